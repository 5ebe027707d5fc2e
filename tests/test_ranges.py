"""Range estimators: exact minmax params, percentile clipping, Lp clipping search vs a brute force."""

from __future__ import annotations

import pytest
import torch

from reparq.quant.ranges import (
    DEFAULT_GRID,
    estimate_params,
    lp_search_params,
    minmax_params,
    percentile_params,
)

EPS32 = torch.finfo(torch.float32).eps


def f32(*v):
    return torch.tensor(v, dtype=torch.float32)


# ----------------------------------------------------------------------------------------- minmax

def test_minmax_asymmetric_exact():
    x = f32(-1.0, 0.5, 3.0, 2.0)
    scale, zp = minmax_params(x, 8, symmetric=False)
    # scale = (hi - lo) / (qmax - qmin) = 4 / 255; zp = qmin - round(lo / scale) = round(63.75) = 64
    assert torch.equal(scale, f32(4.0) / 255)
    assert zp.tolist() == [64.0]
    # The range ends land on the grid ends (up to the rounding of the zero-point).
    assert (torch.round(x.min() / scale) + zp).item() == 0
    assert (torch.round(x.max() / scale) + zp).item() == 255


def test_minmax_symmetric_exact():
    x = f32(-1.0, 0.5, 3.0)
    scale, zp = minmax_params(x, 8, symmetric=True)
    # the smallest step whose grid [-128 s, 127 s] covers [lo, hi]: max(1 / 128, 3 / 127)
    assert torch.equal(scale, f32(3.0) / 127)
    assert zp.tolist() == [0.0]
    scale4, _ = minmax_params(x, 4, symmetric=True)
    assert torch.equal(scale4, f32(3.0) / 7)
    # a negative extreme uses the grid's lone -2^(b-1): max(4 / 8, 3 / 7)
    scale4, _ = minmax_params(f32(-4.0, 3.0), 4, symmetric=True)
    assert torch.equal(scale4, f32(4.0) / 8)


def test_minmax_symmetric_never_clips_the_range_ends():
    """Both ends land on the grid exactly (the old step max|x| / 7.5 clipped the top by 1/15)."""
    torch.manual_seed(0)
    w = torch.randn(64, 32)
    for bits in (4, 8):
        scale, _ = minmax_params(w, bits, symmetric=True, axis=0)
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        k = w / scale[:, None]
        assert float(k.max()) <= qmax + 1e-5 and float(k.min()) >= qmin - 1e-5
        ends = torch.maximum(k.amax(1) / qmax, k.amin(1) / qmin)  # the end that sets each row's step
        torch.testing.assert_close(ends, torch.ones(64), rtol=1e-6, atol=0)


def test_minmax_range_is_widened_to_contain_zero():
    pos = f32(0.5, 2.0)  # lo widened to 0
    scale, zp = minmax_params(pos, 8, symmetric=False)
    assert torch.equal(scale, f32(2.0) / 255) and zp.tolist() == [0.0]
    neg = f32(-4.0, -1.0)  # hi widened to 0
    scale, zp = minmax_params(neg, 4, symmetric=False)
    assert torch.equal(scale, f32(4.0) / 15) and zp.tolist() == [15.0]
    scale, zp = minmax_params(neg, 4, symmetric=True)
    assert torch.equal(scale, f32(4.0) / 8) and zp.tolist() == [0.0]


def test_minmax_all_zero_gives_eps_scale():
    scale, zp = minmax_params(torch.zeros(5), 8, symmetric=False)
    assert scale.tolist() == [EPS32] and zp.tolist() == [0.0]


M = torch.tensor([[-1.0, 2.0, 0.5],
                  [-3.0, 1.0, 4.0]])


def test_minmax_per_channel_axis0():
    scale, zp = minmax_params(M, 8, symmetric=False, axis=0)
    # row 0: [-1, 2] -> 3/255, zp = round(85) = 85; row 1: [-3, 4] -> 7/255, zp = round(109.29) = 109
    assert torch.equal(scale, f32(3.0, 7.0) / 255)
    assert zp.tolist() == [85.0, 109.0]
    scale, zp = minmax_params(M, 8, symmetric=True, axis=0)
    # row 0: max(1/128, 2/127); row 1: max(3/128, 4/127)
    assert torch.equal(scale, f32(2.0, 4.0) / 127) and zp.tolist() == [0.0, 0.0]


