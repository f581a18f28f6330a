"""Convert benchmark: a synthetic Meta checkpoint with CodeLlama-34B's real tensor shapes (dim 8192,
64 heads, 8 kv heads, FFN 22016, vocab 32000, 4 shards) but `--layers N`, converted by
`python -m pipeline convert` in a child process; prints seconds, GB/s, peak RSS against the
bound (2 x largest merged tensor + 1 GiB) and the ratio to a plain `cp` of the same bytes on
the same disk.

    python bench/convert.py --layers 2 [--dir /big/disk/tmp] [--json]
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

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from meta_fixtures import padded_sentencepiece_model  # noqa: E402  (a 32000-piece tokenizer)

from pipeline.core.meta import meta_names, shard_dim  # noqa: E402

CODELLAMA_34B = {"dim": 8192, "n_layers": 48, "n_heads": 64, "n_kv_heads": 8, "multiple_of": 256,
                 "ffn_dim_multiplier": 1.0, "norm_eps": 1e-5, "rope_theta": 1000000}
FFN, VOCAB = 22016, 32000


def full_shapes(p: dict) -> dict[str, tuple[int, ...]]:
    hd = p["dim"] // p["n_heads"]
    dim, kv = p["dim"], p["n_kv_heads"] * hd
    layer = {"attention.wq.weight": (dim, dim), "attention.wk.weight": (kv, dim),
             "attention.wv.weight": (kv, dim), "attention.wo.weight": (dim, dim),
             "feed_forward.w1.weight": (FFN, dim), "feed_forward.w3.weight": (FFN, dim),
             "feed_forward.w2.weight": (dim, FFN), "attention_norm.weight": (dim,),
             "ffn_norm.weight": (dim,)}
    top = {"tok_embeddings.weight": (VOCAB, dim), "norm.weight": (dim,),
           "output.weight": (VOCAB, dim)}
    return {n: layer[n.split(".", 2)[2]] if n.startswith("layers.") else top[n]
            for n in meta_names(p["n_layers"])}


def build(src: Path, n_layers: int, n_shards: int) -> int:
    """Write the synthetic checkpoint rank by rank (one rank's tensors in memory at a time)."""
    src.mkdir(parents=True)
    params = {**CODELLAMA_34B, "n_layers": n_layers}
    g = torch.Generator().manual_seed(0)
    for r in range(n_shards):
        shard = {}
        for name, shape in full_shapes(params).items():
            d = shard_dim(name, 1)
            local = list(shape)
            if d is not None:
                local[d] //= n_shards
            shard[name] = (torch.ones(local) if d is None else  # replicated: equal on every rank
                           torch.randn(local, generator=g) * 0.02).to(torch.bfloat16)
        torch.save(shard, src / f"consolidated.{r:02d}.pth")
        del shard
    (src / "params.json").write_text(json.dumps(params))
    shutil.copyfile(padded_sentencepiece_model(VOCAB), src / "tokenizer.model")
    return sum(p.stat().st_size for p in src.iterdir())


def timed(cmd: list[str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (bytes) of this child alone (wait4), and its stdout."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        child = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - t
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if child.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{err.read()[-2000:]}")
        return seconds, usage.ru_maxrss * 1024, out.read()


def warm(src: Path) -> None:
    """Read the source once so every timed run starts with it in the page cache (the converter
    hands its pages back as it goes, which also evicts them)."""
    for p in src.iterdir():
        with open(p, "rb") as f:
            while f.read(1 << 23):
                pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=a.dir))
    try:
        src_bytes = build(work / "src", a.layers, a.shards)
        warm(work / "src")
        cp_s, _, _ = timed(["cp", "-r", str(work / "src"), str(work / "cp")])
        shutil.rmtree(work / "cp")
        startup_s, _, _ = timed([sys.executable, "-m", "pipeline", "convert", "--help"])
        runs = {}
        for label, extra in (("skip-checksums", ["--skip-checksums"]), ("with checksums", [])):
            warm(work / "src")
            seconds, rss, out = timed([sys.executable, "-m", "pipeline", "convert",
                                       str(work / "src"), str(work / "out"), "--json", "--force",
                                       *extra])
            summary = json.loads(out)
            runs[label] = {"seconds": round(seconds, 2), "peak_rss_gb": round(rss / 1e9, 3),
                           "gb_per_s": round(summary["output"]["bytes"] / 1e9 / seconds, 3),
                           "cp_ratio": round(seconds / cp_s, 2),
                           "cp_ratio_after_startup": round((seconds - startup_s) / cp_s, 2)}
        largest = max(VOCAB * CODELLAMA_34B["dim"], FFN * CODELLAMA_34B["dim"]) * 2  # fp16 bytes
        result = {"layers": a.layers, "shards": a.shards, "source_gb": round(src_bytes / 1e9, 3),
                  "output_gb": round(summary["output"]["bytes"] / 1e9, 3),
                  "cp_seconds": round(cp_s, 2), "startup_seconds": round(startup_s, 2),
                  "rss_bound_gb": round((2 * largest + 2**30) / 1e9, 3), "runs": runs,
                  "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if a.json:
        print(json.dumps(result))
        return
    print(f"convert bench: CodeLlama-34B shapes, {a.layers} layer(s), {a.shards} shards, "
          f"{result['source_gb']} GB bf16 in -> {result['output_gb']} GB fp16 out; "
          f"cp of the source: {result['cp_seconds']} s; interpreter + torch startup "
          f"{result['startup_seconds']} s; {result['cpus']} CPUs, load average "
          f"{result['load_avg_1m']} at the end")
    print("| run | seconds | GB/s | peak RSS GB (bound) | x cp | x cp after startup |")
    print("|---|---|---|---|---|---|")
    for label, r in runs.items():
        print(f"| {label} | {r['seconds']} | {r['gb_per_s']} | {r['peak_rss_gb']} "
              f"({result['rss_bound_gb']}) | {r['cp_ratio']} | {r['cp_ratio_after_startup']} |")


if __name__ == "__main__":
    main()
