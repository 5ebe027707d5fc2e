"""Attention adapters: expose the inputs of attention's two matmuls to quantization, no user edits.

An attention module normally computes ``softmax(q k^T * scale + bias) @ v`` inside one fused
kernel (``scaled_dot_product_attention``), where no quantizer can reach ``q``, ``k``, ``v`` or the
probabilities. The adapter pass attaches a :class:`~reparq.nn.attention.MatmulQuantizers` as
``module.matmul_quant`` and swaps the module's class for a subclass whose ``forward`` computes
attention explicitly, routing the four matmul inputs through those quantizers. With the
quantizers disabled the adapted module computes what timm's own unfused path computes, in the
same order of operations, so calibration passes can observe the float model through it.

Why a class swap (``module.__class__ = QuantX``) rather than a wrapper module: names, parameters,
``isinstance`` checks and the model's own calls (``self.attn(x, attn_mask=...)``, Swin's
``self.attn(x, mask=...)``) stay exactly as they were, and ``copy.deepcopy`` works. The subclasses
are created once per class and published in this module's namespace, so they can be found by name.

Model-family knowledge is a registry keyed by class (like :func:`reparq.model.merge.register_merger`):
timm's ViT/DeiT ``Attention`` and Swin's ``WindowAttention`` are built in; a user's own attention
class is added with::

    @register_attention(MyAttention)
    def my_forward(self, x):      # self.matmul_quant.q / .k / .v / .probs / .attend are available
        ...

Where the quantizers sit (RepQ-ViT's placement): ``q`` and ``k`` are quantized as they leave the
qkv projection, before the softmax scale (the scale folds into the integer product's output scale);
``probs`` after the softmax and ``v`` as they enter ``probs @ v`` (:meth:`MatmulQuantizers.attend`,
which switches to the two-accumulation log2 form once converted, see :mod:`reparq.quant.log_reparam`).
"""

from __future__ import annotations

import fnmatch
import sys
from typing import Callable

import torch
import torch.nn as nn

from reparq.nn.attention import MatmulQuantizers
from reparq.quant.uniform import UniformQuantizer

AttentionForward = Callable[..., torch.Tensor]
_ADAPTERS: dict[type, AttentionForward] = {}
_QUANT_CLASSES: dict[type, type] = {}
_BUILTIN_LOADED = False
PROBS_KINDS = ("logsqrt2", "log2", "uniform")


def register_attention(module_type: type) -> Callable[[AttentionForward], AttentionForward]:
    """Register the explicit, quantizer-routed ``forward`` for an attention class (exact type match:
    a subclass may compute something else, so it needs its own entry)."""

    def deco(fn: AttentionForward) -> AttentionForward:
        _ADAPTERS[module_type] = fn
        _QUANT_CLASSES.pop(module_type, None)
        return fn

    return deco


def list_attention_adapters() -> list[str]:
    _load_builtin()
    return sorted(f"{t.__module__}.{t.__qualname__}" for t in _ADAPTERS)


def _quant_class(cls: type) -> type:
    """The adapted subclass of ``cls`` (created once, published here so it can be found by name)."""
    if cls not in _QUANT_CLASSES:
        name = "Quant_" + f"{cls.__module__}.{cls.__qualname__}".replace(".", "_")
        sub = type(name, (cls,), {"forward": _ADAPTERS[cls], "__module__": __name__, "__qualname__": name,
                                  "_reparq_float_class": cls})
        setattr(sys.modules[__name__], name, sub)
        _QUANT_CLASSES[cls] = sub
    return _QUANT_CLASSES[cls]


