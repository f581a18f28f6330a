"""Model cards (README.md) for the fp16, GPTQ and GGUF repositories.

The text lives in pipeline/templates (string.Template, `$name` fields); this module fills it from
the recipe, the artifacts (quantisation parameters or GGUF types, sizes measured from the files)
and the verify report (perplexities, KL and top-1 against fp16, parity, generation samples, the
runtimes each variant loaded in). Rendering is deterministic: the same inputs give the same bytes.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

from pipeline.core.bounded import read_json
from pipeline.core.chat import chat_format
from pipeline.core.errors import InputError
from pipeline.core.llama import LlamaArgs
from pipeline.methods import METHODS, QUANT_LOG
from pipeline.recipe import Recipe, Variant
from verify.report import NONE, Report, perplexity_cells, perplexity_rows
from verify.runtimes import RAGGED_REFUSED_BY, RUNTIME_WINDOWS, RUNTIMES
from verify.thresholds import PPL_MATCH

TEMPLATES = Path(__file__).parent / "templates"
PART = re.compile(r"^<!-- part: (\w+) -->\n", re.M)
FRONT_MATTER = re.compile(r"\A---\n.*?\n---\n", re.S)
SIZE_UNITS = ("B", "KB", "MB", "GB", "TB")
EXAMPLE_PROMPT = "Write a function that reverses a string."
ERROR_SHOWN = 120  # characters of a runtime's refusal shown on the card (verify.json has more)


@dataclass(frozen=True)
class Branch:
    """One GPTQ branch as its card row shows it: parameters read from the artifact, size measured."""

    name: str
    artifact: str  # the verify report's name for this artifact
    bits: int
    group_size: int
    desc_act: bool
    damp_percent: float
    dataset: str  # "": no calibration (round-to-nearest)
    seqlen: int | None
    size: int
    description: str
    partial_groups: tuple[str, ...] = ()  # linears with a partial last group (quant_log.json)


def read_branch(recipe: Recipe, variant: Variant, path: Path, size: int) -> Branch:
    """The card row of a GPTQ artifact; InputError when its quantize_config disagrees with the
    recipe's variant (the directory would be published under the wrong branch)."""
    qc = read_json(path / "quantize_config.json")
    log = read_json(path / QUANT_LOG)
    expected = {"bits": variant.bits, "group_size": variant.group_size, "desc_act": variant.act_order,
                "sym": variant.sym}
    for key, want in expected.items():
        if qc.get(key) != want:
            raise InputError(f"{path / 'quantize_config.json'}: {key} = {qc.get(key)!r}, but the recipe's "
                             f"variant {variant.branch!r} has {want!r}; this directory is not that variant")
    calibrated = METHODS[variant.method].calibrated  # RTN reads no calibration text
    try:
        seqlen = int(log["calibration"]["seqlen"]) if calibrated else None
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{path / QUANT_LOG}: no calibration.seqlen") from None
    return Branch(name=variant.branch, artifact=path.name, bits=qc["bits"], group_size=qc["group_size"],
                  desc_act=qc["desc_act"], damp_percent=float(qc.get("damp_percent", variant.damp)),
                  dataset=variant.calibration if calibrated else "", seqlen=seqlen, size=size, description=variant.description,
                  partial_groups=tuple((log.get("partial_groups") or {}).get("linears", ())))


@dataclass(frozen=True)
class ModelFacts:
    """What the fp16 conversion recorded (conversion.json) that the cards state: the infilling ids
    of a model Meta trained to fill in the middle, infilling pieces in the vocabulary of one it did
    not (CodeLlama 70B), and tied embeddings (Llama 3.2 1B/3B)."""

    infill: dict[str, int] | None = None
    untrained_infill: bool = False
    tied: bool = False

    @classmethod
    def of(cls, conversion: dict) -> ModelFacts:
        tok, detected = conversion.get("tokenizer") or {}, conversion.get("detected") or {}
        return cls(tok.get("infill"), tok.get("infill_pieces") is not None,
                   detected.get("tie_word_embeddings") is True)


