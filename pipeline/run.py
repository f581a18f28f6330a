"""`python -m pipeline run RECIPE`: the job (pipeline/job.py) on the executor `--executor` names
(pipeline/executors.py), then its summary table (and with --json one JSON object)."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import click

from pipeline.core.errors import InputError
from pipeline.core.paths import PATH
from pipeline.executors import EXECUTORS, SLURM_CLUSTERS, make_executor
from pipeline.job import STAGE_NAMES, JobFailed, check_resources, plan, run_job
from pipeline.recipe import allow_dir_option, find_recipe, load_recipe
from verify.report import render_perplexity


def render_summary(result: dict[str, Any]) -> str:
    """The final table: one row per task (with where it ran, for a cluster's executor), then the
    perplexities and where the plan went."""
    w = max([len(r["stage"]) for r in result["stages"]] + [5])
    remote = result.get("executor", "local") != "local"
    places = [f"{r.get('host')} pid {r.get('pid')}" if remote else "" for r in result["stages"]]
    pw = max([len(p) for p in places] + [5]) if remote else 0
    lines = [f"job {result['name']} ({result['workdir']}): "
             + ("ok" if result["ok"] else f"FAILED (exit {result['exit_code']}): {result['error']}"),
             f"{'stage':<{w}}  {'status':<8} {'seconds':>8}  "
             + (f"{'where':<{pw}}  " if remote else "") + "output / reason"]
    for r, place in zip(result["stages"], places, strict=True):
        lines.append(f"{r['stage']:<{w}}  {r['status']:<8} {r['seconds']:>8.1f}  "
                     + (f"{place:<{pw}}  " if remote else "") + f"{r['output']}  ({r['reason']})")
    if result.get("perplexity"):
        lines += ["", render_perplexity(result["perplexity"]),
                  f"(verify report: {result['verify_report']})"]
    pub = result.get("publish")
    if pub:
        what = "dry run: nothing uploaded" if pub["dry_run"] else \
            f"{pub['uploaded_files']} files uploaded to {pub['endpoint']}, {pub['commits']} commits"
        lines += ["", f"publish: {len(pub['branches'])} branches, {pub['files']} files; {what}; "
                      f"plan and model cards in {pub['plan_dir']}"]
    return "\n".join(lines)


@click.command("run")
@click.argument("recipe")
@click.option("--stage", type=click.Choice(STAGE_NAMES), default="publish", show_default=True,
              help="Run the stages up to and including this one.")
@click.option("--variant", "variants", multiple=True, metavar="BRANCH",
              help="Only this variant (repeatable); verify and publish cover the chosen ones.")
@click.option("--workdir", type=PATH, default=None,
              help="Work directory [default: work/<recipe name>].")
@click.option("--dry-run", is_flag=True, help="Publish writes the plan and cards, uploads nothing.")
@click.option("--endpoint", default=None, help="Hub URL [default: $HF_ENDPOINT or huggingface.co].")
@click.option("--force", is_flag=True, help="Re-run every stage even if its inputs are unchanged.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--executor", type=click.Choice(list(EXECUTORS)), default="local",
              show_default=True, help="Where the tasks run: this process, a Ray cluster, or Slurm "
                                      "jobs (submitit); publish always runs here.")
@click.option("--ray-address", default=None,
              help="Ray cluster to join [default: $RAY_ADDRESS, else a new local one].")
@click.option("--slurm-cluster", type=click.Choice(SLURM_CLUSTERS), default=None,
              help="local: submitit runs the jobs as processes on this machine (for testing on "
                   "one machine) [default: slurm].")
@click.option("--slurm-partition", default=None, help="Slurm partition [default: [slurm] partition].")
@click.option("--slurm-account", default=None, help="Slurm account [default: [slurm] account].")
@click.option("--slurm-time", type=click.IntRange(min=1), default=None, metavar="MINUTES",
              help="Time limit of each Slurm job [default: [slurm] time_min].")
@click.option("--slurm-mem-gb", type=click.IntRange(min=0), default=None, metavar="GB",
              help="Memory of each Slurm job, 0: the partition's default [default: [slurm] mem_gb].")
@allow_dir_option
@click.option("--plan", "show_plan", is_flag=True,
              help="Print the tasks the run would consider and their outputs; run nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary on stdout.")
def command(recipe: str, stage: str, variants: tuple[str, ...], workdir: Path | None,
            dry_run: bool, endpoint: str | None, force: bool, device: str, executor: str,
            ray_address: str | None, slurm_cluster: str | None, slurm_partition: str | None,
            slurm_account: str | None, slurm_time: int | None, slurm_mem_gb: int | None,
            allow_dirs: tuple[Path, ...], show_plan: bool, as_json: bool) -> None:
    """Run RECIPE (a path, or a name in recipes/) end to end, reusing unchanged stage outputs."""
    # each engine's options: (option, the executor's keyword, value)
    given = {"ray": [("--ray-address", "address", ray_address)],
             "slurm": [("--slurm-cluster", "cluster", slurm_cluster),
                       ("--slurm-partition", "partition", slurm_partition),
                       ("--slurm-account", "account", slurm_account),
                       ("--slurm-time", "time_min", slurm_time),
                       ("--slurm-mem-gb", "mem_gb", slurm_mem_gb)]}
    for name, options in given.items():
        stray = [option for option, _, value in options if value is not None and executor != name]
        if stray:
            raise InputError(f"{', '.join(stray)}: only with --executor {name}")
    r = load_recipe(find_recipe(recipe), allow_dirs)
    check_resources(r)  # before an engine starts
    if show_plan:
        tasks = plan(r, workdir=workdir, stage=stage, variants=list(variants))
        if as_json:
            click.echo(json.dumps({"recipe": str(r.path), "tasks": tasks}))
        w = max(len(t["task"]) for t in tasks)
        click.echo("\n".join(f"{t['task']:<{w}}  {t['output']}" for t in tasks), err=as_json)
        return
    settings = {key: value for _, key, value in given.get(executor, []) if value is not None}
    failure = None
    # with --json, stdout holds the JSON only: an engine prints news of its workers there (Ray)
    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
        engine = make_executor(executor, **settings)
        try:
            result = run_job(r, workdir=workdir, stage=stage, variants=list(variants),
                             dry_run=dry_run, endpoint=endpoint, force=force, device=device,
                             executor=engine)
        except JobFailed as e:
            result, failure = e.result, e
        finally:
            engine.close()
    emit(result, as_json)
    if failure is not None:
        raise failure


def emit(result: dict[str, Any], as_json: bool) -> None:
    """The summary table (stderr when --json) and, with --json, the JSON object on stdout."""
    click.echo(render_summary(result), err=as_json)
    if as_json:
        click.echo(json.dumps(result))
