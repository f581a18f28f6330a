"""`python -m pipeline run RECIPE`: convert → quantize (each variant) → gguf (each [[gguf]] type)
→ verify → publish in one work directory, re-running a stage only when its inputs changed (like
make, but by fingerprint).

Work directory (work/<recipe name>/): fp16/, gptq/<branch>/, gguf/<name>.<TYPE>.gguf,
verify/verify.json, publish-plan/,
job.json (per stage: input fingerprints, output fingerprint, status) and job.log. A stage's
inputs are its options, the files it reads (size + mtime) and the fingerprints of the upstream
outputs it uses, so changing one variant's options re-runs that variant and verify only.
Stages take a lock per stage and per variant, so `--variant` jobs may run side by side.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import click

from pipeline import __version__
from verify.errors import CheckFailed, InputError, OutputExistsError, PipelineError
from pipeline.output import overlap, partial_path
from pipeline.recipe import Recipe, allow_dir_option, find_recipe, load_recipe
from verify.report import perplexity_rows, render_perplexity

STAGES = ("convert", "quantize", "gguf", "verify", "publish")
JOB_NAME, LOG_NAME, LOCKS = "job.json", "job.log", ".locks"
SCHEMA = 1
log = logging.getLogger("pipeline.job")


class JobFailed(PipelineError):
    """A stage failed; carries the job's summary and the stage error's exit code."""

    def __init__(self, cause: PipelineError, result: dict[str, Any]) -> None:
        super().__init__(str(cause))
        self.exit_code = cause.exit_code
        self.result = result


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


def text_fingerprint(source: str) -> str:
    """A text source (glob, directory, file, or hf:… dataset id) as a fingerprint."""
    from pipeline.calibration import local_files

    if source.startswith("hf:"):
        return source
    try:
        return f"{source}:{files_fingerprint(local_files(source))}"
    except InputError:
        return f"{source}:no files"  # the stage itself reports it


def options_fingerprint(options: dict[str, Any]) -> str:
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


def read_records(workdir: Path) -> dict[str, Any]:
    path = workdir / JOB_NAME
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text()).get("stages", {})
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e}); delete it to recompute every stage") from e


def write_record(workdir: Path, key: str, record: dict[str, Any]) -> None:
    """Update one stage's record in job.json (read-modify-write under a lock, atomic replace)."""
    with locked(workdir, JOB_NAME):
        stages = read_records(workdir)
        stages[key] = record
        tmp = workdir / f".{JOB_NAME}.{os.getpid()}"
        tmp.write_text(json.dumps({"schema": SCHEMA, "tool_version": __version__,
                                   "stages": stages}, indent=2) + "\n")
        os.replace(tmp, workdir / JOB_NAME)


def scalars(summary: Any) -> dict[str, Any]:
    """The top-level scalar entries of a stage summary (what job.json keeps of it)."""
    if not isinstance(summary, dict):
        return {}
    return {k: v for k, v in summary.items() if isinstance(v, (str, int, float, bool)) or v is None}


# ---------------------------------------------------------------- the job


