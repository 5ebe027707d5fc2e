"""Whether one quantized model is really better than another on the same test items.

Accuracy gaps of a few images in 10k (or perplexity gaps of 0.01) are common between PTQ recipes;
a paired test on the items (images, text windows) says whether such a gap exceeds the test set's
noise. Seeds (calibration subsets) are not independent of each other on one item, items are: so
per-item scores pooled over seeds are compared item by item, and the test is over items.

The benchmarks keep each row's per-item scores (``encode_hits`` / ``decode_hits`` for the
images' right/wrong), so the test is an analysis of the committed rows, not a second run.
"""

from __future__ import annotations

import base64
import math
import statistics
from dataclasses import dataclass

import numpy as np
import torch


def sign_test_p(wins: int, losses: int) -> float:
    """Exact two-sided binomial p of ``wins`` against ``losses`` under a fair coin (ties dropped)."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1))
    return min(1.0, 2 * tail / 2 ** n)  # integers: a float 2.0 ** n overflows past 1023 discordant items


@dataclass(frozen=True)
class PairedResult:
    a_ahead: int  # items on which A scores higher than B (e.g. images right on more seeds)
    b_ahead: int
    p_value: float


def paired_sign_test(score_a: torch.Tensor, score_b: torch.Tensor) -> PairedResult:
    """``score_*``: per test item, a score where higher is better, e.g. how many seeds classified an
    image right. With one seed and 0/1 hits this is McNemar's exact test; with several, each item
    counts once, for the side ahead on it."""
    d = _differences(score_a, score_b)
    a, b = int((d > 0).sum()), int((d < 0).sum())
    return PairedResult(a, b, sign_test_p(a, b))


def sign_flip_p(score_a: torch.Tensor, score_b: torch.Tensor, rounds: int = 20000, seed: int = 0,
                chunk: int = 1000) -> float:
    """Two-sided randomization p of the *mean* per-item difference (a mean metric such as
    perplexity asks about the mean, which the sign test does not): under the null each item's
    difference is as likely negative as positive, so its sign is flipped at random, seeded.

    Items with no difference are left out before drawing: flipping a zero changes no sum, and on
    images most differences are zero (a few hundred discordant images in 10k), so this draws 25x
    fewer signs for the same test. The flips are drawn ``chunk`` rounds at a time (one stream, so
    the same p)."""
    d = _differences(score_a, score_b)
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    d = d[d != 0]
    observed = float(d.sum().abs())
    g = torch.Generator().manual_seed(seed)
    extreme = 0
    for start in range(0, rounds, chunk):
        signs = torch.randint(0, 2, (min(chunk, rounds - start), d.numel()), generator=g, dtype=torch.float64) * 2 - 1
        extreme += int(((signs @ d).abs() >= observed - 1e-9).sum())
    return (extreme + 1) / (rounds + 1)


def mean_difference_interval(score_a: torch.Tensor, score_b: torch.Tensor,
                             level: float = 0.95) -> tuple[float, float, float]:
    """The mean per-item difference ``a - b`` and its two-sided ``level`` confidence interval
    (normal approximation over items: thousands of images or hundreds of windows).

    A p value says whether a gap is noise; this says how large a gap the test set still allows,
    which is what "A is at least as good as B" can honestly claim: A trails B by no more than the
    interval's far end (a non-inferiority margin)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    d = _differences(score_a, score_b)
    if d.numel() < 2:
        raise ValueError("an interval needs at least two items")
    mean = float(d.mean())
    half = statistics.NormalDist().inv_cdf(0.5 + level / 2) * float(d.std(unbiased=True)) / math.sqrt(d.numel())
    return mean, mean - half, mean + half


def _differences(score_a: torch.Tensor, score_b: torch.Tensor) -> torch.Tensor:
    if score_a.shape != score_b.shape or score_a.ndim != 1:
        raise ValueError(f"scores must cover the same items (two 1-D tensors of one length), "
                         f"got {tuple(score_a.shape)} and {tuple(score_b.shape)}")
    return score_a.double() - score_b.double()


def encode_hits(hits: torch.Tensor) -> str:
    """Per-image right/wrong as base64 of packed bits: 10k images in 1.7 kB of JSON."""
    return base64.b64encode(np.packbits(hits.bool().numpy()).tobytes()).decode("ascii")


def decode_hits(text: str, count: int) -> torch.Tensor:
    """Inverse of :func:`encode_hits` (``count``: how many images were encoded)."""
    bits = np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))
    if bits.size < count or bits.size - count >= 8:
        raise ValueError(f"encoded hits hold {bits.size} bits, not {count} images")
    return torch.from_numpy(bits[:count].astype(bool))


__all__ = ["PairedResult", "decode_hits", "encode_hits", "mean_difference_interval", "paired_sign_test", "sign_flip_p",
           "sign_test_p"]
