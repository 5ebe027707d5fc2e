"""Sharded safetensors checkpoints (the Hugging Face layout): write one shard at a time, read one
tensor at a time.

``model.safetensors.index.json`` maps every tensor name to its shard; :class:`LazyCheckpoint`
opens shards with ``safetensors.safe_open`` (memory-mapped), so reading a decoder layer's
tensors touches only those bytes. A single ``model.safetensors`` without an index works too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from reparq.errors import ReparqError

INDEX_FILE, SINGLE_FILE = "model.safetensors.index.json", "model.safetensors"


class LazyCheckpoint:
    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index, single = self.directory / INDEX_FILE, self.directory / SINGLE_FILE
        if index.exists():
            try:
                self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise ReparqError(f"{index} is not a safetensors index: {exc}") from exc
        elif single.exists():
            with safe_open(str(single), framework="pt") as f:
                self.weight_map = {k: SINGLE_FILE for k in f.keys()}
        else:
            raise ReparqError(f"{self.directory} holds no safetensors weights ({INDEX_FILE} or {SINGLE_FILE})")
        missing = {s for s in set(self.weight_map.values()) if not (self.directory / s).exists()}
        if missing:
            raise ReparqError(f"{self.directory}: shard(s) {', '.join(sorted(missing))} named in the index are missing")

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def names(self, prefix: str = "") -> list[str]:
        return [n for n in self.weight_map if n.startswith(prefix)]

    def load(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors, each shard opened once."""
        by_shard: dict[str, list[str]] = {}
        for n in names:
            if n not in self.weight_map:
                raise ReparqError(f"{self.directory}: tensor {n!r} is not in the checkpoint")
            by_shard.setdefault(self.weight_map[n], []).append(n)
        out = {}
        for shard, keys in by_shard.items():
            with safe_open(str(self.directory / shard), framework="pt") as f:
                for k in keys:
                    out[k] = f.get_tensor(k)
        return out


def write_sharded(tensors: Iterator[tuple[str, torch.Tensor]], directory: str | Path, max_shard_mb: float = 500.0,
                  metadata: dict | None = None) -> list[str]:
    """Write ``(name, tensor)`` pairs as shards of at most ``max_shard_mb`` plus the index; only
    one shard is held in memory at a time. Returns the shard file names."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shard: dict[str, torch.Tensor] = {}
    size, total, weight_map, names = 0, 0, {}, []

    def flush(shard: dict[str, torch.Tensor]) -> None:
        name = f"model-{len(names) + 1:05d}.safetensors"  # no total count: it is unknown while writing
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        names.append(name)

    for key, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_shard_mb * 2**20:
            flush(shard)
            shard, size = {}, 0
        shard[key] = t.detach().contiguous()
        size += nbytes
        total += nbytes
    if shard:
        flush(shard)
    index = {"metadata": {"total_size": total, **(metadata or {})}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
    return names


__all__ = ["INDEX_FILE", "LazyCheckpoint", "write_sharded"]
