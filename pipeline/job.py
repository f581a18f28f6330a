"""The job: the stages of the table STAGES (convert → quantize, one task per variant, imatrix,
and gguf, one per [[gguf]] type → verify → publish) in one work directory (pipeline/workdir.py),
re-running a task only when its inputs changed (like make, but by fingerprint). The tasks of each
level run on an executor: here one after another (LocalExecutor), or on a cluster
(pipeline/executors.py); publish always runs here. The `run` command is pipeline/run.py.

The work directory also holds job.json (per task: input fingerprints, its outputs' fingerprint,
every path it has written, status, where it ran) and job.log. A task's inputs are its options,
the files it reads (size + mtime) and the fingerprints of the upstream outputs it uses, so
changing one variant's options re-runs that variant and verify only. Tasks take a lock each, so
`--variant` jobs and a cluster's workers may run side by side.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from pipeline import __version__
from pipeline.core.bounded import checked_path, read_json, typed
from pipeline.core.errors import (CheckFailed, InputError, OutputExistsError, PipelineError,
                                  first_line, os_failure)
from pipeline.core.output import overlap, partial_path
from pipeline.credentials import RedactingFilter, secret_labels
from pipeline.methods import METHODS
from pipeline.recipe import Recipe, Source, TaskResources
from pipeline.workdir import WorkDir
from verify.report import SCHEMA as REPORT_SCHEMA
from verify.report import Report, perplexity_rows, read_report

JOB_NAME, LOG_NAME, LOCKS = "job.json", "job.log", ".locks"
# A task's CPUs and torch threads when [resources] names none for its stage: $PIPELINE_TASK_CPUS,
# else this machine's cores, at most CPUS_CAP (fast on a laptop, polite on a shared node).
CPUS_ENV, CPUS_CAP = "PIPELINE_TASK_CPUS", 8
SCHEMA = 1
ALWAYS = "always runs (uploads only what changed)"
log = logging.getLogger("pipeline.job")


class JobFailed(PipelineError):
    """A stage failed; carries the job's summary and the stage error's exit code."""

    def __init__(self, cause: PipelineError, result: dict[str, Any]) -> None:
        super().__init__(str(cause))
        self.exit_code = cause.exit_code
        self.result = result


class TaskFailed(PipelineError):
    """A task's PipelineError as it came back (from this process or a worker): message and exit
    code."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# ---------------------------------------------------------------- fingerprints


def files_fingerprint(files: list[Path], root: Path | None = None) -> str:
    """sha256 over (name, size, mtime_ns) of the files: cheap, and changes when a file does."""
    h = hashlib.sha256()
    for p in sorted(files):
        st = p.stat()
        name = p.relative_to(root).as_posix() if root else str(p)
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def tree_fingerprint(path: Path) -> str | None:
    """Fingerprint of every file under a directory (or of one file); None when it is absent."""
    path = Path(path)
    if path.is_file():
        return files_fingerprint([path], path.parent)
    if not path.is_dir():
        return None
    return files_fingerprint([p for p in path.rglob("*") if p.is_file()], path)


def outputs_fingerprint(paths: list[Path]) -> str | list[str | None] | None:
    """A task's outputs: its one output's tree_fingerprint, or the list of them."""
    return tree_fingerprint(paths[0]) if len(paths) == 1 else [tree_fingerprint(p) for p in paths]


def text_fingerprint(source: str) -> str:
    """A text source (glob, directory, file, or hf:… dataset id) as a fingerprint: its files by
    name below the source's fixed folder, size and mtime, so a project moved whole keeps it."""
    from pipeline.core.calibration import glob_root, local_files

    if source.startswith("hf:"):
        return source
    top, _ = glob_root(source)
    root = top if top.is_dir() else top.parent
    try:
        return files_fingerprint(local_files(source), root)
    except InputError:
        return "no files"  # the stage itself reports it


def options_fingerprint(options: Any) -> str:
    return json.dumps(options, sort_keys=True, default=str)


# ---------------------------------------------------------------- job.json and locks


