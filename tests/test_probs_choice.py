"""probs="auto": per attention module, the probabilities grid with the smaller error."""

from __future__ import annotations

import torch
import torch.nn as nn

from reparq.nn.attention import MatmulQuantizers
from reparq.quant.log import LogQuantizer
from reparq.quant.uniform import UniformQuantizer
from reparq.recipes.probs_choice import choose_probability_grids, observe_probabilities


class _Probs(nn.Module):
    """Stands in for an attention module: its input rows are the probabilities."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.matmul_quant = MatmulQuantizers(bits, probs_base="logsqrt2")

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        return self.matmul_quant.probs(probs)


def _diffuse(seed: int) -> torch.Tensor:  # ViT-like: 64 keys, values over orders of magnitude, no single winner
    return torch.softmax(3.0 * torch.randn(32, 64, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _peaked(seed: int) -> torch.Tensor:  # causal-LM-like: one key takes most of the mass
    logits = torch.randn(32, 64, generator=torch.Generator().manual_seed(seed))
    logits[:, 0] += 6.0
    return torch.softmax(logits, dim=-1)


def _mse(q: nn.Module, x: torch.Tensor) -> float:
    return float((q(x) - x).pow(2).mean())


def test_observed_probabilities_are_a_subsample_of_the_inputs():
    model = _Probs(8)
    batches = [_peaked(s) for s in range(3)]
    samples = observe_probabilities(model, batches, max_samples=1000)
    assert samples["matmul_quant"].numel() == 1000
    assert bool(torch.isin(samples["matmul_quant"], torch.cat(batches).reshape(-1)).all())


def test_log_kept_for_diffuse_4bit_uniform_taken_for_peaked_8bit():
    diffuse, peaked = _Probs(4), _Probs(8)
    choices = {"diffuse": choose_probability_grids(diffuse, [_diffuse(s) for s in range(4)]),
               "peaked": choose_probability_grids(peaked, [_peaked(s) for s in range(4)])}
    assert choices == {"diffuse": {"matmul_quant": "logsqrt2"}, "peaked": {"matmul_quant": "uniform"}}
    assert isinstance(diffuse.matmul_quant.probs, LogQuantizer)
    uniform = peaked.matmul_quant.probs
    assert isinstance(uniform, UniformQuantizer) and uniform.bits == 8
    # The swap is what the errors say: on held-out peaked rows the uniform grid is closer.
    x = _peaked(99)
    assert _mse(uniform, x) < _mse(LogQuantizer(8, "logsqrt2"), x)
