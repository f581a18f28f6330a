"""Scale-out benchmark: the demo recipe's job (recipes/demo.toml, 5 GPTQ variants and 3 GGUF
files, up to a dry-run publish) on each engine with 1 worker CPU and then 2, from fresh work
directories, every task on one torch thread ($PIPELINE_TASK_CPUS=1):
  ray-local:   a local Ray cluster started in this process (ray.init) of 1 CPU, then 2;
  ray-cluster: a Ray cluster of separate raylets (`ray start --head` + `--address`, one CPU a
               node: tests/ray_cluster.py) of 1 node, then 2;
  slurm:       a real single-node Slurm (slurmctld, slurmd, slurmdbd: tests/slurm_cluster.py,
               `make install` installs it) whose node offers 1 CPU, then 2.
Reports the wall times and their ratio per engine, measured in the same run, and checks that
every run wrote the same bytes.

    python bench/scaleout.py [--engine ray-local|ray-cluster|slurm ...] [--dir /tmp] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # not bench/: Ray workers get the driver's path, and bench/gguf.py is not gguf
sys.path.append(str(ROOT / "tests"))  # the engines' start-up, shared with the tests
os.environ["PIPELINE_TASK_CPUS"] = "1"

from pipeline.executors import RayExecutor, SlurmExecutor  # noqa: E402
from pipeline.job import run_job  # noqa: E402
from pipeline.recipe import RECIPES_DIR, load_recipe  # noqa: E402

MANIFESTS = ("conversion.json", "quant_log.json")  # hold timings: not compared
ENGINES = ("ray-local", "ray-cluster", "slurm")


def weights(work: Path) -> dict[str, str]:
    """sha256 of every file of fp16/, gptq/ and gguf/ except the manifests."""
    return {p.relative_to(work).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for part in ("fp16", "gptq", "gguf") for p in sorted((work / part).rglob("*"))
            if p.is_file() and p.name not in MANIFESTS}


@contextmanager
def engine(name: str, workers: int, root: Path) -> Iterator[Any]:
    """A fresh cluster of `workers` CPUs of engine `name`, and the executor that uses it."""
    if name == "ray-local":
        import ray

        ray.init(num_cpus=workers, include_dashboard=False, logging_level="WARNING")
        try:
            yield RayExecutor()
        finally:
            ray.shutdown()
    elif name == "ray-cluster":
        from ray_cluster import ENV, ray_cluster

        os.environ.update(ENV)
        with ray_cluster(nodes=workers) as c:
            executor = RayExecutor(address=c["address"])
            try:
                yield executor
            finally:
                executor.close()
    else:
        from slurm_cluster import slurm_cluster

        with slurm_cluster(root / f"slurm-{workers}", cpus=workers) as c:
            os.environ.update(c["env"])
            yield SlurmExecutor()


def run(name: str, workers: int, root: Path) -> dict:
    """The demo job on a fresh cluster of engine `name` with `workers` CPUs."""
    work = root / f"{name}-{workers}"
    with engine(name, workers, root) as executor:
        t0 = time.perf_counter()
        result = run_job(load_recipe(RECIPES_DIR / "demo.toml"), workdir=work, dry_run=True,
                         device="cpu", executor=executor)
        seconds = time.perf_counter() - t0
    tasks = {r["stage"]: r["seconds"] for r in result["stages"]}
    return {"engine": name, "workers": workers, "seconds": round(seconds, 1), "ok": result["ok"],
            "task_seconds": tasks, "busy_seconds": round(sum(tasks.values()), 1),
            "hosts_pids": sorted({f"{r['host']}:{r['pid']}" for r in result["stages"]}),
            "weights": weights(work)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=None, help="scratch directory [default: a temp dir]")
    ap.add_argument("--engine", action="append", choices=ENGINES,
                    help=f"engine(s) to measure [default: {' '.join(ENGINES)}]")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-scaleout-", dir=args.dir))
    runs = [run(name, n, root) for name in args.engine or ENGINES for n in (1, 2)]
    same = len({json.dumps(r.pop("weights"), sort_keys=True) for r in runs}) == 1
    ratios = {one["engine"]: round(two["seconds"] / one["seconds"], 2)
              for one, two in zip(runs[::2], runs[1::2], strict=True)}
    out = {"runs": runs, "ratio_2_to_1": ratios, "same_bytes": same,
           "load_average": os.getloadavg(), "dir": str(root)}
    if args.json:
        print(json.dumps(out))
        return
    for r in runs:
        print(f"{r['engine']:<12} {r['workers']} worker(s): {r['seconds']:.1f} s wall, "
              f"{r['busy_seconds']:.1f} s in tasks, {len(r['hosts_pids'])} worker processes, "
              f"ok={r['ok']}")
    print("2 workers / 1 worker: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items())
          + f"; same bytes in every run: {same}; load average "
          + ", ".join(f"{x:.1f}" for x in out["load_average"]))


if __name__ == "__main__":
    main()
