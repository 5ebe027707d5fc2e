"""The public entry points: ``quantize`` and ``evaluate``."""

from __future__ import annotations

import copy
import dataclasses
import math
import random
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn

from reparq.config import QuantConfig
from reparq.errors import ReparqError
from reparq.info import QuantInfo
from reparq.eval.measure import measure
from reparq.nn.qmodules import bake_shared_weights
from reparq.progress import SILENT, Reporter
from reparq.recipes.output_ranges import record_output_ranges


def _batch_len(batch: Any) -> int:
    """Samples in a batch: a tensor's first dimension, or that of a dict's tensors."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.ndim > 0 else 0
    sizes = {v.shape[0] if v.ndim > 0 else 0 for v in batch.values() if isinstance(v, torch.Tensor)}
    if len(sizes) > 1:
        raise ReparqError(f"the tensors of a calibration batch disagree on the number of samples: "
                          f"{ {k: tuple(v.shape) for k, v in batch.items() if isinstance(v, torch.Tensor)} }")
    return sizes.pop() if sizes else 0


def _head(batch: Any, n: int) -> Any:
    """The first ``n`` samples of a tensor or dict batch."""
    if isinstance(batch, torch.Tensor):
        return batch[:n]
    return {k: v[:n] if isinstance(v, torch.Tensor) and v.ndim > 0 else v for k, v in batch.items()}


def _split_dict(data: Mapping, batch_size: int) -> list[dict]:
    n = _batch_len(dict(data))
    return [{k: v[i:i + batch_size] if isinstance(v, torch.Tensor) and v.ndim > 0 else v for k, v in data.items()}
            for i in range(0, n, batch_size)]


def _check_tensor(t: torch.Tensor, key: str | None = None) -> None:
    """Floats must be finite; integers are accepted as token ids [N, T] (or in a dict of keyword inputs)."""
    if torch.is_floating_point(t):
        if not bool(torch.isfinite(t).all()):
            raise ReparqError("calibration data contains NaN or infinite values; clean or drop those samples")
    elif key is None and t.ndim != 2:
        raise ReparqError(f"calibration data must be floating point (or integer token ids of shape [N, T]), "
                          f"got {t.dtype} of shape {tuple(t.shape)}")


def _as_batches(calib_data: Any, batch_size: int) -> list[Any]:
    """Accept a tensor [N, ...] (integer [N, T]: token ids), a dict of tensors [N, ...] (keyword
    inputs of a Hugging Face model: ``input_ids``, ``attention_mask``...), or an iterable of
    tensors, dicts or (input, target) pairs. Dict batches are run as ``model(**batch)``."""
    if isinstance(calib_data, (str, bytes)):
        raise ReparqError("calibration data must be a tensor or an iterable of batches, not a string "
                          "(load the files first, e.g. with reparq.data)")
    if isinstance(calib_data, torch.Tensor):
        batches = list(calib_data.split(batch_size)) if calib_data.ndim > 0 else []
    elif isinstance(calib_data, Mapping):
        batches = _split_dict(calib_data, batch_size)
    elif isinstance(calib_data, Iterable):
        batches = [b[0] if isinstance(b, (tuple, list)) else b for b in calib_data]
        batches = [dict(b) if isinstance(b, Mapping) else b for b in batches]
    else:
        raise ReparqError(f"calibration data must be a tensor or an iterable of batches, got {type(calib_data).__name__}")
    batches = [b for b in batches if isinstance(b, (torch.Tensor, dict)) and _batch_len(b) > 0]
    if not batches:
        raise ReparqError("calibration data is empty; pass at least one sample (e.g. 1024 training images)")
    for b in batches:
        if isinstance(b, dict):
            for k, v in b.items():
                if isinstance(v, torch.Tensor):
                    _check_tensor(v, k)
        else:
            _check_tensor(b)
    return batches


def _describe(batch: Any) -> str:
    if isinstance(batch, dict):
        return "{" + ", ".join(f"{k}: {tuple(v.shape)}" for k, v in batch.items() if isinstance(v, torch.Tensor)) + "}"
    return str(tuple(batch.shape))


def _check_model_accepts(model: nn.Module, batch: Any) -> None:
    from reparq.recipes.calibrate import forward_batch

    try:
        with torch.no_grad():
            out = forward_batch(model, _head(batch, 2))
    except Exception as exc:  # the model's own message says what it wanted
        raise ReparqError(f"the model rejects calibration inputs of shape {_describe(batch)}: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    if isinstance(out, torch.Tensor) and not bool(torch.isfinite(out).all()):
        raise ReparqError("the float model already gives non-finite outputs on the calibration data")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def resolve_recipe(recipe: str, w_bits: int, a_bits: int, options: dict):
    """(recipe spec, QuantConfig, recipe options) from a recipe name and keyword options, which are
    QuantConfig fields or the recipe's own; anything else is an error naming what is allowed."""
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
    return spec, config, recipe_options


