"""Quantizers on the inputs of attention's two matmuls, shared by every attention adapter.

An adapter (timm ViT ``Attention``, Swin ``WindowAttention``, HF BERT / LLaMA attention) attaches
one :class:`MatmulQuantizers` to each attention module as ``module.matmul_quant`` and routes
``q``, ``k`` (inputs of ``q @ k^T``), the post-Softmax probabilities and ``v`` (inputs of
``probs @ v``) through it. Calibration passes find them by type, so every family is calibrated
by the same code.
"""

from __future__ import annotations

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


def matmul_quantizers(model: nn.Module) -> list[tuple[str, MatmulQuantizers]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MatmulQuantizers)]