@dataclasses.dataclass
class Job:
    """One run of a recipe: which stages and variants, where, and how."""

    recipe: Recipe
    workdir: Path
    last_stage: str = "publish"
    branches: list[str] = dataclasses.field(default_factory=list)
    dry_run: bool = False
    endpoint: str | None = None
    token: str | None = None
    force: bool = False
    device: str = "auto"
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    report: dict[str, Any] | None = None
    published: dict[str, Any] | None = None

    @property
    def fp16(self) -> Path:
        return self.workdir / "fp16"

    def gptq(self, branch: str) -> Path:
        return self.workdir / "gptq" / branch

    def gguf(self, type_name: str) -> Path:
        from pipeline.gguf import file_name

        return self.workdir / "gguf" / file_name(self.recipe.model.name, type_name)

    @property
    def verify_dir(self) -> Path:
        return self.workdir / "verify"

    @property
    def plan_dir(self) -> Path:
        return self.workdir / "publish-plan"

    def wants(self, stage: str) -> bool:
        return STAGES.index(stage) <= STAGES.index(self.last_stage)

    def stage(self, key: str, inputs: dict[str, Any], output: Path,
              run: Callable[[bool], dict[str, Any]]) -> dict[str, Any]:
        """Run `run(resume)` unless job.json shows the same inputs and an unchanged output;
        returns the stage's record."""
        with locked(self.workdir, key):
            old = read_records(self.workdir).get(key)
            reason = self.stale(old, inputs, output)
            if reason is None:
                log.info("%s: up to date, reused (%s)", key, output)
                self.rows.append({"stage": key, "status": "reused", "seconds": 0.0,
                                  "output": str(output), "reason": "inputs unchanged"})
                return old
            if old is None and (output.exists() or output.is_symlink()):
                raise OutputExistsError(
                    f"{output}: exists, but {self.workdir / JOB_NAME} has no record of this job "
                    "writing it; the job replaces only its own outputs: move it away")
            resume = bool(old and old.get("inputs") == inputs and old.get("status") != "done"
                          and partial_path(output).exists())
            log.info("%s: running (%s)%s", key, reason, ", resuming" if resume else "")
            write_record(self.workdir, key, {"status": "running", "inputs": inputs,
                                             "started": time.time()})
            t0 = time.perf_counter()
            try:
                summary = run(resume)
            except BaseException as e:
                seconds = round(time.perf_counter() - t0, 2)
                write_record(self.workdir, key, {"status": "failed", "inputs": inputs,
                                                 "error": str(e) or type(e).__name__,
                                                 "seconds": seconds})
                self.rows.append({"stage": key, "status": "failed", "seconds": seconds,
                                  "output": str(output), "reason": reason})
                raise
            seconds = round(time.perf_counter() - t0, 2)
            record = {"status": "done", "inputs": inputs, "output": tree_fingerprint(output),
                      "seconds": seconds, "finished": time.time(), "summary": scalars(summary)}
            write_record(self.workdir, key, record)
            log.info("%s: done in %.1f s (%s)", key, seconds, output)
            self.rows.append({"stage": key, "status": "ran", "seconds": seconds,
                              "output": str(output), "reason": reason})
            return record

    def stale(self, old: dict[str, Any] | None, inputs: dict[str, Any], output: Path) -> str | None:
        """Why a stage must run, or None when its previous output can be reused."""
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
        if tree_fingerprint(output) != old.get("output"):
            return "output missing or modified"
        return None

    def check_inputs(self) -> Path:
        """Every local input of the stages to run, checked before the first one starts (a missing
        evaluation text must not surface after the quantisation); returns the source directory.
        The stages pass force=True: each replaces only an output of its own (its manifest), and
        `stage` only one that job.json records."""
        from pipeline.calibration import local_files
        from pipeline.meta import MetaCheckpoint

        r = self.recipe
        src = r.source.resolve()
        how = overlap(self.workdir, src)
        if how:
            raise InputError(f"{self.workdir}: the work directory {how} the source {src}; "
                             "choose another --workdir")
        MetaCheckpoint(src)  # params.json valid, shards and tokenizer present
        texts = []
        if self.wants("quantize"):
            texts += [(f"[[variants]] {b}: calibration", r.variant(b).calibration)
                      for b in self.branches if r.variant(b).method == "gptq"]
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

    def run(self) -> None:
        """The stages up to `last_stage`, in order; raises the first failure."""
        r = self.recipe
        src = self.check_inputs()
        source_fp = tree_fingerprint(src)
        tool = __version__

        from pipeline.convert import convert
        conv = self.stage("convert", {"source": source_fp, "options": options_fingerprint(
            {**dataclasses.asdict(r.convert), "chat_format": r.model.chat_format}), "tool": tool},
            self.fp16, lambda resume: convert(src, self.fp16, dtype=r.convert.dtype,
                                              max_shard_size=r.convert.max_shard_size,
                                              skip_checksums=r.convert.skip_checksums,
                                              chat_format=r.model.chat_format, force=True))
        if not self.wants("quantize"):
            return

        from pipeline.gptq import QuantSpec
        from pipeline.quantize import quantize
        quants: dict[str, str] = {}
        for branch in self.branches:
            v = r.variant(branch)
            spec = QuantSpec(**v.quant_options())
            inputs = {"fp16": conv["output"], "spec": options_fingerprint(spec.as_dict()),
                      "calibration": text_fingerprint(v.calibration),
                      "sampling": options_fingerprint({"nsamples": v.nsamples, "seqlen": v.seqlen,
                                                       "seed": v.seed}), "tool": tool}
            rec = self.stage(f"quantize/{branch}", inputs, self.gptq(branch),
                             lambda resume, v=v, spec=spec: quantize(
                                 self.fp16, self.gptq(v.branch), spec, calibration=v.calibration,
                                 nsamples=v.nsamples, seqlen=v.seqlen, seed=v.seed,
                                 device=self.device, resume=resume, force=True,
                                 max_shard_size=r.convert.max_shard_size))
            quants[branch] = rec["output"]
        ggufs: dict[str, str] = {}
        if r.gguf and self.wants("gguf"):
            from pipeline.gguf import write_gguf
            for g in r.gguf:
                inputs = {"fp16": conv["output"], "type": g.type, "name": r.model.name, "tool": tool}
                rec = self.stage(f"gguf/{g.type}", inputs, self.gguf(g.type),
                                 lambda resume, g=g: write_gguf(
                                     self.fp16, self.gguf(g.type), type_name=g.type,
                                     name=r.model.name, force=True))
                ggufs[g.type] = rec["output"]
        if not self.wants("verify"):
            return

        from pipeline.judge import judge
        from verify.report import read_report
        vo = r.verify
        inputs = {"fp16": conv["output"], "variants": quants, "meta": source_fp,
                  "eval": text_fingerprint(vo.eval), "tool": tool,
                  "options": options_fingerprint(dataclasses.asdict(vo)), "gguf": ggufs,
                  "gguf_options": options_fingerprint([dataclasses.asdict(g) for g in r.gguf])}

        def run_verify(resume: bool) -> dict[str, Any]:
            report = judge(fp16=self.fp16, quants=[self.gptq(b) for b in self.branches], meta=src,
                            eval_text=vo.eval, out=self.verify_dir, seqlen=vo.seqlen,
                            max_windows=vo.max_windows, thresholds=vo.thresholds(),
                            baseline_rtn=vo.baseline_rtn, prompts=vo.prompts or None,
                            chat_prompts=vo.chat_prompts,
                            device=self.device, force=True,
                            ggufs=[self.gguf(g.type) for g in r.gguf],
                            gguf_thresholds={g.type: g.thresholds() for g in r.gguf},
                            runtimes=vo.runtimes)
            self.report = report
            if not report["passed"]:
                failed = [f"{c['check']} ({c.get('artifact')})" for c in report["checks"]
                          if not c["passed"]]
                raise CheckFailed(f"{self.verify_dir / 'verify.txt'}: verify failed: "
                                  f"{', '.join(failed)}; nothing is published")
            return {"passed": True}

        self.stage("verify", inputs, self.verify_dir, run_verify)
        if self.report is None:
            self.report = read_report(self.verify_dir / "verify.json")
        if not self.wants("publish"):
            return

        from pipeline.publish import publish
        log.info("publish: %s", "dry run" if self.dry_run else "uploading what changed")
        t0 = time.perf_counter()
        try:
            self.published = publish(r, fp16=self.fp16,
                                     variants={b: self.gptq(b) for b in self.branches},
                                     ggufs={g.type: self.gguf(g.type) for g in r.gguf},
                                     report=self.verify_dir / "verify.json", dry_run=self.dry_run,
                                     plan_dir=self.plan_dir, endpoint=self.endpoint,
                                     token=self.token)
        except BaseException:
            self.rows.append({"stage": "publish", "status": "failed",
                              "seconds": round(time.perf_counter() - t0, 2),
                              "output": str(self.plan_dir), "reason": "always runs"})
            raise
        seconds = round(time.perf_counter() - t0, 2)
        self.rows.append({"stage": "publish", "status": "dry run" if self.dry_run else "ran",
                          "seconds": seconds, "output": str(self.plan_dir),
                          "reason": "always runs (uploads only what changed)"})
        write_record(self.workdir, "publish", {"status": "done", "seconds": seconds,
                                               "finished": time.time(),
                                               "summary": scalars(self.published)})

    def result(self, error: PipelineError | None = None) -> dict[str, Any]:
        """The JSON-able summary of this run."""
        return {"recipe": str(self.recipe.path), "name": self.recipe.name,
                "workdir": str(self.workdir), "stage": self.last_stage,
                "variants": self.branches, "ok": error is None,
                "exit_code": 0 if error is None else error.exit_code,
                "error": None if error is None else str(error), "stages": self.rows,
                "perplexity": perplexity_rows(self.report) if self.report else None,
                "publish": self.published}


