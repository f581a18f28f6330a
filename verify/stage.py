"""The verify stage: full forward passes that prove each artifact before publish. fp16 is judged
against Meta's shards (conversion parity); every GPTQ variant against fp16: perplexity, KL
divergence and top-1 agreement on the evaluation windows, greedy generation beside fp16's, and the
weight error of every quantised linear; plus file hashes. Thresholds: verify/thresholds.py.
With --runtime, each variant is also loaded in the runtimes users run it in (verify/runtimes.py).

KL needs fp16's distribution at every evaluation position while each variant runs. Rather than
its log-probs (N·T·V values: 17 GB in float32 for 64×2048 windows of a 32k vocabulary) verify
keeps fp16's last hidden states (N·T·D: 4.3 GB for CodeLlama-34B's D 8192, 2.1 GB in fp16 on CUDA)
in host memory and re-applies fp16's head a few rows at a time beside the variant's."""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from pipeline.core.calibration import MIN_SEQLEN, file_documents, hf_documents, local_files
from pipeline.core.chat import chat_prompt
from pipeline.core.errors import CheckFailed, InputError
from pipeline.core.gguf_types import TYPE_OF_FTYPE, TYPES
from pipeline.core.gptq_layout import ragged
from pipeline.core.grid import rtn
from pipeline.core.imatrix_format import check_imatrix_file, write_uniform
from pipeline.core.llama import compute_dtype, pick_device
from pipeline.core.llamacpp_tools import quantize_file
from pipeline.core.output import check_target, staged_dir
from pipeline.core.paths import PATH
from pipeline.core.tokenizer import load_tokenizer
from pipeline.methods import METHODS, variant_method
from verify import llamacpp
from verify import thresholds as th
from verify.forward import LayerwiseModel, WeightFn
from verify.integrity import OUTPUT_TOKENS, module_errors, rtn_grid
from verify.meta_reference import meta_logits
from verify.metrics import (agreement, degenerate, eval_tokens, kl_summary, logits_parity,
                            perplexity, windows)
from verify.report import (REPORT_NAME, Check, Report, artifact_entry, run_inputs, sha256_file,
                           with_relpaths, write_report)
from verify.runtimes import RUNTIME_WINDOWS, RUNTIMES, run_runtime

DEFAULT_PROMPTS = ["def fibonacci(n):", "The capital of France is"]
PARITY_WINDOWS, PARITY_SEQLEN = 4, 256  # conversion parity: 4 × 256 tokens of the eval text
MAX_NEW_TOKENS = 32
SHOWN_PROBLEMS = 5  # modules named in a module_integrity failure's reason (all are in per_module)


def eval_documents(source: str) -> tuple[list[Path], list[str]]:
    """Files and documents of the evaluation text (a glob, a directory or a file, read as the
    calibration text is: a text file is one document, each .jsonl record one), or the records of
    "hf:DATASET[:CONFIG]:SPLIT:FIELD" in the dataset's order (needs `datasets`)."""
    if source.startswith("hf:"):
        return [], list(hf_documents(source, seed=None))
    try:
        files = local_files(source)
    except InputError as e:
        raise InputError(f"--eval {source!r}: no evaluation text files found") from e
    texts = [doc for f in files for doc in file_documents(f)]
    if not texts:
        raise InputError(f"--eval {source!r}: no text in {len(files)} file(s) (binary files "
                         "are skipped)")
    return files, texts


def check_same_tokenizer(fp16_tok: PreTrainedTokenizerBase, tok: PreTrainedTokenizerBase,
                         path: Path, fp16: Path, sample: str) -> None:
    """A variant must tokenise exactly as the fp16 model: same vocabulary, specials, encodings."""
    diffs = {
        "vocabulary": fp16_tok.get_vocab() != tok.get_vocab(),
        "special tokens": (fp16_tok.bos_token_id, fp16_tok.eos_token_id)
        != (tok.bos_token_id, tok.eos_token_id),
        "encoding of the evaluation text":
            fp16_tok(sample, verbose=False)["input_ids"] != tok(sample, verbose=False)["input_ids"],
    }
    wrong = [k for k, v in diffs.items() if v]
    if wrong:
        raise InputError(f"{path}: tokenizer differs from {fp16}'s ({', '.join(wrong)}); a variant "
                         "must carry its fp16 model's tokenizer files")


def rtn_weight_fn(quantization: dict[str, Any]) -> WeightFn:
    """Round-to-nearest at the variant's bits/group/sym, dequantised (the baseline GPTQ beats)."""
    grid = rtn_grid(quantization)
    return lambda name, W: rtn(W, grid).Q


