"""Quantized Conv2d / Linear: the float module plus a weight and an input-activation quantizer.

They subclass the float classes, so code that inspects ``isinstance(m, nn.Conv2d)`` (timm's
feature helpers, our own passes) keeps working on a quantized model.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from reparq.errors import ReparqError
from reparq.quant.uniform import UniformQuantizer


class QuantizedLayer:
    """Mixin: the two quantizers every quantized layer carries, and construction from a float layer."""

    weight_quantizer: UniformQuantizer
    input_quantizer: UniformQuantizer

    @classmethod
    def from_float(cls, layer: nn.Module, w_bits: int, a_bits: int, w_per_channel: bool = True,
                   w_group_size: int | None = None):
        """Wrap ``layer``'s own parameters (shared, not copied) with fresh quantizers.

        ``w_group_size`` applies to Linear layers only (groups of input columns); a Conv2d keeps
        one scale per output channel."""
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        q.__dict__.update({k: v for k, v in layer.__dict__.items() if not k.startswith("_")})
        q._parameters = dict(layer._parameters)
        q._buffers = dict(layer._buffers)
        # Weights: symmetric signed grid, per output channel (axis 0 for both Conv2d and Linear).
        group = w_group_size if isinstance(layer, nn.Linear) and w_per_channel else None
        if group is not None and layer.in_features % group:
            raise ReparqError(f"w_group_size={group} does not divide the {layer.in_features} input features of a "
                              f"{type(layer).__name__}; choose a divisor (e.g. 32, 64 or 128) or leave that layer "
                              f"per channel with ignore/overrides")
        q.weight_quantizer = UniformQuantizer(w_bits, symmetric=True, channel_axis=0 if w_per_channel else None,
                                              group_size=group)
        # Activations: asymmetric unsigned grid with an integer zero-point, per tensor.
        q.input_quantizer = UniformQuantizer(a_bits, symmetric=False, channel_axis=None)
        return q

    def quantized_weight(self) -> torch.Tensor:
        # While a reconstruction learns rounding, the AdaRound state decides up/down per weight.
        rounding = self.__dict__.get("_rounding")
        if rounding is not None and self.weight_quantizer.enabled and not self.weight_quantizer.is_float:
            return rounding(self.weight)
        return self.weight_quantizer(self.weight)

    def set_quant_enabled(self, weights: bool, inputs: bool) -> None:
        self.weight_quantizer.enabled = weights
        self.input_quantizer.enabled = inputs

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        # A consumer-side fold's per-channel multiply-add (postnorm.fold_at_consumers), if any.
        affine = self._modules.get("input_affine")
        return x if affine is None else affine(x)

    def input_bias(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The bias to use with ``weight`` (the quantized one): an input affine's offset ``add``
        enters the product, so ``weight @ add`` is taken off here, with the weight that actually
        multiplies it. A bias corrected once with the float weight would leave ``(W_q - W) @ add``
        behind, which large offsets turn into a large error at 4-6 bit weights; an integer kernel
        removes the same term through its zero-point correction."""
        affine = self._modules.get("input_affine")
        if affine is None:
            return self.bias
        correction = F.linear(affine.add.to(weight.dtype), weight)
        return -correction if self.bias is None else self.bias - correction

    def _output(self, y: torch.Tensor) -> torch.Tensor:
        # QPRep's per-channel affine, present only between calibration and its fold.
        affine = self._modules.get("output_affine")
        return y if affine is None else affine(y)


class QConv2d(QuantizedLayer, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_quantizer(self._input(x))
        return self._output(self._conv_forward(x, self.quantized_weight(), self.bias))


class QLinear(QuantizedLayer, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.quantized_weight()
        return self._output(F.linear(self.input_quantizer(self._input(x)), weight, self.input_bias(weight)))


class InputAffine(nn.Module):
    """``x * mul + add`` over the last axis, in front of a Linear's input quantizer: where a
    per-channel input range was folded into a layer-wise one and no upstream op could take the
    per-channel division (the norm also feeds the residual; fc2 reads a nonlinearity). The layer
    takes ``W_q @ add`` off its bias (:meth:`QuantizedLayer.input_bias`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mul", torch.ones(channels))
        self.register_buffer("add", torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mul + self.add


def attach_input_affine(layer: "QuantizedLayer", mul: torch.Tensor, add: torch.Tensor) -> InputAffine:
    """Give ``layer`` an input affine, composed with one it already has (so a second fold stays exact)."""
    if not isinstance(layer, nn.Linear):
        raise TypeError("an input affine needs a Linear consumer (channels on the last axis), "
                        f"got {type(layer).__name__}")
    old = layer._modules.get("input_affine")
    if old is not None:  # (x * m0 + a0) * m + a
        mul, add = old.mul * mul, old.add * mul + add
    affine = InputAffine(mul.numel()).to(device=mul.device, dtype=mul.dtype)
    affine.mul.copy_(mul)
    affine.add.copy_(add)
    layer.input_affine = affine
    return affine


QUANTIZED_TYPES: dict[type, type] = {nn.Conv2d: QConv2d, nn.Linear: QLinear}


def quantized_layers(model: nn.Module) -> list[tuple[str, QuantizedLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLayer)]


def parameter_names(model: nn.Module) -> dict[int, list[str]]:
    """Every name of each parameter, by the parameter's id: a tied parameter has several."""
    names: dict[int, list[str]] = {}
    for key, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(key)
    return names


@torch.no_grad()
def bake_shared_weights(model: nn.Module) -> list[str]:
    """Replace the float weight of every quantized layer that shares it with another module (a
    decoder's output layer tied to its input embedding) by its quantized value; returns their names.

    A saved model stores that matrix once, as the layer's integers (:func:`reparq.deploy.serialize.export_state`),
    so after :func:`reparq.load` the embedding reads the quantized matrix. Left float in memory, the embedding would read the
    float one, and the model measured after quantization would not be the model that is loaded
    (zoo opt_fm, repqvit W4A8: logits apart by up to 1.4). Reconstruction already leaves such a
    weight at its quantized value; quantizing a quantized weight again gives it back exactly."""
    names = parameter_names(model)
    baked = []
    for name, layer in quantized_layers(model):
        wq = layer.weight_quantizer
        if len(names.get(id(layer.weight), ())) > 1 and wq.enabled and not wq.is_float and wq.initialized:
            layer.weight.copy_(layer.quantized_weight())
            baked.append(name)
    return baked
