"""Reconstruction baselines: AdaRound (layer-wise), BRECQ (block-wise), QDrop (BRECQ + dropping).

All three start from MSE-searched ranges (as the reference implementations do) and differ only
in the unit of reconstruction, what is learned and whether activation quantization is dropped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch.nn as nn

from reparq.config import QuantConfig
from reparq.errors import ReparqError
from reparq.model.blocks import Unit, discover_units
from reparq.nn.qmodules import quantized_layers
from reparq.progress import SILENT, Reporter
from reparq.recipes.baselines import range_baseline
from reparq.recipes.reconstruct import ReconConfig, reconstruct
from reparq.recipes.registry import register_recipe


@dataclass
class ReconOptions(ReconConfig):
    """Recipe options of the reconstruction recipes (all ReconConfig fields, plus block globs)."""

    block_globs: tuple[str, ...] | None = None
    stage_globs: tuple[str, ...] | None = None


def recon_config(options: ReconOptions, **forced) -> ReconConfig:
    values = {f.name: getattr(options, f.name) for f in fields(ReconConfig)}
    values.update(forced)
    return ReconConfig(**values)


def layer_units(model: nn.Module, block_globs: tuple[str, ...] | None = None) -> list[Unit]:
    """AdaRound's units: one quantized layer each, *including its activation function* where the
    model's block structure shows it (a block holding a single quantized layer, e.g. a merged
    RepVGG/MobileOne block = conv + ReLU), as the AdaRound paper's ``||f(Wx) - f(W~x~)||``.

    Without the activation, the loss of a merged RepVGG conv is dominated by large negative
    pre-activations that ReLU discards (W6A6 zoo RepVGG: 81.4% vs 89.8% without learning)."""
    try:
        blocks = {u.layers[0]: u for u in discover_units(model, block_globs) if u.kind == "block" and len(u.layers) == 1}
    except ReparqError:
        blocks = {}
    return [blocks.get(name, Unit(name, "layer", None, [name])) for name, _ in quantized_layers(model)]


def _recon_recipe(layerwise: bool, drop_prob: float, learn_act_scale: bool):
    def run(model: nn.Module, batches, config: QuantConfig, seed: int = 0, reporter: Reporter = SILENT,
            options: ReconOptions | None = None) -> nn.Module:
        options = options or ReconOptions()
        model = range_baseline(model, batches, config, seed=seed, reporter=reporter)
        units = layer_units(model, options.block_globs) if layerwise else discover_units(model, options.block_globs, options.stage_globs)
        cfg = recon_config(options, drop_prob=drop_prob, learn_act_scale=learn_act_scale)
        model.reparq_recon_stats = reconstruct(model, units, batches, cfg, seed=seed, reporter=reporter)
        return model

    return run


register_recipe("adaround", "MSE ranges, then layer-wise AdaRound weight rounding", ReconOptions,
                w_estimator="mse", a_estimator="mse")(_recon_recipe(layerwise=True, drop_prob=0.0, learn_act_scale=False))
register_recipe("brecq", "MSE ranges, then block-wise reconstruction of rounding and activation step sizes",
                ReconOptions, w_estimator="mse", a_estimator="mse")(
    _recon_recipe(layerwise=False, drop_prob=0.0, learn_act_scale=True))
register_recipe("qdrop", "BRECQ with activation quantization dropped element-wise (p=0.5) while reconstructing",
                ReconOptions, w_estimator="mse", a_estimator="mse")(
    _recon_recipe(layerwise=False, drop_prob=0.5, learn_act_scale=True))

__all__ = ["ReconOptions", "asdict", "layer_units", "recon_config"]