def open_models(fp16: Path, quants: list[Path], table: th.Table, device: torch.device,
                dtype: torch.dtype) -> tuple[LayerwiseModel, dict[str, LayerwiseModel]]:
    """Open and cross-check the fp16 model and its variants (names, configs, thresholds)."""
    base = LayerwiseModel(fp16, device, dtype)
    if base.bits is not None:
        raise InputError(f"{fp16}: --fp16 is a quantised model (config.json quantization_config)")
    variants: dict[str, LayerwiseModel] = {}
    for q in quants:
        m = LayerwiseModel(q, device, dtype)
        if m.bits is None:
            raise InputError(f"{q}: not a GPTQ model (config.json has no quantization_config)")
        if m.name in variants or m.name == "fp16":
            raise InputError(f"{q}: artifact name {m.name!r} is already taken; variant "
                             "directories must have distinct names other than 'fp16'")
        if m.args != base.args:
            raise InputError(f"{q}: config.json describes a different model than {fp16}")
        variants[m.name] = m
    return base, variants


def conversion_parity(model: LayerwiseModel, h: torch.Tensor, meta: Path,
                      tokens: torch.Tensor) -> Check:
    """Our logits (from hidden states h of tokens) against Meta's reference forward on the
    original shards."""
    ours = model.logits(h)
    ref = meta_logits(meta, tokens, device=model.device, dtype=model.dtype).float().cpu()
    thresholds = th.PARITY[str(model.dtype).removeprefix("torch.")]
    if ours.shape != ref.shape:  # e.g. a vocabulary cut or padded by the conversion
        return Check("conversion_parity", "fp16", False,
                     {"max_rel_err": math.inf, "top1_agreement": 0.0}, thresholds,
                     reason=f"logits {tuple(ours.shape)}, Meta's {tuple(ref.shape)}")
    metrics = logits_parity(ours, ref)
    return Check("conversion_parity", "fp16", th.parity_passed(metrics, thresholds), metrics,
                 thresholds)


def greedy_samples(model: LayerwiseModel, tokenizer: PreTrainedTokenizerBase,
                   prompts: list[str]) -> list[dict]:
    """The greedy continuation of each prompt: its tokens, text and why it is degenerate (None)."""
    outs = model.greedy([tokenizer(p)["input_ids"] for p in prompts], MAX_NEW_TOKENS,
                        tokenizer.eos_token_id)
    samples = []
    for prompt, out in zip(prompts, outs, strict=True):
        text = tokenizer.decode(out, skip_special_tokens=True)
        samples.append({"prompt": prompt, "text": text, "tokens": out,
                        "degenerate": degenerate(out, text)})
    return samples


def generation_check(name: str, samples: list[dict], fp16: list[dict] | None = None,
                     min_agreement: float | None = None) -> Check:
    """fp16's samples (fp16 None): reported, never failing, since fp16 is the reference. A
    variant's samples beside fp16's with their token agreement; the variant fails where a sample
    is degenerate and fp16's is not, or where its mean agreement is below min_agreement."""
    if fp16 is None:
        return Check("generation", name, True,
                     {"degenerate": sum(bool(s["degenerate"]) for s in samples)}, reference=True,
                     samples=samples)
    rows, problems = [], []
    for s, ref in zip(samples, fp16, strict=True):
        agree, compared = agreement(ref["tokens"], s["tokens"])
        rows.append({**s, "text_fp16": ref["text"], "degenerate_fp16": ref["degenerate"],
                     "agree": agree, "compared": compared, "agreement": agree / compared})
        if s["degenerate"] and not ref["degenerate"]:
            problems.append(f"{s['prompt']!r}: {s['degenerate']}, where fp16's is not degenerate")
    mean = sum(r["agreement"] for r in rows) / len(rows)
    if min_agreement is not None and not th.agreement_passed(mean, min_agreement):
        problems.append(f"mean agreement with fp16 {mean:.3f} < {min_agreement:g}")
    limits = {"agreement": min_agreement} if min_agreement is not None else {}
    return Check("generation", name, not problems, {"agreement": mean}, limits,
                 reason="; ".join(problems) or None, samples=rows)


def kl_check(name: str, metrics: dict[str, float], t: dict[str, float | None]) -> Check:
    """Pass when mean and 99th-percentile KL against fp16 are at most, and the same-top-token
    fraction at least, the bit width's thresholds that are set (NaN fails those)."""
    limits = {k: t[k] for k in ("kl_mean", "kl_p99", "top1") if t[k] is not None}
    return Check("kl_divergence", name, th.kl_passed(metrics, limits), metrics, limits)


