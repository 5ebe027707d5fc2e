"""Whether one quantized model is really more accurate than another on the same test images.

Accuracy gaps of a few images in 10k are common between PTQ recipes; a paired test on the images
says whether such a gap exceeds the test split's noise. Seeds (calibration subsets) are not
independent of each other on one image, images are: so the counts of seeds that classify each
image right are compared image by image, and the test is over images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def sign_test_p(wins: int, losses: int) -> float:
    """Exact two-sided binomial p of ``wins`` against ``losses`` under a fair coin (ties dropped)."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


@dataclass(frozen=True)
class PairedResult:
    a_ahead: int  # images that A classifies right on more seeds than B
    b_ahead: int
    p_value: float


def paired_sign_test(hits_a: torch.Tensor, hits_b: torch.Tensor) -> PairedResult:
    """``hits_*``: per test image, how many seeds (runs) classified it right. With one seed this is
    McNemar's exact test; with several, each image counts once, for the side ahead on it."""
    if hits_a.shape != hits_b.shape:
        raise ValueError(f"hit counts must cover the same images, got {tuple(hits_a.shape)} and {tuple(hits_b.shape)}")
    d = hits_a.long() - hits_b.long()
    a, b = int((d > 0).sum()), int((d < 0).sum())
    return PairedResult(a, b, sign_test_p(a, b))


__all__ = ["PairedResult", "paired_sign_test", "sign_test_p"]
