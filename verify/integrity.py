"""Per-module integrity of GPTQ variants against their fp16 model: for every quantised linear, the
relative error ||W - W_q|| / ||W|| of its packed tensors dequantised and its output error
||(W - W_q) X|| / ||W X|| on the fp16 model's own activations X of evaluation text, each next to
round-to-nearest's on the same grid computed from W itself (the bounds scale with the module), and
g_idx against the structure the format fixes. GPTQ exists to make the output error smaller than
RTN's, so a module whose packed tensors are subtly wrong (a permuted g_idx keeps the structure)
stands out there. One pass over the fp16 layers serves every variant."""

from __future__ import annotations

import sys

import torch
from tqdm import tqdm

from pipeline.core.checkpoint import HFCheckpoint
from pipeline.core.errors import InputError
from pipeline.core.gptq_format import dequantize
from pipeline.core.gptq_layout import n_groups
from pipeline.core.grid import Grid, rtn
from pipeline.core.llama import LINEARS, LlamaArgs, load_layer, rotary
from verify.forward import packed_linears

OUTPUT_TOKENS = 512  # evaluation tokens whose activations measure each linear's output error
# Act-order's g_idx against falling input energy on those tokens, Spearman's ρ: at least 0.44 on
# every module of a real 135M model's 3-bit variant (0.60 on the demo's), where a shuffled g_idx
# gives |ρ| ≤ 0.17 in 200 draws (0 ± 1/√in): the bound sits between.
ACT_ORDER_RHO = 0.3
# ... judged from this many inputs: a shuffled g_idx's ρ has standard deviation 1/√(in − 1), so
# the bound sits ≥ 4.7 of them above 0 (with 64 inputs it would be 2.4, and a random-weight
# test model's genuine order reaches only 0.24 there)
ACT_ORDER_MIN_IN = 256


def rtn_grid(quantization: dict) -> Grid:
    """The grid of a variant's bits, group size and symmetry (config.json's quantization_config):
    where round-to-nearest, the baseline, rounds."""
    return Grid(int(quantization["bits"]), int(quantization["group_size"]),
                bool(quantization.get("sym", True)))


def output_error(W: torch.Tensor, Wq: torch.Tensor, X: torch.Tensor) -> float:
    """||(W - Wq) X|| / ||W X|| over the activations X [tokens, in] (as relative_error)."""
    return relative_error(X @ W.T, X @ Wq.T)


