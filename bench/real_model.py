"""Quality and time on a real pretrained model (SmolLM2-135M-Instruct, tests/real_model.py): ours,
GPTQModel and round-to-nearest on the same grids, the same calibration (128 x 256 tokens of
recipes/smollm2/text/calib) and the same CPU threads; each artifact then scored by verify against
fp16 on the held-out text (recipes/smollm2/text/eval): perplexity rise, mean KL, top-1.

    python bench/real_model.py [--grids 4:128,3:128,2:64] [--dir /tmp] [--json]
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

import torch  # noqa: E402
from real_model import smollm2_fp16  # noqa: E402

from bench import peer  # noqa: E402

CALIB, EVAL = ROOT / "recipes/smollm2/text/calib", ROOT / "recipes/smollm2/text/eval"
NSAMPLES, SEQLEN, EVAL_SEQLEN = 128, 256, 256


def ours(model: Path, out: Path, bits: int, group: int, act_order: bool) -> float:
    """Our quantize stage with its defaults at this grid; seconds."""
    from pipeline.methods import QuantSpec
    from pipeline.quantize import quantize

    t0 = time.perf_counter()
    quantize(model, out, QuantSpec(bits, group, act_order), calibration=str(CALIB),
             nsamples=NSAMPLES, seqlen=SEQLEN, device="cpu", force=True)
    return time.perf_counter() - t0


def rtn(model: Path, out: Path, bits: int, group: int, act_order: bool) -> float:
    from pipeline.methods import QuantSpec
    from pipeline.quantize import quantize

    t0 = time.perf_counter()
    quantize(model, out, QuantSpec(bits, group, mse=False, method="rtn"), device="cpu", force=True)
    return time.perf_counter() - t0


def gptqmodel(model: Path, out: Path, bits: int, group: int, act_order: bool) -> float:
    return peer.gptqmodel(model, out, bits, group, act_order, str(CALIB), NSAMPLES, SEQLEN,
                          torch.get_num_threads())


TOOLS = {"ours": ours, "GPTQModel": gptqmodel, "RTN": rtn}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grids", default="4:128,3:128,2:64", help="BITS:GROUP,… (act-order on)")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from verify.report import perplexity_rows
    from verify.stage import judge

    grids = [tuple(map(int, g.split(":"))) for g in args.grids.split(",")]
    tools = args.tools.split(",")
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        tmp = Path(d)
        model = smollm2_fp16(tmp / "fp16")
        seconds, dirs = {}, []
        for bits, group in grids:
            for tool in tools:
                out = tmp / f"{tool}-{bits}b-g{group}"
                seconds[out.name] = TOOLS[tool](model, out, bits, group, True)
                dirs.append(out)
                print(f"{out.name}: {seconds[out.name]:.1f} s", file=sys.stderr)
        report = judge(fp16=model, quants=dirs, eval_text=str(EVAL), out=tmp / "verify",
                       seqlen=EVAL_SEQLEN, prompts=["The capital of France is"], force=True)
    rows = {r["artifact"]: r for r in perplexity_rows(report)}
    table = [{"artifact": n, "ppl": rows[n]["ppl"], "ppl_rise": rows[n]["ratio"] - 1,
              "kl_mean": rows[n]["kl_mean"], "top1": rows[n]["top1"], "seconds": s}
             for n, s in seconds.items()]
    print(f"fp16 perplexity {rows['fp16']['ppl']:.4f} ({report.eval['windows']} windows of "
          f"{EVAL_SEQLEN})", file=sys.stderr)
    print(f"{'artifact':22} {'ppl':>9} {'rise':>9} {'KL':>7} {'top-1':>7} {'seconds':>8}", file=sys.stderr)
    for r in table:
        print(f"{r['artifact']:22} {r['ppl']:9.3f} {r['ppl_rise']:+9.1%} {r['kl_mean']:7.3f} "
              f"{r['top1']:7.1%} {r['seconds']:8.1f}", file=sys.stderr)
    if args.json:
        print(json.dumps({"fp16_ppl": rows["fp16"]["ppl"], "rows": table}))


if __name__ == "__main__":
    main()