def gptq_card(recipe: Recipe, branches: list[Branch], report: Report, model_type: str, hub_url: str,
              facts: ModelFacts = ModelFacts()) -> str:
    """README.md of the GPTQ repository: one table row and one perplexity per branch; `facts`:
    what the conversion recorded (the fill-in-the-middle prompt, tied embeddings)."""
    pub, ppl = recipe.publish, report.perplexity
    rows = [[f"[{b.name}]({repo_url(hub_url, pub.gptq_repo)}/tree/{b.name})", str(b.bits),
             "None" if b.group_size == -1 else str(b.group_size), "Yes" if b.desc_act else "No",
             f"{b.damp_percent:g}",
             dataset_label(recipe, b.dataset, hub_url) if b.dataset else "none (round-to-nearest)",
             "—" if b.seqlen is None else str(b.seqlen),
             human_size(b.size), b.description] for b in branches]
    labels = {b.artifact: f"{b.name} ({b.bits}-bit, {group_label(b.group_size)})" for b in branches}
    measured = [("fp16", f"fp16 ({fp16_link(recipe, hub_url)})"),
                *((b.artifact, f"`{b.name}` ({b.bits}-bit, {group_label(b.group_size)})")
                  for b in branches)]
    ppl_rows = perplexity_table(report, measured, {b.artifact: f"`{b.name}` RTN baseline"
                                                   for b in branches})
    has_rtn = any(f"{b.artifact}:rtn" in ppl for b in branches)
    example = next((b.name for b in branches if b.name != "main"), "main")
    meta = metadata(recipe, model_type, pub.gptq_repo, [(labels[k], ppl[k]) for k in labels if k in ppl])
    shown = [("fp16", "fp16"), *((b.artifact, f"`{b.name}`") for b in branches)]
    return render("gptq", recipe, report, hub_url, metadata=meta, branch_rows=table(rows),
                  prompt_notes=prompt_notes(recipe, facts),
                  ppl_rows=table(ppl_rows), rtn_note="\n" + part("rtn_note") if has_rtn else "",
                  generation=generation(report, shown, part("agreement_note")),
                  compatibility=compatibility(report, branches), example_branch=example, local_dir=pub.gptq_repo.split("/")[1])


def fp16_card(recipe: Recipe, files: dict[str, int], report: Report, model_type: str, hub_url: str,
              facts: ModelFacts = ModelFacts()) -> str:
    """README.md of the fp16 repository; `files` maps each file to its measured size, `facts` as
    for gptq_card."""
    pub, ppl = recipe.publish, report.perplexity
    parity = report.metrics("conversion_parity").get("fp16")
    parity_text = (part("parity", creator=recipe.model.creator, max_rel_err=f"{parity['max_rel_err']:.3g}",
                        top1_agreement=f"{parity['top1_agreement']:.4f}")
                   if parity else part("parity_missing"))
    meta = metadata(recipe, model_type, pub.fp16_repo, [("fp16", ppl["fp16"])])
    weights = [f for f in files if f.endswith(".safetensors")]
    return render("fp16", recipe, report, hub_url, metadata=meta, parity=parity_text,
                  prompt_notes=prompt_notes(recipe, facts),
                  generation=generation(report, [("fp16", "fp16")], ""),
                  size=human_size(sum(files.values())), n_weight_files=str(len(weights)), dtype=recipe.convert.dtype,
                  fp16_ppl=f"{ppl['fp16']:.4f}", local_dir=pub.fp16_repo.split("/")[1])


@dataclass(frozen=True)
class GGUFRow:
    """One GGUF file as its card row shows it: type, bits and bits per weight from the type
    catalogue, size measured, whether an importance matrix guided it."""

    name: str  # the file name, also the verify report's name for it
    type: str
    bits: int
    bpw: float  # of the type's main block type
    size: int
    use_case: str
    imatrix: bool  # quantised with the importance matrix


def kv_cache(config: dict) -> tuple[int, int]:
    """(trained context length, bytes of llama.cpp's f16 KV cache per token) from config.json:
    K and V, kv_dim wide, 2 bytes each, in every layer."""
    a = LlamaArgs.from_hf_config(config)
    return a.max_seq_len, 2 * a.n_layers * a.kv_dim * 2


