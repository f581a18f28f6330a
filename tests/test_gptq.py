"""GPTQ against an independent unblocked implementation (the OBS update with the inverse Hessian
shrunk one column at a time, float64); reconstruction error against RTN; the grid; dampening."""

import pytest
import torch

from pipeline.core.errors import InputError, PipelineError
from pipeline.core.grid import Quantizer, rtn
from pipeline.methods import QuantSpec
from pipeline.methods.gptq import gptq


def fp16(x: torch.Tensor) -> torch.Tensor:
    return x.half().double()


def reference_gptq(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, act_order: bool,
                   damp: float) -> torch.Tensor:
    """The paper's algorithm, written out directly: symmetric grid with fp16 scales fitted on the
    updated weights when a group starts; after column i, the remaining columns absorb its error
    through H⁻¹, and H⁻¹ loses row/column i (Gaussian elimination)."""
    W, H = W.double().clone(), H.double().clone()
    n = W.shape[1]
    maxq = 2**bits - 1
    order = torch.argsort(torch.diag(H), descending=True).tolist() if act_order else list(range(n))
    H += damp * torch.diag(H).mean() * torch.eye(n, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    g = n if group_size == -1 else group_size
    for pos, i in enumerate(order):
        if pos % g == 0:
            cols = order[pos:pos + g]
            amax = torch.maximum(-W[:, cols].min(1).values.clamp(max=0), W[:, cols].max(1).values.clamp(min=0))
            scale = fp16(torch.where(amax == 0, torch.ones_like(amax), amax) * 2 / maxq)
            zero = (maxq + 1) // 2
        q = scale * (torch.clamp(torch.round(W[:, i] / scale) + zero, 0, maxq) - zero)
        Q[:, i] = q
        rest = order[pos + 1:]
        W[:, rest] -= torch.outer((W[:, i] - q) / Hinv[i, i], Hinv[i, rest])
        Hinv = Hinv - torch.outer(Hinv[:, i], Hinv[i, :]) / Hinv[i, i]
    return Q


def correlated_inputs(n_in: int, tokens: int, seed: int, outliers: int = 0) -> torch.Tensor:
    """X [tokens, n_in] with strongly correlated channels and, optionally, a few large ones."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n_in // 8, generator=g) @ torch.randn(n_in // 8, n_in, generator=g)
    X += 0.3 * torch.randn(tokens, n_in, generator=g)
    if outliers:
        idx = torch.randperm(n_in, generator=g)[:outliers]
        X[:, idx] *= 25
    return X


def layer_error(W: torch.Tensor, Q: torch.Tensor, X: torch.Tensor) -> float:
    return float(((X @ (W - Q).t()) ** 2).sum())


# 40 does not divide 96: groups of 40, 40 and a partial 16 (ceil(in/group) groups, as in the format)
@pytest.mark.parametrize("group_size,act_order", [(-1, False), (32, False), (32, True), (-1, True),
                                                  (40, False), (40, True)])
def test_gptq_matches_unblocked_reference(group_size, act_order):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(24, 96, generator=g)
    X = correlated_inputs(96, 512, seed=2)
    H = 2 / X.shape[0] * X.t() @ X
    spec = QuantSpec(bits=3, group_size=group_size, act_order=act_order, blocksize=64, mse=False)
    got = gptq(W, H, spec).Q.double()
    want = reference_gptq(W, H, 3, group_size, act_order, spec.damp)
    assert torch.equal(got, want)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32])
def test_gptq_beats_rtn_on_correlated_inputs(bits, group_size):
    g = torch.Generator().manual_seed(bits)
    W = torch.randn(64, 256, generator=g)
    X = correlated_inputs(256, 1024, seed=bits)
    H = 2 / X.shape[0] * X.t() @ X
    spec = QuantSpec(bits=bits, group_size=group_size, act_order=False)
    e_gptq, e_rtn = layer_error(W, gptq(W, H, spec).Q, X), layer_error(W, rtn(W, spec.grid).Q, X)
    assert e_gptq < 0.5 * e_rtn


@pytest.mark.parametrize("bits", [3, 4])
def test_act_order_helps_with_outlier_channels(bits):
    g = torch.Generator().manual_seed(7)
    W = torch.randn(64, 256, generator=g)
    X = correlated_inputs(256, 1024, seed=7, outliers=6)
    H = 2 / X.shape[0] * X.t() @ X
    plain = gptq(W, H, QuantSpec(bits=bits, group_size=-1, act_order=False)).Q
    ordered = gptq(W, H, QuantSpec(bits=bits, group_size=-1, act_order=True)).Q
    assert layer_error(W, ordered, X) < 0.9 * layer_error(W, plain, X)


def test_result_reproduces_its_packed_integers():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(32, 128, generator=g)
    X = correlated_inputs(128, 256, seed=3)
    H = 2 / X.shape[0] * X.t() @ X
    for spec in (QuantSpec(4, 32, True, sym=False), QuantSpec(3, 64, True, static_groups=True),
                 QuantSpec(2, -1, False, mse=True)):
        r = gptq(W, H, spec)
        q, gi = r.ints(spec.bits).double(), r.g_idx.long()
        assert int(r.zeros.min()) >= 1 and int(r.zeros.max()) <= 2**spec.bits - 1
        assert torch.equal(r.scales, r.scales.half().float())
        assert torch.equal(r.Q.double(), r.scales.t()[:, gi].double() * (q - r.zeros.t()[:, gi].double()))
        if spec.static_groups:
            assert torch.equal(r.g_idx.long(), torch.arange(128) // 64)
        else:
            assert sorted(r.g_idx.tolist()) == sorted((torch.arange(128) // spec.group_size).tolist()) \
                if spec.group_size > 0 else set(r.g_idx.tolist()) == {0}


def test_dead_inputs_get_zero_weight():
    g = torch.Generator().manual_seed(4)
    W = torch.randn(32, 64, generator=g)
    X = correlated_inputs(64, 256, seed=4)
    X[:, [5, 17]] = 0
    r = gptq(W, 2 / 256 * X.t() @ X, QuantSpec(4, -1, True))
    assert torch.equal(r.Q[:, [5, 17]], torch.zeros(32, 2))


def test_damp_increases_until_cholesky_succeeds():
    n = 64
    H = torch.eye(n)
    H[0, 0] = -0.5  # indefinite: fails at damp 0.01 (mean diag ≈ 0.98)
    W = torch.randn(32, n, generator=torch.Generator().manual_seed(5))
    r = gptq(W, H, QuantSpec(4, -1, False, damp=0.01))
    assert r.damp_retries[0] == 0.01 and r.damp > 0.5 and r.damp not in r.damp_retries
    H[0, 0] = float("-inf")
    with pytest.raises(PipelineError, match="Cholesky"):
        gptq(W, H, QuantSpec(4, -1, False))


def test_grid_known_values():
    W = torch.tensor([[-1.0, 0.5, 0.25, 0.0], [0.0, 0.7, 1.4, 0.35]])
    s, z = Quantizer(4, sym=True).fit(W)
    assert s[:, 0].tolist() == [torch.tensor(2 / 15).half().item(), torch.tensor(2.8 / 15).half().item()]
    assert z[:, 0].tolist() == [8, 8]
    s, z = Quantizer(4, sym=False).fit(W)
    # row 1 has min 0: z = 0 cannot be stored in v1, so the grid is anchored at z = 1
    assert z[:, 0].tolist() == [torch.round(torch.tensor(1 / (1.5 / 15))).item(), 1]
    assert s[1, 0].item() == torch.tensor(1.4 / 14).half().item()
    Q = Quantizer(4, sym=False).quantize(W, s, z)
    assert (Q - W).abs().max() <= s.max() / 2


def test_rtn_and_mse_search():
    g = torch.Generator().manual_seed(6)
    W = torch.randn(64, 128, generator=g)
    plain = rtn(W, QuantSpec(3, 32, False, mse=False).grid)
    s, gi = plain.scales.t()[:, torch.arange(128) // 32], torch.arange(128) // 32
    amax = W.abs().view(64, 4, 32).amax(-1).t()  # [groups, out]
    assert torch.equal(plain.scales, (2 * amax / 7).half().float())
    assert torch.equal(plain.Q, s * (torch.clamp(torch.round(W / s) + 4, 0, 7) - 4))
    assert torch.equal(plain.g_idx.long(), gi)
    searched = rtn(W, QuantSpec(3, 32, False, mse=True).grid)
    assert ((W - searched.Q) ** 2).sum() < ((W - plain.Q) ** 2).sum()


def brute_force_mse(W: torch.Tensor, bits: int, sym: bool) -> torch.Tensor:
    """Per row, Σ|w - q|^2.4 of the best of GPTQ's 80 shrunk ranges, tried one by one (written
    from the GPTQ reference's description: p = 1 - i/100, i < 80; grid from [p·min, p·max])."""
    maxq = 2**bits - 1
    lo, hi = W.min(1).values.clamp(max=0), W.max(1).values.clamp(min=0)
    best = torch.full((W.shape[0],), float("inf"))
    for i in range(80):
        a, b = (1 - i / 100) * lo, (1 - i / 100) * hi
        if sym:
            m = torch.maximum(-a, b)
            scale, zero = (2 * m / maxq), torch.full_like(m, (maxq + 1) // 2)
        else:
            scale = (b - a) / maxq
            zero = torch.round(-a / scale)
            scale = torch.where(zero < 1, b / (maxq - 1), scale)
            zero = zero.clamp(1, maxq)
        scale = scale.half().float()[:, None]
        q = scale * (torch.clamp(torch.round(W / scale) + zero[:, None], 0, maxq) - zero[:, None])
        best = torch.minimum(best, (q - W).abs().pow(2.4).sum(1))
    return best


@pytest.mark.parametrize("bits,sym", [(2, True), (3, True), (4, False), (8, True)])
def test_mse_search_finds_the_least_error_ranges(bits, sym):
    """The coarse-then-fine search against trying all 80 ranges: the same range on nearly every
    row, and within 0.1% of the least error in total (the error is smooth in the range)."""
    g = torch.Generator().manual_seed(bits)
    W = torch.randn(512, 128, generator=g) * torch.rand(512, 1, generator=g)
    r = rtn(W, QuantSpec(bits, 128, False, sym=sym, mse=True).grid)
    got = (r.Q - W).abs().pow(2.4).sum(1)
    best = brute_force_mse(W, bits, sym)
    assert (got >= best * (1 - 1e-6)).all()  # never below the true least error
    assert float(got.sum()) <= 1.001 * float(best.sum())
    assert float((got <= best * (1 + 1e-6)).double().mean()) >= 0.95


@pytest.mark.parametrize("kwargs,message", [
    ({"bits": 5}, r"--bits 5: must be one of 2, 3, 4, 8"),
    ({"group_size": 0}, r"--group-size 0: must be -1 \(one group per row\) or a positive"),
    ({"group_size": -2}, r"--group-size -2: "),
    ({"damp": 0}, r"--damp 0: must be in \(0, 1\)"),
    ({"method": "awq"}, r"--method 'awq': must be one of gptq, rtn"),
    ({"group_size": -1, "static_groups": True}, r"--static-groups: needs a group size other than -1"),
    ({"blocksize": 0}, r"--blocksize 0: must be positive"),
])
def test_spec_rejects_bad_options_naming_the_option(kwargs, message):
    with pytest.raises(InputError, match=f"^{message}"):
        QuantSpec(**{"bits": 4, **kwargs})
