"""The GPTQ "v1" checkpoint format (AutoGPTQ, GPTQModel, transformers+optimum, vLLM, TGI, ExLlama):
bit packing for 2/3/4/8 bits, dequantisation as the runtimes compute it, and the config files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import torch

from pipeline.core.errors import InputError
from pipeline.core.gptq_layout import BITS, PACK_RUN

MASK32 = 0xFFFFFFFF


def packed_shapes(n_out: int, n_in: int, bits: int, groups: int) -> dict[str, tuple[torch.dtype, tuple[int, int]]]:
    """dtype and shape of each tensor of a packed linear W [n_out, n_in] with `groups` groups."""
    return {"qweight": (torch.int32, (n_in * bits // 32, n_out)),
            "qzeros": (torch.int32, (groups, n_out * bits // 32)),
            "scales": (torch.float16, (groups, n_out)),
            "g_idx": (torch.int32, (n_in,))}


def _layout(bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Word index and bit offset of each of the 32 values packed into `bits` int32 words: one
    LSB-first bit stream, so a 3-bit value may straddle two words (values 10 and 21)."""
    pos = torch.arange(32) * bits
    return pos // 32, pos % 32


def _check_packable(n: int, bits: int, what: str) -> None:
    if bits not in BITS:
        raise InputError(f"{what}: {bits}-bit packing is not supported (choose from {BITS})")
    if not packable(n):
        raise InputError(f"{what}: {n} values along the packed dimension; GPTQ packs {PACK_RUN} "
                         f"values into {bits} int32 words, so it must be a multiple of {PACK_RUN}")


def packable(n: int) -> bool:
    """Whether a dimension of n values packs into whole runs of PACK_RUN (qweight packs a
    linear's inputs, qzeros its outputs: both must be)."""
    return n % PACK_RUN == 0


def _fields(bits: int, k: int) -> tuple[int, int]:
    """The values j0 ≤ j < j1 of a run of 32 with at least one bit in word k."""
    js = [j for j in range(32) if -bits < bits * j - 32 * k < 32]
    return js[0], js[-1] + 1


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """int values [n, m] in [0, 2^bits) -> int32 [n*bits/32, m], packed along dim 0.

    Word k of a run of 32 values is the stream Σ v_j·2^(bits·j) shifted down by 32k and cut to
    32 bits: Σ_j (v_j shifted by bits·j − 32k, right if negative) mod 2^32, the fields disjoint.
    """
    n, m = values.shape
    _check_packable(n, bits, "pack")
    v = values.to(torch.int64).view(n // 32, 32, m)  # [c, 32, m]
    words = []
    for k in range(bits):
        j0, j1 = _fields(bits, k)
        s = (torch.arange(j0, j1, device=v.device) * bits - 32 * k).view(1, -1, 1)
        words.append(((v[:, j0:j1] << s.clamp(min=0)) >> (-s).clamp(min=0) & MASK32).sum(1))
    packed = torch.stack(words, 1).view(n // 32 * bits, m)  # [c*bits, m]
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [k, m] packed along dim 0 -> int32 values [k*32/bits, m] in [0, 2^bits)."""
    k, m = packed.shape
    if bits not in BITS or k % bits:
        raise InputError(f"unpack: {k} words cannot hold whole groups of 32 {bits}-bit values")
    maxq = 2**bits - 1
    if 32 % bits == 0:  # no value straddles two words: shift each word's fields down
        shifts = (torch.arange(32 // bits, device=packed.device) * bits).view(1, -1, 1)
        return ((packed.reshape(k, 1, m) >> shifts) & maxq).reshape(k * 32 // bits, m)
    c = k // bits
    word, off = _layout(bits)
    word, off = word.to(packed.device), off.to(packed.device).view(1, 32, 1)
    words = packed.to(torch.int64).reshape(c, bits, m) & MASK32
    words = torch.cat([words, torch.zeros_like(words[:, :1])], dim=1)  # [c, bits+1, m]
    lo, hi = words[:, word] >> off, words[:, word + 1] << (32 - off)  # [c, 32, m]
    return ((lo | hi) & maxq).to(torch.int32).view(c * 32, m)


def pack(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
         bits: int) -> dict[str, torch.Tensor]:
    """Integer weights q [out, in], zero points [n_groups, out] (in [1, 2^bits - 1]: v1 stores
    zero − 1), scales [n_groups, out], g_idx [in] -> the four v1 tensors."""
    if int(zeros.min()) < 1:
        raise ValueError("GPTQ v1 stores zero − 1 unsigned: a zero point of 0 cannot be written")
    return {
        "qweight": pack_rows(q.t(), bits),  # [in*bits/32, out]
        "qzeros": pack_rows((zeros - 1).t(), bits).t().contiguous(),  # [n_groups, out*bits/32]
        "scales": scales.to(torch.float16).contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               g_idx: torch.Tensor, bits: int, name: str = "linear") -> torch.Tensor:
    """W [out, in] float32 = scales[g] · (q − (stored zero + 1)), g = g_idx[in], as the runtimes
    compute it. `name` (the module prefix) appears in error messages."""
    n_in, (n_groups, n_out) = g_idx.numel(), scales.shape
    expect = {"qweight": (n_in * bits // 32, n_out), "qzeros": (n_groups, n_out * bits // 32)}
    for key, t in (("qweight", qweight), ("qzeros", qzeros)):
        if tuple(t.shape) != expect[key] or t.dtype != torch.int32:
            raise InputError(f"{name}.{key}: {t.dtype} {tuple(t.shape)}, expected torch.int32 "
                             f"{expect[key]} for {bits}-bit, {n_in} inputs, {n_groups} groups")
    g = g_idx.long()
    if n_in and (int(g.min()) < 0 or int(g.max()) >= n_groups):
        raise InputError(f"{name}.g_idx: group indices outside [0, {n_groups})")
    q = unpack_rows(qweight, bits)  # [in, out]
    z = unpack_rows(qzeros.t().contiguous(), bits).t() + 1  # [n_groups, out]
    return (scales.float()[g] * (q - z[g]).float()).t().contiguous()


class GPTQSettings(Protocol):
    """What quantize_config.json records of a quantisation (pipeline/methods QuantSpec has it)."""

    bits: int
    group_size: int
    damp: float
    act_order: bool
    static_groups: bool
    sym: bool
    true_sequential: bool


def quantize_config(spec: GPTQSettings) -> dict[str, Any]:
    """`quantize_config.json` (also `config.json:quantization_config`) for a QuantSpec."""
    return {
        "bits": spec.bits,
        "group_size": spec.group_size,
        "damp_percent": spec.damp,
        "desc_act": spec.act_order,
        "static_groups": spec.static_groups,
        "sym": spec.sym,
        "true_sequential": spec.true_sequential,
        "model_name_or_path": None,
        "model_file_base_name": "model",
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
    }


def write_configs(out: Path, config: dict[str, Any], spec: GPTQSettings) -> None:
    """Write quantize_config.json and config.json (a copy of `config` with quantization_config
    added and fp16 declared as the dtype of the unquantised tensors)."""
    qc = quantize_config(spec)
    cfg = {**config, "quantization_config": qc, "torch_dtype": "float16"}
    if "dtype" in cfg:
        cfg["dtype"] = "float16"
    (Path(out) / "quantize_config.json").write_text(json.dumps(qc, indent=2) + "\n")
    (Path(out) / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
