"""AdaRound soft rounding for a per-channel weight quantizer (Nagel et al., 2020).

Each weight learns whether it rounds up or down: ``w_hat = s * (floor(w/s) + h(V) - z)`` with
``h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``. The regularizer
``sum(1 - |2h - 1|^beta)`` (beta annealed from 20 to 2) pushes h to 0 or 1; at the end the
rounding is made hard and the weights are written back exactly on the grid.

Memory matters here: a LLaMA-size output layer has 65 M weights, and plain autograd keeps about
a dozen weight-sized tensors per step (``floor(w/s)``, the sigmoid, two clamp inputs, the
regularizer's chain...). So the soft weight is a custom autograd function that saves nothing but
``V`` and the float weight (both already held) and recomputes its elementwise chain in row
chunks in the backward pass, and the regularizer's gradient is added to ``V.grad`` chunk by chunk
instead of going through the graph. ``V`` is split into row-chunk parameters, so Adam's own
temporaries are chunk-sized too. Per weight, what stays is the float weight, ``V``, Adam's two
moments and the gradient; the elementwise math is that of the plain autograd form (tests compare
the two).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn

from reparq.quant.uniform import UniformQuantizer

ZETA, GAMMA = 1.1, -0.1
CHUNK_ELEMENTS = 1 << 20  # elementwise work is done in row chunks of about this many weights


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _row_chunks(t: torch.Tensor) -> Iterator[slice]:
    """Slices of dim 0 covering about CHUNK_ELEMENTS elements each."""
    rows = t.shape[0] if t.ndim else 1
    per_row = max(1, t.numel() // max(1, rows))
    step = max(1, CHUNK_ELEMENTS // per_row)
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def _rows_of(p: torch.Tensor, rows: slice) -> torch.Tensor:
    """A per-channel parameter (broadcast shape) cut to ``rows`` when it varies along dim 0."""
    return p[rows] if p.ndim and p.shape[0] > 1 else p


def _soft_weight(v: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                 qmin: int, qmax: int) -> torch.Tensor:
    """The reference form, differentiable in ``v`` (the backward recomputes it chunk by chunk)."""
    ints = torch.clamp(torch.floor(weight / scale) + rectified_sigmoid(v) + zero_point, qmin, qmax)
    return (ints - zero_point) * scale


@torch.no_grad()
def _soft_weight_lean(v_chunks, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                      qmin: int, qmax: int, hard: bool) -> torch.Tensor:
    """The same values as :func:`_soft_weight` (or its hard form), written chunk by chunk into one
    output tensor: no weight-sized temporaries."""
    out = torch.empty_like(weight)
    for rows, v in zip(_row_chunks(weight), v_chunks):
        s, z = _rows_of(scale, rows), _rows_of(zero_point, rows)
        h = (v >= 0).to(weight.dtype) if hard else rectified_sigmoid(v)
        chunk = torch.floor(weight[rows] / s).add_(h).add_(z).clamp_(qmin, qmax)
        out[rows] = chunk.sub_(z).mul_(s)
    return out


class _SoftRound(torch.autograd.Function):
    """Soft weight from row-chunk parameters ``V_1..V_k``; saves nothing weight-sized of its own."""

    @staticmethod
    def forward(ctx, weight, scale, zero_point, qmin, qmax, *v_chunks):  # noqa: D102 (autograd protocol)
        ctx.save_for_backward(weight, scale, zero_point, *v_chunks)
        ctx.bounds = (qmin, qmax)
        return _soft_weight_lean(v_chunks, weight, scale, zero_point, qmin, qmax, hard=False)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        weight, scale, zero_point, *v_chunks = ctx.saved_tensors
        grads = []
        for rows, v in zip(_row_chunks(weight), v_chunks):
            with torch.enable_grad():
                vc = v.detach().requires_grad_(True)
                out = _soft_weight(vc, weight[rows], _rows_of(scale, rows), _rows_of(zero_point, rows), *ctx.bounds)
                grads.append(torch.autograd.grad(out, vc, grad[rows])[0])
        return (None, None, None, None, None, *grads)


def _regularizer_terms(v: torch.Tensor, beta: float) -> torch.Tensor:
    return 1 - (2 * rectified_sigmoid(v) - 1).abs().pow(beta)


class AdaRound(nn.Module):
    """Learnable rounding state attached to a weight quantizer while a unit is reconstructed.

    ``V`` is held as row-chunk parameters (``parameters()``; :attr:`v` is their concatenation, for
    reading): Adam then updates one chunk at a time, so its temporaries are chunk-sized, and its
    per-element arithmetic is that of a single ``V``. ``floor(w/s)`` is recomputed from the float
    weight rather than stored: the weight and its scale do not change while the rounding learns."""

    def __init__(self, quantizer: UniformQuantizer, weight: torch.Tensor) -> None:
        super().__init__()
        self.quantizer = quantizer
        scale, _ = quantizer.shaped_params(weight)
        chunks = []
        with torch.no_grad():
            for rows in _row_chunks(weight):
                ratio = weight[rows] / _rows_of(scale, rows)
                frac = (ratio - torch.floor(ratio)).clamp_(1e-4, 1 - 1e-4)
                # Initialize so that h(V) equals the fractional part: the soft weight starts at the float weight.
                chunks.append(nn.Parameter(-torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1)))
        self.v_chunks = nn.ParameterList(chunks)
        self.hard = False

    @property
    def v(self) -> torch.Tensor:
        return torch.cat([c.detach() for c in self.v_chunks])

    @property
    def v_grad(self) -> torch.Tensor | None:
        grads = [c.grad for c in self.v_chunks]
        return None if any(g is None for g in grads) else torch.cat(grads)

    def h(self) -> torch.Tensor:
        return (self.v >= 0).float() if self.hard else rectified_sigmoid(self.v)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        q = self.quantizer
        scale, zero_point = q.shaped_params(weight)
        scale, zero_point, weight = scale.detach(), zero_point.detach(), weight.detach()
        if self.hard or not torch.is_grad_enabled():
            return _soft_weight_lean(list(self.v_chunks), weight, scale, zero_point, q.qmin, q.qmax, hard=self.hard)
        return _SoftRound.apply(weight, scale, zero_point, q.qmin, q.qmax, *self.v_chunks)

    @torch.no_grad()
    def regularizer(self, beta: float) -> torch.Tensor:
        """The regularizer's value (for reporting; its gradient comes from :meth:`add_regularizer_grad`)."""
        return sum(_regularizer_terms(c, beta).sum() for c in self.v_chunks)

    def add_regularizer_grad(self, beta: float, weight: float) -> None:
        """``V.grad += weight * d regularizer / dV``, chunk by chunk: what backpropagating
        ``weight * regularizer`` would add, without its weight-sized intermediates."""
        for c in self.v_chunks:
            upstream = torch.tensor(weight, dtype=c.dtype, device=c.device)
            with torch.enable_grad():
                vc = c.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(_regularizer_terms(vc, beta).sum(), vc, upstream)
            if c.grad is None:
                c.grad = g
            else:
                c.grad += g


def beta_schedule(step: int, total: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0) -> float | None:
    """None during warm-up (no regularization), then linear decay from ``start`` to ``end``."""
    begin = int(warmup * total)
    if step < begin:
        return None
    return end + (start - end) * max(0.0, 1 - (step - begin) / max(1, total - begin))


__all__ = ["AdaRound", "beta_schedule", "rectified_sigmoid"]
