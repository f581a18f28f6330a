"""A real Ray cluster of two nodes, each its own raylet process, as `ray start --head` and
`ray start --address` make them on two machines (here both on this one, on the loopback address):
the job joins it with --ray-address, its tasks run on both nodes (job.json records each task's
node), and the worker node killed while it quantises leaves the job to finish on the head node,
the killed task retried and resumed, with the bytes of a local run. The cluster is started and
stopped here (`ray stop --force` at the end)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from cli_runner import run_cli
from demo_model import TRIMMED_RECIPE
from ray_cluster import ENV, ray_cluster

from pipeline.core.output import partial_path
from pipeline.job import read_records, run_job
from pipeline.recipe import RECIPES_DIR, load_recipe

pytestmark = pytest.mark.slow  # a two-node Ray cluster

RECIPE = TRIMMED_RECIPE
BRANCHES = ("main", "gptq-8bit-128g-actorder_True")
@pytest.fixture(scope="module")
def cluster():
    """Head and worker node, one CPU each (tests/ray_cluster.py)."""
    with ray_cluster(nodes=2) as c:
        yield c


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict:
    """The recipe, and its local run up to quantize: the bytes every cluster run must give."""
    root = tmp_path_factory.mktemp("raynodes")
    (root / "two.toml").write_text(RECIPE)
    result = run_job(load_recipe(root / "two.toml", [RECIPES_DIR]), workdir=root / "local",
                     stage="quantize", device="cpu")
    assert result["ok"]
    return {"root": root, "files": files(root / "local")}


def files(work: Path) -> dict[str, bytes]:
    """The weights and configs of fp16 and the GPTQ variants (not the run's manifests)."""
    return {p.relative_to(work).as_posix(): p.read_bytes()
            for part in ("fp16", "gptq") for p in sorted((work / part).rglob("*"))
            if p.is_file() and p.name not in ("conversion.json", "quant_log.json")}


def run_on(cluster: dict, project: dict, work: Path, monkeypatch, capsys) -> dict:
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    code, out, err = run_cli(["run", project["root"] / "two.toml", "--allow-dir", RECIPES_DIR,
                              "--workdir", work, "--stage", "quantize", "--device", "cpu",
                              "--executor", "ray", "--ray-address", cluster["address"], "--json"],
                             monkeypatch, capsys)
    assert code == 0 and "Traceback" not in err, err
    return json.loads(out)


def test_tasks_run_on_both_nodes_with_the_bytes_of_a_local_run(cluster, project, monkeypatch,
                                                               capsys):
    work = project["root"] / "both"
    result = run_on(cluster, project, work, monkeypatch, capsys)
    records = read_records(work)
    nodes = {records[f"quantize/{b}"]["node"] for b in BRANCHES}
    assert len(nodes) == 2 and None not in nodes  # one variant on each raylet
    assert {r["stage"] for r in result["stages"]} == {"convert", *(f"quantize/{b}" for b in BRANCHES)}
    assert files(work) == project["files"]


def test_the_worker_node_killed_mid_quantize_leaves_the_job_to_finish(cluster, project,
                                                                     monkeypatch, capsys):
    """SIGKILL the worker node's raylet (and the task worker under it) once the task running
    there has a finished layer: Ray reschedules the task on the head node, which resumes it from
    the partial output, and the bytes are a local run's."""
    work = project["root"] / "killed"
    killed: list[str] = []

    def watch() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            records = read_records(work) if (work / "job.json").is_file() else {}
            for b in BRANCHES:
                r = records.get(f"quantize/{b}", {})
                layers = partial_path(work / "gptq" / b) / "layers"
                on_worker = r.get("pid") in children(cluster["worker_raylet"])
                if r.get("status") == "running" and on_worker and layers.is_dir() \
                        and any(layers.glob("*.safetensors")):
                    for pid in [cluster["worker_raylet"], *children(cluster["worker_raylet"])]:
                        os.kill(pid, signal.SIGKILL)
                    killed.append(b)
                    return
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    result = run_on(cluster, project, work, monkeypatch, capsys)
    watcher.join(timeout=5)
    assert killed, "the worker node never ran a quantize task"
    row = next(r for r in result["stages"] if r["stage"] == f"quantize/{killed[0]}")
    assert row["reason"] == "previous run running"  # the retry found the killed run's record
    log = json.loads((work / "gptq" / killed[0] / "quant_log.json").read_text())
    assert log["resumed_layers"] >= 1
    assert files(work) == project["files"]


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (a raylet's workers)."""
    out = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            ppid = next(int(line.split()[1]) for line in status.read_text().splitlines()
                        if line.startswith("PPid:"))
        except (OSError, StopIteration, ValueError):
            continue
        if ppid == pid:
            out.append(int(status.parent.name))
    return out
