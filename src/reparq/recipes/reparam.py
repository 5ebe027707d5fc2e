"""Passes shared by the ``repqvit`` and ``repquant`` recipes: per-channel calibration of the
post-norm quantizers, their exact fold into layer-wise ones, and RepQ-ViT's percentile ranges.

Order inside a recipe (the quantizers must exist, :mod:`reparq.recipes.insert` and
:mod:`reparq.model.attention_adapters`):

    pairs = find_postnorm_pairs(model)
    rows = observe_norm_outputs(model, pairs, batches)       # float model, one forward pass
    calibrate_postnorm(model, pairs, rows)                   # consumers' inputs: per channel
    ... (RepQuant learns the per-channel bounds here) ...
    fold_postnorm_pairs(model, pairs)                        # exact; consumers' inputs: per tensor
    then re-initialize the consumers' weight ranges (their weights changed: W * r1).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn

from reparq.config import QuantConfig
from reparq.model.postnorm import NormPair, fold_postnorm, norm_has_bias, shared_zero_point_params
from reparq.nn.qmodules import QuantizedLayer, quantized_layers
from reparq.parallel import gather_cat
from reparq.quant.dual_clip import DualClipQuantizer
from reparq.quant.percentile_search import percentile_search_params, unwidened_params
from reparq.quant.ranges import estimate_params
from reparq.quant.uniform import UniformQuantizer
from reparq.recipes.calibrate import forward_batch, set_quant_enabled
from reparq.recipes.insert import _set_submodule

CHANNEL_METHODS = ("percentile", "mse", "minmax")
# "mse": the same least-squared-error choice of the per-channel clipping, over a wider grid of
# two-sided percentiles (min/max included), for when RepQ-ViT's three candidates clip too little.
WIDE_PERCENTILES = (1.0, 0.99999, 0.9999, 0.999, 0.998, 0.995, 0.99, 0.98, 0.95)


def _consumers(model: nn.Module, pair: NormPair) -> list[QuantizedLayer]:
    return [model.get_submodule(c) for c in pair.consumers]


def quantizable_pairs(model: nn.Module, pairs: list[NormPair]) -> list[NormPair]:
    """Pairs whose consumers are quantized layers sharing one activation bit width (others are skipped)."""
    kept = []
    for pair in pairs:
        layers = _consumers(model, pair)
        if not all(isinstance(l, QuantizedLayer) for l in layers):
            continue
        bits = {l.input_quantizer.bits for l in layers}
        if len(bits) != 1 or layers[0].input_quantizer.is_float:
            if len(bits) != 1:
                warnings.warn(f"consumers of {pair.norm} have different activation bits {sorted(bits)}; "
                              f"its post-norm reparameterization is skipped", stacklevel=2)
            continue
        kept.append(pair)
    return kept


@torch.no_grad()
def observe_norm_outputs(model: nn.Module, pairs: list[NormPair], batches: list[torch.Tensor],
                         max_rows: int = 1 << 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rows ``[M, C]`` of every paired norm's output on the float model (a seeded subsample of the
    tokens, at most ``max_rows``, spread evenly over the batches)."""
    gen = torch.Generator().manual_seed(seed)
    per_batch = max(1, math.ceil(max_rows / max(1, len(batches))))
    rows: dict[str, list[torch.Tensor]] = {p.norm: [] for p in pairs}

    def hook(module, args, out, name):
        flat = out.detach().float().reshape(-1, out.shape[-1]).cpu()
        if flat.shape[0] > per_batch:
            flat = flat[torch.randperm(flat.shape[0], generator=gen, device="cpu").to(flat.device)[:per_batch]]
        rows[name].append(flat)

    handles = [model.get_submodule(p.norm).register_forward_hook(lambda m, a, o, n=p.norm: hook(m, a, o, n))
               for p in pairs]
    set_quant_enabled(model, weights=False, inputs=False)
    try:
        for batch in batches:
            forward_batch(model, batch)  # dict batches (HF models) run as model(**batch)
    finally:
        for h in handles:
            h.remove()
        set_quant_enabled(model, weights=True, inputs=True)
    # Under data parallelism every rank gets all ranks' rows (rank order = single-process order).
    return {name: gather_cat(torch.cat(r))[:max_rows] for name, r in rows.items() if r}


