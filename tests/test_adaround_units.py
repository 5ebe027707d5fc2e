"""AdaRound's units include the activation that follows a layer when the block structure shows it."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from reparq.config import QuantConfig
from reparq.recipes.baselines import range_baseline
from reparq.recipes.block_recon import layer_units


class ConvAct(nn.Module):
    def __init__(self, cin: int, cout: int, shift: float = 0.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        with torch.no_grad():
            self.conv.bias -= shift  # most pre-activations far below zero, as in merged RepVGG convs

    def forward(self, x):
        return torch.relu(self.conv(x))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(ConvAct(1, 8), ConvAct(8, 8, shift=30.0), ConvAct(8, 8))
        self.pair = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 1))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.pair(self.blocks(x)).mean(dim=(2, 3)))


def test_single_layer_blocks_become_units_and_multi_layer_blocks_split():
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(32, 1, 8, 8)
    q = range_baseline(copy.deepcopy(model), [x], QuantConfig(w_bits=4, a_bits=8))
    units = layer_units(q, block_globs=("blocks.*", "pair"))
    assert [u.name for u in units] == ["blocks.0", "blocks.1", "blocks.2", "pair.0", "pair.2", "head"]
    assert [u.layers for u in units][:3] == [["blocks.0.conv"], ["blocks.1.conv"], ["blocks.2.conv"]]

