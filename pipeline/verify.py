"""The verify stage: full forward passes that prove each artifact (conversion parity against Meta's
shards, perplexity parity of every GPTQ variant, greedy generation, file hashes) before publish."""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import click
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pipeline import __version__
from pipeline.calibration import file_documents, hf_documents, local_files
from pipeline.errors import CheckFailed, InputError
from pipeline.output import check_target, staged_dir
from pipeline.gptq import QuantSpec, rtn
from verify.forward import LayerwiseModel, WeightFn
from verify.llama import compute_dtype, pick_device
from verify.meta_reference import meta_logits
from verify.metrics import (PARITY_THRESHOLDS, degenerate, eval_tokens, logits_parity,
                            parity_passed, perplexity, windows)
from verify.report import SCHEMA, artifact_entry, write_report

DEFAULT_TOLERANCES = {8: 0.01, 4: 0.05, 3: 0.15}  # allowed ppl_variant / ppl_fp16 − 1, by bits
DEFAULT_PROMPTS = ["def fibonacci(n):", "The capital of France is"]
PARITY_WINDOWS, PARITY_SEQLEN = 4, 256  # conversion parity: 4 × 256 tokens of the eval text
MAX_NEW_TOKENS = 32
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


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


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The directory's tokenizer through AutoTokenizer (as users will load it)."""
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise InputError(f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        raise InputError(f"{path}: tokenizer cannot be loaded ({e})") from e


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
    spec = QuantSpec(bits=int(quantization["bits"]), group_size=int(quantization["group_size"]),
                     act_order=False, sym=bool(quantization.get("sym", True)), method="rtn")
    return lambda name, W: rtn(W, spec).Q


def open_models(fp16: Path, quants: list[Path], tolerances: dict[int, float],
                device: torch.device, dtype: torch.dtype
                ) -> tuple[LayerwiseModel, dict[str, LayerwiseModel]]:
    """Open and cross-check the fp16 model and its variants (names, configs, tolerances)."""
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
        if m.bits not in tolerances:
            raise InputError(f"{q}: no perplexity tolerance for {m.bits}-bit; pass "
                             f"--tolerance {m.bits}=FRACTION")
        variants[m.name] = m
    return base, variants


def conversion_parity(model: LayerwiseModel, h: torch.Tensor, meta: Path,
                      tokens: torch.Tensor) -> dict:
    """Our logits (from hidden states h of tokens) against Meta's reference forward on the
    original shards."""
    ours = model.logits(h)
    ref = meta_logits(meta, tokens, device=model.device, dtype=model.dtype).float().cpu()
    thresholds = PARITY_THRESHOLDS[model.dtype]
    check = {"check": "conversion_parity", "artifact": "fp16"}
    if ours.shape != ref.shape:  # e.g. a vocabulary cut or padded by the conversion
        return {**check, "passed": False, "reason": f"logits {tuple(ours.shape)}, Meta's "
                f"{tuple(ref.shape)}", "metrics": {"max_rel_err": math.inf, "top1_agreement": 0.0},
                "thresholds": thresholds}
    metrics = logits_parity(ours, ref)
    return {**check, "passed": parity_passed(metrics, thresholds), "metrics": metrics,
            "thresholds": thresholds}


def generation_check(model: LayerwiseModel, tokenizer: PreTrainedTokenizerBase,
                     prompts: list[str], name: str) -> dict:
    """Greedy samples of each prompt; fails when any is degenerate (empty, `!!!!`)."""
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    outs = model.greedy(ids, MAX_NEW_TOKENS, tokenizer.eos_token_id)
    samples = []
    for prompt, out in zip(prompts, outs):
        text = tokenizer.decode(out, skip_special_tokens=True)
        samples.append({"prompt": prompt, "text": text, "degenerate": degenerate(out, text)})
    return {"check": "generation", "artifact": name,
            "passed": not any(s["degenerate"] for s in samples), "samples": samples}


def perplexity_check(name: str, ppl: float, ppl_fp16: float, tolerance: float) -> dict:
    """Pass when ppl is finite and ppl ≤ ppl_fp16 · (1 + tolerance)."""
    ratio = ppl / ppl_fp16
    return {"check": "perplexity", "artifact": name,
            "passed": math.isfinite(ppl) and ratio <= 1 + tolerance,
            "metrics": {"ppl": ppl, "ppl_fp16": ppl_fp16, "ratio": ratio},
            "thresholds": {"tolerance": tolerance}}


def verify(*, fp16: Path, quants: list[Path] = [], meta: Path | None = None, eval_text: str,
           out: Path, seqlen: int = 2048, max_windows: int | None = None,
           tolerances: dict[int, float] | None = None, baseline_rtn: bool = False,
           prompts: list[str] | None = None, device: str = "auto", force: bool = False) -> dict:
    """Run every check; write out/verify.json and out/verify.txt; return the report (the CLI
    exits 3 when report["passed"] is false)."""
    out, fp16, quants = Path(out), Path(fp16), [Path(q) for q in quants]
    check_target(out, force)
    if seqlen < 2:
        raise InputError(f"--seqlen {seqlen}: must be at least 2")
    if meta is not None and not Path(meta).is_dir():
        raise InputError(f"{meta}: Meta checkpoint directory missing")
    tolerances = {**DEFAULT_TOLERANCES, **(tolerances or {})}
    prompts = list(prompts or DEFAULT_PROMPTS)
    dev = pick_device(device)
    dtype = compute_dtype(dev)
    base, variants = open_models(fp16, quants, tolerances, dev, dtype)
    if seqlen > base.args.max_seq_len:
        raise InputError(f"--seqlen {seqlen}: longer than {fp16}'s context "
                         f"(max_position_embeddings {base.args.max_seq_len})")

    files, texts = eval_documents(eval_text)
    tokenizer = load_tokenizer(fp16)
    sample = "\n\n".join(texts)[:20000] + "\n".join(prompts)
    for m in variants.values():
        check_same_tokenizer(tokenizer, load_tokenizer(m.ckpt.path), m.ckpt.path, fp16, sample)
    stream = eval_tokens(tokenizer, texts)
    win = windows(stream, seqlen, max_windows, source=eval_text)  # [N, seqlen]
    parity = windows(stream, min(seqlen, PARITY_SEQLEN), PARITY_WINDOWS, source=eval_text)

    artifacts = {"fp16": artifact_entry(fp16, None, progress=True)}
    artifacts.update({n: artifact_entry(m.ckpt.path, m.ckpt.quantization, progress=True)
                      for n, m in variants.items()})
    checks: list[dict] = []
    ppl: dict[str, float] = {}
    seconds = 0.0

    def eval_pass(model: LayerwiseModel, name: str, extra: list[torch.Tensor] = ()) -> list:
        nonlocal seconds
        t0 = time.perf_counter()
        h, *rest = model.hidden([win, *extra], desc=f"{name} layers")
        ppl[name] = perplexity(model.nll(h, win), seqlen)
        seconds += time.perf_counter() - t0
        return rest

    rest = eval_pass(base, "fp16", [parity] if meta is not None else [])
    if meta is not None:
        checks.append(conversion_parity(base, rest[0], Path(meta), parity))
    checks.append(perplexity_check("fp16", ppl["fp16"], ppl["fp16"], 0.0))
    checks.append(generation_check(base, tokenizer, prompts, "fp16"))
    del base

    rtn_ppl: dict[tuple, float] = {}
    n_artifacts = 1 + len(variants)
    for name in list(variants):
        m = variants.pop(name)  # released (with any layers it kept) after its checks
        eval_pass(m, name)
        tol = tolerances[m.bits]
        checks.append(perplexity_check(name, ppl[name], ppl["fp16"], tol))
        checks.append(generation_check(m, tokenizer, prompts, name))
        if baseline_rtn:
            q = m.ckpt.quantization
            key = (q["bits"], q["group_size"], q.get("sym", True))
            if key not in rtn_ppl:
                baseline = LayerwiseModel(fp16, dev, dtype, resident=False,
                                          weight_fn=rtn_weight_fn(q))
                (h,) = baseline.hidden([win], desc=f"{name}:rtn layers")
                rtn_ppl[key] = perplexity(baseline.nll(h, win), seqlen)
            ppl[f"{name}:rtn"] = rtn_ppl[key]

    report = {
        "schema": SCHEMA, "tool_version": __version__,
        "passed": all(c["passed"] for c in checks),
        "device": str(dev), "dtype": str(dtype).removeprefix("torch."),
        "eval": {"source": eval_text, "files": [str(f) for f in files],
                 "sha256": hashlib.sha256("\n\n".join(texts).encode()).hexdigest(),
                 "seqlen": seqlen, "windows": win.shape[0], "tokens": win.numel()},
        "artifacts": artifacts, "checks": checks, "perplexity": ppl,
        "tokens_per_second": win.numel() * n_artifacts / max(seconds, 1e-9),
    }
    with staged_dir(out, force) as tmp:
        write_report(report, tmp)
    return report


def failed_checks(report: dict) -> list[str]:
    return [f"{c['check']}:{c['artifact']}" for c in report["checks"] if not c["passed"]]


def summary(report: dict, out: Path) -> str:
    parts = [f"{n} ppl {p:.4g}" for n, p in report["perplexity"].items()]
    status = "PASSED" if report["passed"] else f"FAILED ({', '.join(failed_checks(report))})"
    return (f"verify {status}: {'; '.join(parts)}; {report['tokens_per_second']:.0f} tokens/s "
            f"-> {out / 'verify.json'}")


def parse_tolerance(ctx, param, values: tuple[str, ...]) -> dict[int, float]:
    result = {}
    for v in values:
        bits, _, frac = v.partition("=")
        try:
            result[int(bits)] = float(frac)
        except ValueError:
            raise click.BadParameter(f"{v!r}: expected BITS=FRACTION, e.g. 4=0.05") from None
        if result[int(bits)] < 0:
            raise click.BadParameter(f"{v!r}: the tolerance must not be negative")
    return result


@click.command("verify")
@click.option("--meta", type=click.Path(path_type=Path), default=None,
              help="Meta checkpoint directory (consolidated.*.pth): enables conversion parity.")
@click.option("--fp16", type=click.Path(path_type=Path), required=True,
              help="Converted HF directory.")
@click.option("--quant", "quants", type=click.Path(path_type=Path), multiple=True,
              help="GPTQ variant directory (repeatable).")
@click.option("--eval", "eval_text", required=True,
              help="Evaluation text: glob, directory or file.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Report directory (verify.json, verify.txt).")
@click.option("--seqlen", default=2048, show_default=True, help="Perplexity window length.")
@click.option("--max-windows", type=int, default=None, help="Use at most this many windows.")
@click.option("--tolerance", "tolerances", multiple=True, callback=parse_tolerance,
              help="BITS=FRACTION allowed perplexity increase (default 8=0.01 4=0.05 3=0.15).")
@click.option("--baseline", type=click.Choice(["rtn"]), default=None,
              help="Also report round-to-nearest perplexity at each variant's bits.")
@click.option("--prompt", "prompts", multiple=True, help="Generation-check prompt (repeatable).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--force", is_flag=True, help="Replace an existing report directory.")
def command(meta, fp16, quants, eval_text, out, seqlen, max_windows, tolerances, baseline,
            prompts, device, as_json, force) -> None:
    """Prove fp16 and GPTQ artifacts by forward passes; exit 3 when any check fails."""
    report = verify(fp16=fp16, quants=list(quants), meta=meta, eval_text=eval_text, out=out,
                    seqlen=seqlen, max_windows=max_windows, tolerances=tolerances,
                    baseline_rtn=baseline == "rtn", prompts=list(prompts) or None, device=device,
                    force=force)
    if as_json:
        click.echo(json.dumps(report))
    click.echo(summary(report, out), err=as_json)
    if not report["passed"]:
        raise CheckFailed(f"verification failed ({', '.join(failed_checks(report))}); "
                          f"see {out / 'verify.txt'}")
