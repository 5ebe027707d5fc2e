"""Channel equalization across ReLU: an exact scale reparameterization between a producer layer
and the layer that consumes its (rectified) output. Ours, not in the RepAPQ paper; see why below.

Why: merging a RepVGG/MobileOne block folds the identity branch's BatchNorm into the centre tap
of the diagonal kernel ``W[c, c, 1, 1]``. Where the incoming channel ``c`` has a tiny variance
that BN gain is huge: in the zoo RepVGG the centre tap is up to 2000x the median weight of its
output channel, so a per-output-channel weight grid spends all its levels on it and rounds the
channel's other taps to zero (8-bit per-channel weights alone cost 0.5 points in one layer).
No per-output-channel quantizer and no QPRep affine can fix an outlier *inside* a channel.

The fix is a rescaling that the float model cannot see. For a producer ``A`` feeding a consumer
``B`` through positively homogeneous ops (ReLU, max/avg pooling, flatten, identity, dropout),
``B(act(A x)) == (B·diag(s))(act((diag(1/s)·A) x))`` for any ``s > 0``: divide A's output
channel ``c`` (weights and bias) by ``s_c`` and multiply B's input channel ``c`` by ``s_c``.
Dividing the tiny channel's activation by a small ``s_c`` lifts it onto the activation grid,
and the diagonal tap shrinks by the same factor. ``s = x_range^alpha / w_range^(1 - alpha)``
(``x_range``: the channel's calibration range at B's input; ``w_range``: max |B[:, c]|) moves
the range between activations and weights as SmoothQuant does; ``alpha`` is searched per pair
(the value whose quantized B output, at B's bit widths, is closest in mean absolute error to
the float one) or fixed. A's own per-output-channel weight grid is unaffected by the row scaling.

Pairs are found on a ``torch.fx`` trace; a model that does not trace is left as it is (with a
warning). The model's output is checked on a calibration batch after equalization and every
scale is undone if it moved (so a pattern misread can cost accuracy gain, never correctness).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from reparq.quant.ranges import estimate_params
from reparq.quant.uniform import KEEP_BITS, broadcast_shape, fake_quant, int_range
from reparq.recipes.calibrate import batch_samples, forward_batch

DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
# ops that commute with a positive per-channel scale and keep channels where they are
_HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d,
                        nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten)
_HOMOGENEOUS_FUNCTIONS = {F.relu, torch.relu, F.leaky_relu, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                          F.adaptive_max_pool2d, F.dropout, torch.flatten}
_HOMOGENEOUS_METHODS = {"relu", "flatten"}
_RECTIFIERS = (nn.ReLU,)


@dataclass(frozen=True)
class EqualizablePair:
    producer: str
    consumer: str
    consumer_rectified: bool  # the consumer's output goes straight into a ReLU: measure errors after it


def _takes_channels(consumer: nn.Module, channels: int) -> bool:
    """Whether input channel c of ``consumer`` is channel c of the producer (so a scale can move)."""
    if isinstance(consumer, nn.Linear):
        return consumer.in_features == channels  # flatten of a 1x1 map; anything larger fails here
    if isinstance(consumer, nn.Conv2d):
        return consumer.in_channels == channels and consumer.groups in (1, channels)
    return False


def _passes_through(node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _HOMOGENEOUS_MODULES) and \
            not (isinstance(modules[node.target], nn.Flatten) and modules[node.target].start_dim != 1)
    if node.op == "call_function":  # indexing (getitem) is not listed: it could reorder channels
        return node.target in _HOMOGENEOUS_FUNCTIONS
    if node.op == "call_method":
        return node.target in _HOMOGENEOUS_METHODS
    return False


def _is_rectifier(node, modules: dict[str, nn.Module]) -> bool:
    return (node.op == "call_module" and isinstance(modules[node.target], _RECTIFIERS)) or \
        (node.op == "call_function" and node.target in (F.relu, torch.relu)) or \
        (node.op == "call_method" and node.target == "relu")


def find_equalizable_pairs(model: nn.Module) -> list[EqualizablePair]:
    """Producer/consumer pairs (Conv2d or Linear) joined only by positively homogeneous ops,
    where the producer's output goes nowhere else. Empty when the model does not trace."""
    import torch.fx as fx

    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as err:  # data-dependent control flow etc.: nothing is equalized
        warnings.warn(f"channel equalization skipped: the model does not trace with torch.fx ({err})",
                      stacklevel=3)
        return []
    modules = dict(model.named_modules())
    layer_types = (nn.Conv2d, nn.Linear)
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], layer_types):
            continue
        producer = modules[node.target]
        cur = node
        while len(cur.users) == 1:
            nxt = next(iter(cur.users))
            if nxt.op == "call_module" and isinstance(modules[nxt.target], layer_types):
                if nxt.args and nxt.args[0] is cur and _takes_channels(modules[nxt.target], producer.weight.shape[0]):
                    after = list(nxt.users)
                    rectified = len(after) == 1 and _is_rectifier(after[0], modules)
                    pairs.append(EqualizablePair(node.target, nxt.target, rectified))
                break
            if not _passes_through(nxt, modules) or nxt.args[0] is not cur:
                break
            cur = nxt
    return pairs


