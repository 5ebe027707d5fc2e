"""Where a quantized model loses signal: per-layer SQNR against its float model.

The float reference is the float model put through the same deployment passes (branch merge,
BN fold) as the quantized one, so every quantized layer has a float twin of the same name.
Hooks on both record each layer's output for the same inputs; the SQNR of a layer,
``10·log10(Σ ref² / Σ (ref − quant)²)``, is the error accumulated up to and including that
layer (what the next layer actually receives), which is what tells you where to spend bits.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn as nn

from reparq.errors import ReparqError
from reparq.nn.qmodules import quantized_layers
from reparq.recipes.calibrate import batch_samples
from reparq.recipes.calibrate import forward_batch as call_model
from reparq.recipes.cache import samples_within


def main_output(out: Any) -> torch.Tensor:
    """The tensor that stands for a model's answer: itself, ``logits``, ``last_hidden_state``, or the first."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find the output tensor in a {type(out).__name__}")


def sqnr_db(signal: float, noise: float) -> float:
    """``10·log10(signal / noise)``; infinite when there is no noise at all."""
    if noise <= 0.0:
        return math.inf
    if signal <= 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


@torch.no_grad()
def float_reference(model: nn.Module) -> nn.Module:
    """A deployed-form float copy (merged, BN folded) whose layer names match the quantized model."""
    from reparq.recipes.prepare import prepare_for_deployment

    ref = copy.deepcopy(model).eval()
    prepare_for_deployment(ref)
    return ref


def _capture(model: nn.Module, names: list[str], batch: Any, inputs: bool = False) -> tuple[dict, torch.Tensor]:
    """Outputs (or first inputs) of the named modules, and the model's own output, for one batch."""
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for name in names:
        module = model.get_submodule(name)
        if inputs:
            hooks.append(module.register_forward_pre_hook(lambda m, a, n=name: seen.setdefault(n, a[0].detach())))
        else:
            hooks.append(module.register_forward_hook(
                lambda m, a, o, n=name: seen.setdefault(n, main_output(o).detach())))
    try:
        out = main_output(call_model(model, batch)).detach()
    finally:
        for h in hooks:
            h.remove()
    return seen, out


@torch.no_grad()
def layer_sqnr(float_model: nn.Module, qmodel: nn.Module, batches: Iterable[Any],
               reference: nn.Module | None = None) -> tuple[list[dict], float]:
    """Rows ``{layer, type, w_bits, a_bits, sqnr_db}`` in execution order, and the output SQNR (dB)."""
    ref = reference if reference is not None else float_reference(float_model)
    ref_modules = dict(ref.named_modules())
    layers = [(n, m) for n, m in quantized_layers(qmodel) if n in ref_modules]
    names = [n for n, _ in layers]
    signal = dict.fromkeys(names, 0.0)
    noise = dict.fromkeys(names, 0.0)
    order: dict[str, int] = {}
    out_signal = out_noise = 0.0
    qmodel.eval()
    for batch in batches:
        ref_seen, ref_out = _capture(ref, names, batch)
        q_seen, q_out = _capture(qmodel, names, batch)
        for n in names:
            if n in ref_seen and n in q_seen and ref_seen[n].shape == q_seen[n].shape:
                order.setdefault(n, list(q_seen).index(n))
                signal[n] += float(ref_seen[n].double().pow(2).sum())
                noise[n] += float((ref_seen[n].double() - q_seen[n].double()).pow(2).sum())
        out_signal += float(ref_out.double().pow(2).sum())
        out_noise += float((ref_out.double() - q_out.double()).pow(2).sum())
    rows = []
    for n, layer in sorted(((n, m) for n, m in layers if n in order), key=lambda nm: order[nm[0]]):
        rows.append({"layer": n, "type": type(layer).__name__, "w_bits": layer.weight_quantizer.bits,
                     "a_bits": layer.input_quantizer.bits, "sqnr_db": round(sqnr_db(signal[n], noise[n]), 3)})
    return rows, round(sqnr_db(out_signal, out_noise), 3)


