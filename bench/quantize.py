"""Quantize benchmark: random-weight Llama directories quantised by `pipeline.quantize.quantize` in
child processes. Reports peak RSS for 2 vs 8 layers of the same width (memory must not grow with
depth), seconds per layer for GPTQ and the RTN baseline, and seconds per layer at width 4096.
With --peer, one layer of real 7B and 34B shapes (4096 wide, FFN 11008; 8192 wide, FFN 22016, 8 KV
heads) quantised by ours and by GPTQModel (bench/peer.py) with the same calibration windows and
threads, at the same grid (both MSE-searched, both min-max) and each at its default, with the
ratio of their seconds.

    python bench/quantize.py [--width 1024] [--wide 4096] [--peer 7b,34b] [--peer-grid all]
                             [--dir /tmp] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from demo_model import CALIBRATION, demo_fp16  # noqa: E402  (the shipped demo model)

from bench import peer  # noqa: E402
from pipeline.core.llama import LAYER_NORMS, LlamaArgs  # noqa: E402
from pipeline.methods import QuantSpec  # noqa: E402
from pipeline.quantize import quantize  # noqa: E402

TOKENIZER_PREFIXES = ("tokenizer", "special_tokens_map", "chat_template")  # files copied over


def demo_tokenizer(out: Path) -> tuple[Path, int]:
    """The demo model's tokenizer files (from its HF conversion) in `out`, and its vocabulary size."""
    fp16 = demo_fp16(out.parent / "demo-fp16")
    out.mkdir(parents=True)
    for f in fp16.iterdir():
        if f.name.startswith(TOKENIZER_PREFIXES):
            (out / f.name).write_bytes(f.read_bytes())
    vocab = json.loads((fp16 / "config.json").read_text())["vocab_size"]
    shutil.rmtree(fp16)
    return out, vocab


# real shapes for --peer: (width, KV heads); FFN ≈ 8/3·width rounded up to 256 gives Llama's
# 11008 and CodeLlama 34B's 22016
PEER_SHAPES = {"7b": (4096, 32), "34b": (8192, 8)}
# --peer-grid: (ours with the MSE search, GPTQModel with it) per comparison
PAIRS = {"mse": (True, True), "min-max": (False, False), "defaults": (True, False)}
PEER_GRIDS = {"all": tuple(PAIRS), **{k: (k,) for k in PAIRS}}


def build(out: Path, width: int, n_layers: int, tokenizer: Path, vocab: int,
          kv_heads: int | None = None) -> Path:
    """A random fp16 Llama (head_dim 128, FFN ≈ 8/3·width rounded to 256) with the tokenizer."""
    ffn = -(-8 * width // 3 // 256) * 256
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": width,
           "intermediate_size": ffn, "num_hidden_layers": n_layers,
           "num_attention_heads": width // 128, "num_key_value_heads": kv_heads or width // 128,
           "vocab_size": vocab, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "max_position_embeddings": 4096, "bos_token_id": 1, "eos_token_id": 2,
           "tie_word_embeddings": False, "torch_dtype": "float16"}
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(cfg))
    for f in tokenizer.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: (torch.randn(*shape, generator=g) * 0.02).half()  # noqa: E731
    state = {"model.embed_tokens.weight": rand(vocab, width), "model.norm.weight": torch.ones(width).half(),
             "lm_head.weight": rand(vocab, width)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        for name, shape in LlamaArgs.from_hf_config(cfg).linear_shapes().items():
            state[f"{p}{name}.weight"] = rand(*shape)
        for norm in LAYER_NORMS:
            state[p + norm] = torch.ones(width).half()
    save_file(state, str(out / "model.safetensors"))
    return out


def worker(args: argparse.Namespace) -> None:
    """One quantize() run; prints seconds and this process's peak RSS as JSON."""
    spec = QuantSpec(args.bits, 128, False, method=args.method)
    t0 = time.perf_counter()
    s = quantize(Path(args.model), Path(args.out), spec, calibration=args.calibration,
                 nsamples=args.nsamples, seqlen=args.seqlen, device=args.device, force=True)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": round(seconds, 2), "seconds_per_layer": round(seconds / s["layers"], 2),
                      "peak_rss_mib": peak_rss_mib()}))