def run_job(recipe: Recipe, *, workdir: Path | None = None, stage: str = "publish",
            variants: list[str] | None = None, dry_run: bool = False, endpoint: str | None = None,
            token: str | None = None, force: bool = False, device: str = "auto") -> dict[str, Any]:
    """Run the recipe's stages up to `stage` for the chosen variants (all by default); returns
    the summary, or raises JobFailed (carrying it) when a stage fails."""
    if stage not in STAGES:
        raise InputError(f"--stage {stage!r}: choose one of {', '.join(STAGES)}")
    branches = list(dict.fromkeys(variants)) if variants else [v.branch for v in recipe.variants]
    for b in branches:
        recipe.variant(b)
    workdir = Path(workdir) if workdir is not None else Path("work") / recipe.name
    workdir.mkdir(parents=True, exist_ok=True)
    job = Job(recipe, workdir, stage, branches, dry_run, endpoint, token, force, device)
    handler = logging.FileHandler(workdir / LOG_NAME)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter("[job] %(message)s"))
    loggers = [logging.getLogger("pipeline"), logging.getLogger("verify")]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
        lg.propagate = False  # a library (GPTQModel) may have configured the root logger: no echo
    log.addHandler(console)
    log.info("job %s: stages up to %s, variants %s, work dir %s", recipe.name, stage,
             ", ".join(branches), workdir)
    try:
        job.run()
    except PipelineError as e:
        log.error("job %s failed: %s", recipe.name, e)
        raise JobFailed(e, job.result(e)) from e
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
            lg.propagate = True
        log.removeHandler(console)
        handler.close()
    return job.result()


