"""Cached unit inputs/outputs: in memory, or memory-mapped on disk above a size threshold.

Reconstruction samples random minibatches from the whole calibration set many times, so the
cache is one [N, ...] array per tensor; a NumPy memmap gives the same indexing from disk.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch


class TensorCache:
    def __init__(self, batches: list[torch.Tensor], threshold_mb: float = 512.0, cache_dir: str | Path | None = None,
                 name: str = "cache") -> None:
        full = torch.cat([b.detach().float() for b in batches])
        self.shape = tuple(full.shape)
        self._tmp = None
        self._path: Path | None = None
        if full.numel() * 4 / 2**20 > threshold_mb:
            if cache_dir is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="reparq-cache-")
                cache_dir = self._tmp.name
            path = Path(cache_dir) / f"{name.replace('/', '_')}.npy"
            arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=self.shape)
            arr[:] = full.numpy()
            arr.flush()
            del arr
            self._data = np.load(path, mmap_mode="r")
            self._path = path
            self.on_disk = True
        else:
            self._data = full
            self.on_disk = False

    def close(self) -> None:
        """Drop the data; a file this cache wrote is deleted."""
        self._data = None
        if self._path is not None:
            self._path.unlink(missing_ok=True)
            self._path = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __len__(self) -> int:
        return self.shape[0]

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        if self.on_disk:
            return torch.from_numpy(np.asarray(self._data[idx.numpy()]))
        return self._data[idx]

    def batches(self, batch_size: int):
        for start in range(0, len(self), batch_size):
            yield self.take(torch.arange(start, min(start + batch_size, len(self))))
