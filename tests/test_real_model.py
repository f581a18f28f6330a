"""The whole job on a real pretrained model nobody here trained (tests/real_model.py): its recipe
runs from an HF source repository (the local Hub), with no conversion, through quantize, GGUF,
verify in the runtimes and a dry-run publish; verify passes its good variants with the default
gates, and fails a single corrupted module of a variant, naming it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hub_server import HubServer
from real_model import RECIPE, REPO, serve, smollm2_fp16
from safetensors.torch import load_file, save_file

from pipeline.job import run_job
from pipeline.recipe import load_recipe
from verify.report import read_report
from verify.stage import judge

pytestmark = pytest.mark.slow  # the whole job on a real 135M model (about 5 minutes)

TOKEN = "hf_real_model_write_token"
# The shipped recipe with less of everything: two of its variants (the most compatible and the
# 3-bit act-order one, where GPTQ matters most), less calibration, fewer evaluation windows.
TRIMMED = f"""
extends = "{RECIPE}"

[calibration]
nsamples = 32
seqlen = 128

[[variants]]
branch = "main"
bits = 4
group_size = 64

[[variants]]
bits = 3
group_size = 64
act_order = true

[[gguf]]
type = "Q8_0"

[verify]
max_windows = 12
prompts = ["The capital of France is"]
runtimes = ["gptqmodel", "transformers"]
"""
BRANCH3 = "gptq-3bit-64g-actorder_True"
MODULE = "model.layers.7.mlp.up_proj"  # the one module each corruption touches


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict:
    """The trimmed recipe's job, from the source repository to a dry-run publish."""
    tmp = tmp_path_factory.mktemp("real")
    model = smollm2_fp16(tmp / "smollm2")
    recipe_path = tmp / "recipes" / "smollm2-trimmed.toml"
    recipe_path.parent.mkdir()
    recipe_path.write_text(TRIMMED)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("HF_TOKEN", raising=False)
        mp.setenv("HF_HUB_DISABLE_XET", "1")
        with HubServer(tmp / "hub", {TOKEN: "write"}) as hub:
            commit = serve(hub, model, TOKEN)
            recipe = load_recipe(recipe_path, allow_dirs=[RECIPE.parent])
            summary = run_job(recipe, workdir=tmp / "work", dry_run=True, endpoint=hub.url)
    return {"summary": summary, "work": tmp / "work", "model": model, "commit": commit}


def test_the_whole_job_runs_from_an_hf_source_repository(job):
    s, work = job["summary"], job["work"]
    assert s["ok"], s["error"]
    # the recipe asks for "main"; the job records the commit it downloaded
    assert s["source"] == {"format": "hf", "repo": REPO, "revision": job["commit"]}
    tasks = [r["stage"] for r in s["stages"]]
    assert "convert" not in tasks and not (work / "fp16").exists()  # nothing converted
    assert {"quantize/main", f"quantize/{BRANCH3}", "gguf/Q8_0", "verify", "publish"} <= set(tasks)
    # the model the stages read is the downloaded snapshot at the commit the Hub served
    snapshot = next((work / "hub-cache").glob(f"models--*/snapshots/{job['commit']}"))
    assert (snapshot / "config.json").is_file()
    report = read_report(work / "verify")
    assert report.passed and not report.failed()
    assert report.artifacts["fp16"]["path"] == str(snapshot)
    runtimes = report.runtimes
    assert runtimes["gptqmodel"]["main"]["loaded"] and runtimes["transformers"]["main"]["loaded"]
    plan = json.loads((work / "publish-plan" / "plan.json").read_text())
    assert sorted(plan["repos"]) == ["my-org/SmolLM2-135M-Instruct-GGUF",
                                     "my-org/SmolLM2-135M-Instruct-GPTQ"]  # the source: not again
    for card in (work / "publish-plan").rglob("README.md"):
        assert f"from the Hugging Face model [{REPO}]" in card.read_text()
        assert f"/tree/{job['commit']}) at revision `{job['commit']}`" in card.read_text()


def test_good_variants_of_the_real_model_beat_rtn_on_their_grid(job):
    report = read_report(job["work"] / "verify")
    for c in (c for c in report.checks if c.check == "against_rtn"):
        m = c.metrics
        assert c.passed and m["ppl"] < m["ppl_rtn"] and m["kl_mean"] < m["kl_mean_rtn"], c
    three = next(c for c in report.checks
                 if c.check == "against_rtn" and c.artifact == BRANCH3).metrics
    assert three["ppl"] < 0.5 * three["ppl_rtn"]  # at 3 bits rounding alone loses far more


def corrupt(src: Path, dst: Path, how: str) -> Path:
    """A copy of the variant `src` with MODULE's tensor `how` changed: its act-order g_idx permuted
    (every group keeps its column count), its scales ×1.25, or random zero points."""
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    t = load_file(f)
    g = torch.Generator().manual_seed(0)
    key = f"{MODULE}.{how}"
    if how == "g_idx":
        t[key] = t[key][torch.randperm(t[key].numel(), generator=g)]
    elif how == "scales":
        t[key] = t[key] * 1.25
    else:
        t[key] = torch.randint(-2**31, 2**31 - 1, t[key].shape, generator=g, dtype=torch.int32)
    save_file(t, f, metadata={"format": "pt"})
    return dst


# g_idx means something only with act-order (the 3-bit variant); a 25% scale error is as large as
# 3-bit rounding noise itself, so it is planted where rounding is finer (4 bits)
CORRUPTIONS = {"g_idx": BRANCH3, "scales": "main", "qzeros": "main"}


def test_one_corrupted_module_of_the_real_model_fails_named(job, tmp_path):
    gptq = job["work"] / "gptq"
    bad = [corrupt(gptq / b, tmp_path / f"bad-{how}", how) for how, b in CORRUPTIONS.items()]
    snapshot = Path(read_report(job["work"] / "verify").artifacts["fp16"]["path"])
    report = judge(fp16=snapshot, quants=[gptq / "main", gptq / BRANCH3, *bad],
                   eval_text=str(RECIPE.parent / "smollm2/text/eval"), out=tmp_path / "v",
                   seqlen=256, max_windows=4, prompts=["The capital of France is"])
    failed = report.failed()
    assert not [f for f in failed if not f.split(":")[1].startswith("bad-")], failed  # good: pass
    for b in bad:
        c = next(c for c in report.checks
                 if c.check == "module_integrity" and c.artifact == b.name)
        assert not c.passed and c.reason.startswith(f"{MODULE}: "), c
        assert c.reason.count("model.layers.") == 1, c  # that module alone
    # the permuted g_idx by act-order's order, the others by their output error against RTN's
    reasons = {c.artifact: c.reason for c in report.checks
               if c.check == "module_integrity" and not c.passed}
    assert "does not follow act-order" in reasons["bad-g_idx"]
    assert "output error" in reasons["bad-scales"] and "output error" in reasons["bad-qzeros"]