@contextmanager
def locked(workdir: Path, name: str) -> Iterator[None]:
    """An exclusive lock on workdir/.locks/NAME (held by one process at a time)."""
    d = workdir / LOCKS
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f"{name.replace('/', '_')}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def existing_or_new_dir(path: Path, what: str) -> Path:
    """`path` as a directory: created when missing; InputError when a file (or a bad path) is there."""
    path = checked_path(path, what)
    if (path.exists() or path.is_symlink()) and not path.is_dir():
        raise InputError(f"{what} {path}: exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    return path


def read_records(workdir: Path) -> dict[str, Any]:
    """job.json's task records (key -> record object); {} when there is none yet."""
    path = workdir / JOB_NAME
    if not (path.exists() or path.is_symlink()):
        return {}
    try:
        stages = typed(read_json(path), "stages", dict, str(path))
        for key, record in stages.items():
            if not isinstance(record, dict) or not isinstance(record.get("inputs", {}), dict):
                raise InputError(f"{path}: stages.{key} must be an object with object inputs")
            written = record.get("written", [])
            if not isinstance(written, list) or not all(isinstance(p, str) for p in written):
                raise InputError(f"{path}: stages.{key}.written must be a list of strings")
    except InputError as e:
        raise InputError(f"{e}; delete it to recompute every stage") from None
    return stages


def write_record(workdir: Path, key: str, record: dict[str, Any]) -> None:
    """Update one task's record in job.json (read-modify-write under a lock, atomic replace)."""
    with locked(workdir, JOB_NAME):
        stages = read_records(workdir)
        stages[key] = record
        tmp = workdir / f".{JOB_NAME}.{socket.gethostname()}.{os.getpid()}"
        tmp.write_text(json.dumps({"schema": SCHEMA, "tool_version": __version__,
                                   "stages": stages}, indent=2) + "\n")
        os.replace(tmp, workdir / JOB_NAME)


def scalars(summary: Any) -> dict[str, Any]:
    """The top-level scalar entries of a stage summary (what job.json keeps of it)."""
    if not isinstance(summary, dict):
        return {}
    return {k: v for k, v in summary.items() if isinstance(v, (str, int, float, bool)) or v is None}


# ---------------------------------------------------------------- the job's configuration


@dataclass(frozen=True)
class Job:
    """What one run of a recipe does: which stages and variants, where, and how. Configuration
    only, and no credential: a task on another machine gets its fields, never the Hub token."""

    recipe: Recipe
    workdir: Path
    last_stage: str = "publish"
    branches: tuple[str, ...] = ()
    dry_run: bool = False
    endpoint: str | None = None
    force: bool = False
    device: str = "auto"
    source: Path | None = None  # the checkpoint directory, resolved once (check_inputs) on the driver
    cpus: int = 1  # a task's CPUs (torch threads) by default: default_cpus(), resolved on the driver

    @property
    def dirs(self) -> WorkDir:
        """Where the stages' outputs lie in the work directory."""
        hf = self.recipe.source.is_hf and self.source is not None
        return WorkDir(self.workdir, self.recipe.model.name, self.source if hf else None)

    def wants(self, stage: str) -> bool:
        return STAGE_NAMES.index(stage) <= STAGE_NAMES.index(self.last_stage)

    def stale(self, old: dict[str, Any] | None, inputs: dict[str, Any],
              outputs: list[Path]) -> str | None:
        """Why a task must run, or None when its previous output can be reused."""
        if self.force:
            return "--force"
        if old is None:
            return "no previous run"
        if old.get("status") != "done":
            return f"previous run {old.get('status')}"
        changed = sorted(k for k in inputs.keys() | old.get("inputs", {}).keys()
                         if inputs.get(k) != old.get("inputs", {}).get(k))
        if changed:
            return f"changed: {', '.join(changed)}"
        if outputs_fingerprint(outputs) != old.get("output"):
            return "output missing or modified"
        return None

    def recorded(self, path: Path) -> str:
        """`path` as job.json records it: relative to the work directory when inside it."""
        return path.relative_to(self.workdir).as_posix() if path.is_relative_to(self.workdir) \
            else str(path)

    def unclaimed(self, records: dict[str, Any], paths: list[Path]) -> list[Path]:
        """Those of `paths` that exist though no task in job.json wrote them (a record's
        `written`; a record from before it was kept, its stage's output)."""
        claimed: set[str] = set()
        for key, r in records.items():
            if "written" in r:
                claimed.update(r["written"])
            elif key.partition("/")[0] in BY_NAME:
                stage, item = task_stage(key)
                claimed.add(self.recorded(stage.output(self, item)))
        return [p for p in paths if (p.exists() or p.is_symlink())
                and self.recorded(p) not in claimed]

    def check_inputs(self) -> Path:
        """Every local input of the stages to run, checked before the first one starts (a missing
        evaluation text must not surface after the quantisation); returns the source directory.
        The stages pass force=True: each replaces only an output of its own (its manifest), and
        `execute` only one that job.json records."""
        from pipeline.core.calibration import local_files

        r = self.recipe
        src = r.source.resolve()
        if src is None:  # a Hub repository: into the work directory's cache
            src = download(r.source, self.dirs.downloads, self.endpoint)
        else:
            how = overlap(self.workdir, src)
            if how:
                raise InputError(f"{self.workdir}: the work directory {how} the source {src}; "
                                 "choose another --workdir")
        check_source_model(r.source, src)
        texts = []
        if self.wants("quantize"):
            texts += [(f"[[variants]] {b}: calibration", r.variant(b).calibration)
                      for b in self.branches if METHODS[r.variant(b).method].calibrated]
        if self.wants("verify"):
            texts.append(("[verify] eval", r.verify.eval))
        for where, source in texts:
            if source.startswith("hf:"):
                continue  # a dataset on the Hub: read by the stage
            try:
                local_files(source)
            except InputError:
                raise InputError(f"{r.path}: {where} = {source!r}: no files found") from None
        return src


def default_cpus() -> int:
    """The default CPUs (and torch threads) of a task, resolved once where the job starts and used
    on every executor alike: GPTQ's float32 sums depend on the thread count, so a local run and a
    cluster's tasks of the same recipe must compute with the same one to give the same bytes."""
    given = os.environ.get(CPUS_ENV)
    if given is None:
        return max(1, min(os.cpu_count() or 1, CPUS_CAP))
    if not given.isdigit() or int(given) < 1:
        raise InputError(f"${CPUS_ENV} must be a whole number of CPUs of at least 1")
    return int(given)


def resources(job: Job, key: str) -> TaskResources:
    """The task's requests: [resources] <stage>, its cpus the job's default (Job.cpus) when the
    recipe names none; a stage that computes on the device (Stage.gpu) asks for one GPU by
    default when the job runs on CUDA (--device cuda[:N], or auto with a GPU here)."""
    stage, _ = task_stage(key)
    res = job.recipe.resources.task(stage.name)
    gpus = res.gpus if res.gpus is not None else int(stage.gpu and on_cuda(job.device))
    return TaskResources(res.cpus if res.cpus is not None else job.cpus, gpus)


def on_cuda(device: str) -> bool:
    if device.startswith("cuda"):
        return True
    if device != "auto":
        return False
    import torch

    return torch.cuda.is_available()


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to n while the block runs."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


HF_FILES = ("*.json", "*.safetensors", "tokenizer.model", "*.jinja")  # what a job reads of a repo


def download(source: Source, cache: Path, endpoint: str | None) -> Path:
    """The source repository at its revision, through huggingface_hub's cache in the work
    directory (resumable; a file appears only once whole): its model files only."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from pipeline.publish import hub_settings

    try:
        with hub_settings():
            return Path(snapshot_download(source.repo, revision=source.revision, cache_dir=cache,
                                          allow_patterns=list(HF_FILES), endpoint=endpoint))
    except (RepositoryNotFoundError, RevisionNotFoundError, HfHubHTTPError,
            LocalEntryNotFoundError) as e:
        raise InputError(f"{source.recipe}: [source] repo = {source.repo!r} at revision "
                         f"{source.revision!r}: {first_line(e)}") from None


def pinned(recipe: Recipe, src: Path) -> Recipe:
    """The recipe with a Hub source's revision replaced by the commit downloaded (the snapshot's
    folder name), so that job.json and the cards name what was used, not a branch that moves."""
    s = recipe.source
    if s.repo is None or s.revision == src.name:
        return recipe
    return dataclasses.replace(recipe, source=dataclasses.replace(s, revision=src.name))


def check_source_model(source: Source, src: Path) -> None:
    """A Meta checkpoint (params.json, shards, tokenizer) or an HF Llama model in fp16, bf16 or
    fp32 (config, every tensor's shape, tied or not, any head count), not quantised already."""
    from pipeline.core.checkpoint import HFCheckpoint
    from pipeline.core.meta import MetaCheckpoint

    if not source.is_hf:
        MetaCheckpoint(src)
        return
    ck = HFCheckpoint(src)
    if ck.quantization:
        raise InputError(f"{src / 'config.json'}: [source] is a quantised model "
                         f"({ck.quantization}); start from the unquantised one")


# ---------------------------------------------------------------- the stages: inputs and functions
# inputs(job, item) -> the task's own input fingerprints (execute adds the output fingerprint of
# every task it needs); run(job, item, resume) -> the stage's summary.


def hf_source(job: Job) -> dict[str, Any]:
    """An HF source's fingerprint, for the stages that read it as the fp16 model (a Meta source's
    conversion is the convert task's output, an upstream input)."""
    return {"source": tree_fingerprint(job.source)} if job.recipe.source.is_hf else {}


def convert_inputs(job: Job, item: str) -> dict[str, Any]:
    r = job.recipe
    return {"source": tree_fingerprint(job.source), "tool": __version__,
            "options": options_fingerprint({**dataclasses.asdict(r.convert),
                                            "chat_format": r.model.chat_format})}


def run_convert(job: Job, item: str, resume: bool) -> dict[str, Any]:
    from pipeline.convert import convert

    c = job.recipe.convert
    return convert(job.source, job.dirs.fp16, dtype=c.dtype, max_shard_size=c.max_shard_size,
                   skip_checksums=c.skip_checksums, chat_format=job.recipe.model.chat_format,
                   force=True)


def quantize_inputs(job: Job, branch: str) -> dict[str, Any]:
    v = job.recipe.variant(branch)
    return {**hf_source(job),
            "spec": options_fingerprint(v.as_dict()),
            "calibration": text_fingerprint(v.calibration),
            "sampling": options_fingerprint({"nsamples": v.nsamples, "seqlen": v.seqlen,
                                             "seed": v.seed}), "tool": __version__,
            "imatrix": branch == imatrix_branch(job)}


def run_quantize(job: Job, branch: str, resume: bool) -> dict[str, Any]:
    from pipeline.quantize import quantize

    v = job.recipe.variant(branch)
    return quantize(job.dirs.fp16, job.dirs.gptq(branch), v, calibration=v.calibration,
                    nsamples=v.nsamples, seqlen=v.seqlen, seed=v.seed, device=job.device,
                    resume=resume, force=True, max_shard_size=job.recipe.convert.max_shard_size,
                    imatrix=job.dirs.imatrix if branch == imatrix_branch(job) else None)


def pass_matrix(job: Job, branch: str) -> list[Path]:
    """The importance matrix, when this variant's GPTQ pass gives it."""
    return [job.dirs.imatrix] if branch == imatrix_branch(job) else []


def gguf_types(job: Job) -> list[str]:
    """The GGUF files the job makes: the recipe's, and F16 whenever a quantised one is made (the
    quantiser's source, and verify's for the baselines without the importance matrix; verified,
    published only when the recipe lists it)."""
    types = [g.type for g in job.recipe.gguf]
    return (["F16"] if "F16" not in types and any(t != "F16" for t in types) else []) + types


def with_imatrix(job: Job, type_name: str) -> bool:
    """Whether a GGUF file is quantised with the job's importance matrix: a type whose quantiser
    uses one, whose [[gguf]] entry keeps `imatrix` (the default)."""
    from pipeline.core.gguf_types import TYPES  # the gguf library is slow to import

    return TYPES[type_name].uses_imatrix and next(g.imatrix for g in job.recipe.gguf
                                                   if g.type == type_name)


def takes_imatrix(job: Job) -> bool:
    """Whether any GGUF file of the job is made with the importance matrix."""
    return any(with_imatrix(job, g.type) for g in job.recipe.gguf)


def imatrix_branch(job: Job) -> str | None:
    """The variant whose GPTQ pass gives the importance matrix, at no extra cost: the first of the
    recipe's calibrated variants that reads [calibration] as it is (text, windows, seed), when a
    GGUF file takes the matrix. None: the imatrix stage makes it in a pass of its own, if one is
    taken."""
    if not takes_imatrix(job):
        return None
    c = job.recipe.calibration
    return next((v.branch for v in job.recipe.variants if METHODS[v.method].calibrated and
                 (v.calibration, v.nsamples, v.seqlen, v.seed)
                 == (c.source, c.nsamples, c.seqlen, c.seed)), None)


def quantize_items(job: Job) -> tuple[str, ...]:
    """The job's variants, and the one whose pass gives the GGUF files' matrix when the job makes
    GGUF files without it (`--variant`): a prerequisite, as make builds one."""
    b = imatrix_branch(job)
    extra = b is not None and b not in job.branches and job.wants("gguf")
    return (*job.branches, *([b] if extra else []))


def imatrix_task(job: Job) -> list[str]:
    """The task that writes the importance matrix: the GPTQ pass's, or the imatrix stage's."""
    b = imatrix_branch(job)
    return [f"quantize/{b}"] if b is not None else ["imatrix"]


def gguf_needs(job: Job, type_name: str) -> list[str]:
    return [*fp16_tasks(job), *(["gguf/F16"] if type_name != "F16" else []),
            *(imatrix_task(job) if with_imatrix(job, type_name) else [])]


def imatrix_inputs(job: Job, item: str) -> dict[str, Any]:
    c = job.recipe.calibration
    return {**hf_source(job), "calibration": text_fingerprint(c.source), "tool": __version__,
            "sampling": options_fingerprint({"nsamples": c.nsamples, "seqlen": c.seqlen,
                                             "seed": c.seed})}


def run_imatrix(job: Job, item: str, resume: bool) -> dict[str, Any]:
    from pipeline.imatrix import imatrix

    c = job.recipe.calibration
    return imatrix(job.dirs.fp16, job.dirs.imatrix, calibration=c.source, nsamples=c.nsamples,
                   seqlen=c.seqlen, seed=c.seed, device=job.device, force=True)


def gguf_inputs(job: Job, type_name: str) -> dict[str, Any]:
    return {**hf_source(job), "type": type_name, "name": job.recipe.model.name,
            "tool": __version__}


def run_gguf(job: Job, type_name: str, resume: bool) -> dict[str, Any]:
    """llama.cpp's quantiser on torch's thread count: a cluster task's CPU request (run_task sets
    it), all cores locally; the bytes do not depend on it."""
    import torch

    from pipeline.gguf import write_gguf

    return write_gguf(job.dirs.fp16, job.dirs.gguf(type_name), type_name=type_name,
                      name=job.recipe.model.name, force=True, threads=torch.get_num_threads(),
                      f16=job.dirs.gguf("F16") if type_name != "F16" else None,
                      imatrix=job.dirs.imatrix if with_imatrix(job, type_name) else None)


def verify_inputs(job: Job, item: str) -> dict[str, Any]:
    r = job.recipe
    return {**hf_source(job),
            "meta": None if r.source.is_hf else tree_fingerprint(job.source),
            "eval": text_fingerprint(r.verify.eval),
            "tool": __version__,  # the options but `eval`, whose files are fingerprinted above
            "options": options_fingerprint({k: v for k, v in dataclasses.asdict(r.verify).items()
                                            if k != "eval"}),
            "schema": REPORT_SCHEMA,  # a report of another schema is made again
            "gguf_options": options_fingerprint([dataclasses.asdict(g) for g in r.gguf])}


def run_verify(job: Job, item: str, resume: bool) -> dict[str, Any]:
    """The verify stage; CheckFailed (after verify.json is written) when a check failed."""
    from verify.stage import judge

    r, vo, d = job.recipe, job.recipe.verify, job.dirs
    report = judge(fp16=d.fp16, quants=[d.gptq(b) for b in job.branches],
                   meta=None if r.source.is_hf else job.source,
                   eval_text=vo.eval, out=d.verify, seqlen=vo.seqlen,
                   max_windows=vo.max_windows, thresholds=vo.thresholds(),
                   baseline_rtn=vo.baseline_rtn, prompts=vo.prompts or None,
                   chat_prompts=vo.chat_prompts,
                   device=job.device, force=True,
                   ggufs=[d.gguf(t) for t in gguf_types(job)],
                   gguf_thresholds={g.type: g.thresholds() for g in r.gguf},
                   runtimes=vo.runtimes,
                   imatrix=d.imatrix if takes_imatrix(job) else None)
    if not report.passed:
        raise CheckFailed(f"{d.table}: verify failed: "
                          f"{', '.join(report.failed())}; nothing is published")
    return {"passed": True}


def publish_inputs(job: Job, item: str) -> dict[str, Any]:
    return {"dry_run": job.dry_run, "tool": __version__}


def run_publish(job: Job, item: str, resume: bool, token: str | None = None) -> dict[str, Any]:
    from pipeline.publish import publish

    return publish(job.recipe, **job.dirs.artifacts(job.recipe, job.branches),
                   dry_run=job.dry_run, plan_dir=job.dirs.plan,
                   endpoint=job.endpoint, token=token)


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class Stage:
    """One entry of the job's table: the stages whose outputs it reads (`after`), how it fans out
    into tasks, each task's output, its inputs (fingerprints) and the function that makes it. A
    task needs every task of the `after` stages, or the task keys `needs` gives; the job derives
    the order and the levels from that graph (task_levels), and a task's inputs hold the output
    fingerprints of the tasks it needs (execute), so it runs again when one of them changed."""

    name: str
    after: tuple[str, ...]
    items: Callable[[Job], Sequence[str]]  # one task per item; ("",): the stage runs once
    output: Callable[[Job, str], Path]
    inputs: Callable[[Job, str], dict[str, Any]]
    run: Callable[..., dict[str, Any]]
    needs: Callable[[Job, str], Sequence[str]] | None = None
    also: Callable[[Job, str], Sequence[Path]] | None = None  # more files the task writes
    always: bool = False  # no reuse: runs every time (publish uploads only what changed)
    on_driver: bool = False  # never sent to a worker: runs where the job runs, with the Hub token
    gpu: bool = False  # computes on --device: a cluster task asks for a GPU by default on CUDA

    def key(self, item: str) -> str:
        """The task's name in job.json, the summary and --json: `quantize/main`, `verify`."""
        return f"{self.name}/{item}" if item else self.name

    def outputs(self, job: Job, item: str) -> list[Path]:
        """Everything the task writes: its output, and the files `also` names."""
        return [self.output(job, item), *(self.also(job, item) if self.also else ())]


def once(job: Job) -> Sequence[str]:
    return ("",)


def fp16_tasks(job: Job) -> list[str]:
    """The task making the fp16 model: the conversion, none for an HF source."""
    return [] if job.recipe.source.is_hf else ["convert"]


STAGES = (
    Stage("convert", (), lambda job: () if job.recipe.source.is_hf else ("",),
          lambda job, _: job.dirs.fp16, convert_inputs, run_convert),
    Stage("quantize", ("convert",), quantize_items, lambda job, b: job.dirs.gptq(b),
          quantize_inputs, run_quantize, gpu=True, also=pass_matrix),
    Stage("imatrix", ("convert",),
          lambda job: ("",) if takes_imatrix(job) and imatrix_branch(job) is None else (),
          lambda job, _: job.dirs.imatrix, imatrix_inputs, run_imatrix, gpu=True),
    Stage("gguf", ("convert", "imatrix"), gguf_types,
          lambda job, t: job.dirs.gguf(t), gguf_inputs, run_gguf, needs=gguf_needs),
    Stage("verify", ("convert", "quantize", "gguf"), once, lambda job, _: job.dirs.verify,
          verify_inputs, run_verify, gpu=True),
    Stage("publish", ("verify",), once, lambda job, _: job.dirs.plan, publish_inputs, run_publish,
          always=True, on_driver=True),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
BY_NAME = {s.name: s for s in STAGES}


def task_needs(job: Job, stage: Stage, item: str) -> list[str]:
    """The keys of the tasks whose outputs a task reads: its `needs`, else every task of its
    `after` stages."""
    if stage.needs is not None:
        return list(stage.needs(job, item))
    return [t.key(j) for name in stage.after for t in [BY_NAME[name]] for j in t.items(job)]


def task_levels(job: Job) -> list[list[tuple[Stage, str]]]:
    """The job's tasks (its stages up to the last) grouped by level: a task's level is one more
    than the highest of the tasks it needs, so the tasks of a level are independent of each
    other and every level needs only those before it. Within a level, table order."""
    tasks = [(s, i) for s in STAGES if job.wants(s.name) for i in s.items(job)]
    needs = {s.key(i): task_needs(job, s, i) for s, i in tasks}
    level: dict[str, int] = {}

    def of(key: str) -> int:
        if key not in level:
            level[key] = 1 + max((of(k) for k in needs[key] if k in needs), default=-1)
        return level[key]

    depth = 1 + max(map(of, needs), default=-1)
    return [[(s, i) for s, i in tasks if level[s.key(i)] == n] for n in range(depth)]


def task_stage(key: str) -> tuple[Stage, str]:
    """(stage, item) of a task key such as `quantize/main`."""
    name, _, item = key.partition("/")
    return BY_NAME[name], item


def check_resources(recipe: Recipe) -> None:
    """[resources] names only stages whose tasks go to workers (the table's names, not those
    that run on the driver)."""
    known = [s.name for s in STAGES if not s.on_driver]
    unknown = sorted(set(recipe.resources.tasks) - set(known))
    if unknown:
        raise InputError(f"{recipe.path}: [resources]: unknown key(s) {', '.join(unknown)} "
                         f"(stages whose tasks take requests: {', '.join(known)})")


# ---------------------------------------------------------------- running one task


@dataclass(frozen=True)
class TaskResult:
    """What one task gives back: its summary-table row (None when it stopped before running),
    job.json record, the stage's summary, its log lines (a worker's, for the driver to show) and,
    when it failed, the PipelineError's message and exit code."""

    key: str
    row: dict[str, Any] | None
    record: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    log: tuple[str, ...] = ()
    error: str | None = None
    exit_code: int = 0


def where() -> dict[str, Any]:
    """The host, process, torch thread count and Ray node (when a Ray worker runs it: several
    raylets may share a host) of a task (rows and job.json records)."""
    import torch

    return {"host": socket.gethostname(), "pid": os.getpid(), "threads": torch.get_num_threads(),
            "node": ray_node()}


def ray_node() -> str | None:
    """The id of the Ray node this process runs on, when it is part of a Ray cluster."""
    ray = sys.modules.get("ray")  # never imported here: only a Ray worker or driver has it
    if ray is None or not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_node_id()


def execute(job: Job, stage: Stage, item: str, upstream: dict[str, Any],
            token: str | None = None) -> TaskResult:
    """One task with the job's bookkeeping: reuse when job.json shows the same inputs and an
    unchanged output, else run (resuming a partial output left by the same inputs) and record.
    A PipelineError comes back in the result; anything else is recorded and raised."""
    key, outputs = stage.key(item), stage.outputs(job, item)
    output = outputs[0]
    row: dict[str, Any] = {"stage": key, "status": "failed", "seconds": 0.0, "output": str(output),
                           "reason": "", **where()}
    try:
        inputs = {**stage.inputs(job, item),  # and what it reads of other tasks, by their keys
                  **{f"upstream {k}": upstream[k] for k in task_needs(job, stage, item)}}
        with locked(job.workdir, key):
            records = read_records(job.workdir)
            old = records.get(key)
            reason = ALWAYS if stage.always else job.stale(old, inputs, outputs)
            if reason is None:
                log.info("%s: up to date, reused (%s)", key, output)
                return TaskResult(key, {**row, "status": "reused", "reason": "inputs unchanged"}, old)
            theirs = [] if stage.always else job.unclaimed(records, outputs)
            if theirs:
                raise OutputExistsError(
                    f"{theirs[0]}: exists, but {job.workdir / JOB_NAME} has no record of this job "
                    "writing it; the job replaces only its own outputs: move it away")
            resume = bool(old and old.get("inputs") == inputs and old.get("status") != "done"
                          and partial_path(output).exists())
            row["reason"] = reason
            log.info("%s: running (%s)%s", key, reason, ", resuming" if resume else "")
            place = {k: row[k] for k in ("host", "pid", "threads", "node")}
            written = list(dict.fromkeys([*(job.recorded(p) for p in outputs),
                                          *(old or {}).get("written", [])]))
            write_record(job.workdir, key, {"status": "running", "inputs": inputs,
                                            "written": written, "started": time.time(), **place})
            t0 = time.perf_counter()
            try:
                summary = stage.run(job, item, resume, **({"token": token} if stage.on_driver else {}))
            except BaseException as e:
                row["seconds"] = round(time.perf_counter() - t0, 2)
                write_record(job.workdir, key, {"status": "failed", "inputs": inputs,
                                                "written": written,
                                                "error": str(e) or type(e).__name__,
                                                "exit_code": getattr(e, "exit_code", None),
                                                "seconds": row["seconds"], **place})
                raise
            seconds = round(time.perf_counter() - t0, 2)
            record = {"status": "done", "inputs": inputs, "written": written,
                      "output": outputs_fingerprint(outputs), "seconds": seconds,
                      "finished": time.time(), "summary": scalars(summary), **place}
            write_record(job.workdir, key, record)
            log.info("%s: done in %.1f s (%s)", key, seconds, output)
            status = "dry run" if summary.get("dry_run") is True else "ran"  # publish --dry-run
            return TaskResult(key, {**row, "status": status, "seconds": seconds}, record, summary)
    except (PipelineError, OSError) as e:
        e = os_failure(e) if isinstance(e, OSError) else e
        return TaskResult(key, row if row["reason"] else None, error=str(e), exit_code=e.exit_code)


# ---------------------------------------------------------------- the run


class Executor(Protocol):
    """Runs the tasks of one level: LocalExecutor, or a cluster's (pipeline/executors.py)."""

    name: str

    def run(self, job: Job, keys: list[str], upstream: dict[str, Any]) -> list[TaskResult]: ...

    def close(self) -> None: ...


class LocalExecutor:
    """This process, one task after another, stopping at the first failure (the default)."""

    name = "local"

    def close(self) -> None:
        pass

    def run(self, job: Job, keys: list[str], upstream: dict[str, Any]) -> list[TaskResult]:
        """Each task on the threads a cluster task of it gets (its [resources] cpus)."""
        results: list[TaskResult] = []
        for key in keys:
            stage, item = task_stage(key)
            with torch_threads(resources(job, key).cpus):
                results.append(execute(job, stage, item, upstream))
            if results[-1].error:
                break
        return results


@dataclass
class Run:
    """What one run of a job produced, filled from the tasks' results: the summary rows, each
    finished task's output fingerprint, the stage summaries and the verify report."""

    job: Job
    executor: str = "local"
    rows: list[dict[str, Any]] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)
    report: Report | None = None

    def add(self, res: TaskResult) -> None:
        if res.row is not None:
            self.rows.append(res.row)
        if res.record is not None:
            self.outputs[res.key] = res.record.get("output")
        if res.summary is not None:
            self.summaries[res.key] = res.summary
        report = self.job.dirs.report
        if res.key == "verify" and res.exit_code in (0, CheckFailed.exit_code) and report.is_file():
            self.report = read_report(report)  # a failed verify's report too: its perplexities

    def result(self, error: PipelineError | None = None) -> dict[str, Any]:
        """The JSON-able summary of this run."""
        return {"recipe": str(self.job.recipe.path), "name": self.job.recipe.name,
                "workdir": str(self.job.workdir), "stage": self.job.last_stage,
                "source": self.job.recipe.source.describe(),
                "variants": list(self.job.branches), "executor": self.executor,
                "task_cpus": {s.name: resources(self.job, s.key(s.items(self.job)[0])).cpus
                              for s in STAGES if not s.on_driver and s.items(self.job)},
                "ok": error is None, "exit_code": 0 if error is None else error.exit_code,
                "error": None if error is None else str(error), "stages": self.rows,
                "perplexity": perplexity_rows(self.report) if self.report else None,
                "verify_report": str(self.job.dirs.table) if self.report else None,
                "publish": self.summaries.get("publish")}


def run_levels(run: Run, executor: Executor, token: str | None) -> None:
    """The table's tasks up to the job's last stage, level by level (the executor waits for each
    level: that is the dependency graph); raises the first failure."""
    src = run.job.check_inputs()
    job = run.job = dataclasses.replace(run.job, source=src, recipe=pinned(run.job.recipe, src))
    for level in task_levels(job):
        tasks = [s.key(i) for s, i in level if not s.on_driver]
        results = executor.run(job, tasks, dict(run.outputs)) if tasks else []
        if not any(r.error for r in results):
            results += [execute(job, s, i, dict(run.outputs), token)
                        for s, i in level if s.on_driver]
        for r in results:
            run.add(r)
        failed = next((r for r in results if r.error), None)
        if failed is not None:
            raise TaskFailed(failed.error, failed.exit_code)


def plan(recipe: Recipe, *, workdir: Path | None = None, stage: str = "publish",
         variants: list[str] | None = None) -> list[dict[str, str]]:
    """The tasks a run would consider, level by level in table order, with their outputs; reads
    nothing but the recipe (no source, no job.json): what `run --plan` prints."""
    if stage not in STAGE_NAMES:
        raise InputError(f"--stage {stage!r}: choose one of {', '.join(STAGE_NAMES)}")
    branches = list(dict.fromkeys(variants)) if variants else [v.branch for v in recipe.variants]
    for b in branches:
        recipe.variant(b)
    job = Job(recipe, WorkDir.of(recipe, workdir).path, stage, tuple(branches))
    return [{"task": s.key(i), "output": ", ".join(str(p) for p in s.outputs(job, i))}
            for level in task_levels(job) for s, i in level]


def run_job(recipe: Recipe, *, workdir: Path | None = None, stage: str = "publish",
            variants: list[str] | None = None, dry_run: bool = False, endpoint: str | None = None,
            token: str | None = None, force: bool = False, device: str = "auto",
            executor: Executor | None = None) -> dict[str, Any]:
    """Run the recipe's stages up to `stage` for the chosen variants (all by default) on the
    executor (default: this process); returns the summary, or raises JobFailed (carrying it)
    when a task fails."""
    if stage not in STAGE_NAMES:
        raise InputError(f"--stage {stage!r}: choose one of {', '.join(STAGE_NAMES)}")
    branches = list(dict.fromkeys(variants)) if variants else [v.branch for v in recipe.variants]
    for b in branches:
        recipe.variant(b)
    check_resources(recipe)
    workdir = existing_or_new_dir(WorkDir.of(recipe, workdir).path, "--workdir")
    executor = executor or LocalExecutor()
    run = Run(Job(recipe, workdir, stage, tuple(branches), dry_run, endpoint, force, device,
                  cpus=default_cpus()), executor.name)
    handler = logging.FileHandler(workdir / LOG_NAME)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter("[job] %(message)s"))
    redacting = RedactingFilter(secret_labels(token))  # job.log and the console: no secret
    handler.addFilter(redacting)
    console.addFilter(redacting)
    loggers = [logging.getLogger("pipeline"), logging.getLogger("verify")]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
        lg.propagate = False  # a library (GPTQModel) may have configured the root logger: no echo
    log.addHandler(console)
    log.info("job %s: stages up to %s, variants %s, work dir %s%s; %d CPU(s) (torch threads) per "
             "task where [resources] names none", recipe.name, stage, ", ".join(branches), workdir,
             "" if executor.name == "local" else f", executor {executor.name}", run.job.cpus)
    try:
        run_levels(run, executor, token)
    except PipelineError as e:
        log.error("job %s failed: %s", recipe.name, e)
        raise JobFailed(e, run.result(e)) from e
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
            lg.propagate = True
        log.removeHandler(console)
        handler.close()
    return run.result()
