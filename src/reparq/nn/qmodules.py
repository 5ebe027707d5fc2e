"""Quantized Conv2d / Linear: the float module plus a weight and an input-activation quantizer.

They subclass the float classes, so code that inspects ``isinstance(m, nn.Conv2d)`` (timm's
feature helpers, our own passes) keeps working on a quantized model.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from reparq.quant.uniform import UniformQuantizer


class QuantizedLayer:
    """Mixin: the two quantizers every quantized layer carries."""

    weight_quantizer: UniformQuantizer
    input_quantizer: UniformQuantizer

    def quantized_weight(self) -> torch.Tensor:
        # While a reconstruction learns rounding, the AdaRound state decides up/down per weight.
        rounding = self.__dict__.get("_rounding")
        if rounding is not None and self.weight_quantizer.enabled and not self.weight_quantizer.is_float:
            return rounding(self.weight)
        return self.weight_quantizer(self.weight)

    def set_quant_enabled(self, weights: bool, inputs: bool) -> None:
        self.weight_quantizer.enabled = weights
        self.input_quantizer.enabled = inputs


def _make_quantizers(layer: nn.Module, w_bits: int, a_bits: int, w_per_channel: bool) -> None:
    # Weights: symmetric signed grid, per output channel (axis 0 for both Conv2d and Linear).
    layer.weight_quantizer = UniformQuantizer(w_bits, symmetric=True, channel_axis=0 if w_per_channel else None)
    # Activations: asymmetric unsigned grid with an integer zero-point, per tensor.
    layer.input_quantizer = UniformQuantizer(a_bits, symmetric=False, channel_axis=None)


class QConv2d(nn.Conv2d, QuantizedLayer):
    @classmethod
    def from_float(cls, conv: nn.Conv2d, w_bits: int, a_bits: int, w_per_channel: bool = True) -> "QConv2d":
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        q.__dict__.update({k: v for k, v in conv.__dict__.items() if not k.startswith("_")})
        q._parameters = dict(conv._parameters)
        q._buffers = dict(conv._buffers)
        _make_quantizers(q, w_bits, a_bits, w_per_channel)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quantizer(x), self.quantized_weight(), self.bias)


class QLinear(nn.Linear, QuantizedLayer):
    @classmethod
    def from_float(cls, linear: nn.Linear, w_bits: int, a_bits: int, w_per_channel: bool = True) -> "QLinear":
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        q.__dict__.update({k: v for k, v in linear.__dict__.items() if not k.startswith("_")})
        q._parameters = dict(linear._parameters)
        q._buffers = dict(linear._buffers)
        _make_quantizers(q, w_bits, a_bits, w_per_channel)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quantizer(x), self.quantized_weight(), self.bias)


QUANTIZED_TYPES: dict[type, type] = {nn.Conv2d: QConv2d, nn.Linear: QLinear}


def quantized_layers(model: nn.Module) -> list[tuple[str, QuantizedLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLayer)]
