"""QPRep: the per-channel affine after a quantized layer folds away exactly (negative gains too)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from reparq.config import QuantConfig
from reparq.model.qprep import attach_qprep, fold_qprep
from reparq.nn.qmodules import QConv2d, QLinear
from reparq.recipes.calibrate import init_weight_ranges
from reparq.quant.ranges import params_from_range


def _layer(kind: str, bits: int) -> nn.Module:
    torch.manual_seed(0)
    if kind == "conv":
        return QConv2d.from_float(nn.Conv2d(4, 6, 3, padding=1), bits, bits)
    return QLinear.from_float(nn.Linear(5, 6), bits, bits)


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("bits", [4, 8])
def test_fold_equals_unfolded_output_with_negative_gains(kind, bits):
    layer = _layer(kind, bits)
    affine = attach_qprep(layer)
    holder = nn.Sequential(layer)
    init_weight_ranges(holder, QuantConfig(w_bits=bits, a_bits=bits, w_estimator="mse"))
    x = torch.randn(3, 4, 5, 5) if kind == "conv" else torch.randn(7, 5)
    lo, hi = x.min().reshape(1), x.max().reshape(1)
    layer.input_quantizer.set_params(*params_from_range(lo, hi, bits, symmetric=False))
    with torch.no_grad():
        affine.gamma.copy_(torch.tensor([1.5, -0.7, 0.2, -2.0, 1.0, 0.9]))
        affine.beta.copy_(torch.randn(6))
    ints_before = layer.weight_quantizer.to_int(layer.quantized_weight())
    with torch.no_grad():
        before = layer(x)
    fold_qprep(layer)
    assert "output_affine" not in layer._modules  # the deployed graph has no extra op
    with torch.no_grad():
        after = layer(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    ints_after = layer.weight_quantizer.to_int(layer.quantized_weight())
    sign = torch.tensor([1, -1, 1, -1, 1, 1]).reshape([-1] + [1] * (ints_before.ndim - 1))
    assert torch.equal(ints_after, ints_before * sign)  # negative gain = negated integers, same grid
    wq = layer.weight_quantizer
    assert ints_after.min() >= wq.qmin and ints_after.max() <= wq.qmax


def test_qprep_uses_the_narrow_grid():
    layer = _layer("conv", 4)
    attach_qprep(layer)
    assert (layer.weight_quantizer.qmin, layer.weight_quantizer.qmax) == (-7, 7)
