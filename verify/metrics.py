"""The numbers verify judges by: perplexity under the standard protocol (GPTQ paper), logits
parity between two forwards, KL divergence and top-1 agreement against a reference (as llama.cpp's
`perplexity --kl-divergence` reports them), greedy-sample agreement and degenerate-generation
detection. The thresholds they are judged against, and the comparisons, live in
verify/thresholds.py."""

from __future__ import annotations

import torch

from pipeline.core.errors import InputError



def eval_tokens(tokenizer, texts: list[str]) -> torch.Tensor:
    """The standard protocol's token stream [N]: texts joined with "\\n\\n", tokenised once."""
    return torch.tensor(tokenizer("\n\n".join(texts), verbose=False)["input_ids"], dtype=torch.long)


def windows(tokens: torch.Tensor, seqlen: int, max_windows: int | None = None,
            source: str = "evaluation text") -> torch.Tensor:
    """Non-overlapping windows [N, seqlen] of a token stream (the tail shorter than seqlen is
    dropped), the first max_windows of them."""
    n = tokens.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise InputError(f"{source}: {tokens.numel()} tokens, shorter than one window of "
                         f"{seqlen}; give more text or a smaller --seqlen")
    return tokens[: n * seqlen].view(n, seqlen)


def perplexity(nll: torch.Tensor, seqlen: int) -> float:
    """exp(mean NLL) from per-window summed NLLs [N], each over seqlen - 1 predicted tokens."""
    return float(torch.exp(nll.double().sum() / (nll.numel() * (seqlen - 1))))  # inf, not an error


def logits_parity(ours: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """max_rel_err: max over positions of max|ours − ref| / max|ref| (logits [..., V]);
    top1_agreement: fraction of positions where both pick the same token."""
    ours, ref = ours.double(), ref.double()
    rel = (ours - ref).abs().amax(-1) / ref.abs().amax(-1).clamp_min(1e-30)
    top1 = (ours.argmax(-1) == ref.argmax(-1)).double().mean()
    return {"max_rel_err": float(rel.max()), "top1_agreement": float(top1)}


def kl_top1(ref: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position of logits [..., V]: KL(P_ref || P) in nats (float32) and whether both put the
    same token on top (bool)."""
    lp = torch.log_softmax(ref.float(), -1)
    lq = torch.log_softmax(logits.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1), ref.argmax(-1) == logits.argmax(-1)


def kl_summary(kl: torch.Tensor, top1: torch.Tensor) -> dict[str, float]:
    """kl_mean, kl_p99 (99th percentile, linear interpolation as numpy's default) and top1 (the
    fraction of same top tokens) over every position of per-position values."""
    x = kl.double().flatten().sort().values
    pos = 0.99 * (x.numel() - 1)
    i = int(pos)
    p99 = x[i] + (x[min(i + 1, x.numel() - 1)] - x[i]) * (pos - i)
    return {"kl_mean": float(x.mean()), "kl_p99": float(p99),
            "top1": float(top1.double().mean())}


def agreement(ref: list[int], tokens: list[int]) -> tuple[int, int]:
    """(number of tokens equal to ref's before the first difference, length compared: the longer
    of the two continuations)."""
    n = next((i for i, (a, b) in enumerate(zip(ref, tokens, strict=False)) if a != b),
             min(len(ref), len(tokens)))
    return n, max(len(ref), len(tokens))


def degenerate(tokens: list[int], text: str) -> str | None:
    """Why a greedy sample is not text (None when it is): one token repeated, empty (or only
    whitespace), or one character repeated (`!!!!`)."""
    s = text.strip()
    if len(tokens) > 1 and len(set(tokens)) == 1:
        return f"one token repeated ({tokens[0]} × {len(tokens)})"
    if not s:
        return "empty output"
    if len(s) > 1 and len(set(s)) == 1:
        return f"one character repeated ({s[0]!r} × {len(s)})"
    return None
