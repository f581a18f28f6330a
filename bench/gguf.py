"""GGUF conversion benchmark: the convert benchmark's synthetic checkpoint with CodeLlama-34B's real
shapes (dim 8192, 64 heads, 8 kv heads, FFN 22016, vocab 32000) but `--layers N`, converted to HF
fp16, then to an F16 GGUF file by `python -m pipeline gguf` in a child process; prints seconds,
GB/s, peak RSS against the bound (2 x the largest tensor + 1 GiB: the stage holds one tensor and
its memory-mapped source at a time) and the ratio to a plain `cp` of the fp16 directory on the
same disk. (This file's name shadows the `gguf` package for scripts in bench/; none imports it.)

    python bench/gguf.py --layers 2 [--dir /big/disk/tmp] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from convert import CODELLAMA_34B, FFN, ROOT, VOCAB, build, timed, warm  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-gguf-", dir=a.dir))
    try:
        # built in a fresh interpreter: a child forked from a process holding the checkpoint's
        # tensors would count that memory in its own peak RSS (ru_maxrss covers the fork)
        maker = multiprocessing.get_context("spawn").Process(target=build,
                                                             args=(work / "src", a.layers, 4))
        maker.start()
        maker.join()
        subprocess.run([sys.executable, "-m", "pipeline", "convert", str(work / "src"),
                        str(work / "fp16"), "--skip-checksums"], cwd=ROOT, check=True,
                       capture_output=True)
        shutil.rmtree(work / "src")
        fp16_bytes = sum(p.stat().st_size for p in (work / "fp16").iterdir())
        warm(work / "fp16")
        cp_s, _, _ = timed(["cp", "-r", str(work / "fp16"), str(work / "cp")])
        shutil.rmtree(work / "cp")
        startup_s, _, _ = timed([sys.executable, "-m", "pipeline", "gguf", "--help"])
        warm(work / "fp16")
        seconds, rss, out = timed([sys.executable, "-m", "pipeline", "gguf", str(work / "fp16"),
                                   str(work / "out.gguf"), "--json"])
        summary = json.loads(out)
        bound = 2 * max(VOCAB, FFN) * CODELLAMA_34B["dim"] * 2 + 2**30  # fp16 bytes
        result = {"layers": a.layers, "fp16_gb": round(fp16_bytes / 1e9, 3),
                  "gguf_gb": round(summary["bytes"] / 1e9, 3), "cp_seconds": round(cp_s, 2),
                  "startup_seconds": round(startup_s, 2), "seconds": round(seconds, 2),
                  "gb_per_s": round(summary["bytes"] / 1e9 / seconds, 3),
                  "peak_rss_gb": round(rss / 1e9, 3), "rss_bound_gb": round(bound / 1e9, 3),
                  "cp_ratio": round(seconds / cp_s, 2),
                  "cp_ratio_after_startup": round((seconds - startup_s) / cp_s, 2),
                  "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if a.json:
        print(json.dumps(result))
        return
    r = result
    print(f"gguf bench: CodeLlama-34B shapes, {a.layers} layer(s), {r['fp16_gb']} GB fp16 in -> "
          f"{r['gguf_gb']} GB F16 GGUF out; cp of the fp16 directory: {r['cp_seconds']} s; "
          f"interpreter + imports {r['startup_seconds']} s; {r['cpus']} CPUs, load average "
          f"{r['load_avg_1m']} at the end")
    print("| run | seconds | GB/s | peak RSS GB (bound) | x cp | x cp after startup |")
    print("|---|---|---|---|---|---|")
    print(f"| F16 | {r['seconds']} | {r['gb_per_s']} | {r['peak_rss_gb']} ({r['rss_bound_gb']}) "
          f"| {r['cp_ratio']} | {r['cp_ratio_after_startup']} |")


if __name__ == "__main__":
    main()
