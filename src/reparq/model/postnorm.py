"""Post-norm reparameterization (RepQ-ViT / RepQuant, DESIGN.md 2.4 item 1).

The output of a LayerNorm has severe inter-channel variation: a per-tensor quantizer wastes the
grid on the few wide channels. So the consumer's input is *calibrated* per channel (scale
``s in R^C``, integer zero point ``z in Z^C``) and then *converted* exactly into one layer-wise
quantizer ``(s~, z~)``, with ``s~ = mean(s)``, ``z~ = round(mean(z))`` (clamped into the grid),
``r1 = s / s~`` and ``r2 = z - z~`` (integers), by moving the difference into the float weights
on both sides of the quantizer:

* norm:      ``gamma' = gamma / r1``,  ``beta' = (beta + s * r2) / r1``
* consumers: ``W' = W * r1`` (input channel c scaled by r1_c),  ``b' = b - W (s * r2)``

Then ``y'_c / s~ = y_c / s_c + r2_c`` for every element, and since ``r2_c`` and ``z~`` are
integers, ``round(y'_c / s~) + z~ == round(y_c / s_c) + z_c``: the layer-wise integers *are* the
per-channel integers, the clamp to the grid is the same, and ``W' x'_hat + b' == W x_hat + b``.
The fold is exact (to float rounding of the folded weights; tests check it).

Where the norm has no bias (RMSNorm; LayerNorm(bias=False)) the shift ``s * r2 / r1`` has no
home. What we do, in order of preference:

1. Calibrate per-channel scales with one shared integer zero point
   (:func:`shared_zero_point_params`): then ``r2 = 0``, the shift and the consumers' bias
   correction vanish, and only ``gamma`` and ``W`` change. Exact, no new parameters: this is
   the default for RMSNorm (:func:`fold_rmsnorm`), and it also suits bias-free consumers
   (LLaMA's q/k/v/gate/up projections).
2. With per-channel zero points, the shift is added after the norm by a :class:`ShiftedNorm`
   wrapper (one per-channel add, which the runtime does in float before its QuantizeLinear), and a
   consumer without a bias gets one. :func:`fold_postnorm` returns the wrapper; the caller
   installs it in place of the norm.

Valid only when the norm's output feeds nothing but the given consumers, through channel-wise
operations (token reshuffles, window partition, shifts and averaging are fine; zero padding
after the norm, as Swin does when the resolution is not a multiple of the window, is not exact
for the padded tokens). The family table below lists only pairs where that holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from reparq.errors import ReparqError
from reparq.quant.uniform import int_range

# Block class name -> ((norm, (consumer, ...)), ...), names relative to the block. Model-family
# knowledge as data: timm's pre-norm ViT/DeiT and Swin blocks and Swin's patch merging. The
# ViT head's ``fc_norm`` (average pooling) feeds only the classifier, so it folds too.
NORM_CONSUMERS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "Block": (("norm1", ("attn.qkv",)), ("norm2", ("mlp.fc1",))),
    "SwinTransformerBlock": (("norm1", ("attn.qkv",)), ("norm2", ("mlp.fc1",))),
    "PatchMerging": (("norm", ("reduction",)),),
    "VisionTransformer": (("fc_norm", ("head",)),),
}


def register_norm_consumers(block_class_name: str, pairs: tuple[tuple[str, tuple[str, ...]], ...]) -> None:
    """Teach the pass a block type: ``(("input_layernorm", ("self_attn.q_proj", ...)), ...)``."""
    NORM_CONSUMERS[block_class_name] = tuple((n, tuple(c)) for n, c in pairs)


# Block class name -> Linear inputs inside the block that no norm feeds (the attention output
# projection reads the attention context, fc2 the activation's output): per-channel ranges there
# can only be folded at the consumer (:func:`fold_at_consumers`).
INNER_INPUTS: dict[str, tuple[str, ...]] = {
    "Block": ("attn.proj", "mlp.fc2"),
    "SwinTransformerBlock": ("attn.proj", "mlp.fc2"),
}


@dataclass(frozen=True)
class NormPair:
    """Consumer Linears that read one tensor, calibrated per channel on it.

    ``norm`` is the module whose output they read ("" where no norm does: then the first
    consumer's input is observed). ``exclusive``: the norm feeds only them, so the fold goes into
    the norm's affine for free; otherwise (post-LN residual, fc2, attention output projection) the
    division stays in front of the consumers as an :class:`~reparq.nn.qmodules.InputAffine`.
    """

    norm: str
    consumers: tuple[str, ...]
    exclusive: bool = True
    # A Linear whose output rows can take the division instead (no norm, no input affine): the
    # consumers read its output through per-channel ops that commute with a positive scale
    # (:func:`find_producer_groups`, :func:`fold_into_producer`).
    producer: str = ""

    @property
    def key(self) -> str:
        """Name of the observed tensor's source (rows and statistics are keyed by it)."""
        return self.norm or self.consumers[0]

    @property
    def folds_into_norm(self) -> bool:
        return bool(self.norm) and self.exclusive


def is_norm(module: nn.Module) -> bool:
    """LayerNorm or an RMSNorm (torch, timm or HF style: a ``weight`` over the last dim)."""
    if isinstance(module, nn.LayerNorm):
        return True
    name = type(module).__name__.lower()
    return "rmsnorm" in name and isinstance(getattr(module, "weight", None), torch.Tensor)


def norm_has_bias(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) and module.bias is not None


def find_postnorm_pairs(model: nn.Module) -> list[NormPair]:
    """Every norm -> consumer-linear pair the table knows, checked (a norm, Linear consumers of
    matching width); entries whose modules are missing or of another kind are skipped."""
    modules = dict(model.named_modules())
    pairs = []
    for name, module in modules.items():
        for norm_rel, consumer_rels in NORM_CONSUMERS.get(type(module).__name__, ()):
            prefix = f"{name}." if name else ""
            norm = modules.get(prefix + norm_rel)
            consumers = [prefix + c for c in consumer_rels]
            if norm is None or not is_norm(norm) or not all(isinstance(modules.get(c), nn.Linear) for c in consumers):
                continue
            width = norm.weight.shape[0] if getattr(norm, "weight", None) is not None else None
            if width is not None and any(modules[c].in_features != width for c in consumers):
                continue
            pairs.append(NormPair(prefix + norm_rel, tuple(consumers)))
    # Hugging Face families (LLaMA's RMSNorms) come from their own table; only norms whose output
    # feeds nothing but the consumers (not BERT's post-LN, which is also the residual) can fold.
    from reparq.model.hf_adapters import norm_consumers

    known = {p.norm for p in pairs}
    for norm_name, consumers, exclusive in norm_consumers(model):
        norm = modules.get(norm_name)
        if exclusive and norm_name not in known and norm is not None and is_norm(norm) \
                and all(isinstance(modules.get(c), nn.Linear) for c in consumers):
            pairs.append(NormPair(norm_name, tuple(consumers)))
    return pairs


def find_consumer_side_groups(model: nn.Module) -> list[NormPair]:
    """Linear inputs that a per-channel quantizer can serve only through a consumer-side fold:
    consumers of norms that also feed the residual (post-LN BERT) and the block-inner inputs
    (attention output projection, fc2) of the families the tables know."""
    from reparq.model.hf_adapters import inner_inputs, norm_consumers

    modules = dict(model.named_modules())
    groups = [NormPair(norm_name, tuple(consumers), exclusive=False)
              for norm_name, consumers, exclusive in norm_consumers(model)
              if not exclusive and is_norm(modules.get(norm_name))
              and all(isinstance(modules.get(c), nn.Linear) for c in consumers)]
    names = [f"{name}.{rel}" if name else rel for name, module in modules.items()
             for rel in INNER_INPUTS.get(type(module).__name__, ())]
    names += inner_inputs(model)
    groups += [NormPair("", (n,), exclusive=False) for n in names if isinstance(modules.get(n), nn.Linear)]
    return groups


def find_producer_groups(model: nn.Module) -> list[NormPair]:
    """Inner inputs whose per-channel division folds into the Linear that produced them: LLaMA's
    down_proj (its input ``act(gate(x)) * up(x)`` is linear in up_proj's output) and OPT's fc2
    (``relu(fc1(x))``, ReLU commutes with a positive scale), from the family tables. Only pairs of
    Linears of matching width are kept."""
    from reparq.model.hf_adapters import producer_inputs

    modules = dict(model.named_modules())
    groups = []
    for consumer, producer in producer_inputs(model):
        c, p = modules.get(consumer), modules.get(producer)
        if isinstance(c, nn.Linear) and isinstance(p, nn.Linear) and p.out_features == c.in_features:
            groups.append(NormPair("", (consumer,), exclusive=False, producer=producer))
    return groups


# ----------------------------------------------------------------------------------------------
# Per-channel parameters


def shared_zero_point_params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel scales with one integer zero point for all channels (so the fold needs no shift).

    The zero point is the rounded mean of the channels' own best ones; each channel then gets the
    smallest scale whose grid around that zero point covers its [lo, hi] (widened to contain 0).
    """
    qmin, qmax = int_range(bits, symmetric=False)
    lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
    eps = torch.finfo(torch.float32).eps
    own_scale = ((hi - lo) / (qmax - qmin)).clamp_min(eps)
    z = torch.clamp(torch.round((qmin - lo / own_scale).mean()), qmin + 1, qmax - 1)
    scale = torch.maximum(-lo / (z - qmin), hi / (qmax - z)).clamp_min(eps)
    return scale, torch.full_like(scale, float(z))


def layerwise_params(scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``s~ = mean(s)`` and ``z~ = round(mean(z))``, clamped into the grid (any integer keeps the
    fold exact; one in range is what a runtime's QuantizeLinear accepts)."""
    qmin, qmax = int_range(bits, symmetric=False)
    s_t = scale.double().mean().float()  # stored as float32 by the quantizer: fold against that value
    z_t = torch.clamp(torch.round(zero_point.double().mean()), qmin, qmax).float()
    return s_t.reshape(1), z_t.reshape(1)


# ----------------------------------------------------------------------------------------------
# The fold


class ShiftedNorm(nn.Module):
    """``norm(x) + shift``: the home of the fold's shift when the norm itself has no bias."""

    def __init__(self, norm: nn.Module, shift: torch.Tensor) -> None:
        super().__init__()
        self.norm = norm
        self.shift = nn.Parameter(shift.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) + self.shift


@dataclass
class FoldResult:
    norm: nn.Module  # the norm to install: the same module, or a ShiftedNorm wrapping it
    scale: torch.Tensor  # layer-wise scale (1 element)
    zero_point: torch.Tensor  # layer-wise integer zero point (1 element)


@torch.no_grad()
def fold_postnorm(norm: nn.Module, consumers: list[nn.Linear], scale: torch.Tensor, zero_point: torch.Tensor,
                  bits: int) -> FoldResult:
    """Fold a per-channel asymmetric quantizer on ``norm``'s output into ``norm`` and ``consumers``.

    Mutates the norm's affine and the consumers' weights and biases in place; returns the
    layer-wise ``(scale, zero_point)`` that the consumers' input quantizer must use from now on,
    and the module to install at the norm's place (a :class:`ShiftedNorm` only when the norm has
    no bias and the zero points differ). See the module docstring for the math.
    """
    s_t, z_t, r1, shift = _fold_factors(consumers, scale, zero_point, bits)
    needs_shift = bool((shift != 0).any())
    channels = r1.numel()

    weight = getattr(norm, "weight", None)
    if weight is None:
        ref = next(iter(c.weight for c in consumers))
        norm.weight = nn.Parameter(torch.ones(channels, dtype=ref.dtype, device=ref.device))
        weight = norm.weight
    weight.copy_((weight.double() / r1).to(weight.dtype))
    result_norm = norm
    if needs_shift:
        if norm_has_bias(norm):
            norm.bias.copy_(((norm.bias.double() + shift) / r1).to(norm.bias.dtype))
        else:
            result_norm = ShiftedNorm(norm, (shift / r1).to(weight.dtype))
    _fold_into_weights(consumers, r1, shift)
    return FoldResult(result_norm, s_t, z_t)


def _fold_factors(consumers: list[nn.Linear], scale: torch.Tensor, zero_point: torch.Tensor,
                  bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checked ``(s~, z~, r1, shift = s * r2)`` of the fold (float64 factors; module docstring)."""
    scale = scale.detach().reshape(-1).double()
    zero_point = zero_point.detach().reshape(-1).double()
    if not torch.equal(zero_point, zero_point.round()):
        raise ReparqError("post-norm fold needs integer zero points; round them before folding")
    if bool((scale <= 0).any()):
        raise ReparqError("post-norm fold needs positive scales")
    if not consumers:
        raise ReparqError("post-norm fold needs at least one consumer layer")
    for layer in consumers:
        if layer.in_features != scale.numel():
            raise ReparqError(f"consumer takes {layer.in_features} inputs but the quantizer has "
                              f"{scale.numel()} channels")
    s_t, z_t = layerwise_params(scale, zero_point, bits)
    r1 = scale / s_t.double()
    return s_t, z_t, r1, scale * (zero_point - z_t.double())  # shift in the input's units, before the division


def _fold_into_weights(consumers: list[nn.Linear], r1: torch.Tensor, shift: torch.Tensor) -> None:
    """``W' = W * r1`` and ``b' = b - W shift`` (a bias is added where the shift needs one)."""
    for layer in consumers:
        w = layer.weight.double()
        if bool((shift != 0).any()):
            correction = w @ shift
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros(layer.out_features, dtype=layer.weight.dtype,
                                                      device=layer.weight.device), requires_grad=False)
            layer.bias.copy_((layer.bias.double() - correction).to(layer.bias.dtype))
        layer.weight.copy_((w * r1).to(layer.weight.dtype))


@torch.no_grad()
def fold_at_consumers(consumers: list[nn.Linear], scale: torch.Tensor, zero_point: torch.Tensor,
                      bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same conversion when nothing upstream can take the division: each consumer gets an
    :class:`~reparq.nn.qmodules.InputAffine` ``x' = (x + s r2) / r1`` in front of its (now
    layer-wise) input quantizer, and ``W * r1``; the layer subtracts ``W' (s r2 / r1)`` from its
    bias with its quantized weight. Exact as the norm fold (the integers are the per-channel
    ones); the cost is one float multiply-add per input element, which a runtime can merge into
    its QuantizeLinear. Returns the layer-wise ``(scale, zero_point)``."""
    from reparq.nn.qmodules import attach_input_affine

    s_t, z_t, r1, shift = _fold_factors(consumers, scale, zero_point, bits)
    for layer in consumers:
        dtype = layer.weight.dtype
        attach_input_affine(layer, (1.0 / r1).to(dtype), (shift / r1).to(dtype))
    # The bias keeps its value: the layer subtracts W' @ (shift / r1) = W @ shift itself, with
    # whatever weight it quantizes to (QuantizedLayer.input_bias).
    _fold_into_weights(consumers, r1, torch.zeros_like(shift))
    return s_t, z_t


@torch.no_grad()
def fold_into_producer(producer: nn.Linear, consumers: list[nn.Linear], scale: torch.Tensor,
                       zero_point: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The conversion when the consumers' input is a per-channel-homogeneous function of one
    Linear's output (SmoothQuant's migration, made exact and free): the producer's output row c
    (weight and bias) is divided by ``r1_c`` and the consumers' input column c multiplied by it, so
    the float model is unchanged and the consumers' input is the per-channel one divided by ``r1``.
    Needs one zero point for all channels (the shift ``s * r2`` would have to be added after the
    nonlinearity, where nothing can hold it). The producer's per-output-channel weight grid is
    unchanged by a row scaling; its ranges are re-initialized anyway. Returns ``(s~, z~)``."""
    s_t, z_t, r1, shift = _fold_factors(consumers, scale, zero_point, bits)
    if bool((shift != 0).any()):
        raise ReparqError("a fold into the producer needs one zero point for all channels; calibrate with "
                          "shared_zero_point_params")
    if producer.out_features != r1.numel():
        raise ReparqError(f"producer has {producer.out_features} outputs but the quantizer has {r1.numel()} channels")
    producer.weight.copy_((producer.weight.double() / r1[:, None]).to(producer.weight.dtype))
    if producer.bias is not None:
        producer.bias.copy_((producer.bias.double() / r1).to(producer.bias.dtype))
    _fold_into_weights(consumers, r1, shift)
    return s_t, z_t


def add_folded_biases(model: nn.Module, state_keys) -> list[str]:
    """Give a bias to each bias-free Linear for which a saved state has one (the fold adds a bias
    to a consumer that had none, e.g. Swin's patch-merging ``reduction``), so the state loads.
    Returns the layers that got one."""
    added = []
    for key in state_keys:
        if not key.endswith(".bias"):
            continue
        name = key[: -len(".bias")]
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(layer, nn.Linear) and layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(layer.out_features, dtype=layer.weight.dtype), requires_grad=False)
            added.append(name)
    return added


def fold_rmsnorm(norm: nn.Module, consumers: list[nn.Linear], scale: torch.Tensor, zero_point: torch.Tensor,
                 bits: int) -> FoldResult:
    """The RMSNorm fold, for callers outside the timm families (HF LLaMA's ``input_layernorm``).

    RMSNorm has no bias, so calibrate with :func:`shared_zero_point_params` (one zero point): the
    fold then changes only ``norm.weight`` and the consumers' weights, and ``result.norm`` is
    ``norm`` itself. With differing zero points the shift goes to a :class:`ShiftedNorm` that the
    caller must install, and bias-free consumers get a bias.
    """
    if getattr(norm, "weight", None) is None:
        raise ReparqError(f"{type(norm).__name__} has no weight to fold into; build it with elementwise_affine=True")
    return fold_postnorm(norm, consumers, scale, zero_point, bits)


__all__ = ["FoldResult", "add_folded_biases", "INNER_INPUTS", "NORM_CONSUMERS", "NormPair", "ShiftedNorm",
           "find_consumer_side_groups", "find_postnorm_pairs", "find_producer_groups", "fold_at_consumers",
           "fold_into_producer", "fold_postnorm", "fold_rmsnorm",
           "is_norm", "layerwise_params", "register_norm_consumers", "shared_zero_point_params"]
