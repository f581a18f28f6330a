"""Model cards (README.md) for the fp16 and GPTQ repositories.

The text lives in pipeline/templates (string.Template, `$name` fields); this module fills it from
the recipe, the artifacts (quantisation parameters, sizes measured from the files) and the verify
report (perplexities, parity). Rendering is deterministic: the same inputs give the same bytes.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from string import Template

from pipeline.errors import InputError
from pipeline.recipe import Recipe, Variant

TEMPLATES = Path(__file__).parent / "templates"
PART = re.compile(r"^<!-- part: (\w+) -->\n", re.M)
FRONT_MATTER = re.compile(r"\A---\n.*?\n---\n", re.S)
SIZE_UNITS = ("B", "KB", "MB", "GB", "TB")
EXAMPLE_PROMPT = "Write a function that reverses a string."


@dataclass(frozen=True)
class Branch:
    """One GPTQ branch as its card row shows it: parameters read from the artifact, size measured."""

    name: str
    artifact: str  # the verify report's name for this artifact
    bits: int
    group_size: int
    desc_act: bool
    damp_percent: float
    dataset: str
    seqlen: int
    size: int
    description: str


def read_json(path: Path) -> dict:
    """A JSON object from an artifact file; InputError naming the file otherwise."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: missing (expected in every GPTQ artifact)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: expected a JSON object")
    return value


def read_branch(recipe: Recipe, variant: Variant, path: Path, size: int) -> Branch:
    """The card row of a GPTQ artifact; InputError when its quantize_config disagrees with the
    recipe's variant (the directory would be published under the wrong branch)."""
    qc = read_json(path / "quantize_config.json")
    log = read_json(path / "quant_log.json")
    expected = {"bits": variant.bits, "group_size": variant.group_size, "desc_act": variant.act_order,
                "sym": variant.sym}
    for key, want in expected.items():
        if qc.get(key) != want:
            raise InputError(f"{path / 'quantize_config.json'}: {key} = {qc.get(key)!r}, but the recipe's "
                             f"variant {variant.branch!r} has {want!r}; this directory is not that variant")
    try:
        seqlen = int(log["calibration"]["seqlen"])
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{path / 'quant_log.json'}: no calibration.seqlen") from None
    return Branch(name=variant.branch, artifact=path.name, bits=qc["bits"], group_size=qc["group_size"],
                  desc_act=qc["desc_act"], damp_percent=float(qc.get("damp_percent", variant.damp)),
                  dataset=variant.calibration, seqlen=seqlen, size=size, description=variant.description)


def gptq_card(recipe: Recipe, branches: list[Branch], report: dict, model_type: str, hub_url: str) -> str:
    """README.md of the GPTQ repository: one table row and one perplexity per branch."""
    pub, ppl = recipe.publish, report["perplexity"]
    rows = [[f"[{b.name}]({repo_url(hub_url, pub.gptq_repo)}/tree/{b.name})", str(b.bits),
             "None" if b.group_size == -1 else str(b.group_size), "Yes" if b.desc_act else "No",
             f"{b.damp_percent:g}", dataset_label(recipe, b.dataset, hub_url), str(b.seqlen),
             human_size(b.size), "Yes" if b.bits == 4 else "No", b.description] for b in branches]
    labels = {b.artifact: f"{b.name} ({b.bits}-bit, {group_label(b.group_size)})" for b in branches}
    measured = [("fp16", f"fp16 ([{pub.fp16_repo}]({repo_url(hub_url, pub.fp16_repo)}))")]
    for b in branches:
        measured.append((b.artifact, f"`{b.name}` ({b.bits}-bit, {group_label(b.group_size)})"))
        measured.append((f"{b.artifact}:rtn", f"`{b.name}` RTN baseline"))
    measured = [(key, label) for key, label in measured if key in ppl]
    ppl_rows = [[label, f"{ppl[key]:.4f}", "—" if key == "fp16" else f"{(ppl[key] / ppl['fp16'] - 1) * 100:+.2f}%"]
                for key, label in measured]
    has_rtn = any(key.endswith(":rtn") for key, _ in measured)
    example = next((b.name for b in branches if b.name != "main"), "main")
    meta = metadata(recipe, model_type, pub.gptq_repo, [(labels[k], ppl[k]) for k in labels if k in ppl])
    return render("gptq", recipe, report, hub_url, metadata=meta, branch_rows=table(rows),
                  ppl_rows=table(ppl_rows), rtn_note="\n" + part("rtn_note") if has_rtn else "",
                  example_branch=example, local_dir=pub.gptq_repo.split("/")[1])


