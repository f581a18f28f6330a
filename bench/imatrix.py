"""The importance matrix on a real pretrained model (SmolLM2-135M-Instruct, tests/real_model.py)
or on the demo model: ours (the imatrix stage: the fp16 model's activations on 128 x 256 tokens of
the calibration text), llama.cpp's own llama-imatrix on the same text (the calibration files
joined, 128 chunks of 256 tokens, the same threads), and the one our GPTQ pass writes (`quantize
--imatrix`, the recipe's main variant: the inputs there come from layers already quantised), the
matrix the job uses when a GPTQ variant reads [calibration]. Each guides llama.cpp's quantiser;
each file is then scored by verify inside llama.cpp against fp16 on the held-out text, beside the
same type made without a matrix (verify's own baseline).

    python bench/imatrix.py [--model smollm2|demo] [--types Q4_K_M,Q3_K_M,Q2_K] [--windows 32]
                            [--dir /tmp] [--json]
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

from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402
from demo_model import demo_fp16  # noqa: E402
from real_model import smollm2_fp16  # noqa: E402

NSAMPLES, SEQLEN, EVAL_SEQLEN = 128, 256, 256


@dataclass(frozen=True)
class Model:
    fp16: Callable[[Path], Path]  # the fp16 directory made at the path given
    text: Path  # calib/ and eval/
    recipe: Path  # its first variant: the GPTQ pass's
    prompt: str


MODELS = {"smollm2": Model(smollm2_fp16, ROOT / "recipes/smollm2/text",
                           ROOT / "recipes/smollm2-135m-instruct.toml", "The capital of France is"),
          "demo": Model(demo_fp16, ROOT / "recipes/demo/text", ROOT / "recipes/demo.toml",
                        "def fibonacci(n):")}


def ours(model: Model, fp16: Path, f16: Path, out: Path) -> float:
    from pipeline.imatrix import imatrix

    t0 = time.perf_counter()
    imatrix(fp16, out, calibration=str(model.text / "calib"), nsamples=NSAMPLES, seqlen=SEQLEN,
            device="cpu", force=True)
    return time.perf_counter() - t0


def llama_cpp(model: Model, fp16: Path, f16: Path, out: Path) -> float:
    """llama-imatrix on the calibration files joined (what a user of llama.cpp would feed it)."""
    from pipeline.core.llamacpp_tools import run_tool

    text = out.with_suffix(".txt")
    text.write_text("\n\n".join(p.read_text() for p in sorted((model.text / "calib").iterdir())
                                 if p.is_file()))
    t0 = time.perf_counter()
    run_tool("llama-imatrix", ["-m", f16, "-f", text, "-o", out, "-c", SEQLEN, "--chunks",
                               NSAMPLES, "-t", torch.get_num_threads(), "--no-ppl"],
             lambda line: None, "bench")
    return time.perf_counter() - t0


def gptq_pass(model: Model, fp16: Path, f16: Path, out: Path) -> float:
    """quantize --imatrix with the recipe's main variant: the seconds are the GPTQ run's (the
    matrix comes free with it)."""
    from pipeline.quantize import quantize
    from pipeline.recipe import load_recipe

    main = load_recipe(model.recipe).variants[0]
    t0 = time.perf_counter()
    quantize(fp16, out.with_suffix(".gptq"), main, calibration=str(model.text / "calib"),
             nsamples=NSAMPLES, seqlen=SEQLEN, device="cpu", force=True, imatrix=out)
    return time.perf_counter() - t0


MATRICES = {"ours": ours, "llama.cpp": llama_cpp, "gptq-pass": gptq_pass}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(MODELS), default="smollm2")
    ap.add_argument("--types", default="Q4_K_M,Q3_K_M,Q2_K")
    ap.add_argument("--matrices", default=",".join(MATRICES))
    ap.add_argument("--windows", type=int, default=32, help="held-out windows scored")
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from pipeline.gguf import write_gguf
    from verify.stage import judge

    types, matrices, model = args.types.split(","), args.matrices.split(","), MODELS[args.model]
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        tmp = Path(d)
        fp16 = model.fp16(tmp / "fp16")
        f16 = Path(write_gguf(fp16, tmp / "m.F16.gguf")["output"])
        seconds, files = {}, [f16]
        for m in matrices:
            matrix = tmp / f"{m}.imatrix.gguf"
            seconds[m] = MATRICES[m](model, fp16, f16, matrix)
            print(f"{m}: {seconds[m]:.1f} s", file=sys.stderr)
            files += [Path(write_gguf(fp16, tmp / f"m.{t}.{m}.gguf", type_name=t, f16=f16,
                                      imatrix=matrix)["output"]) for t in types]
        loose = {"tolerance": 100.0, "kl_mean": 100.0, "kl_p99": 1000.0, "top1": 0.0,
                 "imatrix_margin": 100.0}
        report = judge(fp16=fp16, eval_text=str(model.text / "eval"), out=tmp / "verify",
                       seqlen=EVAL_SEQLEN, max_windows=args.windows, prompts=[model.prompt],
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