def integrity_check(name: str, modules: dict[str, dict], factor: float | None,
                    output_factor: float) -> Check:
    """Pass when every quantised linear's output error on evaluation activations is at most
    `output_factor` times RTN's on the same grid, its relative weight error at most `factor`
    times RTN's (when set), and its g_idx is well formed; the failure names the modules."""
    problems = []
    for module, m in modules.items():
        wrong = [f"||W - W_q||/||W|| = {m['error']:.3g} > {factor:g} × RTN's {m['rtn_error']:.3g}"
                 for _ in [0]
                 if factor is not None and not th.module_passed(m["error"], m["rtn_error"], factor)]
        wrong += [f"output error ||(W - W_q)X||/||WX|| = {m['output_error']:.3g} > "
                  f"{output_factor:g} × RTN's {m['rtn_output_error']:.3g}" for _ in [0]
                  if not th.module_passed(m["output_error"], m["rtn_output_error"], output_factor)]
        wrong += [m["g_idx"]] if m["g_idx"] else []
        if wrong:
            problems.append(f"{module}: {', '.join(wrong)}")
    if not modules:
        problems.append("no quantised linears (qweight/qzeros/scales/g_idx) found")

    def ratio(m: dict, key: str = "error") -> float:
        if m[f"rtn_{key}"]:
            return m[key] / m[f"rtn_{key}"]
        return math.inf if m[key] else 0.0

    def worst(key: str) -> str | None:
        return max(modules, key=lambda k: (math.isnan(ratio(modules[k], key)),
                                           ratio(modules[k], key)), default=None)

    metrics: dict[str, Any] = {"modules": len(modules)}
    if modules:
        w, o = worst("error"), worst("output_error")
        metrics.update({"worst_module": w, "error": modules[w]["error"],
                        "rtn_error": modules[w]["rtn_error"], "ratio": ratio(modules[w]),
                        "worst_output_module": o, "output_error": modules[o]["output_error"],
                        "rtn_output_error": modules[o]["rtn_output_error"],
                        "output_ratio": ratio(modules[o], "output_error")})
    more = f"; and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
    keys = ("error", "rtn_error", "output_error", "rtn_output_error")
    return Check("module_integrity", name, not problems, metrics,
                 {"module_output_error": output_factor,
                  **({"module_error": factor} if factor is not None else {})},
                 reason="; ".join(problems[:SHOWN_PROBLEMS]) + more if problems else None,
                 per_module={k: {key: v[key] for key in keys} for k, v in modules.items()})


def perplexity_check(name: str, ppl: float, ppl_fp16: float, tolerance: float | None) -> Check:
    """Pass when ppl is finite and, with a tolerance set, ppl ≤ ppl_fp16 · (1 + tolerance)."""
    ratio = ppl / ppl_fp16
    passed = (th.perplexity_passed(ppl, ppl_fp16, tolerance) if tolerance is not None
              else math.isfinite(ppl))
    return Check("perplexity", name, passed, {"ppl": ppl, "ppl_fp16": ppl_fp16, "ratio": ratio},
                 {"tolerance": tolerance} if tolerance is not None else {})


def rtn_check(name: str, ppl: float, kl_mean: float, rtn: dict[str, float], ppl_fp16: float,
              margin: float) -> Check:
    """Pass when the variant's perplexity and mean KL against fp16 are each at most (1 + margin)
    times those of round-to-nearest on its own grid, measured in the same run (or within
    thresholds.RTN_FLOOR of fp16); the failure says which and by how much."""
    f = th.RTN_FLOOR
    ok_ppl = th.rtn_passed(ppl, rtn["ppl"], margin, f["ppl_rise"], ppl_fp16)
    ok_kl = th.rtn_passed(kl_mean, rtn["kl_mean"], margin, f["kl_mean"])
    problems = ([f"perplexity {ppl:.4g} > (1 + {margin:g}) × RTN's {rtn['ppl']:.4g}"] * (not ok_ppl)
                + [f"mean KL {kl_mean:.4g} > (1 + {margin:g}) × RTN's {rtn['kl_mean']:.4g}"] * (not ok_kl))
    return Check("against_rtn", name, not problems,
                 {"ppl": ppl, "ppl_rtn": rtn["ppl"], "kl_mean": kl_mean,
                  "kl_mean_rtn": rtn["kl_mean"], "top1_rtn": rtn["top1"],
                  "ppl_ratio": ppl / rtn["ppl"],
                  "kl_ratio": kl_mean / rtn["kl_mean"] if rtn["kl_mean"] else math.inf},
                 {"rtn_margin": margin}, reason="; ".join(problems) or None)


def gguf_type(path: Path, overrides: dict[str, dict[str, float]]) -> tuple[str, dict[str, float]]:
    """A GGUF file's type (pipeline/core/gguf_types.py TYPES, read from the file) and its thresholds."""
    ftype = llamacpp.file_type(path)
    if ftype not in TYPE_OF_FTYPE:
        raise InputError(f"{path}: GGUF file type {ftype} is none of {', '.join(TYPES)}")
    kind = TYPE_OF_FTYPE[ftype]
    try:
        return kind, th.gguf_thresholds(kind, overrides.get(kind))
    except ValueError as e:
        raise InputError(f"{path}: {e}") from None