def fp16_card(recipe: Recipe, files: dict[str, int], report: dict, model_type: str, hub_url: str) -> str:
    """README.md of the fp16 repository; `files` maps each file to its measured size."""
    pub, ppl = recipe.publish, report["perplexity"]
    parity = next((c["metrics"] for c in report["checks"]
                   if c["check"] == "conversion_parity" and c.get("artifact") == "fp16"), None)
    parity_text = (part("parity", creator=recipe.model.creator, max_rel_err=f"{parity['max_rel_err']:.3g}",
                        top1_agreement=f"{parity['top1_agreement']:.4f}")
                   if parity else part("parity_missing"))
    meta = metadata(recipe, model_type, pub.fp16_repo, [("fp16", ppl["fp16"])])
    weights = [f for f in files if f.endswith(".safetensors")]
    return render("fp16", recipe, report, hub_url, metadata=meta, parity=parity_text,
                  size=human_size(sum(files.values())), n_weight_files=str(len(weights)), dtype=recipe.convert.dtype,
                  fp16_ppl=f"{ppl['fp16']:.4f}", local_dir=pub.fp16_repo.split("/")[1])


def metadata(recipe: Recipe, model_type: str, repo: str, ppl: list[tuple[str, float]]) -> str:
    """The YAML front matter; empty fields are left out. GPTQ cards name the quantised base model."""
    m, pub = recipe.model, recipe.publish
    gptq = repo == pub.gptq_repo
    metrics = [{"type": "perplexity", "name": f"perplexity, {label}", "value": round(value, 4),
                "verified": False} for label, value in ppl]
    eval_name, eval_type = dataset_id(recipe, recipe.verify.eval)
    meta = {
        "license": m.license,
        "base_model": (m.base_model or pub.fp16_repo) if gptq else "",
        "base_model_relation": "quantized" if gptq else "",
        "model_name": m.name,
        "model_creator": m.creator,
        "model_type": model_type,
        "pipeline_tag": "text-generation",
        "library_name": "transformers",
        "tags": [t for t in dict.fromkeys([*pub.tags, "gptq"]) if gptq or t != "gptq"],
        "inference": False,
        "quantized_by": pub.quantized_by if gptq else "",
        "prompt_template": m.prompt_template,
        "model-index": [{"name": repo.split("/")[1], "results": [{
            "task": {"type": "text-generation", "name": "Text Generation"},
            "dataset": {"name": eval_name, "type": eval_type},
            "metrics": metrics}]}],
    }
    return to_yaml({k: v for k, v in meta.items() if v not in ("", None, [])})


def render(name: str, recipe: Recipe, report: dict, hub_url: str, **fields: str) -> str:
    """Fill template `name` with the fields both cards share plus `fields`."""
    m, pub, ev = recipe.model, recipe.publish, report["eval"]
    original = (f"[{m.base_model}]({repo_url(hub_url, m.base_model)})" if m.base_model
                else f"{m.name} (original checkpoint)")
    original_card = ""
    if m.original_card is not None:
        text = FRONT_MATTER.sub("", m.original_card.read_text(), count=1).strip()
        original_card = "\n" + part("original_card", creator=m.creator, model_name=m.name, card=text)
    common = {
        "model_name": m.name, "creator": m.creator, "original": original,
        "description": m.description.strip(), "prompt_template": m.prompt_template,
        "prompt_template_py": json.dumps(m.prompt_template),
        "fp16_repo": pub.fp16_repo, "fp16_url": repo_url(hub_url, pub.fp16_repo),
        "gptq_repo": pub.gptq_repo, "gptq_url": repo_url(hub_url, pub.gptq_repo),
        "eval_name": dataset_label(recipe, recipe.verify.eval, hub_url), "eval_windows": str(ev["windows"]),
        "eval_seqlen": str(ev["seqlen"]), "eval_tokens": str(ev["tokens"]),
        "eval_dtype": str(report["dtype"]), "eval_device": str(report["device"]),
        "original_card": original_card,
    }
    text = Template((TEMPLATES / f"{name}.md").read_text()).substitute(common | fields)
    return text.rstrip("\n") + "\n"


def part(name: str, **fields: str) -> str:
    """A conditional fragment from templates/parts.md, filled."""
    chunks = PART.split((TEMPLATES / "parts.md").read_text())
    parts = dict(zip(chunks[1::2], chunks[2::2]))
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
