"""The public entry points: ``quantize`` and ``evaluate``."""

from __future__ import annotations

import copy
import dataclasses
import math
import random
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.nn as nn

from reparq.config import QuantConfig
from reparq.errors import ReparqError
from reparq.eval.measure import measure
from reparq.progress import SILENT, Reporter


@dataclass
class QuantInfo:
    """What a quantized model remembers about how it was made (``model.reparq_info``)."""

    recipe: str
    config: dict
    seed: int
    calib_samples: int
    calib_seconds: float = 0.0
    peak_mem_mb: float = 0.0
    extra: dict = field(default_factory=dict)


def _as_batches(calib_data: Any, batch_size: int) -> list[torch.Tensor]:
    """Accept a tensor [N, ...], or an iterable of tensors / (input, target) pairs."""
    if isinstance(calib_data, (str, bytes)):
        raise ReparqError("calibration data must be a tensor or an iterable of batches, not a string "
                          "(load the files first, e.g. with reparq.data)")
    if isinstance(calib_data, torch.Tensor):
        batches = list(calib_data.split(batch_size)) if calib_data.ndim > 0 else []
    elif isinstance(calib_data, Iterable):
        batches = [b[0] if isinstance(b, (tuple, list)) else b for b in calib_data]
    else:
        raise ReparqError(f"calibration data must be a tensor or an iterable of batches, got {type(calib_data).__name__}")
    batches = [b for b in batches if isinstance(b, torch.Tensor) and b.numel() > 0]
    if not batches:
        raise ReparqError("calibration data is empty; pass at least one sample (e.g. 1024 training images)")
    for b in batches:
        if not torch.is_floating_point(b):
            raise ReparqError(f"calibration data must be floating point, got {b.dtype}")
        if not bool(torch.isfinite(b).all()):
            raise ReparqError("calibration data contains NaN or infinite values; clean or drop those samples")
    return batches


def _check_model_accepts(model: nn.Module, batch: torch.Tensor) -> None:
    try:
        with torch.no_grad():
            out = model(batch[:2])
    except Exception as exc:  # the model's own message says what it wanted
        raise ReparqError(f"the model rejects calibration inputs of shape {tuple(batch.shape)}: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    if isinstance(out, torch.Tensor) and not bool(torch.isfinite(out).all()):
        raise ReparqError("the float model already gives non-finite outputs on the calibration data")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def quantize(model: nn.Module, calib_data: Any, recipe: str = "mse", w_bits: int = 8, a_bits: int = 8,
             seed: int = 0, batch_size: int = 64, reporter: Reporter | None = None, **options: Any) -> nn.Module:
    """Quantize a copy of ``model`` with a named recipe; the caller's model is never modified.

    ``options`` are :class:`~reparq.config.QuantConfig` fields (``ignore``, ``overrides``,
    ``keep_first_last_8bit``, ``strict``, ...) or the recipe's own options (e.g. ``iters`` for
    the reconstruction recipes). The returned model is a fake-quant
    ``nn.Module`` (same inputs and outputs as the original) carrying ``reparq_info``.
    """
    from reparq.recipes.registry import get_recipe

    spec = get_recipe(recipe)
    recipe_fields = [f.name for f in dataclasses.fields(spec.options)] if spec.options else []
    allowed = QuantConfig.option_names() + recipe_fields
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ReparqError(f"unknown option(s) {', '.join(unknown)} for recipe {recipe!r}; allowed: {', '.join(allowed)}")
    config = QuantConfig(w_bits=w_bits, a_bits=a_bits,
                         **{**spec.defaults, **{k: v for k, v in options.items() if k not in recipe_fields}})
    recipe_options = spec.options(**{k: v for k, v in options.items() if k in recipe_fields}) if spec.options else None
    if not isinstance(model, nn.Module):
        raise ReparqError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ReparqError(f"batch_size must be a positive integer, got {batch_size!r}")
    batches = _as_batches(calib_data, batch_size)
    was_training = model.training
    try:
        _check_model_accepts(model.eval(), batches[0])
    finally:
        model.train(was_training)
    seed_everything(seed)
    qmodel = copy.deepcopy(model).eval()
    with measure() as m:
        qmodel = spec.run(qmodel, batches, config, seed=seed, reporter=reporter or SILENT, options=recipe_options)
    qmodel.reparq_info = QuantInfo(recipe=recipe, config=config.to_dict(), seed=seed,
                                   calib_samples=sum(b.shape[0] for b in batches),
                                   calib_seconds=round(m.seconds, 2), peak_mem_mb=m.peak_mem_mb)
    return qmodel


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy (percent) of a float or quantized classifier."""
    from reparq.eval.accuracy import top1

    if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ReparqError("images and labels must be non-empty and of the same length")
    acc = top1(model, images, labels, batch_size)
    if math.isnan(acc):
        raise ReparqError("evaluation produced NaN")
    return acc
