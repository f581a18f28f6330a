"""Meta's Llama forward pass, independent of the converter: `MetaTransformer` (Meta's module names
and math: interleaved complex RoPE, float32 RMSNorm then cast then weight, float32 softmax,
repeated kv heads) and `meta_logits`, the same math streamed over the original model-parallel
shards, rank by rank as fairscale computes it (it never merges a tensor, so it shares nothing with
the converter's shard table: a wrong merge in the converter shows up as a logits mismatch).

Usage:
    model = MetaTransformer(params)              # params.json dict, vocab_size > 0; trainable
    logits = model(tokens)                       # tokens [B, T] -> logits [B, T, V] float32
    logits = meta_logits(Path("CodeLlama-7b"), tokens, device="cuda", dtype=torch.float16)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from verify.errors import InputError
from pipeline.meta import (MetaCheckpoint, ffn_dim, load_shard, prefetch, release,
                           rope_scaling)

LAYER_KEYS = ("attention_norm.weight", "attention.wq.weight", "attention.wk.weight",
              "attention.wv.weight", "attention.wo.weight", "ffn_norm.weight",
              "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight")


def apply_scaling(freqs: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 long-context frequencies: keep high ones, divide low ones by the factor, blend
    in between (wavelengths measured against the original 8192-token context)."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    scaled = torch.where(wavelen > old_ctx / low, freqs / factor, blended)
    return torch.where(wavelen < old_ctx / high, freqs, scaled)


def precompute_freqs_cis(head_dim: int, end: int, theta: float,
                         scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """Unit complex rotations [end, head_dim/2] (complex64), as Meta precomputes them."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    if scaling:
        freqs = apply_scaling(freqs, scaling)
    t = torch.arange(end, dtype=torch.float32)
    angles = torch.outer(t, freqs)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (2i, 2i+1) of each head as complex numbers; x [B, T, H, hd]."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # [B, T, H, hd/2]
    out = torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)
    return out.type_as(x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in float32, cast back to x's dtype, then scale by the weight."""
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def causal_mask(T: int, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((T, T), float("-inf"), device=device).triu(1).to(dtype)


def attention(x: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor,
              wo: torch.Tensor, head_dim: int, freqs_cis: torch.Tensor,
              mask: torch.Tensor) -> torch.Tensor:
    """Meta's attention on the heads these weights hold (all of them, or one rank's share);
    returns wo's (partial, when row-parallel) product [B, T, dim]."""
    B, T, _ = x.shape
    n_heads, n_kv_heads = wq.shape[0] // head_dim, wk.shape[0] // head_dim
    xq = F.linear(x, wq).view(B, T, n_heads, head_dim)
    xk = F.linear(x, wk).view(B, T, n_kv_heads, head_dim)
    xv = F.linear(x, wv).view(B, T, n_kv_heads, head_dim)
    xq, xk = apply_rotary_emb(xq, freqs_cis), apply_rotary_emb(xk, freqs_cis)
    n_rep = n_heads // n_kv_heads
    keys = xk.repeat_interleave(n_rep, dim=2).transpose(1, 2)  # [B, H, T, hd]
    values = xv.repeat_interleave(n_rep, dim=2).transpose(1, 2)
    scores = xq.transpose(1, 2) @ keys.transpose(2, 3) / math.sqrt(head_dim) + mask  # [B, H, T, T]
    scores = F.softmax(scores.float(), dim=-1).type_as(xq)
    out = (scores @ values).transpose(1, 2).reshape(B, T, n_heads * head_dim)
    return F.linear(out, wo)


def feed_forward(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                 w3: torch.Tensor) -> torch.Tensor:
    """SwiGLU: w2(silu(w1 x) * w3 x) (a partial sum when w2 is one rank's row-parallel slice)."""
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int) -> None:
        super().__init__()
        self.head_dim = dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return attention(x, self.wq.weight, self.wk.weight, self.wv.weight, self.wo.weight,
                         self.head_dim, freqs_cis, mask)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return feed_forward(x, self.w1.weight, self.w2.weight, self.w3.weight)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.attention = Attention(dim, n_heads, n_kv_heads)
        self.feed_forward = FeedForward(dim, hidden)
        self.attention_norm = RMSNorm(dim, eps)
        self.ffn_norm = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class MetaTransformer(nn.Module):
    """Meta's Llama in one process; state_dict keys are Meta's (tok_embeddings.weight,
    layers.{i}.attention.wq.weight, ..., norm.weight, output.weight)."""

    def __init__(self, params: dict[str, Any]) -> None:
        super().__init__()
        p = self.params = dict(params)
        if p.get("vocab_size", -1) <= 0:
            raise ValueError("MetaTransformer needs params['vocab_size'] > 0")
        dim, n_heads = p["dim"], p["n_heads"]
        n_kv_heads = p.get("n_kv_heads") or n_heads
        hidden = ffn_dim(dim, p.get("multiple_of", 256), p.get("ffn_dim_multiplier"))
        self.head_dim = dim // n_heads
        self.tok_embeddings = nn.Embedding(p["vocab_size"], dim)
        self.layers = nn.ModuleList(
            TransformerBlock(dim, n_heads, n_kv_heads, hidden, p["norm_eps"])
            for _ in range(p["n_layers"]))
        self.norm = RMSNorm(dim, p["norm_eps"])
        self.output = nn.Linear(dim, p["vocab_size"], bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V] float32 (positions 0..T-1, causal)."""
        T = tokens.shape[1]
        h = self.tok_embeddings(tokens)
        theta = float(self.params.get("rope_theta", 10000.0))
        freqs_cis = precompute_freqs_cis(self.head_dim, T, theta,
                                         rope_scaling(self.params)).to(h.device)
        mask = causal_mask(T, h.device, h.dtype)
        for layer in self.layers:
            h = layer(h, freqs_cis, mask)
        return self.output(self.norm(h)).float()


def embed(tokens: torch.Tensor, parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """tok_embeddings over the ranks' shards: ParallelEmbedding ([V, dim/MP], outputs concatenated)
    or VocabParallelEmbedding ([V/MP, dim], out-of-range ids masked to zero, outputs summed)."""
    if all(e.shape[1] == dim for e in parts):
        h = 0
        for r, e in enumerate(parts):
            start = r * e.shape[0]
            outside = (tokens < start) | (tokens >= start + e.shape[0])
            out = F.embedding((tokens - start).masked_fill(outside, 0), e)
            h = h + out.masked_fill(outside[..., None], 0)
        return h
    if sum(e.shape[1] for e in parts) == dim:
        return torch.cat([F.embedding(tokens, e) for e in parts], dim=-1)
    raise InputError(f"tok_embeddings shards {[tuple(e.shape) for e in parts]} fit neither "
                     f"ParallelEmbedding nor VocabParallelEmbedding for dim {dim}")


@torch.inference_mode()
def meta_logits(src: Path, tokens: torch.Tensor, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Logits [B, T, V] (float32, on the CPU) of Meta's model on the original shards in `src`,
    one layer at a time: each layer's rank shards are materialised on `device`, used, dropped."""
    ckpt = MetaCheckpoint(src)
    p = ckpt.params
    shards = [load_shard(path) for path in ckpt.shards]
    dim, eps = p["dim"], p["norm_eps"]
    head_dim = dim // p["n_heads"]
    T = tokens.shape[1]

    def take(name: str) -> list[torch.Tensor]:
        missing = [str(path) for path, s in zip(ckpt.shards, shards) if name not in s]
        if missing:
            raise InputError(f"{missing[0]}: tensor {name} missing")
        parts = [s[name] for s in shards]
        out = [t.to(device, dtype) for t in parts]
        for t in parts:
            release(t)
        return out

    tokens = tokens.to(device)
    h = embed(tokens, take("tok_embeddings.weight"), dim)
    freqs_cis = precompute_freqs_cis(head_dim, T, float(p.get("rope_theta", 10000.0)),
                                     rope_scaling(p)).to(device)
    mask = causal_mask(T, device, dtype)
    for i in tqdm(range(p["n_layers"]), desc="meta reference", unit="layer", leave=False):
        for s in shards:  # the next layer's bytes start loading while this one computes
            for name in (f"layers.{i + 1}.{k}" for k in LAYER_KEYS):
                if name in s:
                    prefetch(s[name])
        ranks = [dict(zip(LAYER_KEYS, ws)) for ws in
                 zip(*(take(f"layers.{i}.{k}") for k in LAYER_KEYS))]
        if any(r["attention.wq.weight"].shape[0] % head_dim or r["attention.wk.weight"].shape[0]
               % head_dim for r in ranks):
            raise InputError(f"{src}: layer {i}: wq/wk shards do not hold whole heads of "
                             f"{head_dim}")
        # each rank attends with its own heads; wo is row-parallel: partial products summed
        h = h + sum(attention(rms_norm(h, r["attention_norm.weight"], eps),
                              r["attention.wq.weight"], r["attention.wk.weight"],
                              r["attention.wv.weight"], r["attention.wo.weight"], head_dim,
                              freqs_cis, mask) for r in ranks)
        # w1/w3 column-parallel, w2 row-parallel: the ranks' partial sums add up
        h = h + sum(feed_forward(rms_norm(h, r["ffn_norm.weight"], eps),
                                 r["feed_forward.w1.weight"], r["feed_forward.w2.weight"],
                                 r["feed_forward.w3.weight"]) for r in ranks)
    h = rms_norm(h, take("norm.weight")[0], eps)
    return torch.cat([F.linear(h, w) for w in take("output.weight")], dim=-1).float().cpu()
