"""Per attention module, the grid for the softmax probabilities: log-sqrt2 or uniform.

A log grid is fine where attention is diffuse (most probabilities small, as in the zoo ViTs): it
spends its levels on the small values. Where attention concentrates (a causal LM's heads that
put most of the mass on one token), the large probabilities land half an octave apart, e.g. 0.85
becomes 0.71 or 1.0, and that costs more than a uniform grid's even steps. ``probs="auto"``
measures both on the calibration data and keeps the one with the smaller squared error per
module. Both deploy: log2 with parity as shifts, uniform as an integer matmul.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from reparq.nn.attention import matmul_quantizers
from reparq.quant.log import LogQuantizer
from reparq.quant.ranges import estimate_params
from reparq.quant.uniform import UniformQuantizer
from reparq.recipes.calibrate import float_pass
from reparq.recipes.reconstruct import module_device


@torch.no_grad()
def observe_probabilities(model: nn.Module, batches, max_samples: int = 1 << 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """A seeded subsample of every adapted attention's probabilities on the float model."""
    gen = torch.Generator().manual_seed(seed)
    per_batch = max(1, math.ceil(max_samples / max(1, len(batches))))
    samples: dict[str, list[torch.Tensor]] = {}

    def keep(name: str, probs: torch.Tensor) -> None:
        flat = probs.detach().float().reshape(-1).cpu()
        if flat.numel() > per_batch:
            flat = flat[torch.randint(flat.numel(), (per_batch,), generator=gen)]
        samples.setdefault(name, []).append(flat)

    handles = [mq.probs.register_forward_pre_hook(lambda m, a, n=name: keep(n, a[0]))
               for name, mq in matmul_quantizers(model)]
    float_pass(model, batches, handles)
    return {n: torch.cat(s)[:max_samples] for n, s in samples.items()}


def _error(quantizer: nn.Module, x: torch.Tensor) -> float:
    """Squared error of ``quantizer`` on the (CPU-held) samples, computed where the quantizer lives."""
    enabled = quantizer.enabled
    quantizer.enabled = True
    x = x.to(module_device(quantizer))
    try:
        return float((quantizer(x) - x).pow(2).mean())
    finally:
        quantizer.enabled = enabled


@torch.no_grad()
def choose_probability_grids(model: nn.Module, batches, seed: int = 0) -> dict[str, str]:
    """Swap each log-sqrt2 probabilities quantizer for a uniform one (MSE range) where the uniform
    grid has the smaller squared error on the calibration probabilities. Returns name -> choice."""
    samples = observe_probabilities(model, batches, seed=seed)
    choices = {}
    for name, mq in matmul_quantizers(model):
        if not isinstance(mq.probs, LogQuantizer) or name not in samples:
            continue
        x = samples[name]
        uniform = UniformQuantizer(mq.probs.bits, symmetric=False)
        uniform.set_params(*estimate_params(x, "mse", uniform.bits, symmetric=False))
        uniform.enabled = mq.probs.enabled
        if _error(uniform, x) < _error(mq.probs, x):
            mq.probs = uniform
            choices[name] = "uniform"
        else:
            choices[name] = mq.probs.base
    return choices


__all__ = ["choose_probability_grids", "observe_probabilities"]
