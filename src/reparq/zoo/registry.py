"""Registry of the zoo's committed checkpoints: ``list_models()`` and ``load_model(name)``."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch.nn as nn

from reparq.errors import ReparqError

CHECKPOINT_DIR = Path(__file__).with_name("checkpoints")
# Zoo models outside the Fashion-MNIST image family: name -> "module:function" that loads the
# committed checkpoint. Not in list_models(), which the image benchmarks iterate.
TEXT_MODELS = {"llama_fm": "reparq.zoo.train_lm:load_llama_fm", "opt_fm": "reparq.zoo.train_lm:load_opt_fm"}


def checkpoint_path(name: str) -> Path:
    return CHECKPOINT_DIR / f"{name}.safetensors"


def card_path(name: str) -> Path:
    return CHECKPOINT_DIR / f"{name}.json"


def _architectures() -> dict:
    from reparq.zoo.architectures import ARCHITECTURES  # imports timm: keep it out of `import reparq`

    return ARCHITECTURES


def list_models(trained_only: bool = True) -> list[str]:
    """Zoo model names; by default only those whose checkpoint is committed."""
    names = sorted(_architectures())
    return [n for n in names if checkpoint_path(n).exists()] if trained_only else names


def model_card(name: str) -> dict:
    path = card_path(name)
    if not path.exists():
        raise ReparqError(f"zoo model {name!r} has no checkpoint; train it with: reparq zoo train {name}")
    return json.loads(path.read_text())


def load_model(name: str) -> nn.Module:
    """Build a zoo model in its training-time form and load its committed weights (eval mode)."""
    if name in TEXT_MODELS:
        module, _, function = TEXT_MODELS[name].partition(":")
        return getattr(importlib.import_module(module), function)()
    archs = _architectures()
    if name not in archs:
        raise ReparqError(f"unknown zoo model {name!r}; choose one of: {', '.join(sorted(archs))}")
    path = checkpoint_path(name)
    if not path.exists():
        raise ReparqError(f"zoo model {name!r} has no checkpoint at {path}; train it with: reparq zoo train {name}")
    from safetensors.torch import load_file

    model = archs[name]()
    model.load_state_dict(load_file(str(path)))
    return model.eval()
