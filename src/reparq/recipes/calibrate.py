"""Passes that set quantization ranges from data (activations) or from the weights themselves."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from reparq.config import QuantConfig
from reparq.nn.qmodules import quantized_layers
from reparq.progress import SILENT, Reporter
from reparq.quant.observer import ActivationObserver
from reparq.quant.ranges import estimate_params


@torch.no_grad()
def init_weight_ranges(model: nn.Module, config: QuantConfig) -> None:
    """Per-output-channel (or per-tensor) weight ranges with the configured estimator.

    ``percentile`` makes no sense for a few hundred weights per channel, so it uses minmax for
    weights (the percentile baseline clips activations only).
    """
    estimator = "minmax" if config.w_estimator == "percentile" else config.w_estimator
    for _, layer in quantized_layers(model):
        wq = layer.weight_quantizer
        if wq.is_float:
            continue
        scale, zp = estimate_params(layer.weight, estimator, wq.bits, wq.symmetric, wq.channel_axis, narrow=wq.narrow)
        wq.set_params(scale, zp)


def set_quant_enabled(model: nn.Module, weights: bool, inputs: bool) -> None:
    for _, layer in quantized_layers(model):
        layer.set_quant_enabled(weights, inputs)


@torch.no_grad()
def init_activation_ranges(model: nn.Module, batches: Iterable[torch.Tensor], config: QuantConfig,
                           seed: int = 0, reporter: Reporter = SILENT) -> None:
    """Observe every layer input on the float model over the calibration batches, then pick ranges."""
    layers = [(n, l) for n, l in quantized_layers(model) if not l.input_quantizer.is_float]
    observers = {n: ActivationObserver(config.observer_samples, seed=seed + i) for i, (n, _) in enumerate(layers)}
    hooks = [layer.register_forward_pre_hook(lambda m, args, n=n: observers[n].update(args[0]))
             for n, layer in layers]
    set_quant_enabled(model, weights=False, inputs=False)
    batches = list(batches)
    reporter.stage("observe activations", total=len(batches))
    try:
        for batch in batches:
            model(batch)
            reporter.advance(1)
    finally:
        for h in hooks:
            h.remove()
    for name, layer in layers:
        aq = layer.input_quantizer
        scale, zp = observers[name].params(config.a_estimator, aq.bits, aq.symmetric, config.percentile)
        aq.set_params(scale, zp)
    set_quant_enabled(model, weights=True, inputs=True)
