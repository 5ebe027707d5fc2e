"""Dry run: what a recipe would quantize and reconstruct, without calibrating anything."""

from __future__ import annotations

import copy

import torch.nn as nn

from reparq.config import QuantConfig
from reparq.errors import ReparqError
from reparq.model.blocks import discover_units
from reparq.recipes.insert import insert_quantizers
from reparq.recipes.prepare import prepare_for_deployment


def plan(model: nn.Module, config: QuantConfig, block_globs: tuple[str, ...] | None = None,
         stage_globs: tuple[str, ...] | None = None) -> dict:
    """Rows for every quantized layer (with its unit and stage) on a merged copy of ``model``."""
    merged = copy.deepcopy(model).eval()
    prep = prepare_for_deployment(merged)
    bits = insert_quantizers(merged, config)
    try:
        units = discover_units(merged, block_globs, stage_globs)
        unit_error = None
    except ReparqError as exc:
        units, unit_error = [], str(exc)
    unit_of = {layer: u for u in units for layer in u.layers}
    rows = []
    for name, (w, a) in bits.items():
        u = unit_of.get(name)
        rows.append({"layer": name, "type": type(merged.get_submodule(name)).__name__, "w_bits": w, "a_bits": a,
                     "unit": u.name if u else "", "unit_kind": u.kind if u else "", "stage": (u.stage or "") if u else ""})
    return {"layers": rows, "units": [u.__dict__ for u in units], "unit_error": unit_error, **prep}