# ---------------------------------------------------------------- reporting


def render_summary(result: dict[str, Any]) -> str:
    """The final table: one row per stage, then the perplexities and where the plan went."""
    w = max([len(r["stage"]) for r in result["stages"]] + [5])
    lines = [f"job {result['name']} ({result['workdir']}): "
             + ("ok" if result["ok"] else f"FAILED (exit {result['exit_code']}): {result['error']}"),
             f"{'stage':<{w}}  {'status':<8} {'seconds':>8}  output / reason"]
    for r in result["stages"]:
        lines.append(f"{r['stage']:<{w}}  {r['status']:<8} {r['seconds']:>8.1f}  "
                     f"{r['output']}  ({r['reason']})")
    if result.get("perplexity"):
        lines += ["", render_perplexity(result["perplexity"]),
                  f"(verify report: {Path(result['workdir']) / 'verify' / 'verify.txt'})"]
    pub = result.get("publish")
    if pub:
        what = "dry run: nothing uploaded" if pub["dry_run"] else \
            f"{pub['uploaded_files']} files uploaded to {pub['endpoint']}, {pub['commits']} commits"
        lines += ["", f"publish: {len(pub['branches'])} branches, {pub['files']} files; {what}; "
                      f"plan and model cards in {pub['plan_dir']}"]
    return "\n".join(lines)


@click.command("run")
@click.argument("recipe")
@click.option("--stage", type=click.Choice(STAGES), default="publish", show_default=True,
              help="Run the stages up to and including this one.")
@click.option("--variant", "variants", multiple=True, metavar="BRANCH",
              help="Only this variant (repeatable); verify and publish cover the chosen ones.")
@click.option("--workdir", type=click.Path(path_type=Path), default=None,
              help="Work directory [default: work/<recipe name>].")
@click.option("--dry-run", is_flag=True, help="Publish writes the plan and cards, uploads nothing.")
@click.option("--endpoint", default=None, help="Hub URL [default: $HF_ENDPOINT or huggingface.co].")
@click.option("--force", is_flag=True, help="Re-run every stage even if its inputs are unchanged.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@allow_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary on stdout.")
def command(recipe: str, stage: str, variants: tuple[str, ...], workdir: Path | None,
            dry_run: bool, endpoint: str | None, force: bool, device: str,
            allow_dirs: tuple[Path, ...], as_json: bool) -> None:
    """Run RECIPE (a path, or a name in recipes/) end to end, reusing unchanged stage outputs."""
    r = load_recipe(find_recipe(recipe), allow_dirs)
    try:
        result = run_job(r, workdir=workdir, stage=stage, variants=list(variants),
                         dry_run=dry_run, endpoint=endpoint, force=force, device=device)
    except JobFailed as e:
        emit(e.result, as_json)
        raise
    emit(result, as_json)


def emit(result: dict[str, Any], as_json: bool) -> None:
    """The summary table (stderr when --json) and, with --json, the JSON object on stdout."""
    click.echo(render_summary(result), err=as_json)
    if as_json:
        click.echo(json.dumps(result))
