"""``repquant``: RepQuant (Li et al., 2024): RepQ-ViT's decoupling, with learning on both sides of
the reparameterization (DESIGN.md 2.4).

1. Quantizers and statistics-based ranges as in ``repqvit`` (percentile search, log-sqrt2
   probabilities; on post-LN models the config's MSE estimators and the consumer-side fold of
   every block-inner Linear input, see ``consumer_fold``), except that each post-norm consumer input gets a
   :class:`~reparq.quant.dual_clip.DualClipQuantizer`: per-channel lower and upper bounds,
   initialized from the per-channel percentile search. On decoders (``producer_fold``) the
   input of LLaMA's down_proj (``act(gate) * up``) and of OPT's fc2 (``relu(fc1)``) is calibrated
   per channel too, and folded into the producer's output rows (up_proj, fc1): its outlier
   channels, which a per-tensor grid cannot hold, are what SmoothQuant moves into the weights.
2. Dual clipping: the bounds are trained block by block with the block reconstruction loss
   (``clip_iters`` steps per block, weights at nearest rounding, nothing else learns; off by
   default on post-LN models, see :func:`clip_iters_for`), using the
   reconstruction engine (:mod:`reparq.recipes.reconstruct`, which picks the bounds up through
   their ``recon_param_groups``).
3. The learned per-channel quantizers are folded exactly into the norms and consumers, leaving
   layer-wise quantizers; the consumers' weight ranges are re-initialized (their weights are
   now ``W * r1``).
4. Quantized weight reconstruction: block-wise AdaRound rounding with LSQ step sizes for the
   per-tensor activations and the q/k/v matmul inputs (``iters`` steps per block, the
   ReconConfig options), with everything quantized in place. Above 4-bit activations, on post-LN
   models and where the weights have fewer bits than the activations (W4A8), the rounding is
   GPTQ's instead (:mod:`reparq.quant.gptq`, on each layer's quantized inputs; the steps then
   learn only the activation step sizes), see :func:`gptq_for`. On image models above 4-bit
   activations the steps drop activation quantization element-wise as QDrop does
   (:func:`drop_prob_for`).
5. log-sqrt2 -> log2 with parity for the probabilities (``probs="auto"``: only in the attention
   modules where the log-sqrt2 grid fit the calibration probabilities better than a uniform one,
   :mod:`reparq.recipes.probs_choice`).

Defaults are sized for CPU: a zoo transformer (about 0.2 M parameters, 1024 calibration images)
finishes within the 5-minute budget on 2 cores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from reparq.config import QuantConfig
from reparq.model.blocks import discover_units
from reparq.progress import SILENT, Reporter
from reparq.quant.log_reparam import convert_logsqrt2_to_log2
from reparq.recipes.block_recon import ReconOptions, recon_config
from reparq.recipes.reconstruct import check_replayable, reconstruct
from reparq.recipes.registry import register_recipe
from reparq.recipes.reparam import is_post_ln
from reparq.recipes.repqvit import RepQViTOptions, fold_and_reinit, prepare_transformer


@dataclass
class RepQuantOptions(ReconOptions, RepQViTOptions):
    iters: int = 200  # quantized weight reconstruction steps per block
    # dual-clipping steps per block (0: keep the initial bounds); None: CLIP_ITERS, except on post-LN
    # models (BERT), where the learned bounds cost cosine at every width (see clip_iters_for)
    clip_iters: int | None = None
    clip_lr: float = 1e-3  # in units of each channel's initial range per step (Adam)
    consumer_fold: bool | Literal["norms"] | None = None  # None: on for post-LN models (BERT) only; see RepQViTOptions
    # None: on (LLaMA's down_proj, OPT's fc2 calibrated per channel, folded into up_proj / fc1).
    # Measured on llama_fm W8A8 (128 calibration windows, 256 held out, 50 steps, seed 0;
    # benchmarks/diag_llama_down_proj.py): perplexity +0.044 without, +0.003 with (down_proj kept float:
    # +0.018; NNCF's SmoothQuant, which migrates the same outliers, was ahead before it).
    producer_fold: bool | None = None
    ranges: str = "auto"  # MSE estimators on post-LN models, RepQ-ViT's percentile search elsewhere
    probs: str = "auto"  # per attention module, log-sqrt2 or uniform, whichever fits its probabilities better
    # Weight rounding after the fold: True GPTQ on the quantized inputs (then LSQ activation steps),
    # False AdaRound; None: GPTQ above 4-bit activations on post-LN models and where the weights have
    # fewer bits than the activations (see gptq_for)
    gptq: bool | None = None
    # QDrop's element-wise dropping of activation quantization in the weight reconstruction; None:
    # DROP_PROB above 4-bit activations on image models, 0 on text and at 4 bits (see drop_prob_for)
    drop_prob: float | None = None


CLIP_ITERS = 100
DROP_PROB = 0.5  # QDrop's own choice


def clip_iters_for(options: RepQuantOptions, post_ln: bool) -> int:
    """The dual-clipping steps ``options`` mean on a model (``post_ln``: :func:`is_post_ln`). On
    post-LN models every per-channel group is a consumer-side fold, and training its bounds on the
    block's squared error made MiniLM worse where it matters (cosine, seed 0, GPTQ weights, 1024
    calibration sentences: W6A6 0.9903 without, 0.9858 with, the target being 0.99; W4A8 0.9804 /
    0.9814; with AdaRound weights, 512 sentences, W6A6 0.9881 / 0.9871), so "auto" leaves them off
    there."""
    if options.clip_iters is not None:
        return options.clip_iters
    return 0 if post_ln else CLIP_ITERS


def gptq_for(options: RepQuantOptions, post_ln: bool, w_bits: int, a_bits: int) -> bool:
    """Whether the weight reconstruction rounds by GPTQ (``options.gptq``). "auto": GPTQ above
    4-bit activations, on post-LN models and wherever the weights have fewer bits than the
    activations (W4A8, where the weight rounding is most of the error and GPTQ is made for it);
    block-wise AdaRound elsewhere.

    Measured (seed 0): on MiniLM (post-LN; 512 calibration sentences, no clipping) GPTQ is ahead
    at W6A6 and W4A8 (cosine 0.9904 vs 0.9881, 0.9800 vs 0.9672); at W4A8 on the pre-norm
    llama_fm too (perplexity 118.046 vs 118.140), and level on the zoo DeiT / Swin (top-1 -0.02 /
    -0.11 vs +0.01 / -0.12 points). AdaRound, which learns each rounding against the block's
    output with the activation quantizers in place, is ahead where 4-bit activations dominate the
    error (zoo W4A4: DeiT -0.55 vs -0.69, Swin -1.03 vs -2.03; MiniLM W4A4 0.8517 vs 0.8303) and on
    the pre-norm models at equal widths (zoo W6A6: +0.03 / -0.08 vs -0.03 / -0.11)."""
    if options.gptq is not None:
        return options.gptq
    return a_bits > 4 and (post_ln or w_bits < a_bits)


def drop_prob_for(options: RepQuantOptions, image_inputs: bool, a_bits: int) -> float:
    """The probability with which the weight reconstruction keeps an activation in float
    (QDrop, ``options.drop_prob``). "auto": :data:`DROP_PROB` above 4-bit activations on models
    that read images (``image_inputs``: float calibration batches, not token ids), 0 elsewhere.

    Dropping makes the learned rounding and step sizes see a mix of quantized and float inputs,
    which keeps them from fitting the calibration images too closely. Measured (repquant, top-1
    points, mean of seeds 0-2, without -> with): zoo DeiT W8A8 +0.08 -> +0.07, W6A6 +0.12 -> +0.13,
    W4A8 +0.03 -> +0.08; Swin +0.02 -> +0.02, -0.12 -> -0.08, -0.11 -> -0.12: level or ahead, most
    where the weights are rounded at 4-6 bits. At W4A4 it costs (seed 0: DeiT -0.53 -> -0.52, Swin
    -1.00 -> -1.17), as ``qdrop`` trails ``brecq`` there. On text it costs at every width tried
    (llama_fm, seed 0: perplexity W8A8 118.003 -> 118.015, W6A6 118.310 -> 118.349), and ``qdrop``
    trails ``brecq`` in all four MiniLM cells."""
    if options.drop_prob is not None:
        return options.drop_prob
    return DROP_PROB if a_bits > 4 and image_inputs else 0.0


def reads_images(batches) -> bool:
    """Whether the calibration batches are float tensors (images), not token ids or keyword dicts."""
    first = batches[0] if isinstance(batches, (list, tuple)) and batches else None
    return isinstance(first, torch.Tensor) and first.is_floating_point()


@register_recipe("repquant", "RepQuant: learnable per-channel dual clipping of post-norm inputs (block loss), "
                 "exact fold to layer-wise quantizers, then block-wise quantized weight reconstruction; "
                 "log-sqrt2 probabilities converted to log2", RepQuantOptions, w_estimator="mse", a_estimator="mse")
def repquant(model: nn.Module, batches, config: QuantConfig, seed: int = 0, reporter: Reporter = SILENT,
             options: RepQuantOptions | None = None) -> nn.Module:
    options = options or RepQuantOptions()
    post_ln = bool(is_post_ln(model))
    clip_iters, gptq = clip_iters_for(options, post_ln), gptq_for(options, post_ln, config.w_bits, config.a_bits)
    drop_prob = drop_prob_for(options, reads_images(batches), config.a_bits)
    if clip_iters > 0 or options.iters > 0 or gptq:
        check_replayable(batches)  # before the range calibration, not after it
    pairs = prepare_transformer(model, batches, config, options, seed, reporter, learnable_clip=clip_iters > 0,
                                clip_lr=options.clip_lr)
    units = discover_units(model, options.block_globs, options.stage_globs)
    stats: list[dict] = []  # one entry per unit and phase (the clipping phase's units end in ":clip")
    if pairs and clip_iters > 0:
        clip_cfg = recon_config(options, iters=clip_iters, round_weights=False, learn_act_scale=False,
                                drop_prob=0.0)
        clip_stats = reconstruct(model, units, batches, clip_cfg, seed=seed, reporter=reporter)
        stats += [{**s, "unit": f"{s['unit']}:clip"} for s in clip_stats]
    fold_and_reinit(model, pairs, config, options)
    if options.iters > 0 or gptq:
        stats += reconstruct(model, units, batches, recon_config(options, gptq=gptq, drop_prob=drop_prob),
                             seed=seed + 1, reporter=reporter)
    if options.to_log2:
        convert_logsqrt2_to_log2(model)
    model.reparq_recon_stats = stats
    model.reparq_postnorm_pairs = [p.key for p in pairs]  # norm names, or the consumer for groups without one
    return model


__all__ = ["CLIP_ITERS", "DROP_PROB", "RepQuantOptions", "clip_iters_for", "drop_prob_for", "gptq_for", "reads_images"]
