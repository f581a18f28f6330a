"""verify --runtime: every GPTQ variant of the shipped demo model loaded in GPTQModel and
transformers inside verify, each a "runtime" check against our dequantised perplexity on the same
windows; vLLM recorded "not checked" on the CPU; a config that misdescribes the tensors fails by
name; a runtime that RAGGED_REFUSED_BY lists refusing a ragged variant is an expected refusal.

Margin: the runtimes (fp16) were measured within 4.2e-4 of our float32 perplexity on these
variants (the largest: transformers' int4 kernel on 4-bit 32g act-order, -4.16e-4; 4-bit 128g
-1.97e-4; GPTQModel within 2.2e-5), as in tests/test_runtimes.py; PPL_MATCH is 5e-3, so CPU and
kernel rounding differences have 12x room (verify/thresholds.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from demo_model import CALIBRATION, EVAL, RAGGED_FFN, demo_fp16, ragged_model

from pipeline.methods import QuantSpec
from pipeline.quantize import quantize
from verify.report import TABLE_NAME
from verify.runtimes import RUNTIME_WINDOWS
from verify.stage import judge
from verify.thresholds import PPL_MATCH

pytestmark = pytest.mark.slow  # verify with the runtimes

CAL = {"nsamples": 16, "seqlen": 128, "device": "cpu"}
SEQ = 256
CPU_RUNTIMES = ["gptqmodel", "transformers"]
OURS = ("perplexity", "kl_divergence", "generation", "module_integrity")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("vrt")
    dirs = {"fp16": demo_fp16(d / "fp16")}
    for name, spec in {"gptq-4bit-128g": QuantSpec(4, 128, False),
                       "gptq-4bit-32g-ao": QuantSpec(4, 32, True)}.items():
        dirs[name] = d / name
        quantize(dirs["fp16"], dirs[name], spec, calibration=CALIBRATION, **CAL)
    return dirs


def run(fp16: Path, quants: list[Path], out: Path, runtimes: list[str]) -> dict:
    return judge(fp16=fp16, quants=quants, eval_text=EVAL, out=out, seqlen=SEQ,
                  max_windows=RUNTIME_WINDOWS, prompts=["def f():"], device="cpu",
                  runtimes=runtimes)


def runtime_checks(report: dict) -> dict[tuple[str, str], dict]:
    return {(c.artifact, c.runtime): c for c in report.checks if c.check == "runtime"}


def test_runtimes_load_every_variant_at_our_perplexity(demo, tmp_path):
    names = ["gptq-4bit-128g", "gptq-4bit-32g-ao"]
    report = run(demo["fp16"], [demo[n] for n in names], tmp_path / "v", [*CPU_RUNTIMES, "vllm"])
    assert report.passed, report.failed()
    checks = runtime_checks(report)
    assert set(checks) == {(n, r) for n in names for r in CPU_RUNTIMES}  # vllm: no check
    for (name, rt), c in checks.items():
        r = report.runtimes[rt][name]
        assert c.passed and r["loaded"] and r["error"] is None and r["kernels"], r
        # the independent value: our perplexity, from verify's own per-variant forward
        assert r["ppl_ours"] == pytest.approx(report.perplexity[name], rel=1e-12)
        assert abs(r["ppl"] / r["ppl_ours"] - 1) <= PPL_MATCH
        assert 0 < r["kl_mean"] and 0.5 < r["top1"] <= 1 and r["version"]
    for name in names:
        v = report.runtimes["vllm"][name]
        assert not v["checked"] and v["reason"] == "not checked: needs CUDA" and v["ppl"] is None
    text = (tmp_path / "v" / TABLE_NAME).read_text()
    assert "not checked: needs CUDA" in text and "runtime in gptqmodel" in text
    saved = json.loads((tmp_path / "v" / "verify.json").read_text())
    assert saved["runtimes"]["gptqmodel"]["gptq-4bit-128g"]["ppl"] == \
        report.runtimes["gptqmodel"]["gptq-4bit-128g"]["ppl"]


def test_a_config_that_misdescribes_the_tensors_fails_the_runtime_check(demo, tmp_path):
    """quantize_config.json says 8 bits over 4-bit tensors; config.json (which our forward reads)
    is right, so every check of ours passes and only the runtime reading the other file fails."""
    bad = shutil.copytree(demo["gptq-4bit-128g"], tmp_path / "gptq-mislabelled")
    cfg = json.loads((bad / "quantize_config.json").read_text())
    (bad / "quantize_config.json").write_text(json.dumps({**cfg, "bits": 8}))
    report = run(demo["fp16"], [bad], tmp_path / "v", ["gptqmodel"])
    ours = {c.check: c.passed for c in report.checks if c.artifact == bad.name}
    assert all(ours[k] for k in OURS), ours
    assert not report.passed
    assert report.failed() == ["runtime:gptq-mislabelled@gptqmodel"]
    r = report.runtimes["gptqmodel"][bad.name]
    assert r["error"] or abs(r["ratio"]) > PPL_MATCH


def test_a_listed_runtime_refusing_ragged_groups_is_an_expected_refusal(demo, tmp_path):
    fp16 = ragged_model(demo["fp16"], tmp_path / "ffn704", RAGGED_FFN)
    q = tmp_path / "gptq-ffn704"
    quantize(fp16, q, QuantSpec(4, 128, False), calibration=CALIBRATION, **CAL)
    report = run(fp16, [q], tmp_path / "v", CPU_RUNTIMES)
    assert report.passed, report.failed()
    gm, tf = (report.runtimes[r][q.name] for r in CPU_RUNTIMES)
    assert gm["passed"] and not gm["expected_refusal"]
    assert tf["expected_refusal"] and tf["passed"] is False and "divisible" in tf["error"]
    assert "refuses layers with a partial last group" in \
        runtime_checks(report)[(q.name, "transformers")].reason
