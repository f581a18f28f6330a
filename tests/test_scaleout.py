"""The job's tasks on cluster engines give the bytes of a local run: Ray (a local cluster of 2
CPUs started here; a cluster of separate raylets is tests/test_ray_nodes.py), a Ray task killed
mid-quantize (retried, resuming), Slurm through submitit on a real single-node Slurm cluster
(slurmctld, slurmd, slurmdbd: tests/slurm_cluster.py, started for this module) and through
submitit's local executor; bad input and a failed verify come back from a worker with their
message and exit code. The shipped demo model, trimmed to 2 variants and one GGUF type."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from demo_model import TRIMMED_RECIPE
from slurm_cluster import slurm_cluster

from pipeline.core.errors import InputError
from pipeline.core.output import partial_path
from pipeline.executors import RayExecutor
from pipeline.job import CPUS_CAP, CPUS_ENV, JobFailed, default_cpus, read_records, run_job
from pipeline.recipe import RECIPES_DIR, load_recipe

pytestmark = pytest.mark.slow  # jobs through Ray and a real Slurm

RECIPE = TRIMMED_RECIPE
V8 = "gptq-8bit-128g-actorder_True"
TOKEN = "hf_" + "scaleOut" * 4
ALLOW = ["--allow-dir", str(RECIPES_DIR)]
# Manifest fields that differ between two runs of the same inputs, and why:
#   timing (wall clock): conversion.json and quant_log.json `seconds`, quant_log.json
#     `modules.*.seconds`, verify.json `tokens_per_second`;
#   the work directory's path: conversion.json `output.path`, verify.json `artifacts.*.path`;
#   fingerprints of files holding timings: verify.json `inputs.fp16` and the sha256 verify.json
#     records of conversion.json and quant_log.json;
#   how the run went, not what it made: quant_log.json `resumed_layers` (a retried task resumes).
MANIFESTS = ("conversion.json", "quant_log.json", "verify.json")


def drop_run_fields(name: str, doc: dict) -> dict:
    """A manifest without the fields above."""
    doc = json.loads(json.dumps(doc))
    doc.pop("seconds", None)
    doc.pop("tokens_per_second", None)
    doc.pop("resumed_layers", None)
    if name == "conversion.json":
        doc["output"].pop("path")
    if name == "quant_log.json":
        for module in doc["modules"].values():
            module.pop("seconds")
    if name == "verify.json":
        doc["inputs"].pop("fp16")
        for art in doc["artifacts"].values():
            art.pop("path")
            for manifest in MANIFESTS:
                art["files"].pop(manifest, None)
    return doc


def outputs(work: Path, parts: tuple[str, ...] = ("fp16", "gptq", "gguf", "verify")) -> dict:
    """Every output file: bytes, or for a manifest its content without the run's fields."""
    files = {}
    for part in parts:
        for p in sorted((work / part).rglob("*")):
            if p.is_file() and p.name != "verify.txt":  # verify.txt: verify.json rendered
                rel = p.relative_to(work).as_posix()
                files[rel] = drop_run_fields(p.name, json.loads(p.read_text())) \
                    if p.name in MANIFESTS else p.read_bytes()
    return files


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scaleout")
    (root / "demo2.toml").write_text(RECIPE)
    return root


@pytest.fixture(scope="module")
def local(project) -> dict:
    """The local run everything is compared with."""
    assert torch.get_num_threads() == 1  # what the tasks' cpus = 1 gives them
    t0 = time.perf_counter()
    result = run_job(load_recipe(project / "demo2.toml", [RECIPES_DIR]), workdir=project / "local",
                     stage="verify", device="cpu")
    assert result["ok"] and {r["threads"] for r in result["stages"]} == {1}
    return {"work": project / "local", "result": result, "files": outputs(project / "local"),
            "seconds": time.perf_counter() - t0}


