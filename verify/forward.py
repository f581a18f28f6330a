"""Layer-by-layer forward passes over a Hugging Face directory, fp16 or GPTQ: each decoder layer is
loaded once (GPTQ linears dequantised from their packed tensors) and applied to every batch, so a
model larger than the device is still run in full. The head gives NLL, and KL against another
model's head, a few rows at a time."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.core.checkpoint import HFCheckpoint
from pipeline.core.errors import InputError
from pipeline.core.gptq_format import dequantize
from pipeline.core.gptq_layout import SUFFIXES
from pipeline.core.llama import LINEARS, DecoderLayer, fits_in_memory, load_layer, rms_norm, rotary
from verify.metrics import kl_top1

HEAD_ELEMENTS = 2**26  # logits computed at once at the head: rows × vocab (256 MiB in float32)

# name of a linear ("self_attn.q_proj"), its dequantised weight [out, in] -> the weight to run
WeightFn = Callable[[str, torch.Tensor], torch.Tensor]


class LayerwiseModel:
    """An HF checkpoint run one decoder layer at a time on `device`.

    chunk_tokens bounds the tokens a layer processes at once; `resident` keeps loaded layers for
    repeated passes (generation): None decides by whether the model fits in half the free memory.
    weight_fn rewrites each linear's weight after loading (the RTN baseline).
    """

    def __init__(self, path: Path | str, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, *, chunk_tokens: int = 8192,
                 resident: bool | None = None, weight_fn: WeightFn | None = None,
                 progress: bool = True) -> None:
        self.ckpt = HFCheckpoint(path)
        self.args = self.ckpt.args
        self.device = torch.device(device)
        self.dtype = dtype
        self.chunk_tokens = chunk_tokens
        self.weight_fn = weight_fn
        self.progress = progress
        self.bits = gptq_bits(self.ckpt)
        self.resident = fits_in_memory(self.layer_bytes() * self.args.n_layers, self.device) \
            if resident is None else resident
        self._layers: dict[int, DecoderLayer] = {}

    @property
    def name(self) -> str:
        return self.ckpt.path.name

    def layer_bytes(self) -> int:
        """Bytes of one dequantised decoder layer in the compute dtype."""
        return self.args.layer_numel() * self.dtype.itemsize

    def layer(self, i: int) -> DecoderLayer:
        """Decoder layer i on the device, linears dequantised; kept when resident."""
        if i in self._layers:
            return self._layers[i]
        state = self.ckpt.layer_state(i)
        weights = {}
        prefix = f"{self.ckpt.path}: model.layers.{i}"
        for name, parts in packed_linears(state, self.bits, self.device, prefix).items():
            W = dequantize(*parts.values(), self.bits, f"{prefix}.{name}")
            weights[f"{name}.weight"] = W.to(self.dtype)
        weights.update({k: v.to(self.device, self.dtype) for k, v in state.items()})
        if self.weight_fn is not None:
            for name in LINEARS:
                key = f"{name}.weight"
                if key in weights:
                    weights[key] = self.weight_fn(name, weights[key]).to(self.dtype)
        layer = load_layer(self.args, weights, f"{self.ckpt.path}: decoder layer {i}")
        if self.resident:
            self._layers[i] = layer
        return layer

    @cached_property
    def embedding(self) -> torch.Tensor:
        return self.ckpt.tensor("model.embed_tokens.weight")  # [V, D] as stored, memory-mapped

    @cached_property
    def head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Final norm weight [D] and output projection [V, D] on the device."""
        norm = self.ckpt.tensor("model.norm.weight").to(self.device, self.dtype)
        return norm, self.ckpt.lm_head().to(self.device, self.dtype)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] -> hidden states [B, T, D] on the device."""
        V = self.embedding.shape[0]
        bad = tokens[(tokens < 0) | (tokens >= V)]
        if bad.numel():
            raise InputError(f"{self.ckpt.path}: token id {int(bad[0])} outside the embedding's "
                             f"{V} rows (tokenizer and model do not match)")
        return F.embedding(tokens.cpu(), self.embedding).to(self.device, self.dtype)

    @torch.inference_mode()
    def hidden(self, batches: list[torch.Tensor], desc: str | None = None,
               progress: bool | None = None) -> list[torch.Tensor]:
        """Last hidden states (before the final norm) [B, T, D] of each token batch [B, T]:
        every layer is loaded once and applied to all batches, chunk_tokens at a time."""
        hs = [self.embed(t) for t in batches]
        lengths = {t.shape[1] for t in batches}
        rope = {T: rotary(self.args, T, self.device, self.dtype) for T in lengths}
        show = self.progress if progress is None else progress
        bar = tqdm(range(self.args.n_layers), desc=desc or self.name, unit="layer", file=sys.stderr,
                   disable=not show, leave=False)
        for i in bar:
            layer = self.layer(i)
            for h in hs:
                B, T, _ = h.shape
                cos, sin = rope[T]
                b = max(1, self.chunk_tokens // T)
                for s in range(0, B, b):
                    h[s:s + b] = layer(h[s:s + b], cos, sin)
            del layer
        return hs

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and output projection: hidden [..., D] -> float32 logits [..., V]."""
        norm, W = self.head
        return (rms_norm(h, norm, self.args.norm_eps) @ W.T).float()

    @torch.inference_mode()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Float32 logits [B, T, V] on the CPU from hidden states [B, T, D] (short batches)."""
        return torch.cat([self.project(h[b:b + 1]).cpu() for b in range(h.shape[0])])

    @torch.inference_mode()
    def nll(self, h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Summed negative log-likelihood of tokens[:, 1:] per window, float64 [B], from hidden
        states [B, T, D]; logits are computed a few rows at a time, never [B, T, V] at once."""
        tokens = tokens.to(self.device)
        B, T, _ = h.shape
        rows = max(1, HEAD_ELEMENTS // self.head[1].shape[0])
        out = torch.zeros(B, dtype=torch.float64)
        for b in range(B):
            for s in range(0, T - 1, rows):
                e = min(s + rows, T - 1)
                logits = self.project(h[b, s:e])  # [rows, V]
                nll = F.cross_entropy(logits, tokens[b, s + 1:e + 1], reduction="sum")
                out[b] += nll.double().cpu()
        return out

    @torch.inference_mode()
    def divergence(self, h: torch.Tensor, ref: LayerwiseModel, ref_h: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """KL(ref || self) and same-top-token flags, [B, T - 1] on the CPU, at the positions nll
        scores: from this model's hidden states h and ref's ref_h [B, T, D] (which may be kept
        on the CPU), both heads applied a few rows at a time."""
        B, T, _ = h.shape
        rows = max(1, HEAD_ELEMENTS // self.head[1].shape[0])
        kl = torch.zeros(B, T - 1)
        same = torch.zeros(B, T - 1, dtype=torch.bool)
        for b in range(B):
            for s in range(0, T - 1, rows):
                e = min(s + rows, T - 1)
                k, t = kl_top1(ref.project(ref_h[b, s:e].to(ref.device)), self.project(h[b, s:e]))
                kl[b, s:e], same[b, s:e] = k.cpu(), t.cpu()
        return kl, same

    @torch.inference_mode()
    def greedy(self, prompts: list[list[int]], max_new_tokens: int,
               eos_id: int | None = None) -> list[list[int]]:
        """Greedy continuations of each prompt, recomputing the full sequence each step (right
        padding is harmless under the causal mask); stops a prompt at eos_id."""
        seqs = [list(p) for p in prompts]
        done = [False] * len(seqs)
        steps = tqdm(range(max_new_tokens), desc=f"{self.name} generate", unit="tok",
                     file=sys.stderr, disable=not self.progress, leave=False)
        for _ in steps:
            L = max(len(s) for s in seqs)
            tokens = torch.tensor([s + [0] * (L - len(s)) for s in seqs])  # [P, L]
            (h,) = self.hidden([tokens], progress=False)
            last = torch.tensor([len(s) - 1 for s in seqs], device=h.device)
            nxt = self.project(h[torch.arange(len(seqs), device=h.device), last]).argmax(-1)
            for p, t in enumerate(nxt.tolist()):
                if not done[p]:
                    seqs[p].append(t)
                    done[p] = t == eos_id
            if all(done):
                break
        return [s[len(p):] for s, p in zip(seqs, prompts, strict=True)]


def packed_linears(state: dict[str, torch.Tensor], bits: int | None, device: torch.device,
                   prefix: str) -> dict[str, dict[str, torch.Tensor]]:
    """The GPTQ tensors (qweight, qzeros, scales, g_idx) of each quantised linear of one decoder
    layer's state, popped from it and moved to device; prefix names the layer in errors."""
    linears = {}
    for name in LINEARS:
        if f"{name}.qweight" not in state:
            continue
        if bits is None:
            raise InputError(f"{prefix}.{name}: packed GPTQ tensors but config.json has no "
                             "quantization_config")
        missing = [p for p in SUFFIXES if f"{name}.{p}" not in state]
        if missing:
            raise InputError(f"{prefix}.{name}.{missing[0]}: missing (a GPTQ linear needs "
                             f"{', '.join(SUFFIXES)})")
        linears[name] = {p: state.pop(f"{name}.{p}").to(device) for p in SUFFIXES}
    return linears


def gptq_bits(ckpt: HFCheckpoint) -> int | None:
    """Bit width of a GPTQ checkpoint (None when unquantised); other formats are refused."""
    q = ckpt.quantization
    if q is None:
        return None
    method = q.get("quant_method")
    fmt = q.get("checkpoint_format", "gptq")
    if method != "gptq" or fmt != "gptq":
        raise InputError(f"{ckpt.path / 'config.json'}: quantization_config quant_method "
                         f"{method!r} checkpoint_format {fmt!r}; only GPTQ v1 ('gptq') is "
                         "supported")
    if "bits" not in q:
        raise InputError(f"{ckpt.path / 'config.json'}: quantization_config has no 'bits'")
    return int(q["bits"])