@dataclass
class Context:
    """What every artifact's checks share: the evaluation windows, the thresholds, the prompts,
    fp16's results (perplexity, NLL per window, samples, last hidden states and head) and the RTN
    baselines measured so far, one per grid."""

    win: torch.Tensor  # [N, seqlen]
    table: th.Table
    tokenizer: PreTrainedTokenizerBase
    prompts: list[str]
    device: torch.device
    dtype: torch.dtype
    ppl: dict[str, float] = field(default_factory=dict)
    nll: dict[str, torch.Tensor] = field(default_factory=dict)  # summed NLL per window
    seconds: float = 0.0  # in evaluation forwards, for tokens per second
    fp16_samples: list[dict] = field(default_factory=list)
    h_fp16: torch.Tensor | None = None  # [N, seqlen, dim] on the host: the reference for KL
    ref: LayerwiseModel | None = None  # fp16's head only
    errors: dict[str, dict] = field(default_factory=dict)  # variant -> module -> errors
    rtn: dict[tuple, dict[str, float]] = field(default_factory=dict)
    f16: Path | None = None  # the F16 GGUF file judged in this run: the GGUF baselines' source
    scratch: Path | None = None  # where a GGUF baseline is written while it is scored
    imatrix: Path | None = None  # the importance matrix the GGUF files are said to be made with
    without: dict[str, dict[str, float]] = field(default_factory=dict)  # GGUF type -> baseline

    def eval_pass(self, model: LayerwiseModel, name: str,
                  extra: Sequence[torch.Tensor] = ()) -> list[torch.Tensor]:
        """The model's last hidden states on the windows (and `extra` ones); records its NLL and
        perplexity."""
        t0 = time.perf_counter()
        hs = model.hidden([self.win, *extra], desc=f"{name} layers")
        self.nll[name] = model.nll(hs[0], self.win)
        self.ppl[name] = perplexity(self.nll[name], self.win.shape[1])
        self.seconds += time.perf_counter() - t0
        return hs

    def reference(self, b: int) -> torch.Tensor:
        """fp16's logits on window b."""
        return self.ref.logits(self.h_fp16[b:b + 1].to(self.ref.device))[0]

    def rtn_baseline(self, fp16: Path, quantization: dict[str, Any]) -> dict[str, float]:
        """Round-to-nearest on the variant's grid, scored as the variant is (once per grid)."""
        key = (quantization["bits"], quantization["group_size"], quantization.get("sym", True))
        if key not in self.rtn:
            baseline = LayerwiseModel(fp16, self.device, self.dtype, resident=False,
                                      weight_fn=rtn_weight_fn(quantization))
            (h,) = baseline.hidden([self.win], desc=f"rtn {key[0]}-bit layers")
            self.rtn[key] = {"ppl": perplexity(baseline.nll(h, self.win), self.win.shape[1]),
                             **kl_summary(*baseline.divergence(h, self.ref, self.h_fp16))}
        return self.rtn[key]

    def gguf_scores(self, model_file: Path, inspect: Callable[[llamacpp.GGUFModel], list[str]]
                    = lambda _: []) -> tuple[llamacpp.Scores, list[str]]:
        """One GGUF file loaded in llama.cpp, `inspect`ed (its problems), and scored on the
        windows against fp16's logits."""
        model = llamacpp.GGUFModel(model_file, n_ctx=self.win.shape[1])
        try:
            return llamacpp.score(model, self.win, self.reference), inspect(model)
        finally:
            model.close()

    def without_imatrix(self, kind: str) -> dict[str, float]:
        """GGUF type `kind` quantised from the F16 file without an importance matrix (with a
        uniform one where the type needs one), scored as the file is (once per type)."""
        if kind not in self.without:
            t = TYPES[kind]
            self.scratch.mkdir(parents=True, exist_ok=True)  # the report's folder, made anyway
            with tempfile.TemporaryDirectory(prefix=".verify-baseline.", dir=self.scratch) as d:
                uniform = Path(d) / "uniform.imatrix.gguf" if t.needs_imatrix else None
                if uniform is not None:
                    write_uniform(uniform, self.f16)
                quantize_file(self.f16, Path(d) / f"without.{kind}.gguf", t, os.cpu_count() or 1,
                              uniform)
                s, _ = self.gguf_scores(Path(d) / f"without.{kind}.gguf")
            self.without[kind] = {"ppl": perplexity(s.nll, self.win.shape[1]),
                                  **kl_summary(s.kl, s.same)}
        return self.without[kind]


def judge_fp16(ctx: Context, base: LayerwiseModel, meta: Path | None,
               parity: torch.Tensor) -> list[Check]:
    """fp16 against Meta's shards (conversion parity, when given), its perplexity and its greedy
    samples (the reference every variant's are compared with); keeps its hidden states."""
    h, *rest = ctx.eval_pass(base, "fp16", [parity] if meta is not None else [])
    checks = [conversion_parity(base, rest[0], meta, parity)] if meta is not None else []
    checks.append(perplexity_check("fp16", ctx.ppl["fp16"], ctx.ppl["fp16"], 0.0))
    ctx.fp16_samples = greedy_samples(base, ctx.tokenizer, ctx.prompts)
    checks.append(generation_check("fp16", ctx.fp16_samples))
    ctx.h_fp16 = h.cpu()  # the reference for KL (module docstring), while each variant runs
    ctx.ref = LayerwiseModel(base.ckpt.path, ctx.device, ctx.dtype, resident=False,
                             progress=False)
    return checks


@dataclass
class Variant:
    """A GPTQ-format variant being judged: its name, model, thresholds and KL against fp16."""

    name: str
    model: LayerwiseModel
    t: dict[str, float | None]
    kl: dict[str, float]