@pytest.fixture(scope="module")
def ray_cluster():
    import ray  # the scale extra: the Makefile's test install has it

    ray.init(num_cpus=max(2, min(os.cpu_count() or 1, CPUS_CAP)), include_dashboard=False,
             logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def real_slurm(tmp_path_factory):
    """A real Slurm cluster for this module's Slurm runs ($SLURM_CONF points the clients at it)."""
    with slurm_cluster(tmp_path_factory.mktemp("slurm-cluster")) as cluster:
        old = os.environ.get("SLURM_CONF")
        os.environ.update(cluster["env"])
        try:
            yield cluster
        finally:
            os.environ.pop("SLURM_CONF")
            if old is not None:
                os.environ["SLURM_CONF"] = old


# executor under test -> its `run` options; the fixture it needs
ENGINES = {"local": ([], None), "ray": (["--executor", "ray"], "ray_cluster"),
           "slurm": (["--executor", "slurm"], "real_slurm"),
           "slurm-local": (["--executor", "slurm", "--slurm-cluster", "local"], None)}


def engine(name: str, request) -> list[str]:
    """The `run` options of engine `name`, its cluster started."""
    options, fixture = ENGINES[name]
    if fixture:
        request.getfixturevalue(fixture)
    return options


def cli(args: list, monkeypatch, capsys) -> tuple[int, dict | None, str]:
    code, out, err = run_cli(["run", *map(str, args), *ALLOW, "--device", "cpu", "--json"],
                             monkeypatch, capsys)
    assert "Traceback" not in err, err
    return code, json.loads(out) if out else None, err


@pytest.mark.parametrize("table, message", [
    ("[resources]\nquantize = { cpus = 2, gpu = 1 }",
     "[resources] quantize: unknown key(s) gpu (known: cpus, gpus)"),
    ("[resources]\npublish = { cpus = 1 }", "[resources]: unknown key(s) publish"),
    ("[resources]\nquantise = { cpus = 1 }", "[resources]: unknown key(s) quantise (stages whose "
     "tasks take requests: convert, quantize, imatrix, gguf, verify)"),
    ("[resources]\ntasks = {}", "[resources]: unknown key(s) tasks (known: retries)"),
    ("[resources]\ngguf = 4", "[resources] gguf must be a table such as { cpus = 2 }, got int 4"),
    ("[resources]\nverify = { cpus = 0 }", "[resources] verify cpus = 0: must be at least 1"),
    ("[resources]\nquantize = { gpus = -1 }", "[resources] quantize gpus = -1: must not be negative"),
    ("[resources]\nretries = -1", "[resources] retries = -1: must be at least 0"),
    ("[slurm]\ntime_min = 0", "[slurm] time_min = 0: must be at least 1"),
    ("[slurm]\nqueue = \"gpu\"", "[slurm]: unknown key(s) queue"),
])
def test_scale_out_tables_are_validated(project, table, message, monkeypatch, capsys):
    path = project / "scale-bad.toml"
    path.write_text(f'extends = "demo2.toml"\n\n{table}\n')
    code, result, err = cli([path, "--executor", "ray"], monkeypatch, capsys)
    assert code == 2 and f"error: {path}: {message}" in err


def test_engine_options_need_their_engine(project, monkeypatch, capsys):
    for option in (["--ray-address", "h:1"], ["--slurm-time", "5"], ["--slurm-cluster", "local"],
                   ["--slurm-partition", "gpu"], ["--slurm-account", "lab"],
                   ["--slurm-mem-gb", "4"]):
        code, result, err = cli([project / "demo2.toml", *option], monkeypatch, capsys)
        assert code == 2 and f"error: {option[0]}: only with --executor" in err


def test_task_requests_by_stage_name_and_slurm_options_over_the_recipe(project):
    """[resources] by stage name, the defaults for a stage it leaves out, one GPU by default for
    the stages that compute on the device (quantize, verify) when the job runs on CUDA; the
    --slurm-* options over [slurm]."""
    from pipeline.executors import SlurmExecutor, resources
    from pipeline.job import Job

    (project / "requests.toml").write_text(
        'extends = "demo2.toml"\n\n[resources]\nquantize = { cpus = 2 }\ngguf = { cpus = 3 }\n'
        '\n[slurm]\npartition = "gpu"\naccount = "lab"\ntime_min = 120\nmem_gb = 16\n')
    recipe = load_recipe(project / "requests.toml", [RECIPES_DIR])
    keys = ["convert", "quantize/main", "gguf/Q8_0", "verify"]
    for device, gpus in (("cpu", [0, 0, 0, 0]), ("cuda", [0, 1, 0, 1]), ("cuda:1", [0, 1, 0, 1])):
        job = Job(recipe, project / "requests", device=device)
        assert [(resources(job, k).cpus, resources(job, k).gpus) for k in keys] == \
            list(zip([1, 2, 3, 1], gpus)), device
    job = Job(recipe, project / "requests", device="cpu")
    assert SlurmExecutor().parameters(job, "quantize/main") == {
        "name": "quantize-main", "cpus_per_task": 2, "gpus_per_node": 0, "timeout_min": 120,
        "slurm_partition": "gpu", "slurm_account": "lab", "mem_gb": 16}
    options = SlurmExecutor(partition="big", account="other", time_min=5, mem_gb=0)
    assert options.parameters(job, "verify") == {  # mem_gb 0: the partition's default
        "name": "verify", "cpus_per_task": 1, "gpus_per_node": 0, "timeout_min": 5,
        "slurm_partition": "big", "slurm_account": "other"}


def test_the_default_thread_count_is_one_for_every_executor(project, ray_cluster, monkeypatch,
                                                            capsys):
    """With no [resources] and no $PIPELINE_TASK_CPUS, a local run and a Ray run of the same recipe
    compute with the same thread count, this machine's cores capped at CPUS_CAP, and so give the
    same bytes: `make demo` then `run demo --executor ray` with no flags."""
    monkeypatch.delenv(CPUS_ENV)
    n = default_cpus()
    assert n == max(1, min(os.cpu_count() or 1, CPUS_CAP))
    runs = {}
    for executor in ("local", "ray"):
        work = project / f"default-{executor}"
        code, result, err = cli([project / "demo2.toml", "--workdir", work, "--stage", "quantize",
                                 "--executor", executor], monkeypatch, capsys)
        assert code == 0, err
        assert {r["threads"] for r in result["stages"]} == {n}
        # (Q8_0 takes no importance matrix: no imatrix task)
        assert result["task_cpus"] == {"convert": n, "quantize": n, "gguf": n, "verify": n}
        runs[executor] = outputs(work, ("fp16", "gptq"))
    assert runs["local"] == runs["ray"]
    monkeypatch.setenv(CPUS_ENV, "0")
    with pytest.raises(InputError, match=CPUS_ENV):
        default_cpus()


@pytest.mark.parametrize("name", ["slurm", "slurm-local"])
def test_slurm_through_submitit_gives_the_bytes_of_a_local_run(project, local, name, request,
                                                                monkeypatch, capsys):
    """Real Slurm: sbatch scripts submitit writes, run by slurmd, states read with sacct, the
    environment passed to the job (the Hub token left out)."""
    work = project / name
    code, result, err = cli([*engine(name, request), project / "demo2.toml", "--workdir", work,
                             "--stage", "verify"], monkeypatch, capsys)
    assert code == 0, err
    assert result["executor"] == "slurm"
    assert all(r["pid"] != os.getpid() and r["threads"] == 1 for r in result["stages"])
    assert outputs(work) == local["files"]
    assert (work / "slurm").is_dir()  # submitit's job files and logs


@pytest.mark.parametrize("executor", ["local", "slurm", "slurm-local", "ray"])
def test_bad_input_in_a_task_exits_as_a_local_run(project, local, executor, request,
                                                  monkeypatch, capsys):
    """A worker's InputError (too little calibration text: found by the quantize task, not by
    the checks before the first stage) reaches the driver with its message and exit code 2."""
    (project / "bad.toml").write_text('extends = "demo2.toml"\n\n[[variants]]\nbranch = "main"\n'
                                      'bits = 4\nnsamples = 100000\n')
    work = project / f"bad-{executor}"
    shutil.copytree(local["work"], work)  # convert reused (copy2 keeps the mtimes)
    code, result, err = cli([*engine(executor, request), project / "bad.toml", "--workdir",
                             work, "--stage", "quantize"], monkeypatch, capsys)
    assert code == 2 and result["exit_code"] == 2
    assert "256 tokens, 100000 requested; add text or lower --nsamples/--seqlen" in result["error"]
    assert err.rstrip().splitlines()[-1] == f"error: {result['error']}"
    assert [(r["stage"], r["status"]) for r in result["stages"]] == \
        [("convert", "reused"), ("quantize/main", "failed")]


def test_ray_gives_the_bytes_of_a_local_run(project, local, ray_cluster, monkeypatch, capsys):
    work = project / "ray"
    t0 = time.perf_counter()
    code, result, err = cli(["--executor", "ray", project / "demo2.toml", "--workdir", work,
                             "--stage", "verify"], monkeypatch, capsys)
    seconds = time.perf_counter() - t0
    assert code == 0, err
    assert result["executor"] == "ray" and result["ok"]
    stages = {r["stage"]: r for r in result["stages"]}
    assert list(stages) == ["convert", "quantize/main", f"quantize/{V8}", "gguf/F16", "gguf/Q8_0",
                            "verify"]
    for key, row in stages.items():  # each task ran in a Ray worker, on one thread, and says so
        assert row["status"] == "ran" and row["pid"] != os.getpid() and row["threads"] == 1
        assert f"task {key} done on {row['host']} pid {row['pid']}" in err
    # llama.cpp's quantiser too stays within the task's one CPU (by default it takes every core)
    assert read_records(work)["gguf/Q8_0"]["summary"]["threads"] == 1
    header = err.splitlines()[err.splitlines().index(f"job demo2 ({work}): ok") + 1]
    assert header.split() == ["stage", "status", "seconds", "where", "output", "/", "reason"]
    files = outputs(work)
    assert files.keys() == local["files"].keys() and len(files) > 25
    assert files == local["files"]  # weights, tokenizer, GGUF: bytes; manifests: see MANIFESTS
    assert result["perplexity"] == local["result"]["perplexity"]
    print(f"local {local['seconds']:.1f} s, ray {seconds:.1f} s")

    # a second run on the cluster reuses every output, as a local one would
    again = run_job(load_recipe(project / "demo2.toml", [RECIPES_DIR]), workdir=work,
                    stage="verify", device="cpu", executor=RayExecutor())
    assert {r["status"] for r in again["stages"]} == {"reused"}


def test_a_failed_verify_on_a_worker_exits_3(project, local, ray_cluster, monkeypatch, capsys):
    (project / "strict.toml").write_text('extends = "demo2.toml"\n\n[verify]\n'
                                         'top1 = { "4" = 0.999, "8" = 0.999 }\n')
    work = project / "strict"
    shutil.copytree(local["work"], work)
    code, result, err = cli(["--executor", "ray", project / "strict.toml", "--workdir", work,
                             "--stage", "verify"], monkeypatch, capsys)
    assert code == 3 and "verify failed: kl_divergence" in result["error"]
    assert result["perplexity"] and [r["status"] for r in result["stages"]][-1] == "failed"


def test_no_ray_cluster_at_the_address_is_a_clear_error(project, monkeypatch, capsys):
    """An error at once (exit 1), not Ray's wait of many minutes for a cluster."""
    code, result, err = cli(["--executor", "ray", "--ray-address", "127.0.0.1:9",
                             project / "demo2.toml", "--workdir", project / "nowhere"],
                            monkeypatch, capsys)
    assert code == 1 and result is None
    assert "error: --executor ray: no Ray cluster answers at 127.0.0.1:9" in err


# Order: Ray prints news of a killed worker to stdout from a thread, possibly after its test; the
# tests that kill Ray workers come last, so no later test's --json stdout can catch such a line.


@pytest.mark.parametrize("name", ["slurm", "slurm-local", "ray"])
def test_a_task_killed_mid_quantize_is_retried_and_resumes(project, local, name, request,
                                                            monkeypatch, capsys):
    """Ray retries the task (max_retries); for Slurm the driver resubmits the job that died
    (sacct: FAILED)."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the driver's; a Slurm job is submitted without it
    work = project / f"killed-{name}"
    killed = kill_after_first_layer(work, "main")
    code, result, err = cli([*engine(name, request), project / "demo2.toml", "--workdir",
                             work, "--stage", "quantize", "--variant", "main"], monkeypatch, capsys)
    assert code == 0 and result["ok"], err  # stdout: the JSON only, whatever the engine printed
    assert killed, "the worker was never killed"
    pid, layers_done, environ = killed[0]
    if name.startswith("slurm"):
        assert f"HF_TOKEN={TOKEN}".encode() not in environ and os.environ["HF_TOKEN"] == TOKEN
    row = next(r for r in result["stages"] if r["stage"] == "quantize/main")
    assert row["reason"] == "previous run running" and row["pid"] != pid  # a new worker
    log = json.loads((work / "gptq" / "main" / "quant_log.json").read_text())
    assert log["resumed_layers"] >= layers_done >= 1  # the retry went on from its last layer
    assert "quantize/main: running (previous run running), resuming" in err
    files = outputs(work, ("gptq",))
    assert files == {k: v for k, v in local["files"].items() if k.startswith("gptq/main/")}


def test_a_worker_dying_with_no_retry_left_fails_the_job(project, local, ray_cluster):
    (project / "once.toml").write_text('extends = "demo2.toml"\n\n[resources]\nretries = 0\n')
    work = project / "once"
    shutil.copytree(local["work"], work, ignore=shutil.ignore_patterns("gptq"))
    killed = kill_after_first_layer(work, "main")
    with pytest.raises(JobFailed) as e:
        run_job(load_recipe(project / "once.toml", [RECIPES_DIR]), workdir=work,
                stage="quantize", variants=["main"], device="cpu", executor=RayExecutor())
    assert killed and e.value.exit_code == 1
    assert str(e.value).startswith("task quantize/main: Ray gave up after 0 retries")
    assert read_records(work)["quantize/main"]["status"] == "running"  # as the worker left it


def kill_after_first_layer(work: Path, branch: str) -> list[tuple[int, int, bytes]]:
    """SIGKILL the worker quantising `branch` (its pid from job.json's running record) once a
    layer of it is on disk; returns [(pid, finished layers, its environment)] when it did."""
    key, layers = f"quantize/{branch}", partial_path(work / "gptq" / branch) / "layers"
    killed: list[tuple[int, int, bytes]] = []

    def watch() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            record = read_records(work).get(key, {}) if (work / "job.json").is_file() else {}
            done = len(list(layers.glob("*.safetensors"))) if layers.is_dir() else 0
            if record.get("status") == "running" and done >= 1:
                if record["pid"] == os.getpid():
                    return  # a worker's, never this process
                environ = Path(f"/proc/{record['pid']}/environ").read_bytes()
                os.kill(record["pid"], signal.SIGKILL)
                killed.append((record["pid"], done, environ))
                return
            time.sleep(0.02)

    threading.Thread(target=watch, daemon=True).start()
    return killed


def test_a_worker_refuses_a_recipe_changed_since_the_driver_read_it(tmp_path):
    """A worker loads the recipe again: when its tables differ from the driver's (edited mid-run,
    or another copy on that node), the task stops with exit 2 before it computes anything."""
    from pipeline.executors import run_task, task_spec
    from pipeline.job import Job

    path = tmp_path / "demo2.toml"
    path.write_text(RECIPE)
    recipe = load_recipe(path, [RECIPES_DIR])
    job = Job(recipe, tmp_path / "work", "verify", ("main",), device="cpu",
              source=recipe.source.resolve())
    spec = task_spec(job, "convert", {}, threads=1)
    path.write_text(RECIPE.replace("nsamples = 32", "nsamples = 33"))
    result = run_task(spec)
    assert result.exit_code == 2 and "changed since the job started" in result.error
    assert not (tmp_path / "work" / "fp16").exists()
    path.write_text(RECIPE + "\n# a comment changes no table\n")
    assert run_task(dataclasses.replace(spec, key="convert")).exit_code == 0
