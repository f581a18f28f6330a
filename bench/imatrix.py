"""The importance matrix on a real pretrained model (SmolLM2-135M-Instruct, tests/real_model.py):
ours (the imatrix stage: the fp16 model's activations on 128 x 256 tokens of
recipes/smollm2/text/calib), llama.cpp's own llama-imatrix on the same text (the calibration files
joined, 128 chunks of 256 tokens, the same threads), and the diagonal of our GPTQ pass's Hessians
(a 4-bit GPTQ run on the same windows: the inputs there come from layers already quantised) as the
issue's alternative. Each guides llama.cpp's quantiser; each file is then scored by verify inside
llama.cpp against fp16 on the held-out text (recipes/smollm2/text/eval), beside the same type made
without a matrix (verify's own baseline).

    python bench/imatrix.py [--types Q4_K_M,Q3_K_M,Q2_K] [--windows 32] [--dir /tmp] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# not this folder first (bench/gguf.py would shadow the gguf library transformers imports)
sys.path[:] = [str(ROOT), str(ROOT / "tests")] + [p for p in sys.path[1:]]

import gguf  # noqa: E402
import torch  # noqa: E402
from real_model import smollm2_fp16  # noqa: E402

CALIB, EVAL = ROOT / "recipes/smollm2/text/calib", ROOT / "recipes/smollm2/text/eval"
NSAMPLES, SEQLEN, EVAL_SEQLEN = 128, 256, 256


def ours(fp16: Path, f16: Path, out: Path) -> float:
    from pipeline.imatrix import imatrix

    t0 = time.perf_counter()
    imatrix(fp16, out, calibration=str(CALIB), nsamples=NSAMPLES, seqlen=SEQLEN, device="cpu",
            force=True)
    return time.perf_counter() - t0


def llama_cpp(fp16: Path, f16: Path, out: Path) -> float:
    """llama-imatrix on the calibration files joined (what a user of llama.cpp would feed it)."""
    from pipeline.core.llamacpp_tools import run_tool

    text = out.with_suffix(".txt")
    text.write_text("\n\n".join(p.read_text() for p in sorted(CALIB.iterdir()) if p.is_file()))
    t0 = time.perf_counter()
    run_tool("llama-imatrix", ["-m", f16, "-f", text, "-o", out, "-c", SEQLEN, "--chunks",
                               NSAMPLES, "-t", torch.get_num_threads(), "--no-ppl"],
             lambda line: None, "bench")
    return time.perf_counter() - t0


def gptq_pass(fp16: Path, f16: Path, out: Path) -> float:
    """Σx² = diag(H)·n/2 of each linear group's Hessian in a 4-bit GPTQ run: the seconds are the
    GPTQ run's (the matrix would come free with it)."""
    from pipeline import quantize as q
    from pipeline.core.imatrix_format import write_imatrix
    from pipeline.core.llama import LINEAR_GROUPS
    from pipeline.methods import QuantSpec

    diag, rows, original = {}, NSAMPLES * SEQLEN, q.hessian

    def hessian(inputs, parts, where):
        H = original(inputs, parts, where)
        layer, group = where.split(".")[2], where.rsplit(".", 2)[-2:]
        names = next(g for g in LINEAR_GROUPS if ".".join(group) == g[0])
        for n in names:
            Σx2 = H.diagonal().double() * rows / 2  # H = 2/n Σ x xᵀ
            diag[f"model.layers.{layer}.{n}.weight"] = Σx2.cpu().numpy()
        return H

    q.hessian = hessian
    try:
        t0 = time.perf_counter()
        q.quantize(fp16, out.with_suffix(".gptq"), QuantSpec(4, 128, True), calibration=str(CALIB),
                   nsamples=NSAMPLES, seqlen=SEQLEN, device="cpu", force=True)
        seconds = time.perf_counter() - t0
    finally:
        q.hessian = original
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 64)
    write_imatrix(out, {names.get_name(k, try_suffixes=(".weight",)): v for k, v in diag.items()},
                  rows, NSAMPLES, SEQLEN, "calib (GPTQ pass)")
    return seconds


MATRICES = {"ours": ours, "llama.cpp": llama_cpp, "gptq-pass": gptq_pass}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default="Q4_K_M,Q3_K_M,Q2_K")
    ap.add_argument("--matrices", default=",".join(MATRICES))
    ap.add_argument("--windows", type=int, default=32, help="held-out windows scored")
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from pipeline.gguf import write_gguf
    from verify.stage import judge

    types, matrices = args.types.split(","), args.matrices.split(",")
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        tmp = Path(d)
        fp16 = smollm2_fp16(tmp / "fp16")
        f16 = Path(write_gguf(fp16, tmp / "m.F16.gguf")["output"])
        seconds, files = {}, [f16]
        for m in matrices:
            matrix = tmp / f"{m}.imatrix.gguf"
            seconds[m] = MATRICES[m](fp16, f16, matrix)
            print(f"{m}: {seconds[m]:.1f} s", file=sys.stderr)
            files += [Path(write_gguf(fp16, tmp / f"m.{t}.{m}.gguf", type_name=t, f16=f16,
                                      imatrix=matrix)["output"]) for t in types]
        loose = {"tolerance": 100.0, "kl_mean": 100.0, "kl_p99": 1000.0, "top1": 0.0,
                 "imatrix_margin": 100.0}
        report = judge(fp16=fp16, eval_text=str(EVAL), out=tmp / "verify", seqlen=EVAL_SEQLEN,
                       max_windows=args.windows, prompts=["The capital of France is"],
                       device="cpu", ggufs=files,
                       gguf_thresholds={t: loose for t in types}, force=True)
    gate = report.metrics("against_no_imatrix")
    kinds = ("kl_mean", "kl_p99", "top1")
    rows = [{"type": t, "matrix": "none",
             **{k: gate[f"m.{t}.{matrices[0]}.gguf"][f"{k}_without"] for k in kinds}} for t in types]
    rows += [{"type": t, "matrix": m, **{k: gate[f"m.{t}.{m}.gguf"][k] for k in kinds}}
             for t in types for m in matrices]
    rows.sort(key=lambda r: types.index(r["type"]))
    print(f"{report.eval['windows']} windows of {EVAL_SEQLEN} tokens; matrix seconds: "
          + ", ".join(f"{m} {s:.1f}" for m, s in seconds.items()), file=sys.stderr)
    print(f"{'type':8} {'matrix':10} {'KL mean':>8} {'KL p99':>8} {'top-1':>7}", file=sys.stderr)
    for r in rows:
        print(f"{r['type']:8} {r['matrix']:10} {r['kl_mean']:8.4f} {r['kl_p99']:8.3f} "
              f"{r['top1']:7.1%}", file=sys.stderr)
    if args.json:
        print(json.dumps({"seconds": seconds, "rows": rows}))


if __name__ == "__main__":
    main()