# verify's checks of a variant, by name: a method (pipeline/methods METHODS) lists those it takes
VARIANT_CHECKS: dict[str, Callable[[Context, Variant], Check]] = {
    "perplexity": lambda ctx, v: perplexity_check(v.name, ctx.ppl[v.name], ctx.ppl["fp16"],
                                                  v.t["tolerance"]),
    "kl_divergence": lambda ctx, v: kl_check(v.name, v.kl, v.t),
    "generation": lambda ctx, v: generation_check(
        v.name, greedy_samples(v.model, ctx.tokenizer, ctx.prompts), ctx.fp16_samples,
        v.t["agreement"]),
    "module_integrity": lambda ctx, v: integrity_check(v.name, ctx.errors[v.name],
                                                       v.t["module_error"],
                                                       v.t["module_output_error"]),
    "against_rtn": lambda ctx, v: rtn_check(
        v.name, ctx.ppl[v.name], v.kl["kl_mean"],
        ctx.rtn_baseline(ctx.ref.ckpt.path, v.model.ckpt.quantization), ctx.ppl["fp16"],
        v.t["rtn_margin"]),
}


def judge_variant(ctx: Context, name: str, m: LayerwiseModel) -> list[Check]:
    """A variant against fp16 with the checks of the method that made it."""
    (h,) = ctx.eval_pass(m, name)
    v = Variant(name, m, th.for_bits(ctx.table, m.bits),
                kl_summary(*m.divergence(h, ctx.ref, ctx.h_fp16)))
    del h
    return [VARIANT_CHECKS[c](ctx, v) for c in METHODS[variant_method(m.ckpt.path)].checks]


def judge_gguf(ctx: Context, path: Path, sample: str,
               overrides: dict[str, dict[str, float]]) -> tuple[dict, list[Check]]:
    """A GGUF file scored inside llama.cpp (verify/llamacpp.py) against fp16's logits: metadata
    and tokenisation, perplexity and KL/top-1 at its type's thresholds (`overrides`: type -> kind
    -> value), for F16 logits parity to fp16 round-off, and for a file made with an importance
    matrix its gate against its type made without one (and the matrix it records, against
    ctx.imatrix). Returns its artifacts entry and checks; records its perplexity."""
    name, (kind, t) = path.name, gguf_type(path, overrides)
    s, problems = ctx.gguf_scores(path, lambda model: llamacpp.metadata_problems(
        path, ctx.ref.ckpt.path, ctx.tokenizer, model, sample))
    record = llamacpp.imatrix_record(path)
    if record is not None and ctx.imatrix is not None:
        problems += llamacpp.imatrix_problems(record, ctx.imatrix)
    ctx.ppl[name] = perplexity(s.nll, ctx.win.shape[1])
    kl = kl_summary(s.kl, s.same)
    checks = [Check("gguf_metadata", name, not problems, {"problems": len(problems)},
                    reason="; ".join(problems[:SHOWN_PROBLEMS]) or None),
              perplexity_check(name, ctx.ppl[name], ctx.ppl["fp16"], t["tolerance"]),
              kl_check(name, kl, t)]
    if kind == "F16":
        checks.append(Check("gguf_parity", name, th.parity_passed(s.parity, th.GGUF_PARITY),
                            s.parity, th.GGUF_PARITY))
    if record is not None:
        checks.append(imatrix_check(name, kl, ctx.without_imatrix(kind), t["imatrix_margin"]))
    entry = {"path": str(path.resolve()), "kind": "gguf", "type": kind, "bits": TYPES[kind].bits,
             "runtime": f"llama-cpp-python {llamacpp.bindings().__version__}",
             "files": {name: sha256_file(path)}, **({"imatrix": record} if record else {})}
    return entry, checks


def imatrix_check(name: str, kl: dict[str, float], without: dict[str, float],
                  margin: float) -> Check:
    """Pass when a GGUF file made with an importance matrix has a mean KL against fp16 at most
    (1 + margin) times its type's made without one in the same run (or within RTN_FLOOR of
    fp16): a matrix that does not describe the model's activations makes it worse, not better."""
    passed = th.rtn_passed(kl["kl_mean"], without["kl_mean"], margin, th.RTN_FLOOR["kl_mean"])
    return Check("against_no_imatrix", name, passed,
                 {**kl, **{f"{k}_without": v for k, v in without.items()},
                  "kl_ratio": (kl["kl_mean"] / without["kl_mean"] if without["kl_mean"]
                               else math.inf)},
                 {"imatrix_margin": margin},
                 reason=None if passed else (f"mean KL {kl['kl_mean']:.4g} > (1 + {margin:g}) × "
                                             f"{without['kl_mean']:.4g} without the importance "
                                             "matrix"))


