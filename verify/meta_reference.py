"""Meta's Llama forward pass, independent of the converter: `MetaTransformer` (Meta's module names
and math: interleaved complex RoPE, float32 RMSNorm then cast then weight, float32 softmax,
repeated kv heads) and `meta_logits`, the same math streamed over the original model-parallel
shards, rank by rank as fairscale computes it. It reads params.json and the shards itself and
imports nothing of the converter (tests/test_layering.py), so a wrong default or merge in the
converter shows up as a logits mismatch instead of being shared.

Usage:
    args = ModelArgs.from_params(params)         # params.json dict, Meta's defaults
    model = MetaTransformer(params)              # vocab_size > 0; trainable
    logits = model(tokens)                       # tokens [B, T] -> logits [B, T, V] float32
    logits = meta_logits(Path("CodeLlama-7b"), tokens, device="cuda", dtype=torch.float16)
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline.core.errors import InputError

LAYER_KEYS = ("attention_norm.weight", "attention.wq.weight", "attention.wk.weight",
              "attention.wv.weight", "attention.wo.weight", "ffn_norm.weight",
              "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight")

# Llama 3.1 RoPE scaling constants, as Meta's apply_scaling hard-codes them (llama-models,
# models/llama3/model.py); params.json may override the factor and the high-frequency factor
# (`rope_scaling_factor`, `rope_high_freq_factor`, the names of Meta's later ModelArgs).
SCALE_FACTOR, LOW_FREQ_FACTOR, HIGH_FREQ_FACTOR, OLD_CONTEXT_LEN = 8.0, 1.0, 4.0, 8192
# Llama 3.2 1B and 3B, (dim, n_layers): trained with factor 32, which neither their params.json
# nor Meta's hard-coded 8 says (Meta's answer in meta-llama/llama-models#166, #241). They are
# also the Llama 3 models whose output layer is tok_embeddings (tied), by which a checkpoint of
# their layout with fewer layers is known.
SCALE_FACTOR_32 = frozenset({(2048, 16), (3072, 28)})


@dataclass(frozen=True)
class ModelArgs:
    """params.json read as Meta's ModelArgs reads it: n_kv_heads absent or null = n_heads,
    multiple_of 256, no ffn_dim_multiplier, norm_eps 1e-5, rope_theta 10000 (Llama 1/2 do not
    store it), no scaled RoPE; vocab_size -1 (not stored) until the shards say."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int = -1
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    use_scaled_rope: bool = False
    rope_scaling_factor: float | None = None
    rope_high_freq_factor: float | None = None
    tied: bool = False  # output.weight is tok_embeddings (set from the shards)

    @classmethod
    def from_params(cls, p: dict[str, Any]) -> ModelArgs:
        """From a params.json dict (unwrapped from `{"model": {...}}`); ValueError naming the key
        when a value Meta's code needs is missing or of the wrong type."""
        p = p["model"] if isinstance(p.get("model"), dict) else p

        def number(key: str, kind: type, default: Any = None) -> Any:
            v = p.get(key)
            if v is None:  # absent or null: Meta's default
                return default
            if isinstance(v, bool) or not isinstance(v, int if kind is int else (int, float)):
                raise ValueError(f"{key} = {v!r}: expected {kind.__name__}")
            return kind(v)

        missing = [k for k in ("dim", "n_layers", "n_heads") if p.get(k) is None]
        if missing:
            raise ValueError(f"missing key(s) {missing}")
        n_heads = number("n_heads", int)
        args = cls(dim=number("dim", int), n_layers=number("n_layers", int), n_heads=n_heads,
                   n_kv_heads=number("n_kv_heads", int, n_heads),
                   vocab_size=number("vocab_size", int, -1),
                   multiple_of=number("multiple_of", int, 256),
                   ffn_dim_multiplier=number("ffn_dim_multiplier", float),
                   norm_eps=number("norm_eps", float, 1e-5),
                   rope_theta=number("rope_theta", float, 10000.0),
                   use_scaled_rope=p.get("use_scaled_rope") is True,
                   rope_scaling_factor=number("rope_scaling_factor", float),
                   rope_high_freq_factor=number("rope_high_freq_factor", float))
        if min(args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.multiple_of) <= 0:
            raise ValueError("dim, n_layers, n_heads, n_kv_heads and multiple_of must be positive")
        if args.dim % args.n_heads or args.n_heads % args.n_kv_heads:
            raise ValueError(f"dim {args.dim}, n_heads {args.n_heads}, n_kv_heads "
                             f"{args.n_kv_heads}: heads must divide dim, kv heads the heads")
        return args

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """Meta's FeedForward width from hidden_dim = 4·dim: two thirds, times the multiplier,
        rounded up to multiple_of (the int() truncations are Meta's)."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @property
    def scale_factor(self) -> float:
        if self.rope_scaling_factor is not None:
            return self.rope_scaling_factor
        return 32.0 if self.tied or (self.dim, self.n_layers) in SCALE_FACTOR_32 else SCALE_FACTOR

    def freqs_cis(self, end: int) -> torch.Tensor:
        """Rotations for positions 0..end-1 (complex64 [end, head_dim/2])."""
        return precompute_freqs_cis(self.head_dim, end, self.rope_theta, self.use_scaled_rope,
                                    self.scale_factor,
                                    self.rope_high_freq_factor or HIGH_FREQ_FACTOR)


def apply_scaling(freqs: torch.Tensor, scale_factor: float = SCALE_FACTOR,
                  high_freq_factor: float = HIGH_FREQ_FACTOR) -> torch.Tensor:
    """Llama 3.1 long-context frequencies: keep high ones, divide low ones by the factor, blend
    in between (wavelengths measured against the original 8192-token context)."""
    low, high, old_ctx = LOW_FREQ_FACTOR, high_freq_factor, OLD_CONTEXT_LEN
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * freqs / scale_factor + smooth * freqs
    scaled = torch.where(wavelen > old_ctx / low, freqs / scale_factor, blended)
    return torch.where(wavelen < old_ctx / high, freqs, scaled)


def precompute_freqs_cis(head_dim: int, end: int, theta: float = 10000.0,
                         use_scaled: bool = False, scale_factor: float = SCALE_FACTOR,
                         high_freq_factor: float = HIGH_FREQ_FACTOR) -> torch.Tensor:
    """Unit complex rotations [end, head_dim/2] (complex64), as Meta precomputes them."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    if use_scaled:
        freqs = apply_scaling(freqs, scale_factor, high_freq_factor)
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
        a = self.args = ModelArgs.from_params(params)
        if a.vocab_size <= 0:
            raise ValueError("MetaTransformer needs params['vocab_size'] > 0")
        self.tok_embeddings = nn.Embedding(a.vocab_size, a.dim)
        self.layers = nn.ModuleList(
            TransformerBlock(a.dim, a.n_heads, a.n_kv_heads, a.hidden_dim, a.norm_eps)
            for _ in range(a.n_layers))
        self.norm = RMSNorm(a.dim, a.norm_eps)
        self.output = nn.Linear(a.dim, a.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V] float32 (positions 0..T-1, causal)."""
        T = tokens.shape[1]
        h = self.tok_embeddings(tokens)
        freqs_cis = self.args.freqs_cis(T).to(h.device)
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


def tied_head(shards: list[tuple[Path, dict[str, torch.Tensor]]], dim: int, rows: int = 64) -> bool:
    """Whether the output layer is tok_embeddings: output.weight absent (Llama 3.2 1B/3B as Meta
    ships them), or its first rows equal the embeddings' (as Meta also ships them). A head that
    agrees only there is judged tied here and not by the converter, and fails parity."""
    if not any("output.weight" in s for _, s in shards):
        return True
    first = shards[0][1]["output.weight"][:rows]  # rank 0's vocabulary slice starts at row 0
    return torch.equal(first, full_embedding([s["tok_embeddings.weight"] for _, s in shards],
                                             dim, first.shape[0]))


def full_embedding(parts: list[torch.Tensor], dim: int, rows: int | None = None) -> torch.Tensor:
    """The [V, dim] embedding matrix (its first `rows`) from the ranks' ParallelEmbedding or
    VocabParallelEmbedding shards."""
    if all(e.shape[1] == dim for e in parts):
        return torch.cat([e[:rows] for e in parts])[:rows]
    return torch.cat([e[:rows] for e in parts], dim=1)


def read_params(src: Path) -> ModelArgs:
    """ModelArgs from `src`/params.json (InputError naming the file and what is wrong)."""
    path = src / "params.json"
    try:
        params = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(params, dict):
            raise ValueError("expected a JSON object")
        return ModelArgs.from_params(params)
    except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise InputError(f"{path}: {e}") from e
    except RecursionError:
        raise InputError(f"{path}: nested too deeply to be params.json") from None


def load_shards(src: Path) -> list[tuple[Path, dict[str, torch.Tensor]]]:
    """Every rank's state dict, in sorted file order (Meta's `sorted(glob("*.pth"))`),
    memory-mapped: plain tensors only, nothing read yet."""
    paths = sorted(src.glob("consolidated.*.pth"))
    if not paths:
        raise InputError(f"{src}: no consolidated.*.pth shards")
    shards = []
    for path in paths:
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # weights_only refusal, truncation, not a zip: all bad input
            raise InputError(f"{path}: cannot load with weights_only "
                             f"({str(e).splitlines()[0][:200]})") from e
        if not isinstance(state, dict):
            raise InputError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
        shards.append((path, state))
    return shards


_MADV_WILLNEED, _MADV_PAGEOUT = 3, 21
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
if _libc is not None:
    _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def madvise(t: torch.Tensor, advice: int) -> None:
    """Advise the kernel on a memory-mapped tensor's pages: WILLNEED starts reading them (I/O
    overlaps compute), PAGEOUT hands them back (clean file pages, re-read if touched), so
    resident memory stays near one layer whatever the model's size. A no-op off Linux."""
    if _libc is None or t.device.type != "cpu" or t.nbytes == 0:
        return
    start = t.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
    _libc.madvise(start, t.data_ptr() + t.nbytes - start, advice)