def gguf_card(recipe: Recipe, rows: list[GGUFRow], report: Report, config: dict, hub_url: str,
              imatrix: dict[str, Any] | None = None) -> str:
    """README.md of the GGUF repository: one row per file with its measured size, the RAM it
    needs at the full context (`config`: the fp16 config.json) and its KL against fp16, what
    llama.cpp measured (with each file's type made without the importance matrix beside it), and
    the importance matrix the files were made with (`imatrix`: file, dataset, chunks,
    chunk_size)."""
    from shlex import quote

    pub, ppl, m = recipe.publish, report.perplexity, recipe.model
    context, per_token = kv_cache(config)
    url = repo_url(hub_url, pub.gguf_repo)
    kl = report.metrics("kl_divergence")
    files = [[f"[{r.name}]({url}/blob/main/{r.name})", r.type + (", imatrix" if r.imatrix else ""),
              str(r.bits), f"{r.bpw:g}", human_size(r.size),
              human_size(r.size + context * per_token),
              *((f"{kl[r.name]['kl_mean']:.3g}", f"{kl[r.name]['top1']:.2%}") if r.name in kl
                else (NONE, NONE)), r.use_case] for r in rows]
    measured = [("fp16", f"fp16 ({fp16_link(recipe, hub_url)})"),
                *((r.name, f"`{r.name}`") for r in rows)]
    ppl_rows = perplexity_table(report, measured)
    without = report.metrics("against_no_imatrix")
    for r in rows:  # each imatrix file's baseline, after its row
        if r.name in without:
            b = without[r.name]
            c = perplexity_cells({"artifact": r.name, "bits": None, "group_size": None,
                                  "act_order": None, "ppl": b["ppl_without"],
                                  "ratio": b["ppl_without"] / ppl["fp16"], "ppl_rtn": None,
                                  "ratio_rtn": None, **{k: b[f"{k}_without"]
                                                        for k in ("kl_mean", "kl_p99", "top1")}})
            at = next(i for i, row in enumerate(ppl_rows) if row[0] == f"`{r.name}`")
            ppl_rows.insert(at + 1, [f"`{r.type}` without the importance matrix", c["ppl"],
                                     c["vs_fp16"], c["kl_mean"], c["kl_p99"], c["top1"]])
    note = part("gguf_imatrix", file=imatrix["file"], url=f"{url}/blob/main/{imatrix['file']}",
                dataset=imatrix["dataset"], chunks=str(imatrix["chunks"]),
                chunk_size=str(imatrix["chunk_size"]), activations=imatrix["activations"],
                tokens=f"{imatrix['chunks'] * imatrix['chunk_size']:,}") if imatrix else ""
    parity = report.metrics("gguf_parity")
    parity = next(iter(parity.values()), None)
    example = next((r.name for r in rows if r.type == "Q4_K_M"), rows[0].name)
    fmt = chat_format(m.chat_format)
    chat = fmt.template is not None
    runtime = next((a.get("runtime") for a in report.artifacts.values() if a.get("kind") == "gguf"),
                   None) or "llama-cpp-python"
    meta = metadata(recipe, "llama", pub.gguf_repo, [(r.type, ppl[r.name]) for r in rows if r.name in ppl])
    return render("gguf", recipe, report, hub_url, metadata=meta, file_rows=table(files),
                  imatrix_note="\n\n" + note if note else "",
                  ppl_rows=table(ppl_rows), gguf_repo=pub.gguf_repo, gguf_url=url,
                  runtime=runtime, context=str(context), kv_per_token=human_size(per_token),
                  parity=part("gguf_parity", max_rel_err=f"{parity['max_rel_err']:.3g}",
                              top1_agreement=f"{parity['top1_agreement']:.4f}") if parity else "",
                  chat_note="\n\n" + part("gguf_chat_note", reference=fmt.reference) if chat else "",
                  chat_cli="\n\n" + part("gguf_chat_cli", example_file=example) if chat else "",
                  chat_python="\n" + part("gguf_chat_python") + "\n" if chat else "",
                  example_file=example,
                  prompt_shell=quote(m.prompt_template.replace("{prompt}", EXAMPLE_PROMPT)))


