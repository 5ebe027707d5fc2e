"""log-sqrt2 -> log2 reparameterization of the post-Softmax quantizer (RepQ-ViT / RepQuant).

Calibration uses a log-sqrt2 quantizer, ``a_hat = s * 2^(-q/2)``: two levels per octave fit the
power-law distribution of attention probabilities much better than one. Integer kernels only do
shifts, so the deployed form splits each code into a shift and a parity bit:

    2^(-q/2) = 2^(-ceil(q/2)) * (sqrt2 if q is odd else 1)

and ``probs @ V`` becomes two shift-only accumulations, over the even-code and the odd-code
entries, with the odd one multiplied by sqrt2 once per output element (the constant is folded
into that accumulation's output scale, not applied per entry):

    out = s * ( sum_{q even} 2^(-ceil(q/2)) v  +  sqrt2 * sum_{q odd} 2^(-ceil(q/2)) v )

This is exact: both sides are the same real number, so they agree to float tolerance (a test
checks it). :class:`Log2ParityQuantizer` is the converted module; its ``forward`` still returns
the dequantized values (identical to the log-sqrt2 fake-quant), so code that multiplies
``probs(a) @ v`` itself keeps working, and its ``matmul`` is the two-accumulation kernel that
:meth:`reparq.nn.attention.MatmulQuantizers.attend` uses once converted.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from reparq.nn.attention import matmul_quantizers
from reparq.quant.log import LogQuantizer
from reparq.quant.uniform import KEEP_BITS

SQRT2 = math.sqrt(2.0)


def shift_and_parity(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log-sqrt2 codes -> (shift ``ceil(q/2)``, parity ``q odd``)."""
    return torch.div(codes + 1, 2, rounding_mode="floor"), torch.remainder(codes, 2) == 1


def two_accumulation_matmul(shift: torch.Tensor, odd: torch.Tensor, keep: torch.Tensor, v: torch.Tensor,
                            scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """``probs_hat @ v`` from shift/parity codes: two shift-only accumulations, sqrt2 applied once."""
    pow2 = torch.exp2(-shift.to(v.dtype)) * keep.to(v.dtype)  # what a right shift by `shift` does
    odd_f = odd.to(v.dtype)
    even_acc = (pow2 * (1 - odd_f)) @ v
    odd_acc = (pow2 * odd_f) @ v
    return scale * (even_acc + SQRT2 * odd_acc)


class Log2ParityQuantizer(nn.Module):
    """Deployed form of a log-sqrt2 quantizer: log2 shifts plus one parity bit per entry."""

    k = 2  # the codes are the log-sqrt2 codes (LogQuantizer.codes reads k, qmax and scale)

    def __init__(self, source: LogQuantizer) -> None:
        super().__init__()
        if source.base != "logsqrt2":
            raise ValueError(f"only a log-sqrt2 quantizer converts to log2 with parity, got base {source.base!r}")
        self.bits = source.bits
        self.register_buffer("scale", source.scale.detach().clone())
        self.enabled = source.enabled
        self.initialized = True

    @property
    def qmax(self) -> int:
        return 2 ** self.bits - 1

    @property
    def is_float(self) -> bool:
        return self.bits >= KEEP_BITS

    def codes(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(shift, odd, keep) of every entry: what the integer kernel stores."""
        q, keep = LogQuantizer.codes(self, a.detach())  # one code function for both forms
        shift, odd = shift_and_parity(q.long())
        return shift, odd, keep

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.is_float:
            return a
        shift, odd, keep = self.codes(a)
        a_hat = self.scale * torch.exp2(-shift.to(a.dtype)) * torch.where(odd, SQRT2, 1.0).to(a.dtype) * keep
        return a + (a_hat - a).detach()

    def matmul(self, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``quant(a) @ v`` as two shift-only accumulations (straight-through on ``a`` while training)."""
        if not self.enabled or self.is_float:
            return a @ v
        shift, odd, keep = self.codes(a)
        out = two_accumulation_matmul(shift, odd, keep, v, self.scale.to(v.dtype))
        if torch.is_grad_enabled() and a.requires_grad:
            out = out + (a - a.detach()) @ v  # straight-through on `a`, as forward() does
        return out

    def extra_repr(self) -> str:
        return f"bits={self.bits}, log2 shifts + parity (from log-sqrt2)"


def convert_logsqrt2_to_log2(model: nn.Module) -> int:
    """Replace every attention log-sqrt2 probabilities quantizer by its shift+parity form; returns the count."""
    converted = 0
    for _, mq in matmul_quantizers(model):
        if isinstance(mq.probs, LogQuantizer) and mq.probs.base == "logsqrt2":
            mq.probs = Log2ParityQuantizer(mq.probs)
            converted += 1
    return converted


__all__ = ["Log2ParityQuantizer", "SQRT2", "convert_logsqrt2_to_log2", "shift_and_parity", "two_accumulation_matmul"]
