"""Per-module integrity of GPTQ variants against their fp16 model: for every quantised linear, the
relative error ||W - W_q|| / ||W|| of its packed tensors dequantised, next to the error of
round-to-nearest on the same grid computed from W itself (the bound scales with the module), and
g_idx against the structure the format fixes. One pass over the fp16 layers serves every variant."""

from __future__ import annotations

import sys

import torch
from tqdm import tqdm

from verify.errors import InputError
from verify.gptq_format import dequantize, n_groups
from verify.grid import Grid, rtn
from verify.checkpoint import HFCheckpoint
from verify.forward import packed_linears


def rtn_grid(quantization: dict) -> Grid:
    """The grid of a variant's bits, group size and symmetry (config.json's quantization_config):
    where round-to-nearest, the baseline, rounds."""
    return Grid(int(quantization["bits"]), int(quantization["group_size"]),
                bool(quantization.get("sym", True)))


def relative_error(W: torch.Tensor, Wq: torch.Tensor) -> float:
    """||W - Wq||_F / ||W||_F (inf when W is zero and Wq is not, 0 when both are)."""
    diff, norm = float(torch.linalg.vector_norm(W - Wq)), float(torch.linalg.vector_norm(W))
    return diff / norm if norm else (0.0 if diff == 0 else float("inf"))


def g_idx_problem(g_idx: torch.Tensor, group_size: int, desc_act: bool) -> str | None:
    """What is wrong with a linear's g_idx (None when nothing): GPTQ assigns exactly group_size
    columns to each group (the last takes the rest), and without desc_act column i to group
    i // group_size, which runtimes such as ExLlama assume without reading g_idx."""
    n = g_idx.numel()
    g = n if group_size == -1 else group_size
    idx = g_idx.long().cpu()
    if not desc_act:
        if not torch.equal(idx, torch.arange(n) // g):
            return f"g_idx is not i // {g} (desc_act is false)"
        return None
    k = n_groups(n, group_size)
    counts = torch.bincount(idx.clamp(0, k - 1), minlength=k)
    expected = torch.full((k,), g)
    expected[-1] = n - g * (k - 1)
    if int(idx.min()) < 0 or int(idx.max()) >= k or not torch.equal(counts, expected):
        return f"g_idx does not give every group {g} columns"
    return None


@torch.inference_mode()
def module_errors(fp16: HFCheckpoint, variants: dict[str, HFCheckpoint], device: torch.device,
                  progress: bool = True) -> dict[str, dict[str, dict]]:
    """variant -> module -> {"error", "rtn_error", "g_idx"} for every quantised linear: the
    relative errors of the variant and of RTN on its grid against the fp16 weight, and a g_idx
    problem (None). Layer by layer: one fp16 layer and one variant layer in memory at a time."""
    result: dict[str, dict[str, dict]] = {name: {} for name in variants}
    bar = tqdm(range(fp16.args.n_layers), desc="module integrity", unit="layer", file=sys.stderr,
               disable=not progress, leave=False)
    for i in bar:
        ref = fp16.layer_state(i)
        rtn_cache: dict[tuple, float] = {}
        for name, ckpt in variants.items():
            q = ckpt.quantization
            bits, grid = int(q["bits"]), rtn_grid(q)
            prefix = f"{ckpt.path}: model.layers.{i}"
            for linear, parts in packed_linears(ckpt.layer_state(i), bits, device, prefix).items():
                W = ref[f"{linear}.weight"].to(device, torch.float32)
                Wq = dequantize(*parts.values(), bits, f"{prefix}.{linear}")
                if Wq.shape != W.shape:
                    raise InputError(f"{prefix}.{linear}: dequantises to {tuple(Wq.shape)}, the "
                                     f"fp16 weight is {tuple(W.shape)}")
                key = (linear, grid.bits, grid.group_size, grid.sym)
                if key not in rtn_cache:
                    rtn_cache[key] = relative_error(W, rtn(W, grid).Q)
                result[name][f"model.layers.{i}.{linear}"] = {
                    "error": relative_error(W, Wq), "rtn_error": rtn_cache[key],
                    "g_idx": g_idx_problem(parts["g_idx"], grid.group_size,
                                           bool(q.get("desc_act", False)))}
    return result
