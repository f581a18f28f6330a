"""GPTQ (Frantar et al., arXiv 2210.17323) for one linear layer, rounding to the grid of
pipeline/core/grid.py (where RTN, the baseline, rounds too). Weights are W [out, in]."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.core.errors import PipelineError
from pipeline.core.grid import Quantizer, QuantResult, group_width, stack
from pipeline.methods import QuantSpec


def inverse_cholesky(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float, list[float]]:
    """Upper Cholesky factor of (H + damp·mean(diag H)·I)⁻¹; damp doubles while H is not
    positive-definite. Returns (Hinv, damp used, damps that failed)."""
    failed: list[float] = []
    mean = torch.mean(torch.diag(H))
    while True:
        Hd = H.clone()
        Hd.diagonal().add_(damp * mean)
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd  # few [in, in] matrices alive at once: 34B down_proj's H alone is 1.9 GB
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            del L
            Hinv, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return Hinv, damp, failed
        failed.append(damp)
        if damp >= 1:
            raise PipelineError(f"Cholesky failed even with damp {damp} (tried {failed}): "
                                "the Hessian is degenerate; check the calibration data")
        damp = min(2 * damp, 1.0)


@dataclass(frozen=True)
class HessianInverse:
    """What GPTQ takes from H [in, in], computed once for the linears that share an input:
    the processing order `perm`, the inputs that never fire, and chol(H⁻¹) in that order."""

    perm: torch.Tensor  # [in]: act-order (falling diag H) or the identity
    dead: torch.Tensor  # [in] bool: diag H = 0
    Hinv: torch.Tensor  # [in, in] upper, rows and columns in perm's order
    damp: float
    retries: list[float]


def hessian_inverse(H: torch.Tensor, spec: QuantSpec) -> HessianInverse:
    """The order, dead inputs and damped chol(H⁻¹) of H [in, in] for spec's act_order and damp."""
    H = H.to(torch.float32, copy=True)
    dead = torch.diag(H) == 0  # inputs that never fire: any weight works, choose 0
    torch.diagonal(H).masked_fill_(dead, 1)
    perm = torch.arange(H.shape[0], device=H.device)
    if spec.act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        H = H[perm][:, perm]
    Hinv, damp, retries = inverse_cholesky(H, spec.damp)
    return HessianInverse(perm, dead, Hinv, damp, retries)


def gptq(W: torch.Tensor, H: torch.Tensor | HessianInverse, spec: QuantSpec) -> QuantResult:
    """Quantise W [out, in] column by column, spreading each column's error over the columns not
    yet quantised via the inverse Hessian H⁻¹ (H [in, in] = 2/n Σ x xᵀ), in lazy blocks.

    The loop works on Wᵀ [in, out], where a column of W is a contiguous row."""
    inv = H if isinstance(H, HessianInverse) else hessian_inverse(H, spec)
    n = W.shape[1]
    quantizer = Quantizer(spec.bits, spec.sym, spec.mse)
    g = group_width(n, spec.group_size)
    Wt = W.t().to(torch.float32, memory_format=torch.contiguous_format, copy=True)  # [in, out]
    Wt[inv.dead] = 0
    # static groups (and the single group of -1) are fitted up front on the original W
    static = [quantizer.fit(Wt[i:i + g].t()) for i in range(0, n, g)] if spec.static_groups or g == n else []
    perm, Hinv = inv.perm, inv.Hinv
    if spec.act_order:
        Wt = Wt[perm]
    static_of = (perm.cpu() // g).tolist()  # static group of each processed column (one sync)
    # blocks hold whole groups, so a group is fitted on fully updated columns
    B = spec.blocksize if static or spec.blocksize % g == 0 else g * max(1, spec.blocksize // g)

    Qt, Losses = torch.zeros_like(Wt), torch.zeros(n, device=W.device)  # loss per column
    fitted: list[tuple[torch.Tensor, torch.Tensor]] = []  # (scale, zero) per group, in order
    for i1 in range(0, n, B):
        i2 = min(i1 + B, n)
        W1, Hinv1 = Wt[i1:i2], Hinv[i1:i2, i1:i2]  # W1 a view: its updates land in Wt
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            if static:
                scale, zero = static[static_of[i1 + i]]
            elif (i1 + i) % g == 0:
                scale, zero = quantizer.fit(W1[i:i + g].t())
                fitted.append((scale, zero))
            w, d = W1[i], Hinv1[i, i]
            q = quantizer.quantize(w[:, None], scale, zero)[:, 0]
            Qt[i1 + i] = q
            err = (w - q) / d
            Losses[i1 + i] = (err * err).sum() / 2
            W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)
            Err1[i] = err
        Wt[i2:].addmm_(Hinv[i1:i2, i2:].t(), Err1, alpha=-1)

    del Wt, W1, Err1  # before Q is assembled: 34B's down_proj is 0.7 GB in float32
    invperm = torch.argsort(perm)
    g_idx = torch.arange(n, device=W.device) // g
    if not static:
        g_idx = g_idx[invperm]  # act-order: group of each column in processing order
    scales, zeros = stack(static or fitted)
    return QuantResult(Qt[invperm].t().contiguous(), scales, zeros, g_idx.to(torch.int32),
                       float(Losses.sum()), inv.damp, inv.retries)


def prepare(H: torch.Tensor, spec: QuantSpec) -> HessianInverse:
    """Once per group of linears sharing an input: its order and damped chol(H⁻¹)."""
    return hessian_inverse(H, spec)


def quantize(W: torch.Tensor, prepared: HessianInverse, spec: QuantSpec) -> QuantResult:
    return gptq(W, prepared, spec)
