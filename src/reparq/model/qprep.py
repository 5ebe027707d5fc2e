"""Quantization Protecting Reparameterization (RepAPQ): a learnable per-channel affine after a
merged, quantized layer, folded away exactly for deployment.

During calibration ``y = gamma * layer_q(x) + beta`` (gamma=1, beta=0 at start) gives each
output channel back the freedom that branch merging took away. Folding it is exact because the
weight quantizer is per output channel and symmetric: ``gamma_c * s_c * W_int_c`` equals
``(|gamma_c| s_c) * (sign(gamma_c) W_int_c)``, i.e. a new scale and, where gamma is negative,
negated integers. Negation stays on the grid only if the grid is symmetric, so QPRep layers use
the narrow signed range ``[-(2^(b-1)-1), 2^(b-1)-1]``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from reparq.errors import ReparqError
from reparq.nn.qmodules import QuantizedLayer

_MIN_GAIN = 1e-6  # a gain of exactly zero would need a zero scale; clamp it to a tiny one


class ChannelAffine(nn.Module):
    """``gamma * x + beta`` along the channel axis (1 for conv outputs, -1 for linear outputs)."""

    def __init__(self, channels: int, axis: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))
        self.axis = axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.ndim
        shape[self.axis] = -1
        return x * self.gamma.reshape(shape) + self.beta.reshape(shape)


def attach_qprep(layer: QuantizedLayer) -> ChannelAffine:
    """Add the affine and switch the weight grid to narrow range (call before weight ranges are set)."""
    wq = layer.weight_quantizer
    if not wq.symmetric or wq.channel_axis != 0:
        raise ReparqError("QPRep needs a symmetric per-output-channel weight quantizer")
    if wq.group_size is not None:
        raise ReparqError("QPRep folds one gain per output channel into the weight scale; it does not take "
                          "grouped weight scales (w_group_size): quantize this layer per channel")
    wq.narrow = True
    affine = ChannelAffine(layer.weight.shape[0], axis=1 if isinstance(layer, nn.Conv2d) else -1)
    layer.output_affine = affine
    return affine


@torch.no_grad()
def fold_qprep(layer: QuantizedLayer) -> None:
    """Fold the affine into the weight scale, the integer weights' signs and the bias; remove it."""
    affine = getattr(layer, "output_affine", None)
    if affine is None:
        return
    wq = layer.weight_quantizer
    ints = wq.to_int(layer.quantized_weight()).float()  # the integers deployment will hold
    gamma = affine.gamma.detach()
    gain = gamma.abs().clamp_min(_MIN_GAIN)
    sign = torch.where(gamma < 0, -1.0, 1.0)
    shape = [-1] + [1] * (layer.weight.ndim - 1)
    new_scale = wq.scale.detach() * gain
    wq.set_params(new_scale, torch.zeros_like(new_scale))
    layer.weight.copy_(ints * sign.reshape(shape) * new_scale.reshape(shape))
    bias = layer.bias.detach() if layer.bias is not None else torch.zeros_like(gamma)
    layer.bias = nn.Parameter(gamma * bias + affine.beta.detach())
    del layer.output_affine