@torch.no_grad()
def range_samples(qmodel: nn.Module, names: list[str], batch: Any, max_values: int = 50_000,
                  seed: int = 0) -> list[dict]:
    """For each named quantized layer: a sample of the values its input quantizer sees, the range
    that quantizer keeps, and its weights divided by their channel's clipping bound (|w| > 1 is clipped)."""
    seen, _ = _capture(qmodel, names, batch, inputs=True)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for name in names:
        layer = qmodel.get_submodule(name)
        acts = seen.get(name)
        if acts is None:
            continue
        acts = acts.float().flatten()
        if acts.numel() > max_values:
            acts = acts[torch.randperm(acts.numel(), generator=gen)[:max_values]]
        aq, wq = layer.input_quantizer, layer.weight_quantizer
        act_range = None
        if not aq.is_float and aq.initialized and aq.scale.numel() == 1:
            s, z = float(aq.scale), float(aq.zero_point)
            act_range = ((aq.qmin - z) * s, (aq.qmax - z) * s)
        weights = None
        if not wq.is_float and wq.initialized:
            scale, _ = wq.shaped_params(layer.weight)
            w = layer.weight.detach()
            # The signed grid is [qmin, qmax] = [-2^(b-1), 2^(b-1) - 1]: each sign has its own bound.
            weights = torch.where(w >= 0, w / (scale * wq.qmax), w / (scale * -wq.qmin)).flatten()
        clipped = float(((acts < act_range[0]) | (acts > act_range[1])).float().mean()) if act_range else 0.0
        out.append({"layer": name, "acts": acts, "act_range": act_range, "act_clipped": clipped,
                    "weights": weights, "a_bits": aq.bits, "w_bits": wq.bits})
    return out


def _batched(inputs: Any, batch_size: int) -> list[Any]:
    if isinstance(inputs, torch.Tensor):
        return list(inputs.split(batch_size))
    return list(inputs)


@torch.no_grad()
def predictions(model: nn.Module, inputs: Any, batch_size: int = 250) -> torch.Tensor:
    """The model's main output over ``inputs`` (a tensor, or a list of batches), concatenated."""
    model.eval()
    return torch.cat([main_output(call_model(model, b)).float() for b in _batched(inputs, batch_size)])