def test_minmax_per_channel_axis1():
    scale, zp = minmax_params(M, 8, symmetric=False, axis=1)
    # col 0: [-3, -1] -> [-3, 0]; col 1: [1, 2] -> [0, 2]; col 2: [0.5, 4] -> [0, 4]
    assert torch.equal(scale, f32(3.0, 2.0, 4.0) / 255)
    assert zp.tolist() == [255.0, 0.0, 0.0]
    scale, _ = minmax_params(M, 8, symmetric=True, axis=1)
    # col 0 is all negative: 3/128; the others: 2/127, 4/127
    assert torch.equal(scale, torch.stack([f32(3.0) / 128, f32(2.0) / 127, f32(4.0) / 127]).reshape(-1))


def test_minmax_per_channel_4d_axis1():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)
    x[:, 1] *= 10
    scale, _ = minmax_params(x, 8, symmetric=True, axis=1)
    lo, hi = x.amin(dim=(0, 2, 3)).clamp_max(0), x.amax(dim=(0, 2, 3)).clamp_min(0)
    torch.testing.assert_close(scale, torch.maximum(-lo / 128, hi / 127), rtol=1e-7, atol=0)


# ------------------------------------------------------------------------------------- percentile

def test_percentile_hand_computed():
    x = torch.arange(-50, 51, dtype=torch.float32)  # 101 values: 10th/90th percentiles are -40 / 40
    scale, zp = percentile_params(x, 8, symmetric=True, pct=90.0)
    assert scale.item() == pytest.approx(40.0 / 127, rel=1e-5)  # max(40 / 128, 40 / 127)
    assert zp.tolist() == [0.0]
    scale, zp = estimate_params(x, "percentile", 8, symmetric=False, percentile=90.0)
    assert scale.item() == pytest.approx(80.0 / 255, rel=1e-5)
    assert zp.item() == -torch.round(f32(-40.0) / scale).item()  # qmin - round(lo / scale)
    assert zp.item() in (127.0, 128.0)


def test_percentile_ignores_injected_outlier():
    torch.manual_seed(0)
    x = torch.randn(20000)
    x[123] = 1000.0
    s_pct, _ = percentile_params(x, 8, symmetric=False)
    s_mm, _ = minmax_params(x, 8, symmetric=False)
    assert s_pct.item() * 255 < 12.0  # a range of the Gaussian bulk
    assert s_mm.item() * 255 > 1000.0  # minmax pays for the outlier
    assert s_pct.item() < s_mm.item() / 50


def test_percentile_per_channel():
    torch.manual_seed(0)
    x = torch.randn(3, 5000)
    x[0, 7] = 500.0
    s_pct, _ = percentile_params(x, 8, symmetric=True, axis=0, pct=99.9)
    s_mm, _ = minmax_params(x, 8, symmetric=True, axis=0)
    assert s_pct[0] < s_mm[0] / 50
    assert (s_pct[1:] <= s_mm[1:]).all()


# ------------------------------------------------------------------------------------ Lp search

def test_default_grid():
    assert len(DEFAULT_GRID) == 81
    assert DEFAULT_GRID[0] == 1.0 and DEFAULT_GRID[-1] == 0.2
    assert all(abs((a - b) - 0.01) < 1e-9 for a, b in zip(DEFAULT_GRID, DEFAULT_GRID[1:]))


def brute_force_scales(rows: torch.Tensor, bits: int, symmetric: bool, p: float) -> torch.Tensor:
    """Independent search: every alpha of 1.00..0.20, plain torch ops, first strict minimum wins."""
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        qmin, qmax = 0, 2 ** bits - 1
    alphas = [round(1.0 - 0.01 * i, 2) for i in range(81)]
    best = []
    for row in rows:
        lo = torch.clamp(row.min(), max=0.0)
        hi = torch.clamp(row.max(), min=0.0)
        best_err, best_scale = float("inf"), None
        for alpha in alphas:
            a_lo, a_hi = alpha * lo, alpha * hi
            if symmetric:
                s = torch.maximum(-a_lo / -qmin, a_hi / qmax)  # the step that covers [a_lo, a_hi]
            else:
                s = (a_hi - a_lo) / (qmax - qmin)
            s = torch.clamp(s, min=EPS32)
            z = torch.tensor(0.0) if symmetric else torch.clamp(qmin - torch.round(a_lo / s), qmin, qmax)
            x_hat = (torch.clamp(torch.round(row / s) + z, qmin, qmax) - z) * s
            err = (row.double() - x_hat.double()).abs().pow(p).mean().item()
            if err < best_err:
                best_err, best_scale = err, s.item()
        best.append(best_scale)
    return torch.tensor(best)