def linear_inputs(a: LlamaArgs, state: dict[str, torch.Tensor], h: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The fp16 layer (`state`: float32 on h's device) on hidden states h [1, T, dim]: what each
    linear receives
    ([T, in]), and the layer's output, the next layer's h."""
    layer = load_layer(a, state, "the fp16 model's decoder layer")
    X: dict[str, torch.Tensor] = {}
    hooks = [layer.get_submodule(n).register_forward_pre_hook(
        lambda _, inp, n=n: X.__setitem__(n, inp[0].reshape(-1, inp[0].shape[-1])))
        for n in LINEARS]
    try:
        out = layer(h, cos, sin)
    finally:
        for hook in hooks:
            hook.remove()
    return X, out


def relative_error(W: torch.Tensor, Wq: torch.Tensor) -> float:
    """||W - Wq||_F / ||W||_F (inf when W is zero and Wq is not, 0 when both are)."""
    diff, norm = float(torch.linalg.vector_norm(W - Wq)), float(torch.linalg.vector_norm(W))
    return diff / norm if norm else (0.0 if diff == 0 else float("inf"))


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's ρ of two vectors (ties ranked by position; g_idx repeats each group's index)."""
    ra, rb = (v.double().argsort(stable=True).argsort().double() for v in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom else 0.0


def g_idx_problem(g_idx: torch.Tensor, group_size: int, desc_act: bool,
                  energy: torch.Tensor | None = None) -> str | None:
    """What is wrong with a linear's g_idx (None when nothing): GPTQ assigns exactly group_size
    columns to each group (the last takes the rest), and without desc_act column i to group
    i // group_size, which runtimes such as ExLlama assume without reading g_idx. With desc_act,
    unless the groups are static (i // group_size), GPTQ fills groups in order of falling input
    energy Σx² (its Hessian's diagonal): given `energy` [in] from evaluation activations and at
    least ACT_ORDER_MIN_IN inputs, g_idx must rise as it falls (rank correlation at least
    ACT_ORDER_RHO), which a permuted g_idx with the right group sizes does not."""
    n = g_idx.numel()
    g = n if group_size == -1 else group_size
    idx = g_idx.long().cpu()
    in_order = torch.equal(idx, torch.arange(n) // g)
    if not desc_act:
        return None if in_order else f"g_idx is not i // {g} (desc_act is false)"
    k = n_groups(n, group_size)
    counts = torch.bincount(idx.clamp(0, k - 1), minlength=k)
    expected = torch.full((k,), g)
    expected[-1] = n - g * (k - 1)
    if int(idx.min()) < 0 or int(idx.max()) >= k or not torch.equal(counts, expected):
        return f"g_idx does not give every group {g} columns"
    if energy is not None and k > 1 and n >= ACT_ORDER_MIN_IN and not in_order:
        rho = rank_correlation(-energy.cpu(), idx)
        if rho < ACT_ORDER_RHO:
            return (f"g_idx does not follow act-order: its rank correlation with falling input "
                    f"energy is {rho:.2f} < {ACT_ORDER_RHO} (a shuffled g_idx gives about 0)")
    return None


@torch.inference_mode()
def module_errors(fp16: HFCheckpoint, variants: dict[str, HFCheckpoint], device: torch.device,
                  tokens: torch.Tensor | None = None,
                  progress: bool = True) -> dict[str, dict[str, dict]]:
    """variant -> module -> {"error", "rtn_error", "g_idx"} for every quantised linear: the
    relative errors of the variant and of RTN on its grid against the fp16 weight, and a g_idx
    problem (None); with `tokens` [1, T] also "output_error" and "rtn_output_error" on the fp16
    model's activations of them. Layer by layer: one fp16 layer and one variant layer in memory
    at a time."""
    a = fp16.args
    h = cos = sin = None
    if tokens is not None:
        E = fp16.tensor("model.embed_tokens.weight")
        h = torch.nn.functional.embedding(tokens.to(device), E.to(device, torch.float32))
        cos, sin = rotary(a, tokens.shape[1], device, torch.float32)
    result: dict[str, dict[str, dict]] = {name: {} for name in variants}
    bar = tqdm(range(a.n_layers), desc="module integrity", unit="layer", file=sys.stderr,
               disable=not progress, leave=False)
    for i in bar:
        ref = {k: v.to(device, torch.float32) for k, v in fp16.layer_state(i).items()}  # once
        X: dict[str, torch.Tensor] = {}
        if h is not None:
            X, h = linear_inputs(a, ref, h, cos, sin)
        rtn_cache: dict[tuple, tuple[float, float | None]] = {}
        for name, ckpt in variants.items():
            q = ckpt.quantization
            bits, grid = int(q["bits"]), rtn_grid(q)
            prefix = f"{ckpt.path}: model.layers.{i}"
            for linear, parts in packed_linears(ckpt.layer_state(i), bits, device, prefix).items():
                W = ref[f"{linear}.weight"]
                Wq = dequantize(*parts.values(), bits, f"{prefix}.{linear}")
                if Wq.shape != W.shape:
                    raise InputError(f"{prefix}.{linear}: dequantises to {tuple(Wq.shape)}, the "
                                     f"fp16 weight is {tuple(W.shape)}")
                key = (linear, grid.bits, grid.group_size, grid.sym)
                if key not in rtn_cache:
                    Wr = rtn(W, grid).Q
                    rtn_cache[key] = (relative_error(W, Wr),
                                      output_error(W, Wr, X[linear]) if X else None)
                entry = {"error": relative_error(W, Wq), "rtn_error": rtn_cache[key][0],
                         "g_idx": g_idx_problem(parts["g_idx"], grid.group_size,
                                                bool(q.get("desc_act", False)),
                                                X[linear].pow(2).sum(0) if X else None)}
                if X:
                    entry.update(output_error=output_error(W, Wq, X[linear]),
                                 rtn_output_error=rtn_cache[key][1])
                result[name][f"model.layers.{i}.{linear}"] = entry
    return result
