"""Range-based PTQ baselines: merge -> fold BN -> insert quantizers -> set ranges. No learning."""

from __future__ import annotations

import torch.nn as nn

from reparq.config import QuantConfig
from reparq.model.attention_adapters import adapt_attention
from reparq.progress import SILENT, Reporter
from reparq.recipes.calibrate import init_activation_ranges, init_weight_ranges
from reparq.recipes.insert import insert_quantizers
from reparq.recipes.prepare import prepare_for_deployment
from reparq.recipes.registry import register_recipe


def range_baseline(model: nn.Module, batches, config: QuantConfig, seed: int = 0, reporter: Reporter = SILENT,
                   options: None = None) -> nn.Module:
    prepare_for_deployment(model)
    insert_quantizers(model, config)
    # Attention matmul inputs too (q, k, v, probabilities on a uniform grid): a baseline that left
    # them in float would not be comparable with the methods that quantize them.
    adapt_attention(model, config.a_bits, probs="uniform", ignore=config.ignore)
    init_weight_ranges(model, config)
    init_activation_ranges(model, batches, config, seed=seed, reporter=reporter)
    return model


for _name, _desc, _w, _a in (
    ("minmax", "observed min/max ranges for weights (per channel) and activations", "minmax", "minmax"),
    ("percentile", "99.99th-percentile activation ranges, min/max weight ranges", "minmax", "percentile"),
    ("mse", "clipping search minimizing squared error (weights per channel, activations per tensor)", "mse", "mse"),
    ("mae", "clipping search minimizing absolute error (RepAPQ's measure), same granularity as mse", "mae", "mae"),
):
    register_recipe(_name, _desc, w_estimator=_w, a_estimator=_a)(range_baseline)