def peak_rss_mib() -> int:
    """VmHWM: the peak RSS of this process image (ru_maxrss would include the parent's peak
    from before fork + exec)."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status["VmHWM"].split()[0]) // 1024


def measure(model: Path, method: str, calibration: str, nsamples: int, seqlen: int, tmp: Path,
            device: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--model", str(model), "--out", str(tmp / "out"),
           "--method", method, "--calibration", calibration, "--nsamples", str(nsamples),
           "--seqlen", str(seqlen), "--device", device]
    # a fixed malloc mmap threshold: freed tensors go back to the OS at once, so peak RSS measures
    # what is live, not glibc's heap fragmentation (which at this small width would add noise)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        sys.exit(f"worker failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=1024, help="width of the 2- vs 8-layer models (0: skip)")
    ap.add_argument("--wide", type=int, default=4096, help="width of the one-layer speed model (0: skip)")
    ap.add_argument("--peer", default="", help="real shapes timed against GPTQModel: 7b,34b")
    ap.add_argument("--peer-grid", choices=list(PEER_GRIDS), default="all",
                    help="both tools with the MSE range search, both with min-max ranges, each "
                         "with its default (ours MSE, GPTQModel min-max), or all three")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--dir", type=Path, default=None, help="scratch directory")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for a in ("--model", "--out", "--calibration"):
        ap.add_argument(a, help=argparse.SUPPRESS)
    ap.add_argument("--method", default="gptq", help=argparse.SUPPRESS)
    ap.add_argument("--bits", type=int, default=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        tmp = Path(d)
        tok, vocab = demo_tokenizer(tmp / "tok")
        runs = [(f"{n}x{args.width}", args.width, n, args.nsamples, args.seqlen)
                for n in (2, 8) if args.width]
        if args.wide:
            runs.append((f"1x{args.wide}", args.wide, 1, 4, args.seqlen))
        for name, width, layers, nsamples, seqlen in runs:
            model = build(tmp / name, width, layers, tok, vocab)
            for method in ("gptq", "rtn"):
                r = measure(model, method, CALIBRATION, nsamples, seqlen, tmp, args.device)
                results[f"{name} {method}"] = {"layers": layers, "width": width, "nsamples": nsamples,
                                               "seqlen": seqlen, **r}
                print(f"{name:>8} {method:4}: {r['seconds_per_layer']:7.2f} s/layer, "
                      f"peak RSS {r['peak_rss_mib']:6d} MiB", file=sys.stderr)
            (tmp / name / "model.safetensors").unlink()
        for shape in filter(None, args.peer.split(",")):
            width, kv = PEER_SHAPES[shape]
            model = build(tmp / shape, width, 1, tok, vocab, kv)
            for grid in PEER_GRIDS[args.peer_grid]:
                ours_mse, their_mse = PAIRS[grid]
                t0 = time.perf_counter()
                quantize(model, tmp / "ours", QuantSpec(4, 128, True, mse=ours_mse),
                         calibration=CALIBRATION, nsamples=args.nsamples, seqlen=args.seqlen,
                         device=args.device, force=True)
                mine = time.perf_counter() - t0
                theirs = peer.gptqmodel(model, tmp / "peer", 4, 128, True, CALIBRATION, args.nsamples,
                                        args.seqlen, torch.get_num_threads(), their_mse)
                results[f"1x{shape} {grid} peer"] = {"width": width, "ours_seconds": round(mine, 2),
                                                     "gptqmodel_seconds": round(theirs, 2),
                                                     "ratio": round(mine / theirs, 3)}
                print(f"{shape:>8} 1 layer, {grid:8}: ours {mine:7.1f} s, GPTQModel {theirs:7.1f} s "
                      f"(ours/theirs {mine / theirs:.2f})", file=sys.stderr)
            shutil.rmtree(tmp / shape)
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