def judge_runtimes(ctx: Context, names: list[str], paths: dict[str, Path],
                   ragged_groups: dict[str, bool]) -> tuple[dict, list[Check]]:
    """Each GPTQ variant (name -> directory) loaded in each runtime `names` (verify/runtimes.py)
    and scored on the first RUNTIME_WINDOWS evaluation windows against our dequantised perplexity
    on them and fp16's logits. Returns the runtime -> variant -> result section and a "runtime"
    check per result that ran: one not checkable here is only in the section (with its reason);
    a runtime that `refuses_ragged` refusing a ragged variant is an expected refusal, not a
    failure."""
    sub = ctx.win[:RUNTIME_WINDOWS]
    section: dict[str, dict] = {}
    checks: list[Check] = []
    for rt in names:
        section[rt] = {}
        for name, path in paths.items():
            ours = perplexity(ctx.nll[name][:len(sub)], sub.shape[1])
            r = run_runtime(rt, path, sub, ppl_ours=ours,
                            reference=lambda b: ctx.reference(b)[:-1], device=str(ctx.device))
            r["expected_refusal"] = bool(ragged_groups[name] and RUNTIMES[rt].refuses_ragged
                                         and r["error"])
            section[rt][name] = r
            tqdm.write(f"runtime {rt}: {name}: " + (r["reason"] or r["error"] or
                       f"ppl {r['ppl']:.6g} (ours {ours:.6g}, {r['ratio']:+.2e})"), file=sys.stderr)
            if not r["checked"]:
                continue
            reason = None
            if r["error"]:
                reason = (f"{rt} refuses layers with a partial last group, as expected "
                          f"(RAGGED_REFUSED_BY): " if r["expected_refusal"] else "") + r["error"]
            checks.append(Check("runtime", name, bool(r["passed"]) or r["expected_refusal"],
                                {k: r[k] for k in ("ppl", "ppl_ours", "ratio", "top1", "kl_mean")
                                 if r[k] is not None},
                                {"ppl_match": th.PPL_MATCH}, reason=reason, runtime=rt))
    return section, checks


def judge(*, fp16: Path, quants: Sequence[Path] = (), meta: Path | None = None, eval_text: str,
          out: Path, seqlen: int = 2048, max_windows: int | None = None,
          thresholds: th.Table | None = None, baseline_rtn: bool = False,
          prompts: list[str] | None = None, chat_prompts: list[str] | None = None,
          device: str = "auto", force: bool = False, ggufs: Sequence[Path] = (),
          gguf_thresholds: dict[str, dict[str, float]] | None = None,
          runtimes: Sequence[str] = (), imatrix: Path | None = None) -> Report:
    """Run every check; write out/verify.json and out/verify.txt; return the report (the CLI
    exits 3 when it did not pass). `thresholds` (kind -> bits -> value, kinds of
    verify/thresholds.py) override the defaults bit width by bit width; `gguf_thresholds`
    (type -> kind -> value) those of the GGUF files `ggufs`, scored in llama.cpp; each of
    `runtimes` (verify/runtimes.py RUNTIMES) loads every GPTQ variant (judge_runtimes). A GGUF
    file made with an importance matrix is judged against its type made without one from the F16
    file among `ggufs` (which must be there); `imatrix`, the matrix they were made with, is
    recorded (publish uploads it) and must be what each such file says it was made with."""
    out, fp16, quants = Path(out), Path(fp16), [Path(q) for q in quants]
    ggufs = [Path(g) for g in ggufs]
    imatrix = Path(imatrix) if imatrix is not None else None
    models = [fp16, *quants, *ggufs, *(p for p in (meta, imatrix) if p is not None)]
    check_target(out, force, manifest=REPORT_NAME, inputs=models)
    check_options(seqlen, max_windows, meta, runtimes)
    table = th.merged(thresholds)
    dev = pick_device(device)
    dtype = compute_dtype(dev)
    base, variants = open_models(fp16, quants, table, dev, dtype)
    f16 = check_ggufs(ggufs, ["fp16", *variants], gguf_thresholds or {}, imatrix)
    if seqlen > base.args.max_seq_len:
        raise InputError(f"--seqlen {seqlen}: longer than {fp16}'s context "
                         f"(max_position_embeddings {base.args.max_seq_len})")

    files, texts = eval_documents(eval_text)
    tokenizer = load_tokenizer(fp16)
    prompts = list(prompts or DEFAULT_PROMPTS)
    prompts += [chat_prompt(tokenizer, p) for p in chat_prompts or ()]  # in the chat template
    sample = "\n\n".join(texts)[:20000] + "\n".join(prompts)
    for m in variants.values():
        check_same_tokenizer(tokenizer, load_tokenizer(m.ckpt.path), m.ckpt.path, fp16, sample)
    stream = eval_tokens(tokenizer, texts)
    win = windows(stream, seqlen, max_windows, source=eval_text)  # [N, seqlen]
    parity = windows(stream, min(seqlen, PARITY_SEQLEN), PARITY_WINDOWS, source=eval_text)

    artifacts = {"fp16": artifact_entry(fp16, None, progress=True)}
    artifacts.update({n: artifact_entry(m.ckpt.path, m.ckpt.quantization, progress=True)
                      for n, m in variants.items()})
    if imatrix is not None:
        artifacts[imatrix.name] = {"path": str(imatrix.resolve()), "kind": "imatrix",
                                   "files": {imatrix.name: sha256_file(imatrix)}}
    ctx = Context(win, table, tokenizer, prompts, dev, dtype, f16=f16,
                  scratch=out.resolve().parent, imatrix=imatrix)
    checks = judge_fp16(ctx, base, Path(meta) if meta is not None else None, parity)
    del base
    if variants:
        ctx.errors = module_errors(ctx.ref.ckpt, {n: m.ckpt for n, m in variants.items()}, dev,
                                   win[:1, :OUTPUT_TOKENS])
    n_artifacts = 1 + len(variants)
    paths = {n: m.ckpt.path for n, m in variants.items()}
    ragged_groups = {n: any(ragged(n_in, m.ckpt.quantization["group_size"])
                            for _, n_in in m.args.linear_shapes().values())
                     for n, m in variants.items()}
    for name in list(variants):
        m = variants.pop(name)  # released (with any layers it kept) after its checks
        checks += judge_variant(ctx, name, m)
        if baseline_rtn:
            ctx.ppl[f"{name}:rtn"] = ctx.rtn_baseline(fp16, m.ckpt.quantization)["ppl"]
    section, more = judge_runtimes(ctx, list(runtimes), paths, ragged_groups)
    checks += more
    for g in ggufs:
        artifacts[g.name], more = judge_gguf(ctx, g, sample, gguf_thresholds or {})
        checks += more

    ev = {"source": eval_text, "files": [str(f) for f in files],
          "sha256": hashlib.sha256("\n\n".join(texts).encode()).hexdigest(),
          "seqlen": seqlen, "windows": win.shape[0], "tokens": win.numel()}
    report = Report(passed=all(c.passed for c in checks), device=str(dev),
                    dtype=str(dtype).removeprefix("torch."), eval=ev,
                    artifacts=with_relpaths(artifacts, out), checks=checks, perplexity=ctx.ppl,
                    runtimes=section,
                    tokens_per_second=win.numel() * n_artifacts / max(ctx.seconds, 1e-9),
                    inputs=run_inputs(artifacts, meta, ev["sha256"]))  # what publish matches
    with staged_dir(out, force, manifest=REPORT_NAME, inputs=[*models, *files]) as tmp:
        write_report(report, tmp)
    return report


