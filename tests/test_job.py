"""The end-to-end job on a tiny random Meta checkpoint: every stage runs, a re-run recomputes
nothing, a changed variant recomputes only itself and verify, a failing verify stops publish."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from meta_fixtures import build_checkpoint
from safetensors.torch import load_file, save_file

from pipeline.job import (STAGE_NAMES, STAGES, Job, JobFailed, gguf_needs, plan, run_job,
                          task_levels, tree_fingerprint)
from pipeline.recipe import load_recipe

RECIPE = """
[model]
name = "Tiny"

[source]
path = "meta"

[calibration]
source = "text/calib"
nsamples = 8
seqlen = 64

[[variants]]
branch = "main"
bits = 4
group_size = 32

[[variants]]
bits = 8
group_size = 32
act_order = true
damp = 0.05

[verify]
eval = "text/eval"
seqlen = 64
max_windows = 4
# random weights: these tests are about the job, not about quantisation quality
tolerance = { "4" = 10.0, "8" = 10.0 }
kl_mean = { "4" = 10.0, "8" = 10.0 }
kl_p99 = { "4" = 10.0, "8" = 10.0 }
top1 = { "4" = 0.0, "8" = 0.0 }
agreement = { "4" = 0.0, "8" = 0.0 }
prompts = ["def walk(top):"]

[publish]
fp16_repo = "org/Tiny-fp16"
gptq_repo = "org/Tiny-GPTQ"
"""
V8 = "gptq-8bit-32g-actorder_True"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A recipe beside a 2-shard Llama 2-shaped random checkpoint and local text."""
    import argparse
    import json as json_module
    import textwrap as textwrap_module

    build_checkpoint(tmp_path / "meta", "llama2", n_shards=2)
    for name, modules in {"calib": (argparse,), "eval": (json_module, textwrap_module)}.items():
        d = tmp_path / "text" / name
        d.mkdir(parents=True)
        for m in modules:
            (d / f"{m.__name__}.py").write_text(inspect.getsource(m))
    (tmp_path / "tiny.toml").write_text(RECIPE)
    return tmp_path


def statuses(result: dict) -> dict[str, str]:
    return {r["stage"]: r["status"] for r in result["stages"]}


def mtimes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_job_runs_every_stage_then_reuses_and_recomputes_only_what_changed(project):
    work = project / "work"
    first = run_job(load_recipe(project / "tiny.toml"), workdir=work, dry_run=True, device="cpu")
    assert first["ok"] and first["exit_code"] == 0
    assert statuses(first) == {"convert": "ran", "quantize/main": "ran", f"quantize/{V8}": "ran",
                               "verify": "ran", "publish": "dry run"}
    report = json.loads((work / "verify" / "verify.json").read_text())
    assert report["passed"] and set(report["artifacts"]) == {"fp16", "main", V8}
    q8 = json.loads((work / "gptq" / V8 / "quantize_config.json").read_text())
    assert (q8["bits"], q8["group_size"], q8["desc_act"], q8["damp_percent"]) == (8, 32, True, 0.05)
    plan = json.loads((work / "publish-plan" / "plan.json").read_text())
    assert set(plan["repos"]["org/Tiny-GPTQ"]["branches"]) == {"main", V8}
    assert set(plan["repos"]["org/Tiny-fp16"]["branches"]) == {"main"}
    assert {r["artifact"] for r in first["perplexity"]} == {"fp16", "main", V8}
    records = json.loads((work / "job.json").read_text())["stages"]
    assert records["convert"]["output"] == tree_fingerprint(work / "fp16")
    assert "verify: running (no previous run)" in (work / "job.log").read_text()

    # the same inputs: nothing is recomputed, no output file is touched
    before = mtimes(work / "fp16") | {f"gptq/{k}": v for k, v in mtimes(work / "gptq").items()}
    again = run_job(load_recipe(project / "tiny.toml"), workdir=work, dry_run=True, device="cpu")
    assert statuses(again) == {"convert": "reused", "quantize/main": "reused",
                               f"quantize/{V8}": "reused", "verify": "reused", "publish": "dry run"}
    after = mtimes(work / "fp16") | {f"gptq/{k}": v for k, v in mtimes(work / "gptq").items()}
    assert after == before
    assert again["perplexity"] == first["perplexity"]

    # one variant's option changes: only that variant and verify run again
    (project / "tiny.toml").write_text(RECIPE.replace("damp = 0.05", "damp = 0.02"))
    main_files = mtimes(work / "gptq" / "main")
    third = run_job(load_recipe(project / "tiny.toml"), workdir=work, dry_run=True, device="cpu")
    assert statuses(third) == {"convert": "reused", "quantize/main": "reused",
                               f"quantize/{V8}": "ran", "verify": "ran", "publish": "dry run"}
    assert mtimes(work / "gptq" / "main") == main_files
    assert json.loads((work / "gptq" / V8 / "quantize_config.json").read_text())["damp_percent"] == 0.02
    assert "changed: spec" in next(r["reason"] for r in third["stages"] if r["stage"] == f"quantize/{V8}")

    # an output removed by hand is rebuilt, and what depends on it re-runs
    import shutil
    shutil.rmtree(work / "gptq" / "main")
    fourth = run_job(load_recipe(project / "tiny.toml"), workdir=work, stage="verify", device="cpu")
    assert statuses(fourth) == {"convert": "reused", "quantize/main": "ran",
                                f"quantize/{V8}": "reused", "verify": "ran"}
    assert next(r["reason"] for r in fourth["stages"] if r["stage"] == "quantize/main") == \
        "output missing or modified"


