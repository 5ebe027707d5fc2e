"""RepQ-ViT's range estimator: pick the range among a few percentiles of the data by least error.

For each channel (or the whole tensor) the candidates are the ``(1-p, p)`` quantile pairs for
``p in {0.999, 0.9999, 0.99999}``; the one whose fake-quant error ``mean |x - x_hat|^2`` is least
wins. That is what the RepQ-ViT reference code does for every uniform quantizer.

Two departures, both forced by our conventions: weight quantizers are symmetric (signed int8
storage), so a symmetric candidate covers ``max(|lo|, |hi|)``; and ``widen=False`` (used for the
per-channel post-norm quantizers before their fold) keeps a channel's range as found, with a zero
point that may lie outside the grid, as the reference does. Such a channel may not contain 0 at
all (a LayerNorm channel with a large shift), and widening it to 0 would waste most of its grid;
the fold makes the zero point layer-wise and in range anyway (see :mod:`reparq.model.postnorm`).
"""

from __future__ import annotations

import torch

from reparq.quant.ranges import _as_channels, params_from_range, quant_error
from reparq.quant.uniform import int_range

PERCENTILES = (0.999, 0.9999, 0.99999)
_QUANTILE_LIMIT = 16_000_000  # torch.quantile's input size limit


def unwidened_params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric scale and integer zero point that map [lo, hi] onto the grid as is (no widening
    to contain 0, no clamping of the zero point)."""
    qmin, qmax = int_range(bits, symmetric=False)
    eps = torch.finfo(torch.float32).eps
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(eps)
    return scale, qmin - torch.round(lo / scale)


def _quantiles(rows: torch.Tensor, qs: list[float]) -> torch.Tensor:
    if rows.shape[1] > _QUANTILE_LIMIT // max(1, rows.shape[0]):
        step = max(1, rows.shape[1] * rows.shape[0] // _QUANTILE_LIMIT + 1)
        rows = rows[:, ::step]
    return torch.quantile(rows, torch.tensor(qs, dtype=rows.dtype, device=rows.device), dim=1)


@torch.no_grad()
def percentile_search_params(x: torch.Tensor, bits: int, symmetric: bool, axis: int | None = None,
                             percentiles: tuple[float, ...] = PERCENTILES, widen: bool = True, p: float = 2.0,
                             narrow: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (``axis``) or per-tensor range from the least-error percentile pair."""
    rows = _as_channels(x, axis)
    qmin, qmax = int_range(bits, symmetric, narrow)
    levels = _quantiles(rows, [q for pct in percentiles for q in (1.0 - pct, pct)])
    best = None
    for i, _ in enumerate(percentiles):
        lo, hi = levels[2 * i], levels[2 * i + 1]
        if symmetric or widen:
            scale, zp = params_from_range(lo, hi, bits, symmetric, narrow)
        else:
            scale, zp = unwidened_params(lo, hi, bits)
        err = quant_error(rows, scale, zp, qmin, qmax, p)
        if best is None:
            best = [err, scale, zp]
            continue
        better = err < best[0]
        best = [torch.where(better, err, best[0]), torch.where(better, scale, best[1]), torch.where(better, zp, best[2])]
    return best[1], best[2]


__all__ = ["PERCENTILES", "percentile_search_params", "unwidened_params"]