def check_options(seqlen: int, max_windows: int | None, meta: Path | None,
                  runtimes: Sequence[str]) -> None:
    """The options judge checks before it opens any model."""
    if seqlen < MIN_SEQLEN:
        raise InputError(f"--seqlen {seqlen}: must be at least {MIN_SEQLEN}")
    if max_windows is not None and max_windows < 1:
        raise InputError(f"--max-windows {max_windows}: must be at least 1 (omit it to use every "
                         "window of the evaluation text)")
    if meta is not None and not Path(meta).is_dir():
        raise InputError(f"{meta}: Meta checkpoint directory missing")
    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown:
        raise InputError(f"--runtime {', '.join(unknown)}: unknown (known: {', '.join(RUNTIMES)})")


def check_ggufs(ggufs: list[Path], taken: list[str], overrides: dict[str, dict[str, float]],
                imatrix: Path | None) -> Path | None:
    """Each GGUF file exists, has a name of its own and a known type; one made with an importance
    matrix has the F16 file among them (its baseline's source), and `imatrix` is such a file.
    Returns the F16 file (None when there is none)."""
    files = [*ggufs, *([imatrix] if imatrix is not None else [])]
    for g in files:
        if not g.is_file():
            raise InputError(f"{g}: GGUF file missing")
        if g.name in taken or [x.name for x in files].count(g.name) > 1:
            raise InputError(f"{g}: artifact name {g.name!r} is already taken; GGUF files must "
                             "have distinct names")
    kinds = [gguf_type(g, overrides)[0] for g in ggufs]  # each file's type known before any work
    f16 = next((g for g, kind in zip(ggufs, kinds, strict=True) if kind == "F16"), None)
    made_with = [g for g in ggufs if llamacpp.imatrix_record(g) is not None]
    if made_with and f16 is None:
        raise InputError(f"{made_with[0]}: made with an importance matrix, so it is judged against "
                         "its type made without one from the model's F16 GGUF file: verify that "
                         "too (--gguf FILE.F16.gguf)")
    if imatrix is not None:
        check_imatrix_file(imatrix)
    return f16


def summary(report: Report, out: Path) -> str:
    parts = [f"{n} ppl {p:.4g}" for n, p in report.perplexity.items()]
    status = "PASSED" if report.passed else f"FAILED ({', '.join(report.failed())})"
    return (f"verify {status}: {'; '.join(parts)}; {report.tokens_per_second:.0f} tokens/s "
            f"-> {out / 'verify.json'}")


def parse_thresholds(ctx, param, values: tuple[str, ...]) -> dict[int, float]:
    """--KIND BITS=VALUE options (repeatable) -> bits -> value, checked against the kind's range."""
    result = {}
    for v in values:
        bits, _, value = v.partition("=")
        try:
            result[int(bits)] = float(value)
        except ValueError:
            raise click.BadParameter(f"{v!r}: expected BITS=VALUE, e.g. 4=0.05") from None
        problem = th.invalid(param.name, result[int(bits)])
        if problem:
            raise click.BadParameter(f"{v!r}: {problem}")
    return result


