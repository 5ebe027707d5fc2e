"""The memory-lean AdaRound (custom autograd, chunked recomputation, regularizer gradient added
to V.grad directly) computes what the plain autograd form computes."""

from __future__ import annotations

import pytest
import torch

import reparq.quant.adaround as adaround
from reparq.quant.adaround import GAMMA, ZETA, AdaRound
from reparq.quant.uniform import UniformQuantizer


def _plain(v, weight, scale, zero_point, qmin, qmax, beta, reg_weight):
    """The textbook form, everything through autograd: soft weight, and its regularizer."""
    w_floor = torch.floor(weight / scale)
    h = torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)
    w_hat = (torch.clamp(w_floor + h + zero_point, qmin, qmax) - zero_point) * scale
    reg = (1 - (2 * h - 1).abs().pow(beta)).sum()
    return w_hat, reg_weight * reg


@pytest.mark.parametrize("shape,axis,bits", [((37, 19), 0, 4), ((16, 8, 3, 3), 0, 3), ((12, 30), None, 8)])
@pytest.mark.parametrize("chunk", [64, 1 << 20])  # many small chunks, and one chunk
def test_lean_soft_weight_and_gradients_match_plain_autograd(monkeypatch, shape, axis, bits, chunk):
    monkeypatch.setattr(adaround, "CHUNK_ELEMENTS", chunk)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=gen)
    wq = UniformQuantizer(bits, symmetric=True, channel_axis=axis)
    amax = weight.abs().flatten(1).amax(1) if axis == 0 else weight.abs().amax()
    wq.set_params(0.8 * amax / wq.qmax)  # clipped: some weights sit beyond the grid (clamp masks matter)
    r = AdaRound(wq, weight)
    noise = torch.randn(shape, generator=gen)
    with torch.no_grad():
        for rows, c in zip(adaround._row_chunks(weight), r.v_chunks):
            c.add_(noise[rows])
    scale, zp = wq.shaped_params(weight)
    upstream = torch.randn(shape, generator=gen)

    v_ref = r.v.detach().clone().requires_grad_(True)
    w_ref, reg_ref = _plain(v_ref, weight, scale.detach(), zp, wq.qmin, wq.qmax, beta=7.0, reg_weight=0.01)
    ((w_ref * upstream).sum() + reg_ref).backward()

    w_lean = r(weight)
    if chunk > weight.numel():  # one chunk: the very same kernels on the very same tensor
        assert torch.equal(w_lean, w_ref.detach())
    else:  # SIMD bodies and scalar tails of the sigmoid may differ by one ulp at chunk edges
        torch.testing.assert_close(w_lean, w_ref.detach(), rtol=0, atol=1e-6)
    (w_lean * upstream).sum().backward()
    r.add_regularizer_grad(7.0, 0.01)
    torch.testing.assert_close(r.v_grad, v_ref.grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(r.regularizer(7.0), reg_ref.detach() / 0.01, rtol=1e-5, atol=1e-4)
    # Soft weights start at the float weight where it lies inside the grid: the init is unchanged too.
    r0 = AdaRound(wq, weight)
    inside = ((weight / scale) > wq.qmin) & ((weight / scale) < wq.qmax)
    torch.testing.assert_close(r0(weight)[inside], weight[inside], atol=1e-3 * float(scale.max()), rtol=0)
    # The hard form lands on the grid, rounding each weight down or up.
    r.hard = True
    ints = r(weight) / scale
    assert torch.equal(ints, ints.round()) or torch.allclose(ints, ints.round(), atol=1e-5)
    assert ((ints.round() - torch.floor(weight / scale)).abs() <= 1)[inside].all()
    assert ints.round().min() >= wq.qmin and ints.round().max() <= wq.qmax


def test_lean_soft_weight_keeps_no_weight_sized_tensors_for_backward():
    """What the graph holds between forward and backward is V and the weight themselves (no copies)."""
    weight = torch.randn(64, 32)
    wq = UniformQuantizer(4, symmetric=True, channel_axis=0)
    wq.set_params(weight.abs().amax(1) / wq.qmax)
    r = AdaRound(wq, weight)
    out = r(weight)
    saved = out.grad_fn.saved_tensors
    assert sum(t.numel() for t in saved if t.data_ptr() not in {c.data_ptr() for c in r.v_chunks}) \
        == weight.numel() + 2 * 64  # the weight itself, its scale and zero-point
    assert any(t.data_ptr() == weight.data_ptr() for t in saved)


def test_adam_on_row_chunks_of_v_steps_like_adam_on_one_v(monkeypatch):
    """V is split into row-chunk parameters so Adam's temporaries stay chunk-sized; Adam is
    elementwise, so the updates are those of one V."""
    monkeypatch.setattr(adaround, "CHUNK_ELEMENTS", 100)
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(40, 24, generator=gen)
    wq = UniformQuantizer(4, symmetric=True, channel_axis=0)
    wq.set_params(weight.abs().amax(1) / wq.qmax)
    r = AdaRound(wq, weight)
    assert len(r.v_chunks) == 10  # 4 rows of 24 per chunk
    whole = torch.nn.Parameter(r.v.clone())
    opt_chunks, opt_whole = torch.optim.Adam(r.parameters(), lr=1e-2), torch.optim.Adam([whole], lr=1e-2)
    for _ in range(5):
        upstream = torch.randn(40, 24, generator=gen)
        opt_chunks.zero_grad()
        opt_whole.zero_grad()
        (r(weight) * upstream).sum().backward()
        scale, zp = wq.shaped_params(weight)
        (_plain(whole, weight, scale.detach(), zp, wq.qmin, wq.qmax, 2.0, 0.0)[0] * upstream).sum().backward()
        opt_chunks.step()
        opt_whole.step()
    torch.testing.assert_close(r.v, whole.detach(), rtol=1e-6, atol=1e-6)
