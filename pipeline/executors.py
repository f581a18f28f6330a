"""Where the job's tasks run, by `--executor` name (EXECUTORS): `local` (this process, one after
another; pipeline/job.py), `ray` (one Ray task per table entry's item, on a cluster or a local
one) or `slurm` (one Slurm job each, through submitit). Engines are imported only here, and only
when chosen.

A worker gets a TaskSpec (plain data: paths, the task's key, options, the upstream outputs'
fingerprints; never the Hub token or the driver's environment), loads the recipe itself and runs
`pipeline.job.execute`, the same bookkeeping as a local run, on the shared work directory. A
worker that dies is run again by the engine (Ray's max_retries; for Slurm the driver resubmits),
and the retry resumes a quantisation from its last finished layer (job.json's "running" record
and the partial directory). The torch thread count of a task is its CPU request: floating-point
sums depend on it, so the same hardware and the same thread count give the same bytes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.errors import InputError, PipelineError, first_line
from pipeline.credentials import SECRET_ENV
from pipeline.job import (Executor, Job, LocalExecutor, TaskResult, execute, pinned, resources,
                          task_stage)
from pipeline.recipe import TaskResources, load_recipe

INSTALL = "pip install -e '.[scale]'"
SLURM_CLUSTERS = ("slurm", "local")  # submitit's: Slurm itself, or processes on this machine
ENGINE_ENV = ("RAY_", "SLURM_", "SUBMITIT_")  # the engines' own settings
log = logging.getLogger("pipeline.job")


@dataclass(frozen=True)
class TaskSpec:
    """Everything a worker needs to run one task, as plain data (picklable, no credential)."""

    recipe: str
    recipe_digest: str  # the recipe as the driver read it (Recipe.digest): a worker refuses another
    allow_dirs: tuple[str, ...]
    workdir: str
    source: str
    key: str
    last_stage: str
    branches: tuple[str, ...]
    device: str
    force: bool
    upstream: dict[str, Any]
    threads: int


def task_spec(job: Job, key: str, upstream: dict[str, Any], threads: int) -> TaskSpec:
    """The task `key` of the job as a worker gets it: the source path as the driver resolved it,
    and `cuda` for `cuda:N` (the engine shows a task only its own GPUs, from index 0)."""
    device = "cuda" if job.device.startswith("cuda:") else job.device
    return TaskSpec(str(job.recipe.path), job.recipe.digest,
                    tuple(str(d) for d in job.recipe.allow_dirs), str(job.workdir), str(job.source), key, job.last_stage, job.branches,
                    device, job.force, upstream, threads)


def run_task(spec: TaskSpec) -> TaskResult:
    """A worker's entry point: the task with the job's bookkeeping, on `spec.threads` torch
    threads; its log lines come back in the result."""
    import torch

    torch.set_num_threads(spec.threads)
    lines: list[str] = []
    handler = ListHandler(lines)
    loggers = [logging.getLogger("pipeline"), logging.getLogger("verify")]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
        lg.propagate = False
    try:
        try:
            recipe = load_recipe(spec.recipe, [Path(d) for d in spec.allow_dirs])
            if recipe.digest != spec.recipe_digest:
                raise InputError(f"{spec.recipe}: changed since the job started (or differs on "
                                 f"{socket.gethostname()}); run the job again")
        except PipelineError as e:
            return TaskResult(spec.key, None, error=str(e), exit_code=e.exit_code)
        source = Path(spec.source)
        job = Job(pinned(recipe, source), Path(spec.workdir), spec.last_stage, spec.branches,
                  device=spec.device, force=spec.force, source=source, cpus=spec.threads)
        stage, item = task_stage(spec.key)
        result = execute(job, stage, item, spec.upstream)
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
            lg.propagate = True
    return dataclasses.replace(result, log=tuple(lines))


class ListHandler(logging.Handler):
    """Collects a task's log messages, for the driver to show."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__(logging.INFO)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def report(result: TaskResult) -> None:
    """A worker's task on the driver: its log lines, then where and how long it ran."""
    row = result.row or {}
    place = f"{row.get('host')} pid {row.get('pid')}" if row else "a worker"
    for line in result.log:
        log.info("  %s | %s", place, line)
    what = "done" if row.get("status") == "ran" else row.get("status", "failed")
    log.info("task %s %s on %s in %.1f s%s", result.key, what, place, row.get("seconds", 0.0),
             f": {result.error}" if result.error else "")


