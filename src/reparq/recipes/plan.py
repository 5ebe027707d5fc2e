"""Dry run: what a recipe would quantize and reconstruct, without calibrating anything.

Two views of the same plan: ``layers`` (one row per quantized layer, with its reconstruction
unit and stage) and ``points`` (one row per quantizer: a layer's weight and input, and the
four attention-matmul inputs q, k, v, probs where the recipe quantizes them), each with its
bits, granularity, range estimator and the reparameterizations that touch it.
"""

from __future__ import annotations

import copy

import torch.nn as nn

from reparq.config import QuantConfig
from reparq.errors import ReparqError
from reparq.model.blocks import discover_units
from reparq.model.equalize import find_equalizable_pairs, quantized_pairs
from reparq.model.fold import fold_batchnorm
from reparq.model.merge import _MERGERS, _TIMM_METHODS, merge_branches
from reparq.quant.uniform import KEEP_BITS
from reparq.recipes.insert import insert_quantizers

# What each recipe does to the graph beyond merging and BN folding, as data (so a dry run needs
# no recipe code): "equalize" exact channel rescaling between layers joined by ReLU, "qprep"
# per-channel affine on merged convs, "post-norm" per-channel ranges on
# LayerNorm outputs folded to layer-wise ones, "attention" quantized matmul inputs (log grid for
# the probabilities), "dual-clip" learnable per-channel clipping bounds. The recipe option that
# switches a transform off is in ``_SWITCHES`` (a false or zero value turns it off).
RECIPE_TRANSFORMS: dict[str, tuple[str, ...]] = {
    "repapq": ("equalize", "qprep"),
    "repqvit": ("post-norm", "attention"),
    "repquant": ("post-norm", "attention", "dual-clip"),
}
_SWITCHES = {"equalize": "equalize", "qprep": "qprep", "post-norm": "reparam", "dual-clip": "clip_iters"}
_PROBS_LABEL = {"logsqrt2": "log√2", "log2": "log2", "uniform": "uniform"}


def is_rep_block(module: nn.Module) -> bool:
    """True for a block that branch merging merges (a registered merger, or timm's protocol)."""
    return isinstance(module, tuple(_MERGERS)) or any(callable(getattr(module, m, None)) for m in _TIMM_METHODS)


def recipe_transforms(recipe: str | None, options=None) -> tuple[str, ...]:
    found = RECIPE_TRANSFORMS.get(recipe or "", ())
    return tuple(t for t in found if getattr(options, _SWITCHES.get(t, ""), True) not in (False, 0))


def _bits_label(bits: int) -> int | str:
    return "float" if bits >= KEEP_BITS else bits


def _prepare(model: nn.Module) -> tuple[dict, set[str], list[str]]:
    """``prepare_for_deployment`` (merge, then BN fold), noting which layers each step touched."""
    rep_blocks = [n for n, m in model.named_modules() if n and is_rep_block(m)]
    merged = merge_branches(model)
    before = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    folded = fold_batchnorm(model)
    bn_folded = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n in before and before[n] is not m}
    return {"merged_blocks": merged, "folded_bn": folded}, bn_folded, rep_blocks


def _transformer_sites(model: nn.Module) -> tuple[set[str], list[str]]:
    """(Linear layers fed by a norm, attention modules) that the transformer recipes reparameterize."""
    from reparq.model.attention_adapters import attention_modules
    from reparq.model.postnorm import find_postnorm_pairs

    consumers = {c for p in find_postnorm_pairs(model) for c in p.consumers}
    attention = [n for n, _ in attention_modules(model)]
    try:
        from reparq.model import hf_adapters
    except ImportError:  # transformers-only helpers
        hf_adapters = None
    if hf_adapters is not None:
        consumers |= {c for _, names, _ in hf_adapters.norm_consumers(model) for c in names}
        attention += [n for n, _ in hf_adapters.attention_modules(model) if n not in attention]
    return consumers, attention


def _producer_sites(model: nn.Module, recipe: str | None, options) -> dict[str, str]:
    """Consumer -> producer of the inner inputs the recipe folds into their producer (repquant by
    default, repqvit with ``producer_fold``)."""
    from reparq.model.postnorm import find_producer_groups
    from reparq.recipes.repqvit import producer_fold_for

    wanted = producer_fold_for(options) if options is not None else recipe == "repquant"
    return {g.consumers[0]: g.producer for g in find_producer_groups(model)} if wanted else {}


