"""Logarithmic quantizers for post-Softmax attention probabilities in [0, 1].

``q = clamp(round(-k * log2(a / s)), 0, 2^b - 1)`` and ``a_hat = s * 2^(-q / k)`` with
k = 1 (log2) or k = 2 (log-sqrt2). Power-law distributed probabilities get many levels near
0 and few near 1, which is where a uniform grid fails. Values whose code would exceed the
largest index (smaller than the smallest level) are sent to exactly 0, as in RepQ-ViT.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from reparq.quant.uniform import KEEP_BITS, check_bits

LEVELS_PER_OCTAVE = {"log2": 1, "logsqrt2": 2}


class LogQuantizer(nn.Module):
    def __init__(self, bits: int = 8, base: str = "logsqrt2") -> None:
        super().__init__()
        if base not in LEVELS_PER_OCTAVE:
            raise ValueError(f"unknown log quantizer base {base!r}; choose one of {sorted(LEVELS_PER_OCTAVE)}")
        self.bits = check_bits(bits)
        self.base = base
        self.register_buffer("scale", torch.ones(1))
        self.enabled = True
        self.initialized = True  # the natural top value of a probability is 1

    @property
    def k(self) -> int:
        return LEVELS_PER_OCTAVE[self.base]

    @property
    def qmax(self) -> int:
        return 2 ** self.bits - 1

    def codes(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer codes and the mask of entries that survive (are not flushed to zero)."""
        ratio = (a / self.scale).clamp_min(torch.finfo(a.dtype).tiny)
        q = torch.round(-self.k * torch.log2(ratio)).clamp_min(0)
        keep = (q <= self.qmax) & (a > 0)
        return q.clamp_max(self.qmax), keep

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.bits >= KEEP_BITS:
            return a
        q, keep = self.codes(a.detach())
        a_hat = self.scale * torch.exp2(-q / self.k) * keep
        return a + (a_hat - a).detach()  # straight-through

    def extra_repr(self) -> str:
        return f"bits={self.bits}, base={self.base}"
