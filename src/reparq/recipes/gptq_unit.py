"""GPTQ inside the reconstruction engine: a unit's Linear weights rounded one layer at a time on
the inputs the quantized model gives them (ReconConfig ``gptq=True``).

Layers are taken in the order the unit runs them, so each one's Hessian is measured with the
layers before it already rounded and every activation quantizer on: the error GPTQ compensates
is the deployed one. What follows in the engine (LSQ step sizes for the activations, AdaRound
for layers GPTQ does not handle, such as convolutions) then starts from these weights.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from reparq.nn.qmodules import QuantizedLayer
from reparq.quant.gptq import HessianAccumulator, gptq_round
from reparq.recipes.cache import TensorCache
from reparq.recipes.reconstruct import _StopForward, module_device


def gptq_layers(layers: dict[str, QuantizedLayer]) -> dict[str, QuantizedLayer]:
    """The layers GPTQ rounds: Linears with a quantized, symmetric weight grid."""
    return {n: l for n, l in layers.items() if isinstance(l, nn.Linear) and not l.weight_quantizer.is_float
            and l.weight_quantizer.symmetric}


@torch.no_grad()
def execution_order(module: nn.Module, layers: dict[str, QuantizedLayer], x: torch.Tensor, args: tuple,
                    kwargs: dict) -> list[str]:
    """Names of ``layers`` in the order one forward of ``module`` calls them."""
    order: list[str] = []
    hooks = [l.register_forward_pre_hook(lambda m, a, n=n: order.append(n) if n not in order else None)
             for n, l in layers.items()]
    try:
        module(x, *args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return order + [n for n in layers if n not in order]


def _effective_input(layer: QuantizedLayer, x: torch.Tensor) -> torch.Tensor:
    """What multiplies the weight in the deployed layer: the quantized input, less a consumer-side
    fold's offset (the layer takes ``W_q @ add`` off its bias, so that part of the input never
    meets a weight error)."""
    xq = layer.input_quantizer(layer._input(x))
    affine = layer._modules.get("input_affine")
    return xq - affine.add if affine is not None else xq


def _layer_rows(module: nn.Module, layer: QuantizedLayer, cache: TensorCache, args: tuple, kwargs: dict,
                batch_size: int, each) -> None:
    """Run ``module`` on every cached batch up to ``layer``; ``each`` gets the layer's effective input."""
    dev = module_device(module)

    def hook(mod, inputs):
        each(_effective_input(mod, inputs[0]))
        raise _StopForward  # nothing after this layer is needed

    handle = layer.register_forward_pre_hook(hook)
    try:
        for x in cache.batches(batch_size):
            try:
                module(x.to(dev), *args, **kwargs)
            except _StopForward:
                pass
    finally:
        handle.remove()


def _float_rows(module: nn.Module, layers: dict[str, QuantizedLayer], fp_in: TensorCache, args: tuple,
                kwargs: dict, batch_size: int, quant_switch) -> dict[str, torch.Tensor]:
    """Every layer's effective input in the float unit on the float inputs, taken before any
    rounding (rounded layers would change what the later ones see)."""
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    quant_switch(False)
    try:
        for name, layer in layers.items():
            _layer_rows(module, layer, fp_in, args, kwargs, batch_size,
                        lambda x, n=name: rows[n].append(x.reshape(-1, x.shape[-1]).to("cpu", torch.float64)))
    finally:
        quant_switch(True)
    return {n: torch.cat(r) for n, r in rows.items()}


@torch.no_grad()
def gptq_unit(module: nn.Module, layers: dict[str, QuantizedLayer], q_in: TensorCache, args: tuple, kwargs: dict,
              batch_size: int, damp: float = 0.01, act_order: bool = True,
              fp_in: TensorCache | None = None, quant_switch=None) -> set[str]:
    """Round every GPTQ-able layer of the unit (module's quantizers on); returns their names.

    With ``fp_in`` (the unit's float inputs, sample for sample with ``q_in``) each layer matches
    the *float* model's output ``W x_fp`` instead of ``W x_q``: GPTQ then runs on the least-squares
    weight ``W C H^-1`` (``C = X_fp^T X_q / n``), which also absorbs what the quantized prefix already
    got wrong (the asymmetric calibration of GPTAQ, Li et al., 2025). ``quant_switch(enabled)``
    turns every quantizer of the unit off and on again for that float pass."""
    todo = gptq_layers(layers)
    if not todo or len(q_in) == 0:
        return set()
    dev = module_device(module)
    # One sample tells the order; a whole batch would be a language model head's logits.
    order = execution_order(module, todo, q_in.take(torch.arange(1)).to(dev), args, kwargs)
    float_rows = None
    if fp_in is not None:
        float_rows = _float_rows(module, todo, fp_in, args, kwargs, batch_size, quant_switch)
    for name in order:
        layer = todo[name]
        acc = HessianAccumulator(layer.in_features)
        seen: list[torch.Tensor] = []

        def each(x, acc=acc, seen=seen):
            acc.add(x)
            if float_rows is not None:
                seen.append(x.reshape(-1, x.shape[-1]).to("cpu", torch.float64))

        _layer_rows(module, layer, q_in, args, kwargs, batch_size, each)
        h = acc.hessian()
        del acc, each  # each holds the accumulator too (a default argument)
        target = layer.weight.detach().cpu()
        if float_rows is not None:
            xq, xf = torch.cat(seen), float_rows.pop(name)  # each layer's rows are used once: free them
            seen.clear()
            c = xf.T @ xq / xq.shape[0]
            del xq, xf
            hd = h + damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
            # W C H^-1 written as W + W (C - H) H^-1, with the damped H only in the correction: equal
            # inputs (C = H) leave W exactly as it is. Temporaries are freed as soon as used: for a
            # 1.1B LLaMA's lm_head each weight-sized float64 tensor is 0.5 GB.
            target = target.to(torch.float64)
            correction = torch.linalg.solve(hd, (target @ (c - h)).T).T
            del c, hd
            target = (target + correction).to(layer.weight.dtype)
            del correction
        wq = layer.weight_quantizer
        grid = wq.shaped_params(target)[0] if wq.group_size is not None else wq.scale
        rounded = gptq_round(target, h, grid.detach().cpu(), wq.qmin, wq.qmax, damp=damp, act_order=act_order)
        del target
        layer.weight.data.copy_(rounded.to(layer.weight.device))
    return set(todo)


__all__ = ["gptq_unit", "gptq_layers"]
