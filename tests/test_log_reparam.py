"""log-sqrt2 -> log2 with parity: the two-accumulation ``probs @ V`` equals the log-sqrt2 fake-quant
product to float tolerance, and the converted attention computes the same model output."""

from __future__ import annotations

import math

import pytest
import torch

import reparq
from reparq.nn.attention import matmul_quantizers
from reparq.quant.log import LogQuantizer
from reparq.quant.log_reparam import (SQRT2, Log2ParityQuantizer, convert_logsqrt2_to_log2, shift_and_parity,
                                      two_accumulation_matmul)
from reparq.quant.uniform import UniformQuantizer
from tests.test_attention_adapters import tiny_swin, tiny_vit


def test_shift_and_parity_hand_computed():
    shift, odd = shift_and_parity(torch.tensor([0, 1, 2, 3, 4, 5, 14, 15]))
    assert shift.tolist() == [0, 1, 1, 2, 2, 3, 7, 8]
    assert odd.tolist() == [False, True, False, True, False, True, False, True]
    # 2^(-q/2) == 2^(-ceil(q/2)) * (sqrt2 if odd): the identity the deployed form rests on.
    for q in range(16):
        s, o = (q + 1) // 2, q % 2 == 1
        assert 2 ** (-q / 2) == pytest.approx(2.0 ** -s * (SQRT2 if o else 1.0), rel=1e-15)


@pytest.mark.parametrize("bits", [3, 4, 6, 8])
def test_two_accumulations_equal_logsqrt2_fake_quant_matmul(bits):
    torch.manual_seed(bits)
    probs = torch.softmax(torch.randn(2, 3, 49, 49) * 3, dim=-1)  # power-law-ish, many tiny entries
    vq = UniformQuantizer(bits, symmetric=False)
    v = torch.randn(2, 3, 49, 16)
    vq.set_params(torch.tensor([(v.max() - v.min()).item() / (2 ** bits - 1)]), torch.tensor([2 ** (bits - 1)]))
    v_hat = vq(v)
    lq = LogQuantizer(bits, "logsqrt2")
    lq.scale.fill_(0.8)  # a searched top value other than 1 folds into the output scale too
    expected = lq(probs) @ v_hat
    codes, keep = lq.codes(probs)
    shift, odd = shift_and_parity(codes.long())
    got = two_accumulation_matmul(shift, odd, keep, v_hat, lq.scale)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # The kernel sees shifts only: integers in [0, ceil(qmax / 2)], one parity bit each.
    assert shift.dtype == torch.long and int(shift.max()) <= math.ceil(lq.qmax / 2) and int(shift.min()) >= 0
    # Some entries of each parity and some flushed to zero, so every branch of the sum is exercised.
    assert bool(odd[keep].any()) and bool((~odd[keep]).any())
    if bits <= 4:
        assert bool((~keep).any())
    # The converted module does the same, through its forward (dequantized values) and its matmul.
    conv = Log2ParityQuantizer(lq)
    torch.testing.assert_close(conv(probs), lq(probs), rtol=1e-6, atol=0)
    torch.testing.assert_close(conv.matmul(probs, v_hat), expected, rtol=1e-5, atol=1e-6)


def test_converted_matmul_passes_gradient_to_probs_straight_through():
    lq = LogQuantizer(4, "logsqrt2")
    conv = Log2ParityQuantizer(lq)
    probs = torch.softmax(torch.randn(5, 7), dim=-1).requires_grad_(True)
    v = torch.randn(7, 3, requires_grad=True)
    conv.matmul(probs, v).sum().backward()
    torch.testing.assert_close(probs.grad, v.detach().sum(1).expand(5, 7))
    torch.testing.assert_close(v.grad, conv(probs.detach()).sum(0)[:, None].expand(7, 3))


@pytest.mark.parametrize("build", [tiny_vit, tiny_swin])
def test_conversion_keeps_model_output(build):
    model = build()
    x = torch.randn(32, 1, 16, 16)
    q = reparq.quantize(model, x, recipe="repqvit", w_bits=4, a_bits=4, to_log2=False)
    before = q(x)
    assert all(isinstance(mq.probs, LogQuantizer) and mq.probs.base == "logsqrt2" for _, mq in matmul_quantizers(q))
    n = convert_logsqrt2_to_log2(q)
    assert n == len(matmul_quantizers(q)) > 0
    assert all(isinstance(mq.probs, Log2ParityQuantizer) for _, mq in matmul_quantizers(q))
    calls = []
    for _, mq in matmul_quantizers(q):  # the adapters run the two-accumulation kernel
        orig = mq.probs.matmul
        mq.probs.matmul = lambda a, v, orig=orig: calls.append(1) or orig(a, v)
    after = q(x)
    assert len(calls) == n
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    # repqvit converts by default.
    q2 = reparq.quantize(model, x, recipe="repqvit", w_bits=4, a_bits=4)
    assert all(isinstance(mq.probs, Log2ParityQuantizer) for _, mq in matmul_quantizers(q2))
    torch.testing.assert_close(q2(x), before, rtol=1e-4, atol=1e-5)


def test_only_logsqrt2_converts():
    with pytest.raises(ValueError, match="log-sqrt2"):
        Log2ParityQuantizer(LogQuantizer(4, "log2"))
