"""Passes shared by the ``repqvit`` and ``repquant`` recipes: per-channel calibration of the
post-norm quantizers, their exact fold into layer-wise ones, and RepQ-ViT's percentile ranges.

Order inside a recipe (the quantizers must exist, :mod:`reparq.recipes.insert` and
:mod:`reparq.model.attention_adapters`):

    pairs = find_postnorm_pairs(model)
    rows = observe_norm_outputs(model, pairs, batches)       # float model, one forward pass
    calibrate_postnorm(model, pairs, rows)                   # consumers' inputs: per channel
    (calibrate_postnorm_in_passes does both in passes that bound the rows held at once)
    ... (RepQuant learns the per-channel bounds here) ...
    fold_postnorm_pairs(model, pairs)                        # exact; consumers' inputs: per tensor
    then re-initialize the consumers' weight ranges (their weights changed: W * r1;
    :func:`reparq.recipes.calibrate.init_weight_ranges` with their names).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn

from reparq.errors import ReparqError
from reparq.model.postnorm import (NormPair, find_consumer_side_groups, find_postnorm_pairs, find_producer_groups,
                                   fold_at_consumers, fold_into_producer, fold_postnorm, norm_has_bias,
                                   shared_zero_point_params)
from reparq.nn.qmodules import QuantizedLayer, quantized_layers
from reparq.parallel import gather_cat
from reparq.quant.dual_clip import DualClipQuantizer
from reparq.quant.percentile_search import percentile_search_params, unwidened_params
from reparq.quant.uniform import UniformQuantizer, int_range
from reparq.recipes.calibrate import float_pass
from reparq.recipes.insert import _set_submodule

CHANNEL_METHODS = ("percentile", "mse", "minmax")
# "mse": the same least-squared-error choice of the per-channel clipping, over a wider grid of
# two-sided percentiles (min/max included), for when RepQ-ViT's three candidates clip too little.
WIDE_PERCENTILES = (1.0, 0.99999, 0.9999, 0.999, 0.998, 0.995, 0.99, 0.98, 0.95)


def _consumers(model: nn.Module, pair: NormPair) -> list[QuantizedLayer]:
    return [model.get_submodule(c) for c in pair.consumers]


def quantizable_pairs(model: nn.Module, pairs: list[NormPair]) -> list[NormPair]:
    """Pairs whose consumers are all quantized layers with quantized inputs (others are skipped).

    A consumer-side group loses the consumers kept at more bits than the rest (the model's first
    Linear at 8 bits beside 4-bit siblings, a per-layer override): each consumer carries its own
    input affine there, so the wider one simply keeps its layer-wise grid on the unfolded input
    and its weight. Folding it along instead (on a grid of its own bits over the folded range, as
    a norm fold must, see :func:`grid_consumers`) measured the same on MiniLM (repquant, seed 0:
    W6A6 cosine 0.9906 against 0.9903, W4A4 0.8371 against 0.8368)."""
    kept = []
    for pair in pairs:
        layers = _consumers(model, pair)
        if not all(isinstance(l, QuantizedLayer) and not l.input_quantizer.is_float for l in layers):
            continue
        if not pair.folds_into_norm:
            grid = {id(l) for l in grid_consumers(layers)}
            pair = dataclasses.replace(pair, consumers=tuple(c for c, l in zip(pair.consumers, layers) if id(l) in grid))
        kept.append(pair)
    return kept


def grid_consumers(layers: list[QuantizedLayer]) -> list[QuantizedLayer]:
    """The consumers a group is calibrated per channel for: those at its lowest activation bit width.

    A norm fold changes the tensor every consumer of the norm reads, so a consumer kept at more
    bits (LLaMA's first Linear, q_proj, at 8 bits beside 4-bit k/v) cannot stay out of it; it
    cannot share the per-channel grid either, but the fold only needs one per-channel ratio: it
    reads the folded tensor on a layer-wise grid of its own bits over the same range
    (:func:`fold_postnorm_pairs`). Skipping such a group instead left all of its consumers per
    tensor."""
    bits = min(l.input_quantizer.bits for l in layers)
    return [l for l in layers if l.input_quantizer.bits == bits]


CONSUMER_FOLD_MODES = (True, False, None, "norms")


def check_consumer_fold(consumer_fold: object) -> None:
    """One message for a bad ``consumer_fold``, whether it comes from the options or the streamed path."""
    if consumer_fold not in CONSUMER_FOLD_MODES:
        raise ReparqError(f"consumer_fold must be True, False, None (auto) or 'norms', got {consumer_fold!r}")


def reparam_groups(model: nn.Module, norms: bool = True, consumer_fold: bool | str | None = False,
                   producer_fold: bool = False) -> list[NormPair]:
    """The groups a transformer recipe calibrates per channel: post-norm pairs that fold into
    their norm (``norms``), with ``producer_fold`` the inner inputs that fold into the Linear that
    produced them (LLaMA's down_proj into up_proj, OPT's fc2 into fc1) and, with
    ``consumer_fold``, the inputs that fold only at the consumer (an input affine; not for those
    a producer takes). ``consumer_fold=None`` ("auto"): only on post-LN models (BERT), whose norms
    all feed the residual, so that without it nothing there would be calibrated per channel.
    ``consumer_fold="norms"``: only the norm outputs (post-LN BERT's qkv and fc1 inputs), not the
    block-inner inputs (attention output projection, fc2). The published method's scope, and the
    cheaper graph: a norm output's affine is absorbed by the norm at export, leaving one Mul on the
    residual (``onnx_passes.absorb_input_affines_into_norms``), while an inner input keeps a
    per-channel Mul + Add at run time."""
    check_consumer_fold(consumer_fold)
    pairs = find_postnorm_pairs(model) if norms else []
    produced = find_producer_groups(model) if producer_fold else []
    pairs += produced
    if consumer_fold or (consumer_fold is None and is_post_ln(model)):
        taken = {c for g in produced for c in g.consumers}
        pairs += [g for g in find_consumer_side_groups(model) if not taken.intersection(g.consumers)
                  and (consumer_fold != "norms" or g.norm)]
    return quantizable_pairs(model, pairs)


def is_post_ln(model: nn.Module) -> bool:
    """Whether some norm feeding Linears also feeds the residual (post-LN BERT), so that RepQ-ViT's
    norm fold cannot apply to it."""
    return any(g.norm for g in find_consumer_side_groups(model))


@torch.no_grad()
def observe_norm_outputs(model: nn.Module, pairs: list[NormPair], batches: list[torch.Tensor],
                         max_rows: int = 1 << 16, seed: int = 0,
                         keep: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Rows ``[M, C]`` of every pair's observed tensor on the float model, keyed by ``pair.key``
    (a seeded subsample of the tokens, at most ``max_rows``, spread evenly over the batches).

    ``keep``: the keys whose rows are returned (default: all). Every pair is still subsampled, so
    that the rows a pair gets do not depend on which others are kept: observing in several passes
    (:func:`calibrate_postnorm_in_passes`) gives exactly the rows of one pass."""
    gen = torch.Generator().manual_seed(seed)
    per_batch = max(1, math.ceil(max_rows / max(1, len(batches))))
    rows: dict[str, list[torch.Tensor]] = {p.key: [] for p in pairs if keep is None or p.key in keep}

    def observe(name: str, out: torch.Tensor) -> None:
        count = out.numel() // out.shape[-1]
        pick = torch.randperm(count, generator=gen, device="cpu")[:per_batch] if count > per_batch else None
        if name not in rows:
            return
        flat = out.detach().float().reshape(-1, out.shape[-1]).cpu()
        rows[name].append(flat if pick is None else flat[pick])

    # A norm's output, or (no norm: fc2, attention output projection) the first consumer's input.
    handles = [model.get_submodule(p.norm).register_forward_hook(lambda m, a, o, n=p.key: observe(n, o)) if p.norm
               else model.get_submodule(p.key).register_forward_pre_hook(lambda m, a, n=p.key: observe(n, a[0]))
               for p in pairs]
    float_pass(model, batches, handles)
    # Under data parallelism every rank gets all ranks' rows (rank order = single-process order).
    return {name: gather_cat(torch.cat(r))[:max_rows] for name, r in rows.items() if r}


# Rows the post-norm statistics hold at once. One pass held the rows of every group, twice while
# they were concatenated: on MiniLM (24 groups 384 or 1536 wide, 27k calibration tokens) repquant
# peaked at 5.1-5.5 GB of RSS, 2.2-2.9 GB in passes; a float pass over the calibration set is cheap.
ROW_BUDGET_BYTES = 1 << 30


def row_passes(model: nn.Module, pairs: list[NormPair], max_rows: int,
               budget_bytes: int = ROW_BUDGET_BYTES) -> list[list[NormPair]]:
    """The pairs split into consecutive passes whose rows (at most ``max_rows`` float32 rows of
    each pair's width) fit in ``budget_bytes``; a pair wider than the budget gets a pass of its own."""
    passes: list[list[NormPair]] = []
    used = budget_bytes + 1
    for pair in pairs:
        size = max_rows * _consumers(model, pair)[0].weight.shape[-1] * 4
        if passes and used + size <= budget_bytes:
            passes[-1].append(pair)
            used += size
        else:
            passes.append([pair])
            used = size
    return passes


def calibrate_postnorm_in_passes(model: nn.Module, pairs: list[NormPair], batches: list[torch.Tensor],
                                 max_rows: int = 1 << 16, seed: int = 0,
                                 budget_bytes: int | None = None, **calibrate_kwargs) -> None:
    """:func:`calibrate_postnorm` on the rows of :func:`observe_norm_outputs`, in as many float
    passes as ``budget_bytes`` needs; the result is the same as with one pass (the observation runs
    with every quantizer off, so the groups already calibrated do not change what later ones see)."""
    budget = ROW_BUDGET_BYTES if budget_bytes is None else budget_bytes
    for chunk in row_passes(model, pairs, max_rows, budget):
        rows = observe_norm_outputs(model, pairs, batches, max_rows, seed=seed, keep={p.key for p in chunk})
        calibrate_postnorm(model, chunk, rows, **calibrate_kwargs)
        del rows


def channel_params(rows: torch.Tensor, bits: int, method: str = "percentile") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel asymmetric (scale, integer zero point) of ``rows [M, C]``, not widened to 0."""
    if method == "percentile":
        return percentile_search_params(rows, bits, symmetric=False, axis=-1, widen=False)
    if method == "mse":
        return percentile_search_params(rows, bits, symmetric=False, axis=-1, widen=False, percentiles=WIDE_PERCENTILES)
    if method == "minmax":
        return unwidened_params(rows.min(dim=0).values, rows.max(dim=0).values, bits)
    raise ValueError(f"unknown per-channel range method {method!r}; choose one of {CHANNEL_METHODS}")


def balanced_channel_params(scale: torch.Tensor, zero_point: torch.Tensor, weight_max: torch.Tensor, bits: int,
                            alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel grids that move only part of the channel spread into the weights.

    The fold multiplies the consumers' weight column c by ``r_c ~ s_c``: with the full per-channel
    scales, a channel a hundred times wider than the rest makes its weight column a hundred times
    larger, which a 4-bit per-output-channel weight grid cannot hold. So, as SmoothQuant balances
    its migration, the grid ratio becomes ``r_c = range_c^alpha * weight_max_c^(alpha - 1)``: each
    channel's step is ``r_c * u`` with ``u`` the smallest common factor that still covers every
    channel's [lo, hi] (nothing extra is clipped), and the zero point centres the range in its grid.
    ``alpha = 1`` gives back the plain per-channel grids; smaller values leave more of the spread
    on the activation side. The fold stays exact for any choice (integer zero points).
    """
    qmin, qmax = int_range(bits, symmetric=False)
    lo, hi = (qmin - zero_point) * scale, (qmax - zero_point) * scale
    eps = torch.finfo(torch.float32).eps
    span = (hi - lo).double().clamp_min(eps)
    ratio = span.pow(alpha) * weight_max.double().clamp_min(eps).pow(alpha - 1.0)
    ratio = ratio / ratio.mean()
    step = (ratio * (span / ratio).max() / (qmax - qmin)).to(scale.dtype)
    centre = torch.round((qmin + qmax) / 2 - (lo + hi) / (2 * step))
    return step, centre


def _weight_column_max(layers: list[QuantizedLayer]) -> torch.Tensor:
    return torch.stack([l.weight.detach().abs().amax(dim=0) for l in layers]).amax(dim=0).float().cpu()


ALPHAS = (1.0, 0.85, 0.7, 0.5, 0.3)  # migration strengths tried per consumer-side group
_SEARCH_ROWS = 4096


@torch.no_grad()
def _folded_output_error(rows: torch.Tensor, layers: list[QuantizedLayer], scale: torch.Tensor,
                         zero_point: torch.Tensor, bits: int) -> float:
    """Squared output error of the folded consumers with these per-channel input grids: inputs
    fake-quantized on them, weights ``W * r1`` on a per-output-channel min/max grid (a proxy for
    the recipe's own weight ranges), against the float product."""
    qmin, qmax = int_range(bits, symmetric=False)
    x_hat = (torch.clamp(torch.round(rows / scale) + zero_point, qmin, qmax) - zero_point) * scale
    r1 = scale / scale.mean()
    error = 0.0
    for layer in layers:
        w = layer.weight.detach().float().cpu()
        w_bits = layer.weight_quantizer.bits
        folded = w * r1
        w_max = (1 << (w_bits - 1)) - 1
        step = (folded.abs().amax(dim=1, keepdim=True) / w_max).clamp_min(torch.finfo(torch.float32).eps)
        w_hat = torch.clamp(torch.round(folded / step), -w_max, w_max) * step
        error += float(((x_hat / r1) @ w_hat.t() - rows @ w.t()).pow(2).mean())
    return error


def _search_alpha(rows: torch.Tensor, layers: list[QuantizedLayer], scale: torch.Tensor, zero_point: torch.Tensor,
                  bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The balanced grids (:func:`balanced_channel_params`) of the strength in :data:`ALPHAS` that
    gives the consumers' smallest output error: how much spread the weights can take depends on
    their bit width and on the layer (at 6-8 bit weights full migration tends to win; at 4 bits
    the weights need part of it left on the activations)."""
    sample = rows[torch.linspace(0, rows.shape[0] - 1, min(rows.shape[0], _SEARCH_ROWS)).long()].float().cpu()
    wmax = _weight_column_max(layers)
    scale, zero_point = scale.float().cpu(), zero_point.float().cpu()
    candidates = [balanced_channel_params(scale, zero_point, wmax, bits, a) if a != 1.0 else (scale, zero_point)
                  for a in ALPHAS]
    errors = [_folded_output_error(sample, layers, s, z, bits) for s, z in candidates]
    return candidates[errors.index(min(errors))]


def calibrate_postnorm(model: nn.Module, pairs: list[NormPair], rows: dict[str, torch.Tensor],
                       method: str = "percentile", learnable: bool = False, lr: float = 1e-3,
                       consumer_alpha: float | None = 1.0) -> None:
    """Make each pair's consumer input quantizers per-channel with ranges from the norm's output.

    ``learnable``: install RepQuant's :class:`DualClipQuantizer` (one shared by all consumers of a
    norm, so they learn one set of bounds) instead of a fixed per-channel quantizer.
    ``consumer_alpha``: the migration strength of consumer-side groups
    (:func:`balanced_channel_params`; None: searched per group, :func:`_search_alpha`); norm
    folds keep RepQ-ViT's full per-channel grids.
    """
    for pair in pairs:
        if pair.key not in rows:
            continue
        layers = _consumers(model, pair)
        grid = grid_consumers(layers)
        aq0 = grid[0].input_quantizer
        bits = aq0.bits
        scale, zp = channel_params(rows[pair.key], bits, method)
        if not pair.folds_into_norm and consumer_alpha is None:
            device = scale.device
            scale, zp = (t.to(device) for t in _search_alpha(rows[pair.key], layers, scale, zp, bits))
        elif not pair.folds_into_norm and consumer_alpha != 1.0:
            scale, zp = balanced_channel_params(scale, zp, _weight_column_max(layers).to(scale.device), bits,
                                                consumer_alpha)
        lo, hi = (aq0.qmin - zp) * scale, (aq0.qmax - zp) * scale
        # A norm without a bias (RMSNorm) has nowhere to put the fold's shift: one zero point for
        # all channels makes the shift vanish, so the fold adds no op (postnorm module docstring).
        # A consumer-side fold carries its shift in the input affine.
        # A producer fold likewise (the shift would sit after the producer's nonlinearity).
        one_zero_point = bool(pair.producer) or \
            (pair.folds_into_norm and not norm_has_bias(model.get_submodule(pair.norm)))
        if one_zero_point and not learnable:
            scale, zp = shared_zero_point_params(lo, hi, bits)
        if learnable:  # the bounds come from CPU-held statistics; they learn where the quantizer computes
            device = aq0.scale.device
            shared = DualClipQuantizer(bits, lo.to(device), hi.to(device), channel_axis=-1, lr=lr,
                                       shared_zero_point=one_zero_point)
            for layer in grid:
                layer.input_quantizer = shared
            continue
        for layer in grid:
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
        aq = grid_consumers(layers)[0].input_quantizer
        if aq.channel_axis is None or aq.scale.numel() <= 1:
            continue  # not calibrated per channel: nothing to fold
        scale, zp = channel_quantizer_params(aq)
        if pair.folds_into_norm:
            result = fold_postnorm(model.get_submodule(pair.norm), layers, scale, zp, aq.bits)
            if result.norm is not model.get_submodule(pair.norm):
                _set_submodule(model, pair.norm, result.norm)
            s_t, z_t = result.scale, result.zero_point
        elif pair.producer:
            s_t, z_t = fold_into_producer(model.get_submodule(pair.producer), layers, scale, zp, aq.bits)
            changed.append(pair.producer)  # its rows changed: its weight ranges are re-initialized too
        else:
            s_t, z_t = fold_at_consumers(layers, scale, zp, aq.bits)
        for layer in layers:
            bits = layer.input_quantizer.bits
            fresh = UniformQuantizer(bits, symmetric=False, channel_axis=None)
            fresh.set_params(*((s_t, z_t) if bits == aq.bits else _covering_grid(s_t, z_t, aq.bits, bits)))
            fresh.enabled = layer.input_quantizer.enabled
            layer.input_quantizer = fresh
        changed.extend(pair.consumers)
    return changed


def _covering_grid(scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                   wider_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``wider_bits`` asymmetric grid over the range of the ``bits`` grid (scale, zero point)."""
    qmin, qmax = int_range(bits, symmetric=False)
    wmin, wmax = int_range(wider_bits, symmetric=False)
    lo, hi = (qmin - zero_point) * scale, (qmax - zero_point) * scale
    step = (hi - lo) / (wmax - wmin)
    return step, torch.round(wmin - lo / step)


def percentile_activation_params(observer, quantizer: UniformQuantizer):
    """``params_fn`` for :func:`reparq.recipes.calibrate.init_activation_ranges`: RepQ-ViT's search."""
    data = torch.cat([observer.samples, observer.min.reshape(1), observer.max.reshape(1)])
    return percentile_search_params(data, quantizer.bits, quantizer.symmetric)


__all__ = ["balanced_channel_params", "calibrate_postnorm", "calibrate_postnorm_in_passes", "channel_params",
           "fold_postnorm_pairs", "grid_consumers", "is_post_ln", "observe_norm_outputs",
           "percentile_activation_params", "quantizable_pairs", "reparam_groups", "row_passes"]
