"""verify/thresholds.py's comparisons: a value at its threshold passes, one beyond it fails, and
NaN fails every check (a broken measurement never passes)."""

import math

import pytest

from verify import thresholds as th

NAN = math.nan


def test_bounds_are_inclusive_and_directed():
    assert th.perplexity_passed(1.05, 1.0, 0.05 + 1e-12) and not th.perplexity_passed(1.06, 1.0, 0.05)
    assert th.perplexity_passed(0.5, 1.0, 0.0)  # better than fp16 passes
    limits = {"kl_mean": 0.1, "kl_p99": 1.5, "top1": 0.9}
    assert th.kl_passed(dict(limits), limits)
    assert not th.kl_passed({**limits, "kl_mean": 0.11}, limits)
    assert not th.kl_passed({**limits, "kl_p99": 1.6}, limits)
    assert not th.kl_passed({**limits, "top1": 0.89}, limits)
    assert th.agreement_passed(0.03, 0.03) and not th.agreement_passed(0.02, 0.03)
    assert th.module_passed(3.0, 1.0, 3.0) and not th.module_passed(3.1, 1.0, 3.0)
    assert th.module_passed(0.0, 0.0, 3.0)  # an all-zero weight: both errors 0
    assert th.rtn_passed(1.1, 1.0, 0.1, 0.0) and not th.rtn_passed(1.1001, 1.0, 0.1, 0.0)
    assert th.rtn_passed(10.01, 5.0, 0.1, 0.001, 10.0)  # within the floor of fp16's 10
    assert not th.rtn_passed(10.02, 5.0, 0.1, 0.001, 10.0)
    assert th.rtn_passed(0.0009, 0.0001, 0.1, 0.001) and not th.rtn_passed(0.0011, 0.0001, 0.1, 0.001)
    parity = {"max_rel_err": 1e-4, "top1_agreement": 0.999}
    assert th.parity_passed(dict(parity), parity)
    assert not th.parity_passed({**parity, "top1_agreement": 0.998}, parity)
    assert th.runtime_matched(th.PPL_MATCH) and th.runtime_matched(-th.PPL_MATCH)
    assert not th.runtime_matched(2 * th.PPL_MATCH) and not th.runtime_matched(-2 * th.PPL_MATCH)


@pytest.mark.parametrize("check", [
    lambda: th.perplexity_passed(NAN, 1.0, 0.05),
    lambda: th.perplexity_passed(math.inf, 1.0, math.inf),
    lambda: th.kl_passed({"kl_mean": NAN, "kl_p99": 0.0, "top1": 1.0},
                         {"kl_mean": 1.0, "kl_p99": 1.0, "top1": 0.0}),
    lambda: th.kl_passed({"kl_mean": 0.0, "kl_p99": NAN, "top1": 1.0},
                         {"kl_mean": 1.0, "kl_p99": 1.0, "top1": 0.0}),
    lambda: th.kl_passed({"kl_mean": 0.0, "kl_p99": 0.0, "top1": NAN},
                         {"kl_mean": 1.0, "kl_p99": 1.0, "top1": 0.0}),
    lambda: th.agreement_passed(NAN, 0.0),
    lambda: th.rtn_passed(NAN, 1.0, 0.1, 0.001, 1.0),
    lambda: th.rtn_passed(math.inf, math.inf, 0.1, 0.001, 1.0),
    lambda: th.module_passed(NAN, 1.0, 3.0),
    lambda: th.parity_passed({"max_rel_err": NAN, "top1_agreement": 1.0},
                             {"max_rel_err": 1.0, "top1_agreement": 0.0}),
    lambda: th.runtime_matched(NAN),
], ids=["ppl", "ppl-inf", "kl_mean", "kl_p99", "top1", "agreement", "rtn", "rtn-inf", "module",
        "parity", "runtime"])
def test_nan_fails_every_check(check):
    assert check() is False
