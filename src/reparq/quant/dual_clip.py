"""RepQuant's learnable per-channel dual clipping: an asymmetric per-channel quantizer whose lower
and upper bounds (not its scale) are learned by the block reconstruction loss.

``s_c = (hi_c - lo_c) / (qmax - qmin)``, ``z_c = round(qmin - lo_c / s_c)`` (straight-through),
``x_hat = s_c * (clamp(round(x / s_c) + z_c, qmin, qmax) - z_c)``. The bounds are stored as
offsets in units of each channel's initial range, ``lo = lo0 + d_lo * (hi0 - lo0)``, so one
learning rate suits channels whose ranges differ by orders of magnitude (which is the point of
calibrating them per channel). With ``shared_zero_point`` (bias-free norms such as RMSNorm) all
channels share one zero point, the rounded mean of their own, and each channel's scale is the
smallest that covers its bounds around it: the fold then needs no shift. The zero point may lie outside the grid while calibrating, as in
the percentile initialization; :func:`reparq.model.postnorm.fold_postnorm` makes it layer-wise
and in range. The learned bounds are turned into fixed ``(scale, zero_point)`` by
:meth:`DualClipQuantizer.materialize` before the fold.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from reparq.quant.uniform import UniformQuantizer, broadcast_shape, round_ste

_EPS = 1e-8


class DualClipQuantizer(UniformQuantizer):
    def __init__(self, bits: int, lo: torch.Tensor, hi: torch.Tensor, channel_axis: int = -1, lr: float = 1e-3,
                 shared_zero_point: bool = False) -> None:
        super().__init__(bits, symmetric=False, channel_axis=channel_axis)
        self.shared_zero_point = shared_zero_point
        lo, hi = lo.detach().float().reshape(-1), hi.detach().float().reshape(-1)
        width = (hi - lo).clamp_min(_EPS)
        self.register_buffer("lo0", lo.clone())
        self.register_buffer("width0", width.clone())
        self.d_lo = nn.Parameter(torch.zeros_like(lo), requires_grad=False)
        self.d_hi = nn.Parameter(torch.zeros_like(hi), requires_grad=False)
        self.lr = lr
        self.initialized = True
        self.set_params(*self._params())

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo = self.lo0 + self.d_lo * self.width0
        hi = self.lo0 + self.width0 + self.d_hi * self.width0
        return lo, hi

    def _params(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.bounds()
        if self.shared_zero_point:  # for bias-free norms: one zero point, each channel's scale covers its bounds
            lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
            own = ((hi - lo) / (self.qmax - self.qmin)).clamp_min(_EPS)
            z = torch.clamp(round_ste((self.qmin - lo / own).mean()), self.qmin + 1, self.qmax - 1)
            scale = torch.maximum(-lo / (z - self.qmin), hi / (self.qmax - z)).clamp_min(_EPS)
            return scale, z.expand_as(scale)
        scale = ((hi - lo) / (self.qmax - self.qmin)).clamp_min(_EPS)
        zero_point = round_ste(self.qmin - lo / scale)
        return scale, zero_point

    def recon_param_groups(self) -> list[dict]:
        """Picked up by :class:`reparq.recipes.reconstruct.UnitTrainer`: the bounds learn."""
        return [{"params": [self.d_lo, self.d_hi], "lr": self.lr}]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.is_float:
            return x
        scale, zero_point = self._params()
        shape = broadcast_shape(x, self.channel_axis)
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
        q = torch.clamp(round_ste(x / scale) + zero_point, self.qmin, self.qmax)
        return (q - zero_point) * scale

    @torch.no_grad()
    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The learned bounds as fixed per-channel ``(scale, integer zero_point)``."""
        scale, zero_point = self._params()
        return scale.detach().clone(), torch.round(zero_point.detach()).clone()


__all__ = ["DualClipQuantizer"]