def _input_scale_shape(consumer: nn.Module) -> tuple[int, ...]:
    """How a per-input-channel factor broadcasts over the consumer's weight."""
    if isinstance(consumer, nn.Linear):
        return (1, -1)
    if consumer.groups == 1:
        return (1, -1, 1, 1)
    return (-1, 1, 1, 1)  # depthwise: input channel c is filter c


def input_channel_range(consumer: nn.Module) -> torch.Tensor:
    w = consumer.weight.detach().abs()
    if isinstance(consumer, nn.Linear):
        return w.amax(dim=0)
    if consumer.groups == 1:
        return w.transpose(0, 1).flatten(1).amax(dim=1)
    return w.flatten(1).amax(dim=1)


@torch.no_grad()
def apply_channel_scale(producer: nn.Module, consumer: nn.Module, s: torch.Tensor) -> None:
    """Divide the producer's output channels by ``s`` and multiply the consumer's inputs by it."""
    producer.weight.div_(s.reshape([-1] + [1] * (producer.weight.ndim - 1)))
    if producer.bias is not None:
        producer.bias.div_(s)
    consumer.weight.mul_(s.reshape(_input_scale_shape(consumer)))


def _consumer_forward(consumer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(consumer, nn.Linear):
        return F.linear(x, weight, consumer.bias)
    return consumer._conv_forward(x, weight, consumer.bias)


def _fake(x: torch.Tensor, estimator: str, bits: int, symmetric: bool, axis: int | None) -> torch.Tensor:
    scale, zp = estimate_params(x, estimator, bits, symmetric, axis)
    shape = broadcast_shape(x, axis)
    qmin, qmax = int_range(bits, symmetric)
    return fake_quant(x, scale.reshape(shape), zp.reshape(shape), qmin, qmax)


def _scales(x_range: torch.Tensor, w_range: torch.Tensor, alpha: float) -> torch.Tensor:
    s = x_range.pow(alpha) / w_range.pow(1.0 - alpha)
    dead = (x_range <= 0) | (w_range <= 0) | ~torch.isfinite(s)  # nothing to balance: leave the channel
    return torch.where(dead, torch.ones_like(s), s)


@torch.no_grad()
def choose_scale(consumer: nn.Module, x: torch.Tensor, bits: tuple[int, int], rectified: bool,
                 alphas: Iterable[float], w_estimator: str = "mse",
                 a_estimator: str = "mae") -> tuple[float, torch.Tensor, float]:
    """The ``alpha`` (and its scales) whose quantized consumer output is closest to the float one.

    ``x``: the consumer's float input on calibration samples, channels on axis 1 (or last for 2-D).
    Weights are quantized per output channel (symmetric), the input per tensor (asymmetric), as
    the quantized layer will be; the error is a mean absolute error, after the ReLU if one follows."""
    channel_axis = 1 if x.ndim > 2 else -1
    x_range = x.detach().abs().movedim(channel_axis, 0).flatten(1).amax(dim=1)
    w_range = input_channel_range(consumer)
    reference = _consumer_forward(consumer, x, consumer.weight)
    act = F.relu if rectified else (lambda t: t)
    reference = act(reference)
    x_shape = broadcast_shape(x, channel_axis)
    best = None
    for alpha in alphas:
        s = _scales(x_range, w_range, alpha)
        xq = _fake(x / s.reshape(x_shape), a_estimator, bits[1], False, None)
        wq = _fake(consumer.weight * s.reshape(_input_scale_shape(consumer)), w_estimator, bits[0], True, 0)
        err = (act(_consumer_forward(consumer, xq, wq)) - reference).abs().mean().item()
        if best is None or err < best[2]:
            best = (alpha, s, err)
    return best


def quantized_pairs(pairs: list[EqualizablePair], bits: dict[str, tuple[int, int]]) -> list[EqualizablePair]:
    """The pairs worth equalizing: those whose consumer is quantized (named in ``bits`` with a
    weight or input below :data:`KEEP_BITS`)."""
    return [p for p in pairs if p.consumer in bits and min(bits[p.consumer]) < KEEP_BITS]


def _main_tensor(out) -> torch.Tensor:
    """The tensor to compare of a model output (a tensor, a tuple's first item, a dict's first value)."""
    while not isinstance(out, torch.Tensor):
        out = next(iter(out.values())) if isinstance(out, dict) else out[0]
    return out.float()


@torch.no_grad()
def equalize_channels(model: nn.Module, batches: list, bits: dict[str, tuple[int, int]], alpha: float | None = None,
                      w_estimator: str = "mse", a_estimator: str = "mae", samples: int = 256) -> dict[str, float]:
    """Equalize every pair found in ``model`` (in place) whose consumer is quantized (see
    :func:`quantized_pairs`). ``alpha=None`` searches it per pair over :data:`DEFAULT_ALPHAS`.
    Returns ``{consumer: alpha}``; empty if nothing was equalized (or the output check undid it)."""
    pairs = quantized_pairs(find_equalizable_pairs(model), bits)
    if not pairs or not batches:
        return {}
    modules = dict(model.named_modules())
    inputs: dict[str, list[torch.Tensor]] = {p.consumer: [] for p in pairs}
    hooks = [modules[p.consumer].register_forward_pre_hook(
        lambda m, args, name=p.consumer: inputs[name].append(args[0].detach())) for p in pairs]
    reference, seen = None, 0
    try:
        for batch in batches:
            out = forward_batch(model, batch)
            reference = out if reference is None else reference  # the first batch checks exactness below
            seen += batch_samples(batch)
            if seen >= samples:
                break
    finally:
        for h in hooks:
            h.remove()
    saved = {name: (modules[name].weight.detach().clone(),
                    None if modules[name].bias is None else modules[name].bias.detach().clone())
             for p in pairs for name in (p.producer, p.consumer)}
    chosen = {}
    for p in pairs:
        x = torch.cat(inputs.pop(p.consumer))[:samples]
        consumer = modules[p.consumer]
        alphas = DEFAULT_ALPHAS if alpha is None else (alpha,)
        best_alpha, s, _ = choose_scale(consumer, x, bits[p.consumer], p.consumer_rectified, alphas,
                                        w_estimator, a_estimator)
        apply_channel_scale(modules[p.producer], consumer, s)
        chosen[p.consumer] = best_alpha
    after, reference = _main_tensor(forward_batch(model, batches[0])), _main_tensor(reference)
    if not torch.allclose(after, reference, rtol=1e-3, atol=1e-4 * reference.abs().max().item()):
        for name, (w, b) in saved.items():
            modules[name].weight.copy_(w)
            if b is not None:
                modules[name].bias.copy_(b)
        warnings.warn("channel equalization changed the model's output and was undone; a pair was misread",
                      stacklevel=2)
        return {}
    return chosen


__all__ = ["DEFAULT_ALPHAS", "EqualizablePair", "apply_channel_scale", "choose_scale", "equalize_channels",
           "find_equalizable_pairs", "input_channel_range", "quantized_pairs"]
