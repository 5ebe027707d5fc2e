"""Quantized modules."""

from reparq.nn.qmodules import QConv2d, QLinear, QuantizedLayer, quantized_layers

__all__ = ["QConv2d", "QLinear", "QuantizedLayer", "quantized_layers"]