@contextmanager
def without_secrets() -> Iterator[None]:
    """The environment without secret-named variables (HF_TOKEN, …) while an engine starts
    workers or submits jobs: they inherit the environment they are started from. The engine's
    own (RAY_AUTH_TOKEN, …) stay: it needs them to reach its cluster."""
    saved = {k: os.environ.pop(k) for k in list(os.environ)
             if SECRET_ENV.search(k) and not k.startswith(ENGINE_ENV)}
    try:
        yield
    finally:
        os.environ.update(saved)


# ---------------------------------------------------------------- resources


# ---------------------------------------------------------------- ray


@dataclass
class RayExecutor:
    """One Ray task per item, with the recipe's resource requests, retried max_retries times when
    its worker dies. Joins the cluster at `address` (or $RAY_ADDRESS), else starts a local one,
    unless this process is connected already."""

    address: str | None = None
    name: str = "ray"
    started: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        try:
            import ray
        except ImportError:
            raise PipelineError(f"--executor ray needs Ray: {INSTALL}") from None
        self.ray = ray
        address = self.address or os.environ.get("RAY_ADDRESS") or None
        if address:
            check_reachable(address)
        if ray.is_initialized():
            return
        try:
            with without_secrets():
                ray.init(address=address or "local", include_dashboard=False,
                         logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = f"at {address}" if address else "here"
            raise PipelineError(f"--executor ray: cannot start or reach a Ray cluster {where} "
                                f"({first_line(e)}); check --ray-address or $RAY_ADDRESS") from None
        self.started = True

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()

    def run(self, job: Job, keys: list[str], upstream: dict[str, Any]) -> list[TaskResult]:
        ray = self.ray
        remote = ray.remote(run_task)
        refs = {}
        for key in keys:
            res = resources(job, key)
            check_fits(key, res, ray.cluster_resources(), job)
            refs[key] = remote.options(num_cpus=res.cpus, num_gpus=res.gpus,
                                       max_retries=job.recipe.resources.retries,
                                       name=key).remote(task_spec(job, key, upstream,
                                                                  res.cpus))
        results: dict[str, TaskResult] = {}
        pending = {ref: key for key, ref in refs.items()}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            key = pending.pop(done[0])
            try:
                results[key] = ray.get(done[0])
            except ray.exceptions.RayTaskError as e:  # not a PipelineError: a bug in the task
                results[key] = TaskResult(key, None, error=f"task {key} raised on a worker: "
                                          f"{type(e.cause).__name__}: {e.cause}", exit_code=1)
            except ray.exceptions.RayError as e:  # the worker or its node died, retries spent
                results[key] = TaskResult(key, None, exit_code=1, error=(
                    f"task {key}: Ray gave up after {job.recipe.resources.retries} retries "
                    f"({type(e).__name__}: {first_line(e)})"))
            report(results[key])
        return [results[k] for k in keys]


def check_fits(key: str, res: TaskResources, cluster: dict[str, float], job: Job) -> None:
    """InputError for a request larger than the whole cluster: Ray would wait for it forever."""
    for kind, want in (("CPU", res.cpus), ("GPU", res.gpus or 0)):
        have = cluster.get(kind, 0)
        if want > have:
            stage = task_stage(key)[0].name
            hint = " or --device cpu" if kind == "GPU" else ""
            raise InputError(f"{job.recipe.path}: task {key} asks for {want} {kind}(s), the Ray "
                             f"cluster has {have:g}; set [resources] {stage} = {{ cpus = ..., "
                             f"gpus = ... }}{hint}")


def check_reachable(address: str) -> None:
    """A PipelineError now when nothing listens at a Ray address HOST:PORT (or ray://HOST:PORT):
    ray.init would wait for it for many minutes."""
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", "local": Ray resolves them
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as e:
        raise PipelineError(f"--executor ray: no Ray cluster answers at {address} "
                            f"({e.strerror or e}); check --ray-address or $RAY_ADDRESS") from None


# ---------------------------------------------------------------- slurm


@dataclass
class SlurmExecutor:
    """One Slurm job per item through submitit (partition, account, time, memory: these options,
    else [slurm]; CPUs and GPUs from [resources]; job files and logs in WORKDIR/slurm); a job that
    died without a result (killed, preempted, node failure) is resubmitted up to `retries` times.
    cluster "local" runs the jobs as processes on this machine (submitit's LocalExecutor), for
    testing."""

    cluster: str = "slurm"  # SLURM_CLUSTERS
    partition: str | None = None
    account: str | None = None
    time_min: int | None = None
    mem_gb: int | None = None  # 0: the partition's default
    name: str = "slurm"
    poll_s: float = 1.0
    engines: dict[Path, Any] = field(default_factory=dict, init=False)  # submitit's, by folder

    def __post_init__(self) -> None:
        try:
            import submitit
        except ImportError:
            raise PipelineError(f"--executor slurm needs submitit: {INSTALL}") from None
        self.submitit = submitit

    def close(self) -> None:
        pass

    def engine(self, folder: Path) -> Any:
        """submitit's executor writing its job files and logs to `folder` (the job's WORKDIR/slurm),
        made on first use."""
        if folder not in self.engines:
            try:
                self.engines[folder] = self.submitit.AutoExecutor(folder=folder, cluster=self.cluster)
            except (RuntimeError, ValueError) as e:
                raise PipelineError(f"--executor slurm: {e}") from None
        return self.engines[folder]

    def parameters(self, job: Job, key: str) -> dict[str, Any]:
        """submitit's parameters for the task `key`: these options over [slurm]; CPUs and GPUs
        from [resources]; none for what neither sets (the partition's default)."""
        s, res = job.recipe.slurm, resources(job, key)
        mem_gb = s.mem_gb if self.mem_gb is None else self.mem_gb
        params = {"name": key.replace("/", "-"), "cpus_per_task": res.cpus,
                  "gpus_per_node": res.gpus, "timeout_min": self.time_min or s.time_min,
                  "slurm_partition": self.partition or s.partition or None,
                  "slurm_account": self.account or s.account or None, "mem_gb": mem_gb or None}
        return {k: v for k, v in params.items() if v is not None}

    def submit(self, job: Job, key: str, upstream: dict[str, Any]) -> Any:
        params, engine = self.parameters(job, key), self.engine(job.dirs.slurm)
        engine.update_parameters(**params)
        with without_secrets():
            return engine.submit(run_task, task_spec(job, key, upstream, params["cpus_per_task"]))

    def run(self, job: Job, keys: list[str], upstream: dict[str, Any]) -> list[TaskResult]:
        utils = self.submitit.core.utils
        retries = job.recipe.resources.retries
        logs = job.dirs.slurm
        pending = {key: (self.submit(job, key, upstream), 0) for key in keys}
        results: dict[str, TaskResult] = {}
        while pending:
            for key, (sjob, tries) in list(pending.items()):
                if not sjob.done():
                    continue
                del pending[key]
                try:
                    results[key] = sjob.result()
                except utils.FailedJobError as e:  # an exception in the task (a bug): no retry
                    results[key] = TaskResult(key, None, exit_code=1, error=(
                        f"task {key} raised in Slurm job {sjob.job_id}: {first_line(e)}; "
                        f"logs in {logs}"))
                except utils.UncompletedJobError as e:  # died without a result (its superclass)
                    if tries < retries:
                        log.info("task %s: Slurm job %s died (%s); resubmitting (retry %d of %d)",
                                 key, sjob.job_id, first_line(e), tries + 1, retries)
                        pending[key] = (self.submit(job, key, upstream), tries + 1)
                        continue
                    results[key] = TaskResult(key, None, exit_code=1, error=(
                        f"task {key}: Slurm job {sjob.job_id} died {retries + 1} times "
                        f"({first_line(e)}); logs in {logs}"))
                report(results[key])
            if pending:
                time.sleep(self.poll_s)
        return [results[k] for k in keys]


EXECUTORS: dict[str, type] = {"local": LocalExecutor, "ray": RayExecutor, "slurm": SlurmExecutor}


def make_executor(name: str, **settings: Any) -> Executor:
    """The executor `--executor NAME` asks for, with the settings its options gave (RayExecutor
    `address`; SlurmExecutor `cluster`, `partition`, `account`, `time_min`, `mem_gb`)."""
    if name not in EXECUTORS:
        raise InputError(f"--executor {name!r}: choose one of {', '.join(EXECUTORS)}")
    return EXECUTORS[name](**settings)