def quantize(model: nn.Module, calib_data: Any = None, recipe: str | None = None, w_bits: int | None = None,
             a_bits: int | None = None, seed: int | None = None, batch_size: int | None = None,
             reporter: Reporter | None = None, config: Any = None, forward_loop: Any = None,
             **options: Any) -> nn.Module:
    """Quantize a copy of ``model`` with a named recipe; the caller's model is never modified.

    Defaults: recipe ``mse``, W8A8, seed 0, batch size 64. ``config`` (a preset name such as
    ``"w4a4"`` or ``"rep-w4a4-fast"``, a YAML path, or a :class:`reparq.runconfig.RunConfig`)
    replaces those defaults; the arguments passed explicitly here override the config.
    ``forward_loop``, instead of ``calib_data``, is a callable ``forward_loop(model)`` that runs
    the float model over your own data; the inputs it feeds are the calibration batches.

    ``options`` are :class:`~reparq.config.QuantConfig` fields (``ignore``, ``overrides``,
    ``keep_first_last_8bit``, ``strict``, ...) or the recipe's own options (e.g. ``iters`` for
    the reconstruction recipes). The returned model is a fake-quant
    ``nn.Module`` (same inputs and outputs as the original) carrying ``reparq_info``.
    """

    if config is not None:
        from reparq.runconfig import quantize_arguments

        resolved = quantize_arguments(config, model, dict(recipe=recipe, w_bits=w_bits, a_bits=a_bits, seed=seed,
                                                           batch_size=batch_size, options=options))
        recipe, w_bits, a_bits = resolved.pop("recipe"), resolved.pop("w_bits"), resolved.pop("a_bits")
        seed, batch_size, options = resolved.pop("seed"), resolved.pop("batch_size"), resolved
    recipe, w_bits, a_bits = recipe or "mse", 8 if w_bits is None else w_bits, 8 if a_bits is None else a_bits
    seed, batch_size = 0 if seed is None else seed, 64 if batch_size is None else batch_size
    if forward_loop is not None:
        from reparq.sources import record_forward_loop

        if calib_data is not None:
            raise ReparqError("pass calibration data or a forward_loop, not both")
        calib_data = record_forward_loop(model, forward_loop)
    elif calib_data is None:
        raise ReparqError("no calibration data: pass a tensor or batches, or forward_loop=fn(model)")
    spec, config, recipe_options = resolve_recipe(recipe, w_bits, a_bits, options)
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
        bake_shared_weights(qmodel)  # a tied embedding reads what the saved model will hold
    output_ranges = record_output_ranges(qmodel, batches)  # for the ONNX export only; not calibration time
    # Per-unit reconstruction loss curves, thinned to about 200 points, for `reparq report` (saved with the model).
    recon = getattr(qmodel, "reparq_recon_stats", None) or []
    curves = {s["unit"]: s["history"][::max(1, -(-len(s["history"]) // 200))] for s in recon if s.get("history")}
    qmodel.reparq_info = QuantInfo(recipe=recipe, config=config.to_dict(), seed=seed,
                                   calib_samples=sum(_batch_len(b) for b in batches),
                                   calib_seconds=round(m.seconds, 2), peak_mem_mb=m.peak_mem_mb,
                                   extra=({"recon_loss": curves} if curves else {})
                                   | ({"output_ranges": output_ranges} if output_ranges else {})
                                   # the input shape lets export_onnx trace without an example input
                                   | ({"input_shape": list(batches[0].shape[1:])} if isinstance(batches[0], torch.Tensor) else {}))
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
