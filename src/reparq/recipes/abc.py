"""Across-block Calibration (RepAPQ): the loss of block k also measures the error at the output of
its *stage* (the blocks sharing a resolution), obtained by running the rest of the stage on block
k's output: ``L = E(block_k out) + lambda * E(stage out)``.

Our reading (DESIGN.md 2.3, marked there as ours): the tail of the stage runs in full precision by
default; ``quantized_tail=True`` runs it with its current quantizers instead (blocks not yet
calibrated hold their initial ranges). The stage target is the float model's stage output.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from reparq.model.blocks import Unit
from reparq.recipes.cache import TensorCache
from reparq.recipes.reconstruct import _first, lp_loss, unit_layers


def stage_tail(unit: Unit, k: int, ordered: list[Unit]) -> list[Unit]:
    """The units after ``ordered[k]`` in the same stage, up to the first one outside it."""
    tail = []
    if not unit.stage:
        return tail
    for later in ordered[k + 1:]:
        if later.stage != unit.stage:
            break
        tail.append(later)
    return tail


def make_abc_loss(lam: float = 1.0, p: float = 1.0, quantized_tail: bool = False) -> Callable:
    """A ``make_extra_loss`` hook for :func:`reparq.recipes.reconstruct.reconstruct`."""

    def make(model: nn.Module, unit: Unit, k: int, ordered: list[Unit], fp_out: TensorCache, args: tuple,
             kwargs: dict):
        tail = stage_tail(unit, k, ordered)
        if not tail or lam == 0:
            return None
        modules = [model.get_submodule(u.name) for u in tail]
        layers = [layer for u in tail for layer in unit_layers(model, u)]
        for m in modules:
            for prm in m.parameters():
                prm.requires_grad_(False)

        def run_tail(x: torch.Tensor, quantized: bool) -> torch.Tensor:
            for layer in layers:
                layer.set_quant_enabled(quantized, quantized)
            try:
                for m in modules:
                    x = _first(m(x, *args, **kwargs))
            finally:
                for layer in layers:
                    layer.set_quant_enabled(False, False)  # later units stay float until their turn
            return x

        # Float stage output for every cached sample: float block output through the float tail.
        with torch.no_grad():
            target = TensorCache([run_tail(x, False) for x in fp_out.batches(256)], threshold_mb=float("inf"))

        def extra(out: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return lam * lp_loss(run_tail(out, quantized_tail), target.take(idx), p)

        return extra

    return make


__all__ = ["make_abc_loss", "stage_tail"]
