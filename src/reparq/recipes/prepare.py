"""Pass: turn a model into the graph that is deployed (merge Rep branches, fold BN)."""

from __future__ import annotations

import torch.nn as nn

from reparq.model.fold import fold_batchnorm
from reparq.model.merge import merge_branches


def prepare_for_deployment(model: nn.Module) -> dict[str, int]:
    """In place; quantizing anything else would calibrate a graph that never runs."""
    model.eval()
    merged = merge_branches(model)
    folded = fold_batchnorm(model)
    return {"merged_blocks": merged, "folded_bn": folded}
