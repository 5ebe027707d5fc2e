"""A quantized reparq model as the Hugging Face export reads it: the saved description
(``reparq.json``'s layers, attention, info, source) and its tensors, one shard at a time.

Two kinds of source give the same view: a model in memory (:func:`from_model`; one shard, the
tensors :func:`reparq.deploy.serialize.export_state` would save) and a directory written by
``reparq.save`` or ``reparq stream`` (:func:`from_directory`): there every decoder layer is a
shard of its own (``parts/step-0000k.safetensors``), read memory-mapped, so the export holds one
layer at a time whatever the model's size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from reparq.deploy.serialize import TENSOR_FILE, export_state, read_meta
from reparq.errors import ReparqError


@dataclass
class Shard:
    """Tensor names and shapes of one shard; ``load`` reads the named tensors."""

    shapes: dict[str, tuple[int, ...]]
    load: Callable[[list[str]], dict[str, torch.Tensor]]


@dataclass
class ReparqSource:
    layers: dict  # {layer name: {"type", "weight": quantizer meta, "input": quantizer meta}}
    attention: dict  # {attention module: {"bits", "probs"}}
    source: str | None  # "zoo:NAME", "hf:PATH" or None
    shards: list[Shard]
    config: object | None = None  # the transformers config when known (a model in memory)
    info: dict = field(default_factory=dict)

    def keys(self) -> set[str]:
        return {k for s in self.shards for k in s.shapes}

    def shape(self, key: str) -> tuple[int, ...]:
        for s in self.shards:
            if key in s.shapes:
                return s.shapes[key]
        raise KeyError(key)

    def load(self, keys) -> dict[str, torch.Tensor]:
        """Tensors by name from whichever shards hold them (small ones: the refusal checks)."""
        keys, out = set(keys), {}
        for s in self.shards:
            mine = [k for k in keys if k in s.shapes]
            if mine:
                out.update(s.load(mine))
        return out


def from_model(qmodel: nn.Module) -> ReparqSource:
    """The source of a model returned by ``reparq.quantize`` (or ``reparq.load``)."""
    from reparq.model.attention_adapters import describe_attention

    info = getattr(qmodel, "reparq_info", None)
    if info is None:
        raise ReparqError("only models returned by reparq.quantize or reparq.load can be exported")
    layers, tensors = export_state(qmodel)
    shard = Shard({k: tuple(v.shape) for k, v in tensors.items()}, lambda keys: {k: tensors[k] for k in keys})
    extra = getattr(info, "extra", {}) or {}
    return ReparqSource(layers, describe_attention(qmodel), extra.get("source"), [shard],
                        getattr(qmodel, "config", None), {"recipe": info.recipe, "config": info.config})


def _file_shard(path: Path) -> Shard:
    from safetensors import safe_open

    if not path.exists():
        raise ReparqError(f"{path.parent} is not a complete saved reparq model: {path.name} is missing")
    with safe_open(str(path), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    def load(keys: list[str]) -> dict[str, torch.Tensor]:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in keys}

    return Shard(shapes, load)


def from_directory(directory: str | Path) -> ReparqSource:
    """The source of a directory written by ``reparq.save`` or ``reparq stream``."""
    directory = Path(directory)
    meta = read_meta(directory)
    shards = [_file_shard(directory / name) for name in meta.get("shards") or [TENSOR_FILE]]
    info = meta.get("info") or {}
    return ReparqSource(meta.get("layers", {}), meta.get("attention", {}), meta.get("source"), shards, None,
                        {"recipe": info.get("recipe"), "config": info.get("config")})


__all__ = ["ReparqSource", "Shard", "from_directory", "from_model"]