def test_failing_verify_stops_publish(project, monkeypatch):
    """A variant whose quantised weights are broken (NaN scales) fails verify: exit code 3,
    no publish plan."""
    import pipeline.quantize

    real = pipeline.quantize.quantize

    def broken(model, out, spec, **kw):
        summary = real(model, out, spec, **kw)
        if spec.bits == 8:
            for f in Path(out).glob("*.safetensors"):
                tensors = load_file(f)
                for name in tensors:
                    if name.endswith("scales"):
                        tensors[name] = torch.full_like(tensors[name], float("nan"))
                save_file(tensors, f, metadata={"format": "pt"})
        return summary

    monkeypatch.setattr(pipeline.quantize, "quantize", broken)
    with pytest.raises(JobFailed) as e:
        run_job(load_recipe(project / "tiny.toml"), workdir=project / "work", dry_run=True,
                device="cpu")
    assert e.value.exit_code == 3
    result = e.value.result
    assert not result["ok"] and result["exit_code"] == 3 and "perplexity" in result["error"]
    assert statuses(result)["verify"] == "failed" and "publish" not in statuses(result)
    assert not (project / "work" / "publish-plan").exists()
    records = json.loads((project / "work" / "job.json").read_text())["stages"]
    assert records["verify"]["status"] == "failed" and "publish" not in records


def test_one_variant_then_the_rest_and_the_cli(project, monkeypatch, capsys):
    work = project / "work"
    # a scheduler's per-variant task: convert + quantize one variant, nothing else
    code, out, err = run_cli(["run", str(project / "tiny.toml"), "--workdir", str(work),
                              "--stage", "quantize", "--variant", "main", "--device", "cpu",
                              "--json"], monkeypatch, capsys)
    assert code == 0, err
    result = json.loads(out)  # stdout holds exactly one JSON object
    assert "quantize/main" in err  # the table goes to stderr with --json
    assert statuses(result) == {"convert": "ran", "quantize/main": "ran"}
    assert result["variants"] == ["main"] and result["ok"]
    assert not (work / "gptq" / V8).exists() and not (work / "verify").exists()
    # the final task: everything, reusing the variant already made
    final = run_job(load_recipe(project / "tiny.toml"), workdir=work, stage="verify", device="cpu")
    assert statuses(final) == {"convert": "reused", "quantize/main": "reused",
                               f"quantize/{V8}": "ran", "verify": "ran"}
    # bad input: exit code 2, naming what is wrong
    code, out, err = run_cli(["run", str(project / "tiny.toml"), "--workdir", str(work),
                              "--variant", "nope"], monkeypatch, capsys)
    assert code == 2 and "no variant 'nope'" in err
    code, out, err = run_cli(["run", "no-such-recipe"], monkeypatch, capsys)
    assert code == 2 and "no-such-recipe: no such recipe" in err