def __getattr__(name: str) -> type:
    """Find an adapted class by name in a fresh process (unpickling), creating it on demand."""
    if name.startswith("Quant_"):
        _load_builtin()
        for cls in list(_ADAPTERS):
            if "Quant_" + f"{cls.__module__}.{cls.__qualname__}".replace(".", "_") == name:
                return _quant_class(cls)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_adapted(module: nn.Module) -> bool:
    return isinstance(module._modules.get("matmul_quant"), MatmulQuantizers)


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Attention modules the registry knows (adapted or not), in registration order."""
    _load_builtin()
    return [(n, m) for n, m in model.named_modules()
            if type(m) in _ADAPTERS or getattr(type(m), "_reparq_float_class", None) in _ADAPTERS]


def adapt_attention(model: nn.Module, a_bits: int, probs: str = "logsqrt2",
                    ignore: tuple[str, ...] = ()) -> list[str]:
    """Attach matmul quantizers to every known attention module (in place); returns their names.

    ``probs``: ``"logsqrt2"`` (RepQ-ViT / RepQuant calibration), ``"log2"``, or ``"uniform"``
    (what a baseline does to any tensor). Modules matching an ``ignore`` glob stay float. A
    module that is already adapted keeps its quantizers.
    """
    if probs not in PROBS_KINDS:
        raise ValueError(f"probs must be one of {PROBS_KINDS}, got {probs!r}")
    adapted = []
    for name, module in attention_modules(model):
        if any(fnmatch.fnmatchcase(name, p) for p in ignore):
            continue
        if not is_adapted(module):
            module.matmul_quant = MatmulQuantizers(a_bits, probs_base="logsqrt2" if probs == "uniform" else probs,
                                                   probs_uniform=probs == "uniform")
            module.__class__ = _quant_class(type(module))
        adapted.append(name)
    return adapted


def _probs_kind(mq: MatmulQuantizers) -> str:
    if isinstance(mq.probs, UniformQuantizer):
        return "uniform"
    return "log2parity" if hasattr(mq.probs, "matmul") else mq.probs.base


def describe_attention(model: nn.Module) -> dict[str, dict]:
    """What a saved model must record to rebuild its adapted attention: ``{name: {bits, probs}}``
    (probs: ``uniform``, ``logsqrt2``, ``log2`` or ``log2parity``, the converted deploy form)."""
    return {name: {"bits": module.matmul_quant.q.bits, "probs": _probs_kind(module.matmul_quant)}
            for name, module in attention_modules(model) if is_adapted(module)}


def rebuild_attention(model: nn.Module, description: dict[str, dict]) -> None:
    """Adapt the described modules of a freshly built model (their ranges come from the state dict)."""
    from reparq.quant.log_reparam import Log2ParityQuantizer

    for name, desc in description.items():
        module = model.get_submodule(name)
        kind = desc["probs"]
        base = "logsqrt2" if kind in ("uniform", "log2parity") else kind
        module.matmul_quant = MatmulQuantizers(desc["bits"], probs_base=base, probs_uniform=kind == "uniform")
        if kind == "log2parity":
            module.matmul_quant.probs = Log2ParityQuantizer(module.matmul_quant.probs)
        for _, q in module.matmul_quant.uniform_quantizers():
            q.initialized = True  # scale and zero point arrive with load_state_dict
        if type(module) in _ADAPTERS:
            module.__class__ = _quant_class(type(module))


# ----------------------------------------------------------------------------------------------
# Built-in adapters: timm. Imported lazily so that `import reparq` does not import timm.


def _timm_vit_attention_forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                                is_causal: bool = False) -> torch.Tensor:
    """timm ``Attention.forward`` (unfused path) with the matmul inputs quantized."""
    from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask

    mq = self.matmul_quant
    B, N, _ = x.shape
    gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    attn = (mq.q(q) * self.scale) @ mq.k(k).transpose(-2, -1)
    attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
    attn = self.attn_drop(attn.softmax(dim=-1))
    x = mq.attend(attn, v)
    x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
    x = self.norm(x)
    if gate is not None:
        x = x * gate
    return self.proj_drop(self.proj(x))


def _timm_swin_window_attention_forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """timm Swin ``WindowAttention.forward`` (unfused path): relative position bias and the
    shifted-window mask are added to the logits before the softmax, as timm does."""
    mq = self.matmul_quant
    B_, N, _ = x.shape
    qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    attn = (mq.q(q) * self.scale) @ mq.k(k).transpose(-2, -1)
    attn = attn + self._get_rel_pos_bias()
    if mask is not None:
        num_win = mask.shape[0]
        attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, self.num_heads, N, N)
    attn = self.attn_drop(self.softmax(attn))
    x = mq.attend(attn, v)
    x = x.transpose(1, 2).reshape(B_, N, -1)
    return self.proj_drop(self.proj(x))


def _load_builtin() -> None:
    global _BUILTIN_LOADED
    import sys

    # A Hugging Face model means transformers is already imported; only then register its
    # attention classes (importing transformers for a CNN would cost seconds for nothing).
    # Checked on every call: transformers may be imported after the first quantization.
    if "transformers" in sys.modules:
        from reparq.model.hf_adapters import register_hf_attention

        register_hf_attention()  # idempotent
    if _BUILTIN_LOADED:
        return
    _BUILTIN_LOADED = True
    try:
        from timm.layers.attention import Attention
        from timm.models.swin_transformer import WindowAttention
    except ImportError:  # timm is optional: without it there is nothing of timm's to adapt
        return
    _ADAPTERS.setdefault(Attention, _timm_vit_attention_forward)
    _ADAPTERS.setdefault(WindowAttention, _timm_swin_window_attention_forward)


__all__ = ["adapt_attention", "attention_modules", "describe_attention", "is_adapted", "list_attention_adapters",
           "rebuild_attention", "register_attention"]
