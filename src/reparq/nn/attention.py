"""Quantizers on the inputs of attention's two matmuls, shared by every attention adapter.

An adapter (timm ViT ``Attention``, Swin ``WindowAttention``, HF BERT / LLaMA attention) attaches
one :class:`MatmulQuantizers` to each attention module as ``module.matmul_quant`` and routes
``q``, ``k`` (inputs of ``q @ k^T``), the post-Softmax probabilities and ``v`` (inputs of
``probs @ v``) through it. Calibration passes find them by type, so every family is calibrated
by the same code.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from reparq.quant.log import LogQuantizer
from reparq.quant.uniform import UniformQuantizer


class MatmulQuantizers(nn.Module):
    """q, k, v: per-tensor asymmetric uniform; probs: log2 or log-sqrt2 (``probs_base``)."""

    def __init__(self, a_bits: int, probs_base: str = "log2", probs_uniform: bool = False) -> None:
        super().__init__()
        self.q = UniformQuantizer(a_bits, symmetric=False)
        self.k = UniformQuantizer(a_bits, symmetric=False)
        self.v = UniformQuantizer(a_bits, symmetric=False)
        # Baselines quantize the probabilities on a uniform grid (what they would do to any tensor);
        # RepQ-ViT / RepQuant use the log grid.
        self.probs = UniformQuantizer(a_bits, symmetric=False) if probs_uniform else LogQuantizer(a_bits, probs_base)

    def set_enabled(self, enabled: bool) -> None:
        """Switch all four quantizers (calibration passes observe the float model with them off)."""
        for q in (self.q, self.k, self.v, self.probs):
            q.enabled = enabled

    def uniform_quantizers(self) -> list[tuple[str, UniformQuantizer]]:
        """The members whose ranges come from data (the log grid of the probabilities needs none)."""
        return [(n, q) for n, q in (("q", self.q), ("k", self.k), ("v", self.v), ("probs", self.probs))
                if isinstance(q, UniformQuantizer)]

    def attend(self, probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``probs @ v`` with both inputs quantized. A probabilities quantizer that has its own
        ``matmul`` (the deployed log2-with-parity form, :mod:`reparq.quant.log_reparam`) computes
        the product itself, in the form an integer kernel runs."""
        v = self.v(v)
        matmul = getattr(self.probs, "matmul", None)
        if matmul is not None and self.probs.enabled:
            return matmul(probs, v)
        return self.probs(probs) @ v


def matmul_quantizers(model: nn.Module) -> list[tuple[str, MatmulQuantizers]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MatmulQuantizers)]
