"""verify.metrics: the perplexity protocol against the GPTQ reference evaluation loop run with
transformers on the shipped demo model, KL divergence against torch's kl_div, and every metric
against values known in closed form."""

from __future__ import annotations

import glob
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from demo_model import EVAL, demo_fp16
from transformers import AutoTokenizer, LlamaForCausalLM

from pipeline.core.errors import InputError
from verify.forward import LayerwiseModel
from verify.metrics import (agreement, degenerate, eval_tokens, kl_summary, kl_top1, logits_parity,
                            perplexity, windows)
from verify.thresholds import parity_passed


def reference_perplexity(model_dir: Path, texts: list[str], seqlen: int,
                         max_windows: int | None = None) -> float:
    """The GPTQ repository's evaluation: one tokenisation of the "\\n\\n"-joined text,
    non-overlapping windows, loss × seqlen per window, exp(sum / (n · seqlen))."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    enc = tok("\n\n".join(texts), return_tensors="pt").input_ids
    n = min(enc.numel() // seqlen, max_windows or enc.numel())
    nlls = []
    with torch.no_grad():
        for i in range(n):
            batch = enc[:, i * seqlen:(i + 1) * seqlen]
            logits = model(batch).logits
            loss = F.cross_entropy(logits[0, :-1], batch[0, 1:])
            nlls.append(loss.float() * seqlen)
    return torch.exp(torch.stack(nlls).sum() / (n * seqlen)).item()


def test_perplexity_protocol_matches_reference_loop(tmp_path):
    model_dir = demo_fp16(tmp_path / "fp16")
    texts = [Path(p).read_text() for p in sorted(glob.glob(EVAL))] + ["x = 1\n"]
    seqlen, n = 256, 12
    stream = eval_tokens(AutoTokenizer.from_pretrained(model_dir), texts)
    assert windows(stream, seqlen).shape[0] == stream.numel() // seqlen
    win = windows(stream, seqlen, max_windows=n)
    m = LayerwiseModel(model_dir, progress=False)
    (h,) = m.hidden([win])
    ours = perplexity(m.nll(h, win), seqlen)
    ref = reference_perplexity(model_dir, texts, seqlen, max_windows=n)
    assert 5 < ref < 200  # a trained model (vocabulary 2048), so the comparison means something
    # both float32 on the same weights; they differ by summation order only (~1e-7 relative)
    assert ours == pytest.approx(ref, rel=1e-5)
    # the same model against itself: KL exactly 0 (identical log-probs), every top token shared
    kl, same = m.divergence(h, m, h.clone())
    assert kl.shape == same.shape == (n, seqlen - 1)
    assert torch.equal(kl, torch.zeros_like(kl)) and bool(same.all())
    assert kl_summary(kl, same) == {"kl_mean": 0.0, "kl_p99": 0.0, "top1": 1.0}


def test_perplexity_of_uniform_prediction_is_vocab_size():
    V, T = 50, 9
    nll = torch.full((3,), (T - 1) * math.log(V), dtype=torch.float64)
    assert perplexity(nll, T) == pytest.approx(V, rel=1e-12)
    assert math.isnan(perplexity(torch.tensor([float("nan")]), T))  # NaN propagates, never raises
    assert perplexity(torch.tensor([0.0]), T) == 1.0
    assert perplexity(torch.tensor([1e6]), 2) == math.inf


def test_windows_drop_the_tail_and_respect_max():
    t = torch.arange(23)
    assert windows(t, 5).tolist() == [list(range(i, i + 5)) for i in range(0, 20, 5)]
    assert windows(t, 5, max_windows=2).shape == (2, 5)
    with pytest.raises(InputError, match=r"eval\.txt: 23 tokens, shorter than one window of 24"):
        windows(t, 24, source="eval.txt")


def test_eval_tokens_joins_with_blank_line():
    class Tok:
        def __call__(self, text, verbose=True):
            return {"input_ids": [ord(c) for c in text]}

    assert eval_tokens(Tok(), ["ab", "c"]).tolist() == [97, 98, 10, 10, 99]


def test_logits_parity_known_values():
    ref = torch.tensor([[[1.0, 4.0, -2.0], [3.0, 0.0, 1.0]]], dtype=torch.float64)
    ours = ref.clone()
    ours[0, 0, 2] += 0.004  # 0.004 / max|ref| 4 = 1e-3
    ours[0, 1, 1] = 3.5  # argmax moves: 1 of 2 positions agree; error 3.5 / 3
    m = logits_parity(ours, ref)
    assert m["max_rel_err"] == pytest.approx(3.5 / 3)
    assert m["top1_agreement"] == 0.5
    m = logits_parity(ours[:, :1], ref[:, :1])
    assert m == {"max_rel_err": pytest.approx(1e-3, rel=1e-5), "top1_agreement": 1.0}
    assert parity_passed(m, {"max_rel_err": 1e-3 + 1e-9, "top1_agreement": 1.0})
    assert not parity_passed(m, {"max_rel_err": 1e-4, "top1_agreement": 1.0})


def test_kl_top1_against_torch_kl_div_and_a_closed_form():
    g = torch.Generator().manual_seed(0)
    ref, other = torch.randn(3, 5, 11, generator=g) * 3, torch.randn(3, 5, 11, generator=g) * 3
    kl, same = kl_top1(ref, other)
    expected = F.kl_div(F.log_softmax(other.double(), -1), F.log_softmax(ref.double(), -1),
                        log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kl.double(), expected, rtol=1e-5, atol=1e-6)  # float32 vs float64
    assert torch.equal(same, ref.argmax(-1) == other.argmax(-1)) and 0 < same.sum() < same.numel()
    # P = (1/2, 1/2), Q = (1/4, 3/4): KL = ½ ln 2 + ½ ln ⅔ = ½ ln 4/3; top tokens 0, 1 differ
    p, q = torch.tensor([[0.5, 0.5]]).log() + 7, torch.tensor([[0.25, 0.75]]).log() - 2
    kl, same = kl_top1(p, q)
    assert float(kl) == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6) and not bool(same)
    kl, same = kl_top1(other, other)
    assert torch.equal(kl, torch.zeros_like(kl)) and bool(same.all())


def test_kl_summary_mean_percentile_and_top1():
    x = torch.arange(101, dtype=torch.float32).view(1, 101) / 100  # 0.00 … 1.00
    same = torch.tensor([True] * 3 + [False]).repeat(25)
    assert kl_summary(x, same) == pytest.approx({"kl_mean": 0.5, "kl_p99": 0.99, "top1": 0.75})
    y = torch.rand(7, 33, generator=torch.Generator().manual_seed(1)) ** 4
    got = kl_summary(y, y > 0.5)
    assert got["kl_p99"] == pytest.approx(float(np.quantile(y.double().numpy(), 0.99)), rel=1e-12)
    assert got["kl_mean"] == pytest.approx(float(y.double().mean()), rel=1e-12)


@pytest.mark.parametrize("ref,tokens,expected", [
    ([1, 2, 3, 4], [1, 2, 3, 4], (4, 4)),
    ([1, 2, 3, 4], [1, 2, 9, 4], (2, 4)),
    ([5, 2], [1, 2], (0, 2)),
    ([1, 2, 2], [1, 2], (2, 3)),          # the variant stopped (EOS) early
    ([1, 2], [1, 2, 7, 7], (2, 4)),       # fp16 stopped early
])
def test_agreement(ref, tokens, expected):
    assert agreement(ref, tokens) == expected


@pytest.mark.parametrize("tokens,text,reason", [
    ([5, 5, 5, 5], "abababab", "one token repeated"),
    ([1, 2, 3], "!!!!!!", "one character repeated"),
    ([], "", "empty output"),
    ([7, 8], "  \n ", "empty output"),
    ([0, 0, 0], "", "one token repeated"),
    ([3, 4, 3, 4], "return x + 1", None),
    ([9], "a", None),
])
def test_degenerate(tokens, text, reason):
    got = degenerate(tokens, text)
    assert (got is None) if reason is None else (got is not None and got.startswith(reason))
