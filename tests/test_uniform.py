"""UniformQuantizer, fake_quant, int_range, round_ste: exact grids, per-channel axes, STE/LSQ gradients."""

from __future__ import annotations

import pytest
import torch

from reparq.errors import ReparqError
from reparq.quant.uniform import UniformQuantizer, check_bits, fake_quant, int_range, round_ste


def make_quantizer(bits, symmetric, scale, zero_point=None, channel_axis=None):
    q = UniformQuantizer(bits, symmetric=symmetric, channel_axis=channel_axis)
    q.set_params(torch.as_tensor(scale), None if zero_point is None else torch.as_tensor(zero_point))
    return q


# 4-bit asymmetric grid (qmin 0, qmax 15), scale 0.5, zero_point 3. Hand-computed:
#   x / s           : -4   -3  -1.2 -0.4  0  0.52  0.5  1.5  2.5  2   11  12  20
#   round (half->even): -4  -3  -1   -0   0  1     0    2    2    2   11  12  20
#   + z, clamp[0,15]:  0    0   2    3    3  4     3    5    5    5   14  15  15
#   (q - z) * s     : -1.5 -1.5 -0.5 0    0  0.5   0    1    1    1   5.5 6   6
X_ASYM = [-2.0, -1.5, -0.6, -0.2, 0.0, 0.26, 0.25, 0.75, 1.25, 1.0, 5.5, 6.0, 10.0]
Q_ASYM = [0, 0, 2, 3, 3, 4, 3, 5, 5, 5, 14, 15, 15]
OUT_ASYM = [-1.5, -1.5, -0.5, 0.0, 0.0, 0.5, 0.0, 1.0, 1.0, 1.0, 5.5, 6.0, 6.0]


def test_asymmetric_4bit_hand_computed_grid():
    torch.manual_seed(0)
    q = make_quantizer(4, False, 0.5, 3.0)
    assert (q.qmin, q.qmax) == (0, 15)
    x = torch.tensor(X_ASYM)
    assert torch.equal(q(x), torch.tensor(OUT_ASYM))
    ints = q.to_int(x)
    assert ints.dtype == torch.int32
    assert ints.tolist() == Q_ASYM


def test_fake_quant_function_matches_hand_values():
    x = torch.tensor(X_ASYM)
    out = fake_quant(x, torch.tensor(0.5), torch.tensor(3.0), 0, 15)
    assert torch.equal(out, torch.tensor(OUT_ASYM))
    # Zero is always exactly representable thanks to the integer zero-point.
    assert fake_quant(torch.zeros(3), torch.tensor(0.37), torch.tensor(5.0), 0, 15).abs().max().item() == 0.0


def test_symmetric_4bit_hand_computed_grid_and_saturation():
    q = make_quantizer(4, True, 0.25)
    assert (q.qmin, q.qmax) == (-8, 7)
    x = torch.tensor([-100.0, -2.0, -1.9, -0.3, -0.1, 0.0, 0.13, 0.62, 1.75, 1.9, 100.0])
    # x/s: -400 -8 -7.6 -1.2 -0.4 0 0.52 2.48 7 7.6 400 -> clamp(round) to [-8, 7]
    ints = [-8, -8, -8, -1, 0, 0, 1, 2, 7, 7, 7]
    assert q.to_int(x).tolist() == ints
    assert torch.equal(q(x), torch.tensor(ints, dtype=torch.float32) * 0.25)


@pytest.mark.parametrize("bits, expected", [
    (2, (-2, 1)), (3, (-4, 3)), (4, (-8, 7)), (5, (-16, 15)), (6, (-32, 31)), (7, (-64, 63)), (8, (-128, 127)),
])
def test_symmetric_signed_int_range(bits, expected):
    assert int_range(bits, True) == expected
    assert int_range(bits, False) == (0, 2 ** bits - 1)
    q = make_quantizer(bits, True, 1.0)
    assert (q.qmin, q.qmax) == expected
    # Saturation reaches exactly the ends of the signed grid.
    out = q(torch.tensor([-1e6, 1e6]))
    assert out.tolist() == [float(expected[0]), float(expected[1])]