def plan(model: nn.Module, config: QuantConfig, block_globs: tuple[str, ...] | None = None,
         stage_globs: tuple[str, ...] | None = None, recipe: str | None = None, options=None) -> dict:
    """Rows for every quantized layer (with its unit and stage) and every quantization point,
    on a merged copy of ``model``; ``recipe``/``options`` say which reparameterizations apply."""
    merged = copy.deepcopy(model).eval()
    prep, bn_folded, rep_blocks = _prepare(merged)
    transforms = recipe_transforms(recipe, options)
    if "dual-clip" in transforms and getattr(options, "clip_iters", 1) is None:
        from reparq.recipes.reparam import is_post_ln
        from reparq.recipes.repquant import clip_iters_for  # "auto": off on post-LN models

        if clip_iters_for(options, bool(is_post_ln(merged))) == 0:
            transforms = tuple(t for t in transforms if t != "dual-clip")
    found = []
    if "equalize" in transforms:  # on the float graph: the trace must see plain Conv2d/Linear
        found = find_equalizable_pairs(merged)
    bits = insert_quantizers(merged, config)
    found = quantized_pairs(found, bits)  # what the recipe equalizes
    producers, equalized = {p.producer for p in found}, {p.consumer for p in found}
    try:
        units = discover_units(merged, block_globs, stage_globs)
        unit_error = None
    except ReparqError as exc:
        units, unit_error = [], str(exc)
    unit_of = {layer: u for u in units for layer in u.layers}
    consumers, attention = _transformer_sites(merged) if {"post-norm", "attention"} & set(transforms) else (set(), [])
    produced = _producer_sites(merged, recipe, options) if "post-norm" in transforms else {}
    percentile_search = getattr(options, "ranges", None) == "percentile"
    w_est = "minmax" if config.w_estimator == "percentile" else config.w_estimator
    if percentile_search:
        w_est = a_est = "percentile search"
    else:
        a_est = config.a_estimator
    rows, points = [], []
    for name, (w, a) in bits.items():
        u = unit_of.get(name)
        layer = merged.get_submodule(name)
        rows.append({"layer": name, "type": type(layer).__name__, "w_bits": w, "a_bits": a,
                     "unit": u.name if u else "", "unit_kind": u.kind if u else "",
                     "stage": (u.stage or "") if u else ""})
        w_reparam = []
        if any(name == b or name.startswith(b + ".") for b in rep_blocks):
            w_reparam.append("merge")
        elif name in bn_folded:
            w_reparam.append("BN fold")
        a_reparam, a_gran = [], "per-tensor"
        if name in producers:
            w_reparam.append("equalize (out ÷ s)")
        if name in equalized:
            w_reparam.append("equalize (in · s)")
            a_reparam.append("equalize (÷ s)")
        if "qprep" in transforms and type(layer).__name__ == "QConv2d" and w < KEEP_BITS:
            w_reparam.append("QPRep")
        # A per-channel input folded to one grid: after a norm, or into the Linear that produced it.
        fold = "post-norm" if name in consumers else "producer fold" if name in produced else None
        if fold and a < KEEP_BITS:
            w_reparam.append(f"{fold} (W·r1)")
            a_reparam.append(fold)
            a_gran = "per-channel→per-tensor"
            if "dual-clip" in transforms:
                a_reparam.append("dual-clip")
        if name in produced.values():
            w_reparam.append("producer fold (out ÷ r1)")
        w_gran = "per-channel" if config.w_per_channel else "per-tensor"
        group = layer.weight_quantizer.group_size  # insert_quantizers decided where groups apply
        if group is not None and w < KEEP_BITS:
            w_gran = f"per-group ({group})"
        points.append(_point(f"{name}.weight", name, "weight", w, w_gran, w_est, w_reparam))
        points.append(_point(f"{name}.input", name, "input", a, a_gran, a_est, a_reparam))
    probs = getattr(options, "probs", "logsqrt2")
    for attn in attention:
        a = config.a_bits
        for kind in ("q", "k", "v"):
            points.append(_point(f"{attn}.{kind}", attn, f"matmul {kind}", a, "per-tensor", a_est, []))
        label = _PROBS_LABEL.get(probs, probs)
        reparam = [f"{label} → log2 + parity"] if probs == "logsqrt2" and getattr(options, "to_log2", True) else []
        points.append(_point(f"{attn}.probs", attn, "matmul probs", a, "per-tensor",
                             a_est if probs == "uniform" else f"{label} grid, top 1", reparam))
    return {"layers": rows, "points": points, "units": [u.__dict__ for u in units], "unit_error": unit_error,
            "transforms": list(transforms), **prep}


def _point(point: str, layer: str, kind: str, bits: int, granularity: str, estimator: str, reparam: list[str]) -> dict:
    is_float = bits >= KEEP_BITS
    return {"point": point, "layer": layer, "kind": kind, "bits": _bits_label(bits),
            "granularity": "-" if is_float else granularity, "estimator": "-" if is_float else estimator,
            "reparam": ", ".join(reparam)}


def plan_for(model: nn.Module, run) -> dict:
    """The plan of a :class:`~reparq.runconfig.RunConfig` on ``model``."""
    from reparq.recipes.registry import get_recipe

    spec = get_recipe(run.recipe)
    options = spec.options(**run.recipe_options()) if spec.options else None
    globs = getattr(options, "block_globs", None) if options is not None else None
    stages = getattr(options, "stage_globs", None) if options is not None else None
    return plan(model, run.quant_config(), block_globs=globs, stage_globs=stages, recipe=run.recipe, options=options)


def plan_table(result: dict, title: str):
    """A rich table of the quantization points."""
    from rich.table import Table

    table = Table("point", "kind", "bits", "granularity", "estimator", "reparameterization", "unit", title=title)
    unit_of = {r["layer"]: r["unit"] for r in result["layers"]}
    for p in result["points"]:
        table.add_row(p["point"], p["kind"], str(p["bits"]), p["granularity"], p["estimator"], p["reparam"],
                      unit_of.get(p["layer"], ""))
    return table


__all__ = ["RECIPE_TRANSFORMS", "is_rep_block", "plan", "plan_for", "plan_table", "recipe_transforms"]
