"""RepAPQ (Zhang et al. 2024) for structurally reparameterized CNNs: merge first, MAE everywhere,
Quantization Protecting Reparameterization, Across-block Calibration. DESIGN.md section 2.3
gives our reading; each choice marked *(ours)* there is an option here, so ablations are
``reparq.quantize(..., recipe="repapq", qprep=False)`` and so on.

Departure from our first reading (measured, merged zoo RepVGG, W4A4, 100 iterations): MAE-searched
*weight* ranges clip the one large centre tap that the merged identity branch leaves in each output
channel, and no rounding can bring it back (24.9% top-1); MSE-searched weight ranges keep it (85.1%).
So weights default to the MSE search, while activation ranges and the reconstruction loss use MAE.
``w_estimator="mae"`` restores the all-MAE variant for the ablation.

Addition of ours (measured, merged zoo RepVGG, seed 0): channel equalization across ReLU
(:mod:`reparq.model.equalize`) before anything is quantized. The merged identity branch leaves
in-channel outliers (a centre tap up to 2000x its channel's median) that no per-channel grid or
QPRep affine can reach; an exact rescaling between consecutive convs removes them (minmax W8A8
-1.77 -> -0.08 points with no learning at all, one-off with one fixed alpha of 0). ``equalize=False``
is the paper's recipe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from reparq.config import QuantConfig
from reparq.model.blocks import discover_units
from reparq.model.equalize import equalize_channels
from reparq.model.qprep import attach_qprep, fold_qprep
from reparq.nn.qmodules import QConv2d, quantized_layers
from reparq.progress import SILENT, Reporter
from reparq.recipes.abc import make_abc_loss
from reparq.recipes.block_recon import ReconOptions, recon_config
from reparq.recipes.calibrate import init_activation_ranges, init_weight_ranges
from reparq.recipes.insert import insert_quantizers, layer_bits, quantizable_layers
from reparq.recipes.prepare import prepare_for_deployment
from reparq.recipes.reconstruct import reconstruct
from reparq.recipes.registry import register_recipe


@dataclass
class RepAPQOptions(ReconOptions):
    loss_p: float = 1.0  # MAE reconstruction loss; 2.0 for the MSE ablation
    qprep: bool = True
    abc: bool = True
    abc_lambda: float = 1.0
    quantized_tail: bool = False
    equalize: bool = True  # ours: exact channel rescaling across ReLU before quantizing
    equalize_alpha: float | None = None  # None: searched per layer pair; a number fixes it


@register_recipe("repapq", "RepAPQ: MAE ranges and loss, QPRep per-channel affine (folded), across-block "
                 "calibration with AdaRound rounding and activation step sizes", RepAPQOptions,
                 w_estimator="mse", a_estimator="mae")
def repapq(model: nn.Module, batches, config: QuantConfig, seed: int = 0, reporter: Reporter = SILENT,
           options: RepAPQOptions | None = None) -> nn.Module:
    options = options or RepAPQOptions()
    prepare_for_deployment(model)
    if options.equalize:
        bits = layer_bits(quantizable_layers(model, config), config)
        batches = list(batches)
        reporter.stage("equalize channels", total=1)
        model.reparq_equalized = equalize_channels(model, batches, bits, options.equalize_alpha,
                                                   config.w_estimator, config.a_estimator)
        reporter.advance(1)
    insert_quantizers(model, config)
    qprep_layers = []
    if options.qprep:  # merged convs only: that is where merging took the per-channel freedom away
        qprep_layers = [layer for _, layer in quantized_layers(model)
                        if isinstance(layer, QConv2d) and not layer.weight_quantizer.is_float]
        for layer in qprep_layers:
            attach_qprep(layer)
    init_weight_ranges(model, config)
    init_activation_ranges(model, batches, config, seed=seed, reporter=reporter)
    units = discover_units(model, options.block_globs, options.stage_globs)
    abc = make_abc_loss(options.abc_lambda, options.loss_p, options.quantized_tail) if options.abc else None
    model.reparq_recon_stats = reconstruct(model, units, batches, recon_config(options), seed=seed,
                                           reporter=reporter, make_extra_loss=abc)
    for layer in qprep_layers:
        fold_qprep(layer)
    return model