def test_per_channel_axis0_2d_different_scales():
    w = torch.tensor([[0.3, -0.74, 10.0],
                      [0.26, -0.04, -5.0]])
    q = make_quantizer(4, True, [0.5, 0.1], channel_axis=0)
    # row 0 / 0.5 = [0.6, -1.48, 20] -> [1, -1, 7]; row 1 / 0.1 = [2.6, -0.4, -50] -> [3, 0, -8]
    ints = torch.tensor([[1, -1, 7], [3, 0, -8]])
    assert torch.equal(q.to_int(w), ints.to(torch.int32))
    expected = ints.float() * torch.tensor([[0.5], [0.1]])
    assert torch.equal(q(w), expected)
    # A per-tensor quantizer with either scale would give a different result.
    assert not torch.equal(q(w), make_quantizer(4, True, 0.5)(w))
    assert not torch.equal(q(w), make_quantizer(4, True, 0.1)(w))


def test_per_channel_axis1_2d_matches_transposed_axis0():
    w = torch.tensor([[0.3, -0.74, 10.0],
                      [0.26, -0.04, -5.0]])
    q0 = make_quantizer(4, True, [0.5, 0.1], channel_axis=0)
    q1 = make_quantizer(4, True, [0.5, 0.1], channel_axis=1)
    assert torch.equal(q1(w.t().contiguous()), q0(w).t())


def test_per_channel_asymmetric_axis1_with_zero_points():
    # 3-bit unsigned grid [0, 7]; column 0: s=0.5 z=3, column 1: s=0.25 z=1
    x = torch.tensor([[-2.0, -1.0],
                      [0.6, 0.3],
                      [3.0, 2.0]])
    q = make_quantizer(3, False, [0.5, 0.25], [3.0, 1.0], channel_axis=1)
    # col 0: x/s = [-4, 1.2, 6] -> +3 -> [-1, 4.2, 9] -> round/clamp [0, 4, 7] -> (q-3)*0.5 = [-1.5, 0.5, 2]
    # col 1: x/s = [-4, 1.2, 8] -> +1 -> [-3, 2.2, 9] -> [0, 2, 7] -> (q-1)*0.25 = [-0.25, 0.25, 1.5]
    assert q.to_int(x).tolist() == [[0, 0], [4, 2], [7, 7]]
    assert torch.equal(q(x), torch.tensor([[-1.5, -0.25], [0.5, 0.25], [2.0, 1.5]]))


def test_per_channel_4d_axis0_and_axis1():
    torch.manual_seed(0)
    scales = torch.tensor([0.05, 0.2, 1.0])
    # Weight-like [C_out=3, C_in=2, 2, 2], per output channel.
    w = torch.randn(3, 2, 2, 2)
    qw = make_quantizer(4, True, scales, channel_axis=0)
    ints = torch.clamp(torch.round(w / scales.reshape(3, 1, 1, 1)), -8, 7)
    assert torch.equal(qw(w), ints * scales.reshape(3, 1, 1, 1))
    # Activation-like [N=2, C=3, 2, 2], per axis 1.
    a = torch.randn(2, 3, 2, 2) * 3
    qa = make_quantizer(4, False, scales, [2.0, 5.0, 8.0], channel_axis=1)
    s, z = scales.reshape(1, 3, 1, 1), torch.tensor([2.0, 5.0, 8.0]).reshape(1, 3, 1, 1)
    expected = (torch.clamp(torch.round(a / s) + z, 0, 15) - z) * s
    assert torch.equal(qa(a), expected)
    # Each channel really used its own scale: channel 0 output lies on the 0.05 grid, channel 2 on the 1.0 grid.
    assert torch.equal(qa(a)[:, 2], torch.round(qa(a)[:, 2]))


def test_per_channel_scale_count_mismatch_raises():
    q = make_quantizer(4, True, [0.5, 0.1], channel_axis=0)
    with pytest.raises(ReparqError, match="2 channel scales"):
        q(torch.ones(3, 4))