def compatibility(report: Report, branches: list[Branch]) -> str:
    """The compatibility section as measured: each branch in each runtime verify loaded it in
    (verify.json `runtimes`), at which perplexity and ratio to ours; the runtimes not checked,
    with the reason; and for branches with partial last groups, which runtimes refuse them."""
    rows, unchecked = [], {}
    for rt, results in report.runtimes.items():
        label = RUNTIMES[rt].label if rt in RUNTIMES else rt
        for b in (b for b in branches if b.artifact in results):
            r = results[b.artifact]
            if not r["checked"]:
                unchecked[label] = r["reason"].removeprefix("not checked: ")
                continue
            name, branch = f"{label} {r['version'] or ''}".strip(), f"`{b.name}`"
            if r["error"]:
                verdict = "refused, as expected" if r.get("expected_refusal") else "refused"
                rows.append([name, branch, f"{verdict}: {code_span(r['error'][:ERROR_SHOWN])}", "—", "—", "—"])
            else:
                rows.append([name, branch, "yes", f"{r['ppl']:.4f}", f"{r['ratio'] * 100:+.3f}%",
                             "—" if r["top1"] is None else f"{r['top1']:.1%}"])
    windows = min(RUNTIME_WINDOWS, report.eval["windows"])
    text = part("runtimes", windows=str(windows), match=f"{PPL_MATCH:.1%}", rows=table(rows)) \
        if rows else part("no_runtimes")
    if unchecked:
        text += "\n\n" + "; ".join(f"{k}: not checked ({v})" for k, v in unchecked.items()) + "."
    ragged = [b for b in branches if b.partial_groups]
    if ragged:
        text += "\n\n" + part("ragged", branches=", ".join(f"`{b.name}`" for b in ragged),
                              refused_by=", ".join(RAGGED_REFUSED_BY))
    return text


def perplexity_table(report: Report, measured: list[tuple[str, str]],
                     rtn: dict[str, str] | None = None) -> list[list[str]]:
    """The card's perplexity rows, built from verify/report.py's rows and cells: each measured
    (artifact, label) with its perplexity, change against fp16, KL mean / p99 and top-1, then
    its RTN baseline's row (labelled `rtn[artifact]`) when one was measured."""
    rows = {r["artifact"]: r for r in perplexity_rows(report)}
    out = []
    for key, label in measured:
        if key not in rows:
            continue
        c = perplexity_cells(rows[key])
        out.append([label, c["ppl"], c["vs_fp16"], c["kl_mean"], c["kl_p99"], c["top1"]])
        if rtn and key in rtn and rows[key]["ppl_rtn"] is not None:
            out.append([rtn[key], c["ppl_rtn"], c["rtn_vs_fp16"], NONE, NONE, NONE])
    return out


def generation(report: Report, shown: list[tuple[str, str]], note: str) -> str:
    """The generation-samples section: for each prompt the greedy continuation of every artifact
    in `shown` ((report name, label)), as the report's generation checks recorded them."""
    gen = {c.artifact: c.samples for c in report.checks if c.check == "generation"}
    shown = [(name, label) for name, label in shown if name in gen]
    if not shown:
        return ""
    blocks = []
    for i, prompt in enumerate(s["prompt"] for s in gen[shown[0][0]]):
        blocks.append(f"Prompt {code_span(json.dumps(prompt))}:")
        for name, label in shown:
            s = gen[name][i]
            agree = f" (matches fp16 for the first {s['agree']} of {s['compared']} tokens)" if "agree" in s else ""
            blocks.append(f"{label}{agree}:\n\n{code_block(s['text'])}")
    return "\n\n" + part("generation", note=note, samples="\n\n".join(blocks))


