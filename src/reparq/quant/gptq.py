"""GPTQ rounding for a Linear weight on a fixed per-output-channel grid (Frantar et al., 2023).

AdaRound learns each weight's rounding by gradient descent; with a few hundred steps per block
on CPU that is far from converged at 4-6 bits. GPTQ instead rounds the input columns one at a
time and spreads each column's rounding error over the columns not yet rounded, weighted by the
inverse Hessian ``H = X^T X`` of the layer's squared output error. That is the exact optimal
update for the remaining columns, costs one Cholesky factorization per layer, and needs no
learning rate or iteration count.

Here the grid (the weight quantizer's per-channel scales, set by the range search) stays fixed
and ``X`` is the layer's *quantized* input as the deployed model computes it (RepQuant's
quantized weight reconstruction works on quantized activations). The result lies exactly on the
grid, so the quantizer reproduces it.
"""

from __future__ import annotations

import torch

from reparq.errors import ReparqError

UPDATE_ROWS = 2048  # rows per step of the error update (bounds its temporary; any value gives the same result)


class HessianAccumulator:
    """``X^T X`` over the rows of every batch seen, in float64 (sums of many outer products)."""

    def __init__(self, features: int) -> None:
        self.xtx = torch.zeros(features, features, dtype=torch.float64)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(device="cpu", dtype=torch.float64)
        self.xtx += x.T @ x
        self.rows += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.rows == 0:
            raise ReparqError("GPTQ saw no inputs for a layer (was it run by the calibration forward?)")
        return self.xtx / self.rows


@torch.no_grad()
def gptq_round(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int,
               damp: float = 0.01, act_order: bool = True, block: int = 128) -> torch.Tensor:
    """``weight`` [out, in] rounded onto the symmetric grid ``scale * k`` (``k`` in ``[qmin, qmax]``,
    ``scale`` per output row, one scalar, or one per weight: grouped scales expanded to the weight's
    shape), minimizing ``||(W - Q) X^T||`` for ``H = X^T X / n``.

    ``damp`` adds that fraction of the mean diagonal to ``H`` (a few thousand calibration tokens do
    not pin down a 1536-wide layer's Hessian); ``act_order`` rounds the columns with the largest
    input energy first, while the most columns are left to absorb their error.
    """
    if weight.ndim != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ReparqError(f"GPTQ needs a [out, in] weight and an [in, in] Hessian, got {tuple(weight.shape)} "
                          f"and {tuple(hessian.shape)}")
    h = hessian.detach().to(torch.float64, copy=True)
    grouped = tuple(scale.shape) == tuple(weight.shape)  # a scale per weight: grouped scales, expanded
    s = scale.detach().to(torch.float64) if grouped else scale.detach().to(torch.float64).reshape(-1)
    s = s.expand(weight.shape[0]).clone() if s.numel() == 1 else s
    if not grouped and s.numel() != weight.shape[0]:
        raise ReparqError(f"GPTQ needs one scale per output row ({weight.shape[0]}) or one per weight (grouped "
                          f"scales expanded), got {s.numel()}")
    dead = torch.diag(h) == 0  # inputs that were always zero: their weights do not matter
    h[dead, dead] = 1.0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(weight.shape[1])
    # Permuted before it is widened, so that one float64 copy of the weight is live, not two (each is
    # 0.5 GB for a 1.1B LLaMA's lm_head, which stays at 8 bits and is rounded here too).
    w = weight.detach()[:, perm].to(torch.float64)
    if grouped:  # the grid stays fixed (set from the unrounded weight), so act_order only reorders it
        s = s[:, perm]
    w[:, dead[perm]] = 0.0
    h = h[perm][:, perm]
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    # Upper Cholesky factor of H^-1: row i holds the update that column i's error spreads to j > i.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    out = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)  # in the caller's column order
    for start in range(0, w.shape[1], block):
        end = min(start + block, w.shape[1])
        wb, err = w[:, start:end].clone(), torch.zeros(w.shape[0], end - start, dtype=w.dtype)
        hb = hinv[start:end, start:end]
        for j in range(end - start):
            col = wb[:, j]
            sj = s[:, start + j] if grouped else s
            qcol = torch.clamp(torch.round(col / sj), qmin, qmax) * sj
            out[:, perm[start + j]] = qcol
            e = (col - qcol) / hb[j, j]
            wb[:, j:] -= e.unsqueeze(1) * hb[j, j:].unsqueeze(0)
            err[:, j] = e
        # The error spread to the columns left, a band of rows at a time: the whole product would be
        # one more weight-sized float64 temporary.
        for r in range(0, w.shape[0], UPDATE_ROWS):
            w[r:r + UPDATE_ROWS, end:] -= err[r:r + UPDATE_ROWS] @ hinv[start:end, end:]
    return out


__all__ = ["HessianAccumulator", "gptq_round"]
