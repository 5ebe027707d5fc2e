"""AdaRound soft rounding for a per-channel weight quantizer (Nagel et al., 2020).

Each weight learns whether it rounds up or down: ``w_hat = s * (floor(w/s) + h(V) - z)`` with
``h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``. The regularizer
``sum(1 - |2h - 1|^beta)`` (beta annealed from 20 to 2) pushes h to 0 or 1; at the end the
rounding is made hard and the weights are written back exactly on the grid.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from reparq.quant.uniform import UniformQuantizer

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


class AdaRound(nn.Module):
    """Learnable rounding state attached to a weight quantizer while a unit is reconstructed."""

    def __init__(self, quantizer: UniformQuantizer, weight: torch.Tensor) -> None:
        super().__init__()
        self.quantizer = quantizer
        scale, zero_point = quantizer.shaped_params(weight)
        self.register_buffer("w_floor", torch.floor(weight.detach() / scale))
        frac = (weight.detach() / scale - self.w_floor).clamp(1e-4, 1 - 1e-4)
        # Initialize so that h(V) equals the fractional part: the soft weight starts at the float weight.
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1))
        self.hard = False

    def h(self) -> torch.Tensor:
        return (self.v >= 0).float() if self.hard else rectified_sigmoid(self.v)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        q = self.quantizer
        scale, zero_point = q.shaped_params(weight)
        ints = torch.clamp(self.w_floor + self.h() + zero_point, q.qmin, q.qmax)
        return (ints - zero_point) * scale.detach()

    def regularizer(self, beta: float) -> torch.Tensor:
        return (1 - (2 * rectified_sigmoid(self.v) - 1).abs().pow(beta)).sum()


def beta_schedule(step: int, total: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0) -> float | None:
    """None during warm-up (no regularization), then linear decay from ``start`` to ``end``."""
    begin = int(warmup * total)
    if step < begin:
        return None
    return end + (start - end) * max(0.0, 1 - (step - begin) / max(1, total - begin))


__all__ = ["AdaRound", "beta_schedule", "rectified_sigmoid"]
