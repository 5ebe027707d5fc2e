"""Cached unit inputs/outputs: in memory, or memory-mapped on disk above a size threshold.

Reconstruction samples random minibatches from the whole calibration set many times, so the
cache is one [N, ...] array per tensor; a NumPy memmap gives the same indexing from disk.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import torch


def samples_within(budget_mb: float, values_per_sample: int, most: int | None = None) -> int:
    """How many samples of ``values_per_sample`` float32 values fit in ``budget_mb`` (at least one,
    at most ``most``): the batch size that bounds a large output (a language model's logits)."""
    fit = max(1, int(budget_mb * 2**20 // (4 * values_per_sample)))
    return fit if most is None else min(most, fit)


class TensorCache:
    def __init__(self, batches: Iterable[torch.Tensor], threshold_mb: float = 512.0,
                 cache_dir: str | Path | None = None, name: str = "cache", consume: bool = False,
                 total: int | None = None) -> None:
        """``batches`` is a list, or an iterator (say, a unit producing its outputs) with ``total``
        samples in all; each batch is written straight to its destination (a file above the
        threshold), so the array is never in memory twice. ``consume`` empties a list while
        copying it in, for a caller that is done with it."""
        if isinstance(batches, list):
            total = sum(len(b) for b in batches)
        elif total is None:
            raise ValueError("a cache filled from an iterator needs its total sample count")
        self._tmp = None
        self._path: Path | None = None
        self.on_disk = False
        dest = None
        start = 0
        for i, b in enumerate(batches):
            b = b.detach()
            if dest is None:
                self.shape = (total, *b.shape[1:])
                dest = self._allocate(threshold_mb, cache_dir, name)
            dest[start:start + len(b)] = b.float().numpy() if self.on_disk else b
            start += len(b)
            if consume:
                batches[i] = None
            del b
        if dest is None or start != total:
            raise ValueError(f"a cache of {total} samples was given {start}")
        if consume:
            batches.clear()
        if self.on_disk:
            dest.flush()
            del dest
            self._data = np.load(self._path, mmap_mode="r")
        else:
            self._data = dest

    def _allocate(self, threshold_mb: float, cache_dir: str | Path | None, name: str):
        if math.prod(self.shape) * 4 / 2**20 <= threshold_mb:
            return torch.empty(self.shape, dtype=torch.float32)
        self.on_disk = True
        if cache_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="reparq-cache-")
            cache_dir = self._tmp.name
        self._path = Path(cache_dir) / f"{name.replace('/', '_')}.npy"
        return np.lib.format.open_memmap(self._path, mode="w+", dtype=np.float32, shape=self.shape)

    def close(self) -> None:
        """Drop the data; a file this cache wrote is deleted."""
        self._data = None
        if self._path is not None:
            self._path.unlink(missing_ok=True)
            self._path = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def views(self, batch_size: int) -> list[torch.Tensor]:
        """The data in batches; where it is in memory, views sharing it (they outlive :meth:`close`)."""
        return list(self.batches(batch_size)) if self.on_disk else list(self._data.split(batch_size))

    def __len__(self) -> int:
        return self.shape[0]

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        if self.on_disk:
            return torch.from_numpy(np.asarray(self._data[idx.numpy()]))
        return self._data[idx]

    def batches(self, batch_size: int):
        for start in range(0, len(self), batch_size):
            yield self.take(torch.arange(start, min(start + batch_size, len(self))))
