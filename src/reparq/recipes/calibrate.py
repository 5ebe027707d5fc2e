"""Passes that set quantization ranges from data (activations) or from the weights themselves."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from reparq.config import QuantConfig
from reparq.nn.attention import matmul_quantizers
from reparq.nn.qmodules import quantized_layers
from reparq.parallel import merge_observer
from reparq.progress import SILENT, Reporter
from reparq.quant.observer import ActivationObserver
from reparq.quant.percentile_search import percentile_search_params
from reparq.quant.ranges import estimate_params


def forward_batch(model: nn.Module, batch):
    """One forward on a calibration batch: a tensor is the model's input; a dict holds keyword
    inputs (``input_ids``, ``attention_mask``, ... of a Hugging Face model)."""
    return model(**batch) if isinstance(batch, dict) else model(batch)


def batch_samples(batch) -> int:
    """How many samples a calibration batch holds (a tensor's rows, or a dict's first tensor's)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    return next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor))


@torch.no_grad()
def init_weight_ranges(model: nn.Module, config: QuantConfig, names: list[str] | None = None,
                       percentile_search: bool = False) -> None:
    """(Re-)initialize the weight ranges of the named quantized layers (all when None): per output
    channel (per group with ``w_group_size``, or per tensor) with the configured estimator, or
    RepQ-ViT's per-channel percentile search with ``percentile_search``.

    The ``percentile`` estimator makes no sense for a few hundred weights per channel, so it uses
    minmax for weights (the percentile baseline clips activations only).
    """
    estimator = "minmax" if config.w_estimator == "percentile" else config.w_estimator
    wanted = None if names is None else set(names)
    for name, layer in quantized_layers(model):
        wq = layer.weight_quantizer
        if wq.is_float or (wanted is not None and name not in wanted):
            continue
        data, axis = wq.estimation_view(layer.weight)  # with groups: one row per (output row, group)
        if percentile_search:
            scale, zp = percentile_search_params(data, wq.bits, True, axis, narrow=wq.narrow)
        else:
            scale, zp = estimate_params(data, estimator, wq.bits, wq.symmetric, axis, narrow=wq.narrow)
        wq.set_params(scale, zp)


def set_quant_enabled(model: nn.Module, weights: bool, inputs: bool) -> None:
    for _, layer in quantized_layers(model):
        layer.set_quant_enabled(weights, inputs)
    for _, mq in matmul_quantizers(model):  # attention matmul inputs are activations too
        mq.set_enabled(inputs)


def float_pass(model: nn.Module, batches: Iterable, hooks: list, reporter: Reporter = SILENT) -> None:
    """Run the calibration batches through the float model (every quantizer off) for the forward
    ``hooks`` already registered to observe it; the hooks are removed and quantization is turned
    back on afterwards, also when a batch fails. ``reporter``: advanced once per batch."""
    set_quant_enabled(model, weights=False, inputs=False)
    try:
        for batch in batches:
            forward_batch(model, batch)  # dict batches (HF models) run as model(**batch)
            reporter.advance(1)
    finally:
        for h in hooks:
            h.remove()
        set_quant_enabled(model, weights=True, inputs=True)


def activation_quantizers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every data-calibrated activation quantizer: layer inputs and attention matmul inputs."""
    found = [(f"{n}.input_quantizer", layer.input_quantizer) for n, layer in quantized_layers(model)]
    found += [(f"{n}.{k}", q) for n, mq in matmul_quantizers(model) for k, q in mq.uniform_quantizers()]
    return [(n, q) for n, q in found if not q.is_float]


@torch.no_grad()
def init_activation_ranges(model: nn.Module, batches: Iterable[torch.Tensor], config: QuantConfig,
                           seed: int = 0, reporter: Reporter = SILENT, params_fn=None,
                           observer_index: dict[str, int] | None = None) -> None:
    """Observe every activation quantizer's input on the float model over the calibration batches,
    then pick ranges: ``params_fn(observer, quantizer) -> (scale, zero_point)`` when given (a
    recipe's own estimator), else ``config.a_estimator``.

    Observer ``i`` subsamples with seed ``seed + i``; ``observer_index`` gives each quantizer its
    index in the whole model when ``model`` is one part of it (streamed calibration). Under data
    parallelism (:mod:`reparq.parallel`) the observers are merged over ranks first."""
    layers = activation_quantizers(model)
    index = observer_index or {n: i for i, (n, _) in enumerate(layers)}
    observers = {n: ActivationObserver(config.observer_samples, seed=seed + index[n]) for n, _ in layers}
    hooks = [quantizer.register_forward_pre_hook(lambda m, args, n=n: observers[n].update(args[0]))
             for n, quantizer in layers]
    batches = list(batches)
    reporter.stage("observe activations", total=len(batches))
    float_pass(model, batches, hooks, reporter)
    for name, aq in layers:
        merge_observer(observers[name])
        if params_fn is not None:
            scale, zp = params_fn(observers[name], aq)
        else:
            scale, zp = observers[name].params(config.a_estimator, aq.bits, aq.symmetric, config.percentile)
        aq.set_params(scale, zp)
