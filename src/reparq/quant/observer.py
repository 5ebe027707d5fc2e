"""Activation observer: collects what calibration batches show an activation quantizer.

It keeps the exact running min/max and a seeded uniform subsample of values (reservoir-style,
bounded memory), from which any estimator in :mod:`reparq.quant.ranges` can pick a range.
"""

from __future__ import annotations

import torch

from reparq.quant.ranges import estimate_params, params_from_range


class ActivationObserver:
    def __init__(self, max_samples: int = 1 << 18, seed: int = 0) -> None:
        self.max_samples = max_samples
        self.gen = torch.Generator().manual_seed(seed)
        self.min = torch.tensor(float("inf"))
        self.max = torch.tensor(float("-inf"))
        self.samples = torch.empty(0)
        self.seen = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().float().reshape(-1).cpu()  # statistics live on the CPU whatever device the model runs on
        if not bool(torch.isfinite(flat).all()):
            raise FloatingPointError("non-finite activation observed during calibration")
        self.min = torch.minimum(self.min, flat.min())
        self.max = torch.maximum(self.max, flat.max())
        self.seen += flat.numel()
        pool = torch.cat([self.samples, flat])
        if pool.numel() > self.max_samples:
            # Keep each value seen so far with equal probability: weight new values by batch share.
            keep_old = round(self.max_samples * (self.seen - flat.numel()) / self.seen)
            old = self.samples[torch.randperm(self.samples.numel(), generator=self.gen, device="cpu").to(pool.device)[:keep_old]]
            new = flat[torch.randperm(flat.numel(), generator=self.gen, device="cpu").to(pool.device)[:self.max_samples - keep_old]]
            pool = torch.cat([old, new])
        self.samples = pool

    def params(self, estimator: str, bits: int, symmetric: bool, percentile: float = 99.99):
        if self.seen == 0:
            raise RuntimeError("observer saw no data: the layer never ran during calibration")
        if estimator == "minmax":
            return params_from_range(self.min.reshape(1), self.max.reshape(1), bits, symmetric)
        # Make sure the search sees the true extremes, not only the subsample's.
        data = torch.cat([self.samples, self.min.reshape(1), self.max.reshape(1)])
        return estimate_params(data, estimator, bits, symmetric, None, percentile)
