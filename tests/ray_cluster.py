"""A real Ray cluster of separate raylet processes on this machine, as `ray start --head` and
`ray start --address` make one across machines (here on the loopback address, one CPU a node),
for tests/test_ray_nodes.py and bench/scaleout.py; stopped with `ray stop --force`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")
# the cluster's own settings: no usage report (no network here), no token (a test cluster on the
# loopback address only)
ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raylets() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "raylet/raylet"], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def ray_start(*args: str) -> float:
    """`ray start ARGS` (one node: its raylet and daemons, detached); the seconds it took."""
    t0 = time.perf_counter()
    run = subprocess.run([RAY, "start", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                          "--disable-usage-stats", *args], capture_output=True, text=True,
                         env={**os.environ, **ENV}, timeout=120)
    if run.returncode:
        raise RuntimeError(f"ray start failed: {run.stdout[-2000:]}{run.stderr[-2000:]}")
    return time.perf_counter() - t0


@contextmanager
def ray_cluster(nodes: int = 2) -> Iterator[dict]:
    """A head node and nodes - 1 worker nodes of one CPU each; yields {"address", "worker_raylet"
    (the first worker's raylet pid), "seconds" (to start each node)}."""
    before = raylets()
    port = free_port()
    try:
        seconds = [ray_start("--head", f"--port={port}", "--include-dashboard=false")]
        head = raylets() - before
        seconds += [ray_start(f"--address=127.0.0.1:{port}") for _ in range(nodes - 1)]
        workers = sorted(raylets() - before - head)
        if len(head) != 1 or len(workers) != nodes - 1:
            raise RuntimeError(f"ray cluster: expected 1 head and {nodes - 1} worker raylets")
        yield {"address": f"127.0.0.1:{port}", "worker_raylet": workers[0] if workers else None,
               "seconds": seconds}
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, env={**os.environ, **ENV},
                       timeout=120)