def test_missing_source_is_an_input_error(project, tmp_path, monkeypatch):
    text = RECIPE.replace('path = "meta"', 'env = "TINY_META_DIR"')
    (project / "env.toml").write_text(text)
    monkeypatch.delenv("TINY_META_DIR", raising=False)
    with pytest.raises(JobFailed, match=r"\$TINY_META_DIR is not set") as e:
        run_job(load_recipe(project / "env.toml"), workdir=project / "w", device="cpu")
    assert e.value.exit_code == 2
    monkeypatch.setenv("TINY_META_DIR", str(project / "meta"))
    result = run_job(load_recipe(project / "env.toml"), workdir=project / "w", stage="convert")
    assert statuses(result) == {"convert": "ran"} and result["ok"]


def test_levels_follow_the_task_graph_not_the_table(tmp_path):
    """A quantised GGUF file needs the F16 task (it is quantised from its file) and the task
    writing the importance matrix (the first GPTQ pass on [calibration] as it is, else the
    imatrix stage), so it runs a level after them, whatever the recipe's order; verify needs
    every artifact, publish verify."""
    (tmp_path / "meta").mkdir()
    for d in ("calib", "eval"):
        (tmp_path / "text" / d).mkdir(parents=True)
        (tmp_path / "text" / d / "a.py").write_text("x = 1\n")
    gguf = '\n[[gguf]]\ntype = "Q4_K_M"\n\n[[gguf]]\ntype = "F16"\n'
    (tmp_path / "tiny.toml").write_text(RECIPE.replace("[publish]", gguf + "\n[publish]")
                                        + 'gguf_repo = "org/Tiny-GGUF"\n')
    recipe = load_recipe(tmp_path / "tiny.toml")
    job = Job(recipe, tmp_path / "work", "publish", ("main", V8))
    levels = [[s.key(i) for s, i in level] for level in task_levels(job)]
    assert levels == [["convert"], ["quantize/main", f"quantize/{V8}", "gguf/F16"],
                      ["gguf/Q4_K_M"], ["verify"], ["publish"]]
    planned = plan(recipe, workdir=tmp_path / "w")
    assert [t["task"] for t in planned] == sum(levels, [])
    assert planned[1]["output"] == f"{tmp_path}/w/gptq/main, {tmp_path}/w/gguf/tiny.imatrix.gguf"
    assert gguf_needs(job, "Q4_K_M") == ["convert", "gguf/F16", "quantize/main"]
    assert gguf_needs(job, "F16") == ["convert"]  # F16 is not quantised: no importance matrix
    # the recipe decides: a --variant job that makes GGUF files makes main too, whose pass gives
    # their matrix (not so when it stops at quantize); the imatrix stage when no variant reads
    # [calibration] as it is (its own windows) or none is calibrated
    only8 = dataclasses.replace(job, branches=(V8,))
    assert gguf_needs(only8, "Q4_K_M")[-1] == "quantize/main"
    assert [[s.key(i) for s, i in level] for level in task_levels(only8)][1] == [
        f"quantize/{V8}", "quantize/main", "gguf/F16"]
    assert [[s.key(i) for s, i in level] for level in task_levels(
        dataclasses.replace(only8, last_stage="quantize"))] == [["convert"], [f"quantize/{V8}"]]
    for change in ('group_size = 32\n', 'group_size = 32\nnsamples = 4\n'), \
                  ('group_size = 32\n', 'group_size = 32\nmethod = "rtn"\n'):
        (tmp_path / "tiny.toml").write_text(RECIPE.replace(*change).replace(
            "[publish]", gguf + "\n[publish]") + 'gguf_repo = "org/Tiny-GGUF"\n')
        job = Job(load_recipe(tmp_path / "tiny.toml"), tmp_path / "work", "publish", ("main",))
        assert [[s.key(i) for s, i in level] for level in task_levels(job)][:2] == [
            ["convert"], ["quantize/main", "imatrix", "gguf/F16"]], change
    # without an F16 file in the recipe the job makes one anyway (the quantiser's source and
    # verify's, never published); with `imatrix = false` no importance matrix, and no imatrix task
    alone = gguf.split("\n\n")[0] + "\nimatrix = false\n"
    (tmp_path / "tiny.toml").write_text(RECIPE.replace("[publish]", alone + "\n[publish]")
                                        + 'gguf_repo = "org/Tiny-GGUF"\n')
    job = Job(load_recipe(tmp_path / "tiny.toml"), tmp_path / "work", "publish", ("main",))
    assert [[s.key(i) for s, i in level] for level in task_levels(job)] == [
        ["convert"], ["quantize/main", "gguf/F16"], ["gguf/Q4_K_M"], ["verify"], ["publish"]]
    assert set(job.dirs.artifacts(job.recipe, ("main",))["ggufs"]) == {"Q4_K_M"}