def rows_of(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    return x.reshape(1, -1) if axis is None else x.movedim(axis, 0).reshape(x.shape[axis], -1)


def heavy_tailed(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(*shape, generator=g) - 0.5
    x = -torch.sign(u) * torch.log1p(-2 * u.abs())  # Laplace(0, 1)
    flat = x.reshape(-1)
    idx = torch.randperm(flat.numel(), generator=g)[:max(2, flat.numel() // 200)]
    flat[idx] = torch.randn(idx.numel(), generator=g).sign() * (8 + 8 * torch.rand(idx.numel(), generator=g))
    return x


@pytest.mark.parametrize("p", [1.0, 2.0])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape, axis, seed", [((512,), None, 0), ((4, 3, 3, 3), None, 1), ((4, 3, 3, 3), 0, 2),
                                               ((6, 40), 0, 3), ((40, 6), 1, 4), ((2, 5, 4, 4), 1, 5)])
def test_lp_search_matches_brute_force(p, symmetric, shape, axis, seed):
    x = heavy_tailed(*shape, seed=seed)
    bits = 4
    scale, zp = lp_search_params(x, bits, symmetric, axis, p=p)
    expected = brute_force_scales(rows_of(x, axis), bits, symmetric, p)
    assert scale.shape == expected.shape
    torch.testing.assert_close(scale, expected, rtol=1e-6, atol=0)
    if symmetric:
        assert zp.eq(0).all()
    else:
        assert zp.eq(zp.round()).all() and zp.ge(0).all() and zp.le(15).all()


@pytest.mark.parametrize("p", [1.0, 2.0])
def test_lp_search_never_worse_than_minmax(p):
    torch.manual_seed(0)
    x = heavy_tailed(8, 64, seed=3)
    s, z = lp_search_params(x, 4, False, 0, p=p)
    s0, z0 = minmax_params(x, 4, False, 0)

    def err(s, z):
        xh = (torch.clamp(torch.round(x / s[:, None]) + z[:, None], 0, 15) - z[:, None]) * s[:, None]
        return (x - xh).abs().pow(p).mean(1)

    assert (err(s, z) <= err(s0, z0) + 1e-7).all()
    assert (err(s, z) < err(s0, z0)).any()  # outliers make clipping strictly better somewhere


@pytest.mark.parametrize("bits", [4, 6])
@pytest.mark.parametrize("symmetric", [True, False])
def test_mae_clips_more_than_mse_on_heavy_tails(bits, symmetric):
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((4096,))
    x[:4] = torch.tensor([40.0, -35.0, 30.0, -45.0])
    s_mse, _ = estimate_params(x, "mse", bits, symmetric)
    s_mae, _ = estimate_params(x, "mae", bits, symmetric)
    s_mm, _ = minmax_params(x, bits, symmetric)
    assert s_mae.item() < s_mse.item() < s_mm.item()


def test_estimate_params_dispatch():
    torch.manual_seed(0)
    x = heavy_tailed(4, 50, seed=1)
    for name, ref in (("minmax", minmax_params(x, 4, True, 0)),
                      ("percentile", percentile_params(x, 4, True, 0, 99.99)),
                      ("mse", lp_search_params(x, 4, True, 0, p=2.0)),
                      ("mae", lp_search_params(x, 4, True, 0, p=1.0))):
        got = estimate_params(x, name, 4, True, 0)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), name
    assert not torch.equal(estimate_params(x, "mse", 4, True, 0)[0], estimate_params(x, "mae", 4, True, 0)[0])


def test_unknown_estimator_raises():
    with pytest.raises(ValueError, match="unknown range estimator 'kl'"):
        estimate_params(torch.randn(10), "kl", 8, False)