def parse_gguf_thresholds(ctx, param, values: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """--gguf-threshold TYPE.KIND=VALUE options -> type -> kind -> value, each checked."""
    result: dict[str, dict[str, float]] = {}
    for v in values:
        key, _, value = v.partition("=")
        kind_type, _, kind = key.partition(".")
        try:
            number = float(value)
        except ValueError:
            raise click.BadParameter(f"{v!r}: expected TYPE.KIND=VALUE, e.g. "
                                     "Q4_K_M.tolerance=0.1") from None
        if kind_type not in TYPES or kind not in th.GGUF_KINDS:
            raise click.BadParameter(f"{v!r}: TYPE one of {', '.join(TYPES)}, KIND one of "
                                     f"{', '.join(th.GGUF_KINDS)}")
        problem = th.invalid(kind, number)
        if problem:
            raise click.BadParameter(f"{v!r}: {problem}")
        result.setdefault(kind_type, {})[kind] = number
    return result


def threshold_options(f):
    """One repeatable --KIND BITS=VALUE option per threshold kind of verify/thresholds.py."""
    for kind, (what, _, default) in reversed(th.KINDS.items()):
        defaults = " ".join(f"{b}={x:g}" for b, x in default.items())
        f = click.option(th.CLI_OPTION[kind], kind, multiple=True, callback=parse_thresholds,
                         metavar="BITS=VALUE",
                         help=f"{what[0].upper()}{what[1:]}; "
                              + (f"default {defaults}." if default else "none by default.")
                         )(f)
    return f


def given_thresholds(params: dict[str, Any]) -> th.Table:
    """The --KIND BITS=VALUE tables the command line set (kind -> bits -> value)."""
    return {k: v for k, v in params.items() if k in th.KINDS and v}


@click.command("verify")
@click.option("--meta", type=PATH, default=None,
              help="Meta checkpoint directory (consolidated.*.pth): enables conversion parity.")
@click.option("--fp16", type=PATH, required=True,
              help="Converted HF directory.")
@click.option("--quant", "quants", type=PATH, multiple=True,
              help="GPTQ variant directory (repeatable).")
@click.option("--eval", "eval_text", required=True,
              help="Evaluation text: glob, directory or file.")
@click.option("--out", type=PATH, required=True,
              help="Report directory (verify.json, verify.txt).")
@click.option("--seqlen", default=2048, show_default=True, help="Perplexity window length.")
@click.option("--max-windows", type=int, default=None, help="Use at most this many windows.")
@threshold_options
@click.option("--baseline", type=click.Choice(["rtn"]), default=None,
              help="Also report round-to-nearest perplexity at each variant's bits.")
@click.option("--prompt", "prompts", multiple=True, help="Generation-check prompt (repeatable).")
@click.option("--chat-prompt", "chat_prompts", multiple=True,
              help="Generation-check user message, sent through the tokenizer's chat template "
                   "(repeatable).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--gguf", "ggufs", type=PATH, multiple=True,
              help="GGUF file, scored inside llama.cpp (repeatable; needs the gguf extra).")
@click.option("--gguf-threshold", "gguf_thresholds", multiple=True, metavar="TYPE.KIND=VALUE",
              callback=parse_gguf_thresholds,
              help=f"A GGUF type's threshold, e.g. Q4_K_M.tolerance=0.1 (kinds: "
                   f"{', '.join(th.GGUF_KINDS)}; defaults in verify/thresholds.py).")
@click.option("--imatrix", type=PATH, default=None,
              help="The importance matrix the GGUF files were made with: checked against what "
                   "each records, and recorded (publish uploads it).")
@click.option("--runtime", "runtimes", type=click.Choice(list(RUNTIMES)), multiple=True,
              help="Also load every GPTQ variant in this runtime and match its perplexity to "
                   f"ours on the first {RUNTIME_WINDOWS} windows (repeatable; needs the "
                   "runtimes extra; vllm needs CUDA).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--force", is_flag=True, help="Replace an existing report directory.")
def command(meta, fp16, quants, eval_text, out, seqlen, max_windows, baseline, prompts,
            chat_prompts, device, ggufs, gguf_thresholds, imatrix, runtimes, as_json, force,
            **thresholds) -> None:
    """Prove fp16, GPTQ and GGUF artifacts by forward passes; exit 3 when any check fails."""
    report = judge(fp16=fp16, quants=list(quants), meta=meta, eval_text=eval_text, out=out,
                    seqlen=seqlen, max_windows=max_windows,
                    thresholds=given_thresholds(thresholds),
                    baseline_rtn=baseline == "rtn", prompts=list(prompts) or None,
                    chat_prompts=list(chat_prompts), device=device, force=force,
                    ggufs=list(ggufs), gguf_thresholds=gguf_thresholds, runtimes=list(runtimes),
                    imatrix=imatrix)
    if as_json:
        click.echo(json.dumps(report.to_dict()))
    click.echo(summary(report, out), err=as_json)
    if not report.passed:
        raise CheckFailed(f"verification failed ({', '.join(report.failed())}); "
                          f"see {out / 'verify.txt'}")
