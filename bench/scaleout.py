"""Scale-out benchmark: the demo recipe's job (recipes/demo.toml, 5 GPTQ variants and 3 GGUF
files, up to a dry-run publish) with `--executor ray` on a local Ray cluster of 1 worker CPU and
then of 2, from fresh work directories; each task runs on one torch thread (the demo's
[resources] default, cpus = 1). Reports both wall times and their ratio, measured in the same run,
and checks that both runs wrote the same bytes.

    python bench/scaleout.py [--dir /tmp] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # not bench/: Ray workers get the driver's path, and bench/gguf.py is not gguf

from pipeline.executors import RayExecutor  # noqa: E402
from pipeline.job import run_job  # noqa: E402
from pipeline.recipe import RECIPES_DIR, load_recipe  # noqa: E402

MANIFESTS = ("conversion.json", "quant_log.json")  # hold timings: not compared


def weights(work: Path) -> dict[str, str]:
    """sha256 of every file of fp16/, gptq/ and gguf/ except the manifests."""
    return {p.relative_to(work).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for part in ("fp16", "gptq", "gguf") for p in sorted((work / part).rglob("*"))
            if p.is_file() and p.name not in MANIFESTS}


def run(workers: int, work: Path) -> dict:
    """The demo job on a fresh local Ray cluster of `workers` CPUs."""
    import ray

    ray.init(num_cpus=workers, include_dashboard=False, logging_level="WARNING")
    try:
        t0 = time.perf_counter()
        result = run_job(load_recipe(RECIPES_DIR / "demo.toml"), workdir=work, dry_run=True,
                         device="cpu", executor=RayExecutor())
        seconds = time.perf_counter() - t0
    finally:
        ray.shutdown()
    tasks = {r["stage"]: r["seconds"] for r in result["stages"]}
    return {"workers": workers, "seconds": round(seconds, 1), "ok": result["ok"],
            "task_seconds": tasks, "busy_seconds": round(sum(tasks.values()), 1),
            "hosts_pids": sorted({f"{r['host']}:{r['pid']}" for r in result["stages"]})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=None, help="scratch directory [default: a temp dir]")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-scaleout-", dir=args.dir))
    runs = [run(n, root / f"workers-{n}") for n in (1, 2)]
    same = weights(root / "workers-1") == weights(root / "workers-2")
    out = {"runs": runs, "ratio_2_to_1": round(runs[1]["seconds"] / runs[0]["seconds"], 2),
           "same_bytes": same, "load_average": os.getloadavg(), "dir": str(root)}
    if args.json:
        print(json.dumps(out))
        return
    for r in runs:
        print(f"{r['workers']} worker(s): {r['seconds']:.1f} s wall, {r['busy_seconds']:.1f} s in "
              f"tasks, {len(r['hosts_pids'])} worker processes, ok={r['ok']}")
    print(f"2 workers / 1 worker: {out['ratio_2_to_1']:.2f}; same bytes: {same}; "
          f"load average {', '.join(f'{x:.1f}' for x in out['load_average'])}")


if __name__ == "__main__":
    main()