def test_the_stage_table_is_a_graph_in_order():
    """Each stage reads only stages listed before it, so the table order is a topological one."""
    for n, s in enumerate(STAGES):
        assert set(s.after) <= set(STAGE_NAMES[:n]), s.name


def test_the_importance_matrix_is_the_jobs_own_whichever_task_writes_it(project):
    """The matrix comes from main's GPTQ pass (a second output of quantize/main, in its record),
    or from the imatrix stage when no variant reads [calibration] as it is. Either task replaces
    a matrix the other wrote (job.json records it), never a file the job did not write."""
    import gguf

    from pipeline.core.imatrix_format import ACTIVATIONS, FP16_ACTIVATIONS

    text = RECIPE.replace("[publish]", '[[gguf]]\ntype = "Q4_K_M"\n\n[publish]') + \
        'gguf_repo = "org/Tiny-GGUF"\n'
    own = text.replace("group_size = 32\n", "group_size = 32\nnsamples = 4\n")  # no variant's
    work, matrix = project / "work", project / "work" / "gguf" / "tiny.imatrix.gguf"
    matrix.parent.mkdir(parents=True)
    matrix.write_bytes(b"GGUF mine")
    (project / "tiny.toml").write_text(text)
    with pytest.raises(JobFailed) as e:
        run_job(load_recipe(project / "tiny.toml"), workdir=work, stage="imatrix", device="cpu")
    assert e.value.exit_code == 2 and f"{matrix}: exists, but {work / 'job.json'} has no record" \
        in str(e.value) and matrix.read_bytes() == b"GGUF mine"
    matrix.unlink()

    def activations() -> str:
        return gguf.GGUFReader(matrix).get_field(ACTIVATIONS).contents()

    first = run_job(load_recipe(project / "tiny.toml"), workdir=work, stage="imatrix", device="cpu")
    assert statuses(first) == {"convert": "reused", "quantize/main": "ran", f"quantize/{V8}": "ran"}
    assert activations().startswith("the model in this pipeline's GPTQ pass (4-bit, group 32)")
    (project / "tiny.toml").write_text(own)
    second = run_job(load_recipe(project / "tiny.toml"), workdir=work, stage="imatrix", device="cpu")
    assert statuses(second) == {"convert": "reused", "quantize/main": "ran", f"quantize/{V8}": "ran",
                                "imatrix": "ran"}
    assert activations() == FP16_ACTIVATIONS
    (project / "tiny.toml").write_text(text)
    third = run_job(load_recipe(project / "tiny.toml"), workdir=work, stage="imatrix", device="cpu")
    assert statuses(third)["quantize/main"] == "ran" and "imatrix" not in statuses(third)
    assert activations().startswith("the model in this pipeline's GPTQ pass")