def code_span(text: str) -> str:
    """Inline code holding `text` verbatim: delimited by more backticks than it contains in a row."""
    fence = "`" * (max(map(len, re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def code_block(text: str) -> str:
    """A fenced block holding `text` verbatim: the fence is longer than any backtick run in it."""
    fence = "`" * max(3, max(map(len, re.findall(r"`+", text)), default=0) + 1)
    return f"{fence}text\n{text.rstrip(chr(10))}\n{fence}"


def prompt_notes(recipe: Recipe, facts: ModelFacts) -> str:
    """What follows the prompt template: the chat template the tokenizer carries (its format from
    pipeline/core/chat.py, as the template above), the fill-in-the-middle prompt (or why there is
    none) and tied embeddings, where they apply."""
    fmt = chat_format(recipe.model.chat_format)
    notes = [part("chat_template", reference=fmt.reference)] if fmt.template is not None else []
    if facts.infill is not None:
        notes.append(part("infill", **{role: str(i) for role, i in facts.infill.items()}))
    elif facts.untrained_infill:
        notes.append(part("no_infill"))
    if facts.tied:
        notes.append(part("tied"))
    return "".join("\n\n" + n for n in notes)


def metadata(recipe: Recipe, model_type: str, repo: str, ppl: list[tuple[str, float]]) -> str:
    """The YAML front matter; empty fields are left out. GPTQ and GGUF cards name the quantised
    base model and carry their format's tag (and only theirs)."""
    m, pub = recipe.model, recipe.publish
    fmt = {pub.gptq_repo: "gptq", pub.gguf_repo: "gguf"}.get(repo)
    gptq = fmt is not None  # a quantised repository
    metrics = [{"type": "perplexity", "name": f"perplexity, {label}", "value": round(value, 4),
                "verified": False} for label, value in ppl]
    eval_name, eval_type = dataset_id(recipe, recipe.verify.eval)
    meta = {
        "license": m.license,
        "base_model": (m.base_model or pub.fp16_repo or recipe.source.repo or "") if gptq else "",
        "base_model_relation": "quantized" if gptq else "",
        "model_name": m.name,
        "model_creator": m.creator,
        "model_type": model_type,
        "pipeline_tag": "text-generation",
        "library_name": "gguf" if fmt == "gguf" else "transformers",
        "tags": [t for t in dict.fromkeys([*pub.tags, *([fmt] if fmt else [])])
                 if t not in ("gptq", "gguf") or t == fmt],
        "inference": False,
        "quantized_by": pub.quantized_by if gptq else "",
        "prompt_template": m.prompt_template,
        "model-index": [{"name": repo.split("/")[1], "results": [{
            "task": {"type": "text-generation", "name": "Text Generation"},
            "dataset": {"name": eval_name, "type": eval_type},
            "metrics": metrics}]}],
    }
    return to_yaml({k: v for k, v in meta.items() if v not in ("", None, [])})


def render(name: str, recipe: Recipe, report: Report, hub_url: str, **fields: str) -> str:
    """Fill template `name` with the fields both cards share plus `fields`."""
    m, pub, ev = recipe.model, recipe.publish, report.eval
    original = (f"[{m.base_model}]({repo_url(hub_url, m.base_model)})" if m.base_model
                else f"{m.name} (original checkpoint)")
    original_card = ""
    if m.original_card is not None:
        text = FRONT_MATTER.sub("", m.original_card_text, count=1).strip()
        original_card = "\n" + part("original_card", creator=m.creator, model_name=m.name, card=text)
    common = {
        "model_name": m.name, "creator": m.creator, "original": original,
        "repositories": repositories(recipe, hub_url, this=name, original=original),
        "description": m.description.strip(), "prompt_template": m.prompt_template,
        "prompt_template_py": json.dumps(m.prompt_template),
        "fp16_repo": pub.fp16_repo, "fp16_source": fp16_source(recipe, hub_url),
        "gptq_repo": pub.gptq_repo, "gptq_url": repo_url(hub_url, pub.gptq_repo),
        "eval_name": dataset_label(recipe, recipe.verify.eval, hub_url), "eval_windows": str(ev["windows"]),
        "eval_seqlen": str(ev["seqlen"]), "eval_tokens": str(ev["tokens"]),
        "eval_dtype": str(report.dtype), "eval_device": str(report.device),
        "original_card": original_card,
    }
    text = Template((TEMPLATES / f"{name}.md").read_text()).substitute(common | fields)
    return text.rstrip("\n") + "\n"


def fp16_link(recipe: Recipe, hub_url: str) -> str:
    """The unquantised model every artifact was made from, as a link where it has one: the fp16
    repository (a Meta source), the source repository at its revision, or a local model's name."""
    s, pub = recipe.source, recipe.publish
    if pub.fp16_repo:
        return f"[{pub.fp16_repo}]({repo_url(hub_url, pub.fp16_repo)})"
    if s.repo is not None:
        return f"[{s.repo}]({repo_url(hub_url, s.repo)}/tree/{s.revision}) at revision `{s.revision}`"
    return f"{recipe.model.name} (a local Hugging Face model)"


def fp16_source(recipe: Recipe, hub_url: str) -> str:
    """How the GPTQ and GGUF cards name what they were made from."""
    if recipe.source.is_hf:
        return f"the Hugging Face model {fp16_link(recipe, hub_url)}"
    return (f"the fp16 conversion in {fp16_link(recipe, hub_url)} (itself checked against "
            f"{recipe.model.creator}'s original checkpoint)")


def repositories(recipe: Recipe, hub_url: str, this: str, original: str) -> str:
    """The "Repositories available" list every card shows: GPTQ, GGUF (when the recipe has
    [[gguf]] files), fp16 and the original, with "(this repo)" on the card's own."""
    pub, creator = recipe.publish, recipe.model.creator
    repos = [("gptq", pub.gptq_repo, "GPTQ models for GPU inference, with several quantisation "
                                     "parameter options"),
             ("gguf", pub.gguf_repo if recipe.gguf else "", "GGUF models for CPU and GPU inference "
                                                            "with llama.cpp, one file per quantisation type"),
             ("fp16", pub.fp16_repo, f"Unquantised fp16 model in safetensors, converted from "
                                     f"{creator}'s original checkpoint"),
             ("source", recipe.source.repo or "", "The Hugging Face model these were made from "
                                                  f"(revision `{recipe.source.revision}`)")]
    lines = [f"- [{text}]({repo_url(hub_url, repo)})" + (" (this repo)" if kind == this else "")
             for kind, repo, text in repos if repo]
    return "\n".join(lines + [f"- {creator}'s original model: {original}"])


def part(name: str, **fields: str) -> str:
    """A conditional fragment from templates/parts.md, filled."""
    chunks = PART.split((TEMPLATES / "parts.md").read_text())
    parts = dict(zip(chunks[1::2], chunks[2::2], strict=True))
    return Template(parts[name].strip("\n")).substitute(fields)


def to_yaml(value: object, indent: int = 0) -> str:
    """Block-style YAML for card metadata: mappings and lists nested, scalars written as JSON
    (valid YAML, so quoting is never ambiguous)."""
    pad = " " * indent
    if isinstance(value, dict):
        lines = []
        for k, v in value.items():
            if isinstance(v, (dict, list)) and v:
                lines.append(f"{pad}{k}:\n" + to_yaml(v, indent + 2 if isinstance(v, dict) else indent))
            else:
                lines.append(f"{pad}{k}: {json.dumps(v)}\n")
        return "".join(lines)
    if isinstance(value, list):
        lines = []
        for item in value:
            if isinstance(item, (dict, list)) and item:
                lines.append(f"{pad}- " + to_yaml(item, indent + 2)[indent + 2:])
            else:
                lines.append(f"{pad}- {json.dumps(item)}\n")
        return "".join(lines)
    return f"{pad}{json.dumps(value)}\n"


def table(rows: list[list[str]]) -> str:
    """Markdown table rows (the header is in the template); '|' in cells escaped."""
    return "\n".join("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows)


def repo_url(hub_url: str, repo: str) -> str:
    return f"{hub_url.rstrip('/')}/{repo}"


def dataset_id(recipe: Recipe, source: str) -> tuple[str, str]:
    """(name, type) of a text source for model-index: a Hub dataset (hf:DATASET[:CONFIG]:SPLIT:FIELD)
    by id, config and split, or local files as written relative to the recipe."""
    if source.startswith("hf:"):
        dataset, *config, split, _ = source[3:].split(":")
        return f"{dataset} ({', '.join([*config, split])})", dataset
    return local_source(recipe, source), "custom"


def dataset_label(recipe: Recipe, source: str, hub_url: str) -> str:
    """A text source for the card body: a link to the Hub dataset, or the files relative to the recipe."""
    name, kind = dataset_id(recipe, source)
    return f"[{name}]({hub_url.rstrip('/')}/datasets/{kind})" if kind != "custom" else f"`{name}`"


def local_source(recipe: Recipe, source: str) -> str:
    """A local glob or directory as written relative to the recipe (never an absolute path of this machine)."""
    return os.path.relpath(source, recipe.path.parent) if os.path.isabs(source) else source


def group_label(group_size: int) -> str:
    return "no groups" if group_size == -1 else f"{group_size}g"


def human_size(n: int) -> str:
    """Decimal units as the Hub shows them: 3.90 GB."""
    if n < 1000:
        return f"{n} B"
    value, unit = float(n), 0
    while value >= 1000 and unit < len(SIZE_UNITS) - 1:
        value, unit = value / 1000, unit + 1
    return f"{value:.2f} {SIZE_UNITS[unit]}"