def _per_sample_agreement(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if not torch.is_floating_point(target):
        return (pred.argmax(dim=-1) == target).double()
    if pred.ndim == 2:
        return (pred.argmax(dim=1) == target.argmax(dim=1)).double()
    # In float64: a causal LM's logits flatten to millions of values per sample, over which float32
    # sums put a model's agreement with itself at 100.004.
    cos = torch.nn.functional.cosine_similarity(pred.flatten(1).double(), target.flatten(1).double(), dim=1)
    return cos.clamp(-1.0, 1.0)


def agreement(pred: torch.Tensor, target: torch.Tensor) -> float:
    """How much a quantized model's outputs agree with reference outputs or labels, in percent:
    top-1 accuracy against labels (integer ``target``), top-1 agreement for class scores [N, C],
    and 100 × mean cosine similarity for anything else (embeddings, hidden states)."""
    return 100.0 * float(_per_sample_agreement(pred, target).mean())


def samples_with_output_within(model: nn.Module, inputs: Any, budget_mb: float, most: int) -> int:
    """How many of ``inputs`` (a tensor) the model's output stays within ``budget_mb`` for, at most
    ``most``, sized on one sample; ``most`` for a list of batches, which is taken as given."""
    if not isinstance(inputs, torch.Tensor):
        return most
    with torch.no_grad():
        probe = main_output(call_model(model, inputs[:1]))
    return samples_within(budget_mb, probe[0].numel(), most=most)


class AgreementScorer:
    """:func:`agreement` of many candidate models with one float model (or labels) over one
    evaluation set, without ever holding every output at once.

    Sensitivity analysis scores a model once per layer and once per mixed-precision step, so the
    float side is computed once and kept in its smallest exact form: the label slices; for class
    scores [N, C] the float argmax (integer targets give the same top-1 agreement as comparing
    argmaxes); for anything else (hidden states, a causal LM's logits) the float outputs while all
    of them fit in ``budget_mb``, or else nothing, and the float model is run again beside each
    candidate. Batches are sized so that one batch's output stays within ``budget_mb`` too.
    """

    def __init__(self, float_model: nn.Module, inputs: Any, labels: torch.Tensor | None = None,
                 batch_size: int = 250, budget_mb: float = 256.0) -> None:
        float_model.eval()
        self._float = float_model
        self._batches = _batched(inputs, samples_with_output_within(float_model, inputs, budget_mb, batch_size))
        total = sum(batch_samples(b) for b in self._batches)
        if labels is not None and len(labels) != total:
            raise ReparqError(f"{len(labels)} labels for {total} evaluation samples")
        targets: list[torch.Tensor] = []
        outputs_bytes = 0  # of float outputs kept as targets; labels and argmaxes are small
        keep = True
        fp_sum = 0.0
        count = 0
        with torch.no_grad():
            for batch in self._batches:
                fp = main_output(call_model(float_model, batch)).float()
                n = batch_samples(batch)
                if labels is not None:
                    target = labels[count:count + n]
                    fp_sum += float(_per_sample_agreement(fp, target).sum())
                elif fp.ndim == 2:
                    target = fp.argmax(dim=1)
                    fp_sum += float(n)  # the float model agrees with itself
                else:
                    target = fp
                    fp_sum += float(n)
                    outputs_bytes += fp.numel() * fp.element_size()
                    keep = keep and outputs_bytes <= budget_mb * 2**20
                count += n
                if keep:
                    targets.append(target)
                else:
                    targets.clear()
        self.samples = count
        self.fp_score = 100.0 * fp_sum / count
        self._targets = targets if keep else None
        self.recomputes = not keep

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> float:
        """The model's agreement with the targets, in percent."""
        model.eval()
        total = 0.0
        for i, batch in enumerate(self._batches):
            if self._targets is None:
                target = main_output(call_model(self._float, batch)).float()
            else:
                target = self._targets[i]
            total += float(_per_sample_agreement(main_output(call_model(model, batch)).float(), target).sum())
        return 100.0 * total / self.samples


@dataclass(frozen=True)
class OutputComparison:
    fp_score: float  # agreement (percent) of the float model with the labels, or 100 without them
    q_score: float
    sqnr_db: float  # of the quantized model's main output against the float model's


@torch.no_grad()
def compare_outputs(float_model: nn.Module, qmodel: nn.Module, inputs: Any, labels: torch.Tensor | None = None,
                    batch_size: int = 250, budget_mb: float = 128.0) -> OutputComparison:
    """:func:`agreement` of both models and the output SQNR, accumulated batch by batch.

    Neither model's outputs are ever all in memory: a causal LM's logits over a few dozen
    windows are gigabytes, and in float64 twice that. A tensor of inputs is cut into batches
    whose float output stays within ``budget_mb`` (sized on one sample); a list of batches is
    taken as given.
    """
    float_model.eval()
    qmodel.eval()
    batch_size = samples_with_output_within(float_model, inputs, budget_mb, batch_size)
    fp_sum = q_sum = signal = noise = 0.0
    count = start = 0
    for batch in _batched(inputs, batch_size):
        fp = main_output(call_model(float_model, batch)).float()
        q = main_output(call_model(qmodel, batch)).float()
        n = batch_samples(batch)
        if labels is not None:
            target = labels[start:start + n]
            fp_sum += float(_per_sample_agreement(fp, target).sum())
        else:
            target = fp
            fp_sum += float(n)  # the float model agrees with itself
        q_sum += float(_per_sample_agreement(q, target).sum())
        signal += float(fp.double().pow(2).sum())
        noise += float((fp.double() - q.double()).pow(2).sum())
        count += n
        start += n
    return OutputComparison(100.0 * fp_sum / count, 100.0 * q_sum / count, sqnr_db(signal, noise))