def test_round_ste_forward_rounds_backward_is_identity():
    x = torch.tensor([-1.5, -0.6, 0.4, 0.5, 1.5, 2.7], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [-2.0, -1.0, 0.0, 0.0, 2.0, 3.0]
    (y * torch.arange(6.0)).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_ste_gradient_wrt_input_is_one_inside_zero_outside():
    q = make_quantizer(4, False, 0.5, 3.0)
    # round(x/s) + z = [-1(low), 2, 4, 5, 14, 23(high)]: first and last are clamped
    x = torch.tensor([-2.0, -0.6, 0.52, 1.0, 5.4, 10.0], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_lsq_gradient_wrt_learnable_scale():
    # One element per channel so the per-channel gradient is the per-element LSQ gradient:
    # inside the range d x_hat / d s = round(x/s) - x/s, clamped low: qmin - z, clamped high: qmax - z.
    q = UniformQuantizer(4, symmetric=False, channel_axis=0)
    q.scale.requires_grad_(True)
    q.set_params(torch.full((5,), 0.5), torch.full((5,), 3.0))
    assert q.scale.requires_grad  # set_params keeps the scale learnable
    x = torch.tensor([[-2.0], [-0.6], [0.26], [1.0], [10.0]])  # x/s = -4(low), -1.2, 0.52, 2, 20(high)
    q(x).sum().backward()
    expected = torch.tensor([0 - 3, -1 - (-1.2), 1 - 0.52, 0.0, 15 - 3])
    torch.testing.assert_close(q.scale.grad, expected, rtol=0, atol=1e-6)
    assert q.scale.grad.abs().sum() > 0


def test_per_tensor_scale_gradient_is_sum_of_elementwise_terms():
    q = make_quantizer(4, False, 0.5, 3.0)
    q.scale.requires_grad_(True)
    x = torch.tensor([-2.0, -0.6, 0.26, 1.0, 10.0])
    q(x).sum().backward()
    assert q.scale.grad.item() == pytest.approx(-3 + 0.2 + 0.48 + 0.0 + 12, abs=1e-5)


def test_disabled_quantizer_passes_through():
    q = make_quantizer(4, False, 0.5, 3.0)
    x = torch.tensor([0.1234, -7.0, 42.0])
    assert not torch.equal(q(x), x)
    q.enabled = False
    assert torch.equal(q(x), x)


def test_bits16_passes_through_even_uninitialized():
    q = UniformQuantizer(16)
    assert q.is_float
    x = torch.tensor([0.1234, -7.0, 42.0])
    assert torch.equal(q(x), x)


def test_uninitialized_quantizer_refuses_to_run():
    with pytest.raises(RuntimeError, match="calibration"):
        UniformQuantizer(8)(torch.ones(2))


@pytest.mark.parametrize("bits", [1, 9, 2.5, 0, -4, True, "8"])
def test_bad_bits_raise(bits):
    with pytest.raises(ReparqError, match="2..8"):
        UniformQuantizer(bits)
    with pytest.raises(ReparqError):
        check_bits(bits)


@pytest.mark.parametrize("scale", [0.0, -0.5, float("inf"), float("nan")])
def test_set_params_rejects_bad_scale(scale):
    q = UniformQuantizer(8, symmetric=False)
    with pytest.raises(ReparqError, match="positive"):
        q.set_params(torch.tensor([0.5, scale]), torch.zeros(2))
    assert not q.initialized


def test_set_params_rejects_nonzero_zero_point_for_symmetric():
    q = UniformQuantizer(8, symmetric=True)
    with pytest.raises(ReparqError, match="zero_point"):
        q.set_params(torch.tensor(0.5), torch.tensor(1.0))
    q.set_params(torch.tensor(0.5), torch.tensor(0.0))  # zero is fine
    assert q.initialized


def test_set_params_rounds_zero_point_to_integer():
    q = make_quantizer(8, False, 0.5, 3.4)
    assert q.zero_point.tolist() == [3.0]


@pytest.mark.parametrize("symmetric, axis", [(False, None), (True, None), (True, 0), (False, 1)])
def test_to_int_dequantizes_to_forward(symmetric, axis):
    torch.manual_seed(1)
    x = torch.randn(4, 3, 2, 2) * 4
    n = 1 if axis is None else x.shape[axis]
    scale = torch.rand(n) * 0.2 + 0.05
    zp = None if symmetric else torch.randint(0, 16, (n,)).float()
    q = UniformQuantizer(4, symmetric=symmetric, channel_axis=axis)
    q.set_params(scale, zp)
    ints = q.to_int(x)
    assert ints.dtype == torch.int32
    assert int(ints.min()) >= q.qmin and int(ints.max()) <= q.qmax
    assert int(ints.min()) == q.qmin and int(ints.max()) == q.qmax  # data this wide saturates both ends
    s, z = q.shaped_params(x)
    assert torch.equal((ints.float() - z) * s, q(x))
