"""The methods registry (pipeline/methods): every method's algorithm and checks exist, RTN is the
grid's round-to-nearest, and publish requires a variant's method's checks."""

from __future__ import annotations

import pytest
import torch

from pipeline.core.grid import Grid, rtn
from pipeline.methods import METHODS, QuantSpec, SpecError, variant_method
from verify.report import Check, Report, required_checks, verdict_problems
from verify.stage import VARIANT_CHECKS


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_has_its_algorithm_and_known_checks(name):
    m = METHODS[name]
    algorithm = m.algorithm()
    assert callable(algorithm.prepare) and callable(algorithm.quantize)
    assert set(m.checks) <= set(VARIANT_CHECKS) and len(set(m.checks)) == len(m.checks)
    assert {"perplexity", "kl_divergence", "generation"} <= set(m.checks)  # every variant vs fp16


def test_rtn_method_is_the_grids_round_to_nearest():
    W = torch.randn(48, 256, generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(bits=3, group_size=64, method="rtn", mse=False)
    algorithm = METHODS["rtn"].algorithm()
    got = algorithm.quantize(W, algorithm.prepare(None, spec), spec)
    want = rtn(W, Grid(3, 64, True, False))
    assert torch.equal(got.Q, want.Q) and torch.equal(got.scales, want.scales)


def test_an_unknown_method_is_refused_naming_the_option():
    with pytest.raises(SpecError, match=r"--method 'awq': must be one of gptq, rtn"):
        QuantSpec(bits=4, method="awq")


def test_a_variants_method_comes_from_its_quant_log(tmp_path):
    assert variant_method(tmp_path) == "gptq"  # made elsewhere: no record
    (tmp_path / "quant_log.json").write_text('{"method": "rtn"}')
    assert variant_method(tmp_path) == "rtn"
    (tmp_path / "quant_log.json").write_text('{"method": "awq"}')
    with pytest.raises(Exception, match="quant_log.json: method 'awq' is none of gptq, rtn"):
        variant_method(tmp_path)


def report_with(checks: list[str], method: str) -> Report:
    art = {"path": "/x", "kind": "gptq", "files": {}, "method": method}
    return Report(passed=True, device="cpu", dtype="float32", eval={}, artifacts={"v": art},
                  checks=[Check(c, "v", True) for c in checks], perplexity={"v": 1.0},
                  tokens_per_second=1.0)


def test_publish_requires_the_checks_of_the_variants_method():
    gptq, rtn_checks = METHODS["gptq"].checks, METHODS["rtn"].checks
    assert "against_rtn" in required_checks({"kind": "gptq"})  # a foreign GPTQ model: GPTQ's
    assert "against_rtn" not in required_checks({"kind": "gptq", "method": "rtn"})
    assert verdict_problems(report_with(list(rtn_checks), "rtn"), ["v"]) == []
    missing = [c for c in gptq if c != "module_integrity"]
    assert verdict_problems(report_with(missing, "gptq"), ["v"]) == [
        "'v' lacks the required check(s) module_integrity"]
