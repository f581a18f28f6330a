"""GPTQ (Frantar et al., arXiv 2210.17323) for one linear layer, the quantisation grid it rounds
to, and round-to-nearest (RTN) on the same grid as the baseline. Weights are W [out, in]."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from pipeline.errors import InputError, PipelineError
from pipeline.gptq_format import BITS

METHODS = ("gptq", "rtn")


@dataclass(frozen=True)
class QuantSpec:
    """What to quantise to and how; the same spec means the same output."""

    bits: int
    group_size: int
    act_order: bool
    sym: bool = True
    damp: float = 0.01
    static_groups: bool = False
    true_sequential: bool = True
    mse: bool = False
    blocksize: int = 128
    method: str = "gptq"

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise InputError(f"--bits {self.bits}: GPTQ packing supports {BITS}")
        if self.group_size == 0 or self.group_size < -1:
            raise InputError(f"--group-size {self.group_size}: use -1 (one group) or a size > 0")
        if not 0 < self.damp < 1:
            raise InputError(f"--damp {self.damp}: must be in (0, 1) (fraction of mean diag H)")
        if self.method not in METHODS:
            raise InputError(f"--method {self.method!r}: choose from {METHODS}")
        if self.blocksize < 1:
            raise InputError(f"blocksize {self.blocksize}: must be positive")

    def as_dict(self) -> dict:
        return asdict(self)


class Quantizer:
    """The grid q = clamp(round(w/s) + z, 0, maxq), fitted per output row on a slice of W.

    Scales are rounded to fp16 when fitted (what the checkpoint stores), so s·(q − z) here is
    bit-for-bit what a runtime dequantises. GPTQ v1 stores z − 1 unsigned, so z ≥ 1 always.
    """

    def __init__(self, bits: int, sym: bool = True, mse: bool = False, grid: int = 100,
                 maxshrink: float = 0.8, norm: float = 2.4) -> None:
        self.maxq, self.sym, self.mse = 2**bits - 1, sym, mse
        self.grid, self.maxshrink, self.norm = grid, maxshrink, norm

    def _grid(self, xmin: torch.Tensor, xmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) [out, 1] covering [xmin, xmax] (xmin ≤ 0 ≤ xmax)."""
        if self.sym:
            xmax = torch.maximum(-xmin, xmax)
            scale = 2 * xmax / self.maxq
            zero = torch.full_like(scale, (self.maxq + 1) // 2)
        else:
            scale = (xmax - xmin) / self.maxq
            zero = torch.round(-xmin / scale)
            # z = 0 is unstorable in v1: anchor the grid at z = 1 (still covers [xmin, xmax]).
            scale = torch.where(zero < 1, xmax / (self.maxq - 1), scale)
            zero = zero.clamp(1, self.maxq)
        scale = scale.half().float().clamp(min=torch.finfo(torch.float16).tiny)
        return scale.unsqueeze(1), zero.unsqueeze(1)

    def fit(self, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero), each [out, 1], for the columns W [out, k]; MSE search if enabled."""
        xmin = W.min(1).values.clamp(max=0)
        xmax = W.max(1).values.clamp(min=0)
        both0 = (xmin == 0) & (xmax == 0)
        xmin, xmax = xmin.masked_fill(both0, -1), xmax.masked_fill(both0, 1)
        scale, zero = self._grid(xmin, xmax)
        if self.mse:
            best = torch.full_like(xmin, float("inf"))
            for i in range(int(self.maxshrink * self.grid)):
                p = 1 - i / self.grid
                s1, z1 = self._grid(p * xmin, p * xmax)
                err = (self.quantize(W, s1, z1) - W).abs().pow(self.norm).sum(1)
                better = err < best
                best = torch.where(better, err, best)
                scale = torch.where(better[:, None], s1, scale)
                zero = torch.where(better[:, None], z1, zero)
        return scale, zero

    def ints(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(w / scale) + zero, 0, self.maxq)

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Fake-quantise: the float value the runtime will compute for w."""
        return scale * (self.ints(w, scale, zero) - zero)


@dataclass
class QuantResult:
    """Fake-quantised weights Q [out, in] (float32) and what the checkpoint stores for them."""

    Q: torch.Tensor
    scales: torch.Tensor  # [n_groups, out], float32 holding fp16 values
    zeros: torch.Tensor  # [n_groups, out], in [1, maxq]
    g_idx: torch.Tensor  # [in], int32
    loss: float
    damp: float | None = None
    damp_retries: list[float] = field(default_factory=list)

    def ints(self, bits: int) -> torch.Tensor:
        """Integer weights q [out, in] such that Q = scales[g]·(q − zeros[g])."""
        g = self.g_idx.long()
        s, z = self.scales.t()[:, g], self.zeros.t()[:, g]  # [out, in]
        return torch.clamp(torch.round(self.Q / s) + z, 0, 2**bits - 1).to(torch.int32)


def _groups(n_cols: int, group_size: int) -> int:
    """Columns per group; one group (all columns) for -1 or a size beyond the width."""
    return n_cols if group_size == -1 else min(group_size, n_cols)


def _stack(params: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale [out, 1], zero [out, 1]) -> scales, zeros [n_groups, out]."""
    return torch.cat([s for s, _ in params], 1).t(), torch.cat([z for _, z in params], 1).t()


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


def gptq(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec) -> QuantResult:
    """Quantise W [out, in] column by column, spreading each column's error over the columns not
    yet quantised via the inverse Hessian H⁻¹ (H [in, in] = 2/n Σ x xᵀ), in lazy blocks."""
    W, H = W.to(torch.float32, copy=True), H.to(torch.float32, copy=True)
    n = W.shape[1]
    quantizer = Quantizer(spec.bits, spec.sym, spec.mse)
    g = _groups(n, spec.group_size)
    dead = torch.diag(H) == 0  # inputs that never fire: any weight works, choose 0
    torch.diagonal(H).masked_fill_(dead, 1)
    W.masked_fill_(dead[None, :], 0)
    # static groups (and the single group of -1) are fitted up front on the original W
    static = [quantizer.fit(W[:, i:i + g]) for i in range(0, n, g)] if spec.static_groups or g == n else []
    perm = torch.argsort(torch.diag(H), descending=True) if spec.act_order else torch.arange(n, device=W.device)
    if spec.act_order:
        W, H = W[:, perm], H[perm][:, perm]
    static_of = (perm.cpu() // g).tolist()  # static group of each processed column (one sync)
    Hinv, damp, retries = inverse_cholesky(H, spec.damp)
    del H
    # blocks hold whole groups, so a group is fitted on fully updated columns
    B = spec.blocksize if static or spec.blocksize % g == 0 else g * max(1, spec.blocksize // g)

    Q, Losses = torch.zeros_like(W), torch.zeros(n, device=W.device)  # loss per column
    fitted: list[tuple[torch.Tensor, torch.Tensor]] = []  # (scale, zero) per group, in order
    for i1 in range(0, n, B):
        i2 = min(i1 + B, n)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            if static:
                scale, zero = static[static_of[i1 + i]]
            elif (i1 + i) % g == 0:
                scale, zero = quantizer.fit(W1[:, i:i + g])
                fitted.append((scale, zero))
            w, d = W1[:, i], Hinv1[i, i]
            q = quantizer.quantize(w[:, None], scale, zero)[:, 0]
            Q[:, i1 + i] = q
            Losses[i1 + i] = ((w - q) ** 2).sum() / d**2 / 2
            err = (w - q) / d
            W1[:, i:] -= err[:, None] @ Hinv1[None, i, i:]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    invperm = torch.argsort(perm)
    g_idx = torch.arange(n, device=W.device) // g
    if not static:
        g_idx = g_idx[invperm]  # act-order: group of each column in processing order
    scales, zeros = _stack(static or fitted)
    return QuantResult(Q[:, invperm], scales, zeros, g_idx.to(torch.int32),
                       float(Losses.sum()), damp, retries)


def rtn(W: torch.Tensor, spec: QuantSpec) -> QuantResult:
    """Round-to-nearest on the same grid and groups (the baseline GPTQ is measured against)."""
    W = W.float()
    n = W.shape[1]
    quantizer = Quantizer(spec.bits, spec.sym, spec.mse)
    g = _groups(n, spec.group_size)
    scales, zeros = _stack([quantizer.fit(W[:, i:i + g]) for i in range(0, n, g)])
    g_idx = torch.arange(n, device=W.device) // g
    s, z = scales.t()[:, g_idx], zeros.t()[:, g_idx]  # [out, in]
    Q = quantizer.quantize(W, s, z)
    return QuantResult(Q, scales, zeros, g_idx.to(torch.int32), float(((W - Q) ** 2).sum()))


def n_groups(in_features: int, group_size: int) -> int:
    """Rows of scales/qzeros for a linear with in_features inputs (the last group is partial
    when group_size does not divide in_features)."""
    return 1 if group_size == -1 else math.ceil(in_features / group_size)