def channel_params(rows: torch.Tensor, bits: int, method: str = "percentile") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel asymmetric (scale, integer zero point) of ``rows [M, C]``, not widened to 0."""
    if method == "percentile":
        return percentile_search_params(rows, bits, symmetric=False, axis=-1, widen=False)
    if method == "mse":
        return percentile_search_params(rows, bits, symmetric=False, axis=-1, widen=False, percentiles=WIDE_PERCENTILES)
    if method == "minmax":
        return unwidened_params(rows.min(dim=0).values, rows.max(dim=0).values, bits)
    raise ValueError(f"unknown per-channel range method {method!r}; choose one of {CHANNEL_METHODS}")


def calibrate_postnorm(model: nn.Module, pairs: list[NormPair], rows: dict[str, torch.Tensor],
                       method: str = "percentile", learnable: bool = False, lr: float = 1e-3) -> None:
    """Make each pair's consumer input quantizers per-channel with ranges from the norm's output.

    ``learnable``: install RepQuant's :class:`DualClipQuantizer` (one shared by all consumers of a
    norm, so they learn one set of bounds) instead of a fixed per-channel quantizer.
    """
    for pair in pairs:
        if pair.norm not in rows:
            continue
        layers = _consumers(model, pair)
        bits = layers[0].input_quantizer.bits
        scale, zp = channel_params(rows[pair.norm], bits, method)
        lo, hi = (layers[0].input_quantizer.qmin - zp) * scale, (layers[0].input_quantizer.qmax - zp) * scale
        # A norm without a bias (RMSNorm) has nowhere to put the fold's shift: one zero point for
        # all channels makes the shift vanish, so the fold adds no op (postnorm module docstring).
        one_zero_point = not norm_has_bias(model.get_submodule(pair.norm))
        if one_zero_point and not learnable:
            scale, zp = shared_zero_point_params(lo, hi, bits)
        if learnable:
            shared = DualClipQuantizer(bits, lo, hi, channel_axis=-1, lr=lr, shared_zero_point=one_zero_point)
            for layer in layers:
                layer.input_quantizer = shared
            continue
        for layer in layers:
            aq = layer.input_quantizer
            aq.channel_axis = -1
            aq.set_params(scale, zp)


def channel_quantizer_params(quantizer: UniformQuantizer) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(quantizer, DualClipQuantizer):
        return quantizer.materialize()
    return quantizer.scale.detach().clone(), quantizer.zero_point.detach().clone()


@torch.no_grad()
def fold_postnorm_pairs(model: nn.Module, pairs: list[NormPair]) -> list[str]:
    """Fold every per-channel-calibrated pair (exact); the consumers get one layer-wise input
    quantizer. Returns the consumers whose weights changed (their weight ranges need re-init)."""
    changed = []
    for pair in pairs:
        layers = _consumers(model, pair)
        aq = layers[0].input_quantizer
        if aq.channel_axis is None or aq.scale.numel() <= 1:
            continue  # not calibrated per channel: nothing to fold
        scale, zp = channel_quantizer_params(aq)
        result = fold_postnorm(model.get_submodule(pair.norm), layers, scale, zp, aq.bits)
        if result.norm is not model.get_submodule(pair.norm):
            _set_submodule(model, pair.norm, result.norm)
        for layer in layers:
            fresh = UniformQuantizer(aq.bits, symmetric=False, channel_axis=None)
            fresh.set_params(result.scale, result.zero_point)
            fresh.enabled = aq.enabled
            layer.input_quantizer = fresh
        changed.extend(pair.consumers)
    return changed


@torch.no_grad()
def init_weight_ranges_for(model: nn.Module, config: QuantConfig, names: list[str] | None = None,
                           percentile: bool = False) -> None:
    """(Re-)initialize weight ranges of the named quantized layers (all when None): RepQ-ViT's
    per-channel percentile search, or ``config.w_estimator``."""
    estimator = "minmax" if config.w_estimator == "percentile" else config.w_estimator
    wanted = None if names is None else set(names)
    for name, layer in quantized_layers(model):
        wq = layer.weight_quantizer
        if wq.is_float or (wanted is not None and name not in wanted):
            continue
        if percentile:
            scale, zp = percentile_search_params(layer.weight, wq.bits, True, wq.channel_axis, narrow=wq.narrow)
        else:
            scale, zp = estimate_params(layer.weight, estimator, wq.bits, wq.symmetric, wq.channel_axis, narrow=wq.narrow)
        wq.set_params(scale, zp)


def percentile_activation_params(observer, quantizer: UniformQuantizer):
    """``params_fn`` for :func:`reparq.recipes.calibrate.init_activation_ranges`: RepQ-ViT's search."""
    data = torch.cat([observer.samples, observer.min.reshape(1), observer.max.reshape(1)])
    return percentile_search_params(data, quantizer.bits, quantizer.symmetric)


__all__ = ["calibrate_postnorm", "channel_params", "fold_postnorm_pairs", "init_weight_ranges_for",
           "observe_norm_outputs", "percentile_activation_params", "quantizable_pairs"]
