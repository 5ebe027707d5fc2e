"""LogQuantizer (log2 and log-sqrt2) for attention probabilities: exact codes and levels."""

from __future__ import annotations

import math

import pytest
import torch

from reparq.errors import ReparqError
from reparq.quant.log import LogQuantizer


def test_log2_hand_computed_codes_and_outputs():
    q = LogQuantizer(bits=4, base="log2")  # k = 1, codes 0..15, levels 2^0 .. 2^-15
    assert q.k == 1 and q.qmax == 15
    a = torch.tensor([1.0, 0.5, 0.25, 0.3, 0.75, 0.7, 2.0 ** -15, 2.0 ** -15.4, 2.0 ** -15.6, 2.0 ** -20, 0.0])
    # -log2(a) = 0, 1, 2, 1.737, 0.415, 0.515, 15, 15.4, 15.6 (-> 16 > qmax: flushed), 20 (flushed), zero (flushed)
    codes, keep = q.codes(a)
    assert codes.tolist() == [0, 1, 2, 2, 0, 1, 15, 15, 15, 15, 15]
    assert keep.tolist() == [True] * 8 + [False] * 3
    out = q(a)
    expected = [1.0, 0.5, 0.25, 0.25, 1.0, 0.5, 2.0 ** -15, 2.0 ** -15, 0.0, 0.0, 0.0]
    assert out.tolist() == expected  # powers of two are exact


def test_logsqrt2_hand_computed_codes_and_outputs():
    q = LogQuantizer(bits=3, base="logsqrt2")  # k = 2, codes 0..7, levels 2^(-q/2) down to 2^-3.5
    assert q.k == 2 and q.qmax == 7
    a = torch.tensor([1.0, 0.3536, 0.5, 0.25, 0.6, 2.0 ** -3.5, 2.0 ** -3.7, 2.0 ** -3.8, 0.0])
    # -2*log2(a) = 0, 2.9995, 2, 4, 1.47, 7, 7.4, 7.6 (-> 8 > qmax: flushed), zero (flushed)
    codes, keep = q.codes(a)
    assert codes.tolist() == [0, 3, 2, 4, 1, 7, 7, 7, 7]
    assert keep.tolist() == [True] * 7 + [False] * 2
    out = q(a)
    expected = [1.0, 2 ** -1.5, 0.5, 0.25, 2 ** -0.5, 2 ** -3.5, 2 ** -3.5, 0.0, 0.0]
    torch.testing.assert_close(out, torch.tensor(expected), rtol=1e-6, atol=0)
    # Even codes are exact powers of two.
    assert out[[0, 2, 3]].tolist() == [1.0, 0.5, 0.25]
    assert out[-2:].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("base, k", [("log2", 1), ("logsqrt2", 2)])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_outputs_are_levels_or_zero_and_never_exceed_scale(base, k, bits):
    torch.manual_seed(0)
    q = LogQuantizer(bits=bits, base=base)
    logits = torch.randn(4, 16, 16) * 4
    a = torch.cat([logits.softmax(-1).reshape(-1), torch.tensor([0.0, 1.0, 1e-30, 1.3])])
    out = q(a)
    assert float(out.max()) <= 1.0 and float(out.min()) >= 0.0
    assert out[-1].item() == 1.0  # a value above the scale saturates at the scale
    kept = out > 0
    # Every surviving output is 2^(-c/k) for an integer code c in [0, qmax].
    codes = -k * torch.log2(out[kept].double())
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert int(codes.round().min()) >= 0 and int(codes.round().max()) <= q.qmax
    # Rounding happens in the log domain: at most half a level away from the input.
    ratio = torch.log2(out[kept].double() / a[kept].double()).abs()
    in_range = a[kept] <= 1.0
    assert float(ratio[in_range].max()) <= 0.5 / k + 1e-6
    # Zero stays zero; values below half a level under the smallest one are exactly 0.
    smallest = 2.0 ** (-q.qmax / k)
    assert out[a == 0].eq(0).all()
    below = a < smallest * 2 ** (-0.5 / k) * 0.999
    assert out[below].eq(0).all()
    if bits < 8:  # at 8 bits the smallest level is below float32's range, so nothing is flushed
        assert below.any()
    above = a > smallest * 2 ** (-0.5 / k) * 1.001
    assert out[above].gt(0).all()


def test_straight_through_gradient_and_passthrough():
    q = LogQuantizer(bits=4, base="log2")
    a = torch.tensor([0.3, 0.6, 0.0], requires_grad=True)
    (q(a) * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert a.grad.tolist() == [1.0, 2.0, 3.0]
    x = torch.tensor([0.3, 0.6])
    q.enabled = False
    assert torch.equal(q(x), x)
    assert torch.equal(LogQuantizer(bits=16)(x), x)


def test_bad_base_and_bits_raise():
    with pytest.raises(ValueError, match="unknown log quantizer base"):
        LogQuantizer(bits=4, base="log10")
    with pytest.raises(ReparqError):
        LogQuantizer(bits=9)


def test_levels_double_per_octave_for_sqrt2():
    # log-sqrt2 at b bits covers the same dynamic range as log2 at b-1 bits, with twice the resolution.
    q2, qs = LogQuantizer(bits=4, base="log2"), LogQuantizer(bits=5, base="logsqrt2")
    assert 2.0 ** (-q2.qmax / q2.k) == pytest.approx(2.0 ** -15)
    assert 2.0 ** (-qs.qmax / qs.k) == pytest.approx(2.0 ** -15.5)
    a = torch.tensor([2 ** -0.5])
    assert q2(a).item() in (1.0, 0.5)
    assert qs(a).item() == pytest.approx(math.sqrt(0.5), rel=1e-6)
