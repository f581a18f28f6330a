"""The Llama decoder in Hugging Face layout (rotate-half RoPE, HF tensor names), small enough to
run one layer at a time: quantize feeds calibration through it, verify runs full forward passes."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.errors import InputError


@dataclass(frozen=True)
class LlamaArgs:
    """Model hyper-parameters, named as in Meta's params.json."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None = None
    max_seq_len: int = 4096
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def q_dim(self) -> int:
        """Width of the queries (q_proj's output, o_proj's input)."""
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of the keys and values (k_proj's and v_proj's output)."""
        return self.n_kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each linear of a decoder layer, keyed and ordered as LINEARS: q, k, v, o,
        gate, up, down."""
        d, q, kv, f = self.dim, self.q_dim, self.kv_dim, self.ffn_dim
        return dict(zip(LINEARS, ((q, d), (kv, d), (kv, d), (d, q), (f, d), (f, d), (d, f)),
                        strict=True))

    def layer_numel(self) -> int:
        """Weights of one decoder layer: its linears and its norms."""
        return sum(o * i for o, i in self.linear_shapes().values()) + len(LAYER_NORMS) * self.dim

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> LlamaArgs:
        """Read a config.json dict as transformers 4.x (top-level rope_theta/rope_scaling) or
        5.x (rope_parameters) writes it; ValueError names the key of any value this layer cannot
        run exactly as transformers' LlamaForCausalLM would."""
        rope = cfg.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ValueError(f"rope_parameters = {rope!r}: must be an object")
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling")
        if scaling is None and rope.get("rope_type", "default") != "default":
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
            if cfg.get(key) not in (None, want):
                raise ValueError(f"{key} = {cfg[key]!r}: only {want!r} is supported (Llama)")
        dim, n_heads = config_int(cfg, "hidden_size"), config_int(cfg, "num_attention_heads")
        n_kv_heads = config_int(cfg, "num_key_value_heads", n_heads, nullable=True)
        check_heads(dim, n_heads, n_kv_heads,
                    ("hidden_size", "num_attention_heads", "num_key_value_heads"))
        if config_int(cfg, "head_dim", dim // n_heads, nullable=True) != dim // n_heads:
            raise ValueError(f"head_dim = {cfg['head_dim']!r}: must be hidden_size / "
                             f"num_attention_heads = {dim // n_heads}")
        tied = cfg.get("tie_word_embeddings", False)
        if not isinstance(tied, bool):
            raise ValueError(f"tie_word_embeddings = {tied!r}: must be true or false")
        return cls(
            dim=dim,
            n_layers=config_int(cfg, "num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            ffn_dim=config_int(cfg, "intermediate_size"),
            vocab_size=config_int(cfg, "vocab_size"),
            norm_eps=config_float(cfg, "rms_norm_eps", 1e-6, below=1.0),
            rope_theta=config_float({"rope_theta": theta}, "rope_theta", above=1.0),
            rope_scaling=check_rope_scaling(scaling),
            max_seq_len=config_int(cfg, "max_position_embeddings", 4096),
            tie_word_embeddings=tied,
        )


_REQUIRED = object()


def _absent(cfg: dict[str, Any], key: str, default: Any, nullable: bool) -> bool:
    """Whether cfg lacks key (or, when nullable, holds null there) and default stands in."""
    if key in cfg and (cfg[key] is not None or not nullable):
        if cfg[key] is None:
            raise ValueError(f"{key} = null: must be a value")
        return False
    if default is _REQUIRED:
        raise ValueError(f"{key}: missing")
    return True


def config_int(cfg: dict[str, Any], key: str, default: Any = _REQUIRED, *,
               nullable: bool = False) -> int:
    """cfg[key] as a positive integer (JSON 4, not 4.0, "4" or true); absent (or null, when
    nullable): default."""
    if _absent(cfg, key, default, nullable):
        return default
    value = cfg[key]
    if type(value) is not int or value < 1:
        raise ValueError(f"{key} = {value!r}: must be a positive integer")
    return value


def config_float(cfg: dict[str, Any], key: str, default: Any = _REQUIRED, *, above: float = 0.0,
                 below: float = math.inf, nullable: bool = False) -> float:
    """cfg[key] as a finite number in (above, below); absent (or null, when nullable): default."""
    if _absent(cfg, key, default, nullable):
        return default
    value = cfg[key]
    if type(value) not in (int, float) or not (above < value < below) or not math.isfinite(value):
        bounds = f"> {above:g}" + (f" and < {below:g}" if math.isfinite(below) else "")
        raise ValueError(f"{key} = {value!r}: must be a finite number {bounds}")
    return float(value)


def check_heads(dim: int, n_heads: int, n_kv_heads: int, keys: tuple[str, str, str]) -> None:
    """Heads split dim evenly into even-sized heads (rotary pairs), kv heads group the heads."""
    d, h, kv = keys
    if dim % n_heads:
        raise ValueError(f"{d} = {dim} is not divisible by {h} = {n_heads}")
    if (dim // n_heads) % 2:
        raise ValueError(f"{d} / {h} = {dim // n_heads}: the head size must be even (RoPE pairs)")
    if n_heads % n_kv_heads:
        raise ValueError(f"{h} = {n_heads} is not a multiple of {kv} = {n_kv_heads}")


def check_rope_scaling(s: Any) -> dict[str, Any] | None:
    """None, or Llama 3.1's "llama3" scaling with usable factors (what inv_freq implements)."""
    if s is None:
        return None
    kind = s.get("rope_type", s.get("type")) if isinstance(s, dict) else None
    if kind in (None, "default") and isinstance(s, dict):
        return s
    if kind != "llama3":
        raise ValueError(f"rope_scaling = {s!r}: only rope_type \"llama3\" is supported")
    try:
        config_float(s, "factor", above=0.0)
        low = config_float(s, "low_freq_factor", above=0.0)
        config_float(s, "high_freq_factor", above=low)
        config_int(s, "original_max_position_embeddings")
    except ValueError as e:
        raise ValueError(f"rope_scaling.{e}") from None
    return s


def inv_freq(args: LlamaArgs) -> torch.Tensor:
    """RoPE inverse frequencies [head_dim/2], with Llama 3.1's long-context scaling if configured."""
    hd = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    s = args.rope_scaling
    if s and s.get("rope_type", s.get("type")) == "llama3":
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_ctx = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / freqs
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * freqs / factor + smooth * freqs
        freqs = torch.where(wavelen > old_ctx / low, freqs / factor,
                            torch.where(wavelen < old_ctx / high, freqs, blended))
    elif s and s.get("rope_type", s.get("type")) not in (None, "default"):
        raise ValueError(f"unsupported rope_scaling {s}")
    return freqs.float()


def rotary(args: LlamaArgs, seqlen: int, device: torch.device | str = "cpu",
           dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [seqlen, head_dim] for rotate-half RoPE."""
    t = torch.arange(seqlen, dtype=torch.float32)
    angles = torch.outer(t, inv_freq(args))
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(device, dtype), emb.sin().to(device, dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in float32, cast back, then scale (Meta's and HF's order)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class Attention(nn.Module):
    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.args = args
        self.q_proj = nn.Linear(args.dim, args.q_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.kv_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.kv_dim, bias=False)
        self.o_proj = nn.Linear(args.q_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.core(x, cos, sin))

    def core(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Attention up to o_proj's input [B, T, q_dim]."""
        a = self.args
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, a.n_heads, a.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = self.k_proj(x).view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)  # [B, Hkv, T, hd]
        v = self.v_proj(x).view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
        cos, sin = cos[:T], sin[:T]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = a.n_heads // a.n_kv_heads
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, hd]
        return y.transpose(1, 2).reshape(B, T, a.q_dim)


class MLP(nn.Module):
    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.ffn_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.ffn_dim, bias=False)
        self.down_proj = nn.Linear(args.ffn_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(x))

    def act(self, x: torch.Tensor) -> torch.Tensor:
        """down_proj's input [B, T, ffn_dim]."""
        return F.silu(self.gate_proj(x)) * self.up_proj(x)


class DecoderLayer(nn.Module):
    """One decoder layer; its state_dict keys are HF's, less the `model.layers.{i}.` prefix."""

    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


# Linear layers of a decoder layer in GPTQ's true-sequential order.
LINEAR_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
LINEARS = tuple(name for group in LINEAR_GROUPS for name in group)
LAYER_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")  # [dim] each
# The projections RoPE rotates, and the LlamaArgs field counting their heads (rows: heads × head_dim)
ROTARY_HEADS = {"self_attn.q_proj.weight": "n_heads", "self_attn.k_proj.weight": "n_kv_heads"}


def load_layer(args: LlamaArgs, state: dict[str, torch.Tensor], where: str) -> DecoderLayer:
    """A DecoderLayer holding exactly `state` (built on the meta device, tensors assigned);
    InputError naming `where` (the checkpoint and layer) when the tensors do not fit `args`."""
    with torch.device("meta"):
        layer = DecoderLayer(args)
    try:
        layer.load_state_dict(state, assign=True, strict=True)
    except RuntimeError as e:
        raise InputError(f"{where} does not match config.json "
                         f"({str(e).splitlines()[-1].strip()})") from None
    return layer


CHUNK_TOKENS = 2048  # calibration tokens per forward step: matmuls wide enough to be efficient


def chunks(X: torch.Tensor) -> list[slice]:
    """Slices of the calibration samples X [n, T, …], about CHUNK_TOKENS tokens each."""
    step = max(1, CHUNK_TOKENS // X.shape[1])
    return [slice(j, min(j + step, X.shape[0])) for j in range(0, X.shape[0], step)]


def pick_device(name: str = "auto") -> torch.device:
    """`auto` is CUDA when present, else the CPU; anything else is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def fits_in_memory(nbytes: int, device: torch.device) -> bool:
    """Whether nbytes fit in half the memory free on device (the GPU's, or the host's for the
    CPU): what may stay resident rather than be streamed."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return nbytes <= free // 2


def compute_dtype(device: torch.device) -> torch.dtype:
    """Forward passes run in fp16 on CUDA and float32 on the CPU."""
    return torch.float16 if device.type == "cuda" else torch.float32
