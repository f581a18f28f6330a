"""verify.metrics: the perplexity protocol against the GPTQ reference evaluation loop run with
transformers, and every metric against values known in closed form."""

from __future__ import annotations

import glob
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaForCausalLM

from pipeline.errors import InputError
from trained_model import eval_glob, make_trained_model
from verify.forward import LayerwiseModel
from verify.metrics import (degenerate, eval_tokens, logits_parity, parity_passed, perplexity,
                            windows)


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
    model_dir = make_trained_model(tmp_path)
    texts = [Path(p).read_text() for p in sorted(glob.glob(eval_glob(tmp_path)))] + ["x = 1\n"]
    seqlen = 256
    stream = eval_tokens(AutoTokenizer.from_pretrained(model_dir), texts)
    win = windows(stream, seqlen)
    assert win.shape[0] == stream.numel() // seqlen
    m = LayerwiseModel(model_dir, progress=False)
    (h,) = m.hidden([win])
    ours = perplexity(m.nll(h, win), seqlen)
    ref = reference_perplexity(model_dir, texts, seqlen)
    assert 1.5 < ref < 10  # a trained model, so the comparison means something
    assert ours == pytest.approx(ref, rel=1e-5)


def test_perplexity_of_uniform_prediction_is_vocab_size():
    V, T = 50, 9
    nll = torch.full((3,), (T - 1) * math.log(V), dtype=torch.float64)
    assert perplexity(nll, T) == pytest.approx(V, rel=1e-12)
    assert perplexity(torch.tensor([float("nan")]), T) != perplexity(torch.tensor([0.0]), T)
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
