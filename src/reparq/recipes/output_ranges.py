"""Output ranges of the quantized convolutions, recorded once the recipe is done, for deployment.

Why: ONNX Runtime runs a convolution on integers (``QLinearConv``) only when its output is
quantized again. Inside a network the next layer's input quantizer does that; the last conv
before a pooling layer (RepVGG's and MobileOne's final stage, a ViT's patch embedding feeding
the position-embedding add) has no such consumer, so it would run in float at full size. The
export requantizes such outputs (``reparq.deploy.onnx_passes.requantize_unfused_convs``) and
needs their range; the fake-quant model itself never uses it. Kept in ``reparq_info.extra`` so
that it is saved and loaded with the model.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from reparq.nn.qmodules import QConv2d, quantized_layers
from reparq.recipes.calibrate import batch_samples, forward_batch

# Enough samples for a stable min/max of post-ReLU feature maps; more only costs time.
MAX_SAMPLES = 256


@torch.no_grad()
def record_output_ranges(model: nn.Module, batches: Sequence[Any], max_samples: int = MAX_SAMPLES
                         ) -> dict[str, list[float]]:
    """``{conv name: [min, max]}`` of each quantized conv's output over the first calibration samples."""
    convs = [(name, layer) for name, layer in quantized_layers(model) if isinstance(layer, QConv2d)]
    if not convs or not batches:
        return {}
    ranges: dict[str, list[float]] = {}

    def hook(name: str):
        def record(_module, _inputs, out):
            lo, hi = float(out.min()), float(out.max())
            old = ranges.get(name)
            ranges[name] = [lo, hi] if old is None else [min(old[0], lo), max(old[1], hi)]
        return record

    handles = [layer.register_forward_hook(hook(name)) for name, layer in convs]
    was_training = model.training
    model.eval()
    try:
        seen = 0
        for batch in batches:
            if seen >= max_samples:
                break
            forward_batch(model, batch)
            seen += batch_samples(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return ranges