def check_layer(src: Path, i: int, ranks: list[dict[str, torch.Tensor]], a: ModelArgs) -> None:
    """The ranks' wq/wk/w1 rows add up to what params.json implies (heads, kv heads, Meta's FFN
    width), as loading them into Meta's modules would demand."""
    for key, want, unit in (("attention.wq.weight", a.n_heads * a.head_dim, a.head_dim),
                            ("attention.wk.weight", a.n_kv_heads * a.head_dim, a.head_dim),
                            ("feed_forward.w1.weight", a.hidden_dim, 1)):
        rows = [r[key].shape[0] for r in ranks]
        if sum(rows) != want or any(n % unit for n in rows):
            whole = f" in whole heads of {unit}" if unit > 1 else ""
            raise InputError(f"{src}: layers.{i}.{key} has {rows} rows on the ranks; params.json "
                             f"implies {want}{whole}")


@torch.inference_mode()
def meta_logits(src: Path, tokens: torch.Tensor, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Logits [B, T, V] (float32, on the CPU) of Meta's model on the original shards in `src`,
    one layer at a time: each layer's rank shards are materialised on `device`, used, dropped."""
    src = Path(src)
    a = read_params(src)
    shards = load_shards(src)
    T = tokens.shape[1]

    def take(name: str) -> list[torch.Tensor]:
        missing = [str(path) for path, s in shards if name not in s]
        if missing:
            raise InputError(f"{missing[0]}: tensor {name} missing")
        parts = [s[name] for _, s in shards]
        out = [t.to(device, dtype) for t in parts]
        for t in parts:
            madvise(t, _MADV_PAGEOUT)
        return out

    tokens = tokens.to(device)
    embeddings = take("tok_embeddings.weight")
    a = replace(a, tied=tied_head(shards, a.dim))
    h = embed(tokens, embeddings, a.dim)
    freqs_cis = a.freqs_cis(T).to(device)
    mask = causal_mask(T, device, dtype)
    for i in tqdm(range(a.n_layers), desc="meta reference", unit="layer", leave=False):
        for _, s in shards:  # the next layer's bytes start loading while this one computes
            for name in (f"layers.{i + 1}.{k}" for k in LAYER_KEYS):
                if name in s:
                    madvise(s[name], _MADV_WILLNEED)
        ranks = [dict(zip(LAYER_KEYS, ws, strict=True)) for ws in
                 zip(*(take(f"layers.{i}.{k}") for k in LAYER_KEYS), strict=True)]
        check_layer(src, i, ranks, a)
        # each rank attends with its own heads; wo is row-parallel: partial products summed
        h = h + sum(attention(rms_norm(h, r["attention_norm.weight"], a.norm_eps),
                              r["attention.wq.weight"], r["attention.wk.weight"],
                              r["attention.wv.weight"], r["attention.wo.weight"], a.head_dim,
                              freqs_cis, mask) for r in ranks)
        # w1/w3 column-parallel, w2 row-parallel: the ranks' partial sums add up
        h = h + sum(feed_forward(rms_norm(h, r["ffn_norm.weight"], a.norm_eps),
                                 r["feed_forward.w1.weight"], r["feed_forward.w2.weight"],
                                 r["feed_forward.w3.weight"]) for r in ranks)
    h = rms_norm(h, take("norm.weight")[0], a.norm_eps)
    # column-parallel: each rank holds a slice of the vocabulary; tied: the embedding matrix
    heads = [full_embedding(embeddings, a.dim)] if a.tied else take("output.weight")
    vocab = sum(w.shape[0] for w in heads)
    if a.vocab_size > 0 and vocab != a.vocab_size:
        raise InputError(f"{src}: output.weight has {vocab} rows over the ranks; params.json "
                         f"says vocab_size {a.vocab_size}")
    return torch.cat([F.linear(h, w) for w in heads], dim=-1).float().cpu()
