"""Data-parallel calibration over ``torch.distributed`` (gloo on CPU, NCCL on GPUs).

Ranks hold contiguous blocks of the calibration batches, so concatenating per-rank results in
rank order gives the single-process order. Three things cross ranks, all through this module:

- activation statistics: each rank's observed values (the observer's subsample), min and max
  are gathered, so every rank picks the same range from the same data;
- post-norm statistics: the sampled rows of each norm's output are gathered likewise;
- reconstruction: every rank draws the same *global* minibatch indices (same seeded generator),
  computes the loss on the samples it holds, divided by the global minibatch size, and the
  gradients are summed over ranks before every optimizer step, so all ranks take the same step.

Library code asks :func:`current` for the active context; ``None`` (the default) is one process
and every function here is then a no-op. :func:`data_parallel` activates one.
"""

from __future__ import annotations

import contextvars
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch

_CURRENT: contextvars.ContextVar["DataParallel | None"] = contextvars.ContextVar("reparq_data_parallel", default=None)


@dataclass
class DataParallel:
    rank: int
    world: int
    # Samples held by each rank (rank order); set once the local calibration data is known.
    counts: list[int] | None = None

    @property
    def offset(self) -> int:
        return sum(self.counts[: self.rank])

    def set_local_count(self, n: int) -> None:
        self.counts = [int(c) for c in all_gather_objects(n)]

    def shard(self, items: list) -> list:
        """This rank's contiguous block of ``items`` (batches), as even as possible."""
        per, extra = divmod(len(items), self.world)
        start = self.rank * per + min(self.rank, extra)
        return items[start:start + per + (1 if self.rank < extra else 0)]

    def total(self) -> int:
        return sum(self.counts)

    def local(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask over ``idx`` of the samples this rank holds, their local indices)."""
        lo, hi = self.offset, self.offset + self.counts[self.rank]
        mask = (idx >= lo) & (idx < hi)
        return mask, idx[mask] - lo


def current() -> DataParallel | None:
    return _CURRENT.get()


@contextmanager
def data_parallel(backend: str | None = None):
    """Join the process group that ``torchrun`` describes (``WORLD_SIZE`` > 1) and make it the
    active context; without torchrun's environment this is one process and yields ``None``."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield None
        return
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    ctx = DataParallel(dist.get_rank(), dist.get_world_size())
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)
        if created:
            dist.destroy_process_group()


def all_gather_objects(obj) -> list:
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor (any first-dimension length per rank) over ranks, in rank order."""
    if current() is None:
        return t
    return torch.cat([p.to(t.device) for p in all_gather_objects(t.detach().cpu())]).to(t.dtype)


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    if current() is None:
        return t
    import torch.distributed as dist

    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    dist.all_reduce(t, op=ops[op])
    return t


def all_reduce_grads(params) -> None:
    """Sum gradients over ranks (a rank whose share of the minibatch was empty sends zeros)."""
    if current() is None:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        all_reduce_(p.grad, "sum")


def merge_observer(observer) -> None:
    """Make an :class:`~reparq.quant.observer.ActivationObserver` hold what all ranks saw: the
    values concatenated in rank order (subsampled to its budget), and the global min and max."""
    if current() is None:
        return
    observer.min = all_reduce_(observer.min.clone(), "min")
    observer.max = all_reduce_(observer.max.clone(), "max")
    observer.seen = int(sum(all_gather_objects(observer.seen)))
    pool = gather_cat(observer.samples)
    if pool.numel() > observer.max_samples:
        pool = pool[torch.randperm(pool.numel(), generator=observer.gen)[:observer.max_samples]]
    observer.samples = pool


__all__ = ["DataParallel", "all_reduce_", "all_reduce_grads", "current", "data_parallel", "gather_cat",
           "merge_observer"]
