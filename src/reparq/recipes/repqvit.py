"""``repqvit``: RepQ-ViT (Li et al., ICCV 2023) as a baseline. Two scale reparameterizations,
statistics-based ranges, no learning (DESIGN.md 2.4, item 5 for the reference's choices).

1. Quantizers everywhere a transformer runs a product: every Conv/Linear (weights per output
   channel, inputs per tensor) and, through the attention adapters, q, k, v and the attention
   probabilities (log-sqrt2 grid).
2. Ranges from one float forward pass over the calibration data: RepQ-ViT's least-MSE choice
   among the {99.9, 99.99, 99.999}th percentiles (``ranges="percentile"``), or the
   ``QuantConfig`` estimators (``ranges="config"``, an ablation).
3. Post-norm reparameterization: the inputs of ``qkv``, ``fc1``, Swin's patch-merging
   ``reduction`` (and the ViT head after ``fc_norm``) are calibrated per channel, then folded
   exactly into the norm and the consumer (:mod:`reparq.model.postnorm`); the consumers' weight
   ranges are re-initialized because their weights changed.
4. log-sqrt2 -> log2 with parity for the probabilities (:mod:`reparq.quant.log_reparam`), exact.

Our departures from the reference: integer zero points in the fold (exact, where the reference
aligns to a real-valued mean); symmetric weight grids; all of the calibration data is used (the
reference takes 32 images).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.nn as nn

from reparq.config import QuantConfig
from reparq.errors import ReparqError
from reparq.model.attention_adapters import PROBS_KINDS, adapt_attention
from reparq.progress import SILENT, Reporter
from reparq.quant.log_reparam import convert_logsqrt2_to_log2
from reparq.recipes import baselines, block_recon, repapq  # noqa: F401  (listed before us, whoever imports first)
from reparq.recipes.calibrate import init_activation_ranges, init_weight_ranges
from reparq.recipes.insert import insert_quantizers
from reparq.recipes.prepare import prepare_for_deployment
from reparq.recipes.probs_choice import choose_probability_grids
from reparq.recipes.registry import register_recipe
from reparq.recipes.reparam import (CHANNEL_METHODS, calibrate_postnorm_in_passes, check_consumer_fold,
                                    fold_postnorm_pairs, is_post_ln, percentile_activation_params, reparam_groups)

RANGE_MODES = ("percentile", "config", "auto")


@dataclass
class RepQViTOptions:
    # "percentile": RepQ-ViT's search; "config": QuantConfig's estimators; "auto": config on post-LN
    # models (BERT: there percentile clipping is the worst start), percentile elsewhere.
    ranges: str = "percentile"
    channel_ranges: str = "percentile"  # per-channel post-norm ranges: "percentile" | "minmax"
    reparam: bool = True  # False: leave the post-norm inputs per tensor (ablation)
    # True: also the Linear inputs that only a consumer-side fold can serve (post-LN norms that
    # feed the residual, the attention output projection, fc2), at one float multiply-add each.
    # "norms": only the post-LN norm outputs (not the attention output projection and fc2), whose
    # affine the norm absorbs at export: the fast graph (README, speed at real sizes).
    consumer_fold: bool | Literal["norms"] = False
    # True: also the inner inputs whose per-channel division folds into the Linear that produced
    # them (LLaMA's down_proj into up_proj, OPT's fc2 into fc1): exact and free at run time. Not in
    # the RepQ-ViT paper, so off here; ``repquant`` turns it on (see RepQuantOptions).
    producer_fold: bool | None = False
    # How much of those inputs' channel spread moves into the weights (1: all, as the norm fold);
    # None: the strength with the least consumer output error, per group (reparam.ALPHAS).
    consumer_alpha: float | None = None
    probs: str = "logsqrt2"  # "logsqrt2" | "log2" | "uniform" | "auto" (per module, see probs_choice)
    to_log2: bool = True  # convert log-sqrt2 to the deployed log2+parity form at the end
    max_rows: int = 1 << 16  # tokens kept per norm for the per-channel statistics

    def __post_init__(self) -> None:
        if self.ranges not in RANGE_MODES:
            raise ReparqError(f"ranges must be one of {', '.join(RANGE_MODES)}, got {self.ranges!r}")
        if self.channel_ranges not in CHANNEL_METHODS:
            raise ReparqError(f"channel_ranges must be one of {', '.join(CHANNEL_METHODS)}, got {self.channel_ranges!r}")
        if self.consumer_alpha is not None and not 0.0 <= self.consumer_alpha <= 1.0:
            raise ReparqError(f"consumer_alpha must be within [0, 1], got {self.consumer_alpha}")
        check_consumer_fold(self.consumer_fold)
        if self.probs not in PROBS_KINDS + ("auto",):
            raise ReparqError(f"probs must be one of {', '.join(PROBS_KINDS)}, auto; got {self.probs!r}")


def prepare_transformer(model: nn.Module, batches, config: QuantConfig, options, seed: int, reporter: Reporter,
                        learnable_clip: bool = False, clip_lr: float = 1e-3, bits: dict | None = None,
                        observer_index: dict[str, int] | None = None):
    """Steps 1-3 up to (not including) the fold: quantizers in, ranges set, post-norm inputs per
    channel. Returns the pairs to fold. Shared with ``repquant`` and the streamed path (which
    passes the whole model's ``bits`` and ``observer_index``, see :mod:`reparq.stream`)."""
    prepare_for_deployment(model)
    insert_quantizers(model, config, bits=bits)
    adapt_attention(model, config.a_bits, probs="logsqrt2" if options.probs == "auto" else options.probs,
                    ignore=config.ignore)
    percentile = uses_percentile_ranges(model, options)
    init_weight_ranges(model, config, percentile_search=percentile)
    init_activation_ranges(model, batches, config, seed=seed, reporter=reporter,
                           params_fn=percentile_activation_params if percentile else None, observer_index=observer_index)
    if options.probs == "auto":
        choose_probability_grids(model, batches, seed=seed)
    pairs = reparam_groups(model, norms=options.reparam, consumer_fold=options.consumer_fold,
                           producer_fold=producer_fold_for(options))
    if pairs:
        reporter.stage("post-norm statistics", total=1)
        calibrate_postnorm_in_passes(model, pairs, batches, options.max_rows, seed=seed,
                                     method=options.channel_ranges, learnable=learnable_clip, lr=clip_lr,
                                     consumer_alpha=options.consumer_alpha)
        reporter.advance(1)
    return pairs


def producer_fold_for(options) -> bool:
    """Whether ``options`` fold inner inputs into their producers (``producer_fold``; None: on)."""
    return getattr(options, "producer_fold", False) is not False


def fold_and_reinit(model: nn.Module, pairs, config: QuantConfig, options) -> None:
    changed = fold_postnorm_pairs(model, pairs)
    init_weight_ranges(model, config, changed, percentile_search=uses_percentile_ranges(model, options))


def uses_percentile_ranges(model: nn.Module, options) -> bool:
    """Whether ``options.ranges`` means RepQ-ViT's percentile search on this model."""
    return options.ranges == "percentile" or (options.ranges == "auto" and not is_post_ln(model))


@register_recipe("repqvit", "RepQ-ViT: per-channel post-norm ranges folded into layer-wise ones, log-sqrt2 "
                 "attention probabilities converted to log2 shifts, percentile ranges; no learning",
                 RepQViTOptions, w_estimator="mse", a_estimator="mse")
def repqvit(model: nn.Module, batches, config: QuantConfig, seed: int = 0, reporter: Reporter = SILENT,
            options: RepQViTOptions | None = None) -> nn.Module:
    options = options or RepQViTOptions()
    pairs = prepare_transformer(model, batches, config, options, seed, reporter)
    fold_and_reinit(model, pairs, config, options)
    if options.to_log2:
        convert_logsqrt2_to_log2(model)
    model.reparq_postnorm_pairs = [p.key for p in pairs]  # norm names, or the consumer for groups without one
    return model


__all__ = ["RepQViTOptions", "fold_and_reinit", "prepare_transformer", "producer_fold_for", "uses_percentile_ranges"]
