"""Verify's checks as units: thresholds per bit width from the CLI and the recipe reach each
check, which records them and judges by them (verify/stage.py, verify/thresholds.py). The
forward passes that produce the numbers are tested end to end in test_verify.py."""

from __future__ import annotations

import math

from cli_runner import run_cli

from pipeline.recipe import load_recipe
from verify import thresholds as th
from verify.stage import (command, generation_check, given_thresholds, integrity_check, kl_check,
                          perplexity_check, rtn_check)

KL = {"kl_mean": 0.01, "kl_p99": 0.2, "top1": 0.9}
MODULES = {"model.layers.0.mlp.down_proj": {"error": 0.1, "rtn_error": 0.12, "output_error": 0.05,
                                            "rtn_output_error": 0.08, "g_idx": None}}
RTN = {"ppl": 11.0, "kl_mean": 0.02, "top1": 0.85}


def sample(tokens: list[int]) -> dict:
    return {"prompt": "def f():", "text": "x" * len(tokens), "tokens": tokens, "degenerate": None}


def checks_at(t: dict[str, float | None]) -> dict:
    """Every check of a 4-bit variant, at thresholds t, on fixed numbers."""
    fp16 = [sample([1, 2, 3, 4])]
    return {"perplexity": perplexity_check("v", 10.4, 10.0, t["tolerance"]),
            "kl_divergence": kl_check("v", KL, t),
            "generation": generation_check("v", [sample([1, 2, 9, 9])], fp16, t["agreement"]),
            "module_integrity": integrity_check("v", MODULES, t["module_error"],
                                                t["module_output_error"]),
            "against_rtn": rtn_check("v", 10.4, 0.01, RTN, 10.0, t["rtn_margin"])}


def test_cli_thresholds_per_bit_width_reach_every_check(monkeypatch, capsys):
    args = ["--fp16", "f", "--eval", "e", "--out", "o", "--kl-mean", "4=0", "--tolerance", "4=0.5",
            "--kl-mean", "8=0.5", "--agreement", "4=0"]
    params = command.make_context("verify", args).params  # click's own parsing
    given = given_thresholds(params)  # what the command passes to judge
    assert given == {"kl_mean": {4: 0.0, 8: 0.5}, "tolerance": {4: 0.5}, "agreement": {4: 0.0}}
    c = checks_at(th.for_bits(th.merged(given), 4))
    assert [k for k, v in c.items() if not v.passed] == ["kl_divergence"]  # KL of 4 bits is > 0
    assert c["kl_divergence"].thresholds == {"kl_mean": 0.0}  # the unset kinds are not judged
    assert c["perplexity"].thresholds == {"tolerance": 0.5}
    assert c["generation"].thresholds == {"agreement": 0.0}
    assert c["generation"].metrics["agreement"] == 0.5  # two of four tokens before the first miss
    defaults = th.for_bits(th.merged(None), 4)
    assert c["module_integrity"].thresholds == {"module_output_error":
                                                defaults["module_output_error"]}
    assert c["against_rtn"].thresholds == {"rtn_margin": defaults["rtn_margin"]}
    code, _, err = run_cli(["verify", *args[:6], "--top1", "4=1.5"], monkeypatch, capsys)
    assert code == 2 and "top1 must be in [0, 1]" in err


def test_recipe_thresholds_reach_every_check(tmp_path):
    for d in ("src", "calib", "eval"):
        (tmp_path / d).mkdir()
    (tmp_path / "calib" / "a.txt").write_text("x")
    (tmp_path / "eval" / "a.txt").write_text("x")
    (tmp_path / "r.toml").write_text("""
[model]
name = "Demo"
[source]
path = "src"
[calibration]
source = "calib"
[[variants]]
branch = "main"
bits = 4
group_size = 128
[verify]
eval = "eval"
module_error = { "4" = 1.0 }
top1 = { "4" = 1.0 }
[publish]
fp16_repo = "o/a"
gptq_repo = "o/b"
""")
    vo = load_recipe(tmp_path / "r.toml").verify
    assert vo.thresholds() == {"module_error": {4: 1.0}, "top1": {4: 1.0}}
    c = checks_at(th.for_bits(th.merged(vo.thresholds()), 4))
    assert c["kl_divergence"].thresholds == {"top1": 1.0} and not c["kl_divergence"].passed
    assert c["module_integrity"].thresholds == {"module_error": 1.0, "module_output_error": 1.5}
    assert c["module_integrity"].passed  # 0.1 <= 1.0 x 0.12, 0.05 <= 1.5 x 0.08
    worse = {m: {**v, "error": 0.13} for m, v in MODULES.items()}
    failed = integrity_check("v", worse, 1.0, 1.5)
    assert not failed.passed and failed.reason.startswith("model.layers.0.mlp.down_proj: ")


def test_a_nan_fails_every_check():
    nan = math.nan
    t = th.for_bits(th.merged({"tolerance": {4: 0.5}, "kl_mean": {4: 1.0}}), 4)
    assert not perplexity_check("v", nan, 10.0, t["tolerance"]).passed
    assert not kl_check("v", {**KL, "kl_mean": nan}, t).passed
    assert not rtn_check("v", nan, 0.01, RTN, 10.0, t["rtn_margin"]).passed
