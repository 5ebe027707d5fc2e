"""Attention adapters for Hugging Face transformers: BERT self-attention, LLaMA attention (and
the LLaMA-architecture Mistral and Qwen2), OPT attention.

Why an attention *function* and not a re-written forward: in transformers 5.x every attention
module computes q, k, v (and LLaMA's rotary embedding, grouped-query heads and KV cache) itself
and then calls the function that ``config._attn_implementation`` names in
``ALL_ATTENTION_FUNCTIONS``. We register one more, ``"reparq"`` (:func:`quantized_attention`):
eager attention with ``module.matmul_quant`` on the inputs of its two matmuls (q and k after
the rotary embedding, the post-Softmax probabilities and v, the last two through
:meth:`MatmulQuantizers.attend` so that the deployed log2 form applies too). Everything else
stays the model's own code, so with the quantizers off the adapted model equals the original.

How it plugs in: the HF classes join the shared attention-adapter registry
(:mod:`reparq.model.attention_adapters`, the pass every recipe runs) with a forward that is
the class's own, run with a per-module copy of the config that selects ``"reparq"``. Only the
adapted attention modules switch; the model keeps building its masks for its own
implementation, and :func:`quantized_attention` takes every mask form (eager's additive float
mask, SDPA's boolean mask, or none on a causal module). Nothing global changes, and the
caller's model is untouched because ``reparq.quantize`` adapts a deep copy.

Family knowledge is data (:data:`HF_FAMILIES`): which Linear inputs are post-norm (qkv, fc1),
which are post-activation (fc2) and which norm feeds which consumers. Importing this module
does not import transformers; :func:`register_hf_attention` does, once.
"""

from __future__ import annotations

import copy
import fnmatch
import importlib
import re
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from reparq.errors import ReparqError
from reparq.nn.attention import MatmulQuantizers

ATTN_IMPLEMENTATION = "reparq"


@dataclass(frozen=True)
class HFFamily:
    """One transformers family: attention class names, block regex, and globs on module names.

    ``norm_consumers``: (norm, consumers), names relative to a block. ``exclusive_norms`` is
    False where the norm output is also the residual stream (post-LN BERT): a per-channel scale
    folded into such a norm would change the residual, so only the consumers can absorb it.
    """

    attention: tuple[str, ...]
    blocks: str  # regex on full module names
    post_norm: tuple[str, ...]
    post_act: tuple[str, ...]
    norm_consumers: tuple[tuple[str, tuple[str, ...]], ...]
    exclusive_norms: bool
    not_post_act: tuple[str, ...] = ()
    inner_inputs: tuple[str, ...] = ()  # Linears inside a block that no norm feeds (relative to the block)
    # (consumer, producer) among the inner inputs whose input is the producer Linear's output
    # through per-channel ops that commute with a positive per-channel scale: a per-channel
    # division of the input folds into the producer's rows (:func:`producer_inputs`).
    producer_inputs: tuple[tuple[str, str], ...] = ()
    # The block's activation module (relative name) that must be a ReLU for ``producer_inputs`` to
    # hold (empty: none needed, as LLaMA's gated MLP, whose input to down_proj is linear in
    # up_proj's output whatever the gate's activation). Read from the module, not the config, so
    # that the streamed path, which holds one layer at a time, sees it too.
    relu_module: str = ""
    # Post-LN: the norm (relative to a block) whose output is the next block's input and so feeds
    # its ``qkv``; ``first_qkv_norm`` (a full-name suffix) feeds the first block's, if any.
    qkv: tuple[str, ...] = ()
    qkv_from_previous: str | None = None
    first_qkv_norm: str | None = None


_LLAMA = HFFamily(
    attention=("LlamaAttention",),
    blocks=r"(?:.*\.)?layers\.\d+",
    post_norm=("*.self_attn.q_proj", "*.self_attn.k_proj", "*.self_attn.v_proj", "*.mlp.gate_proj",
               "*.mlp.up_proj"),
    post_act=("*.mlp.down_proj",),
    norm_consumers=(("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))),
    exclusive_norms=True,
    inner_inputs=("self_attn.o_proj", "mlp.down_proj"),
    producer_inputs=(("mlp.down_proj", "mlp.up_proj"),),  # act(gate(x)) * up(x): linear in up's output
)
_OPT_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")

HF_FAMILIES: dict[str, HFFamily] = {
    "bert": HFFamily(
        attention=("BertSelfAttention",),
        blocks=r"(?:.*\.)?encoder\.layer\.\d+",
        post_norm=("*.attention.self.query", "*.attention.self.key", "*.attention.self.value",
                   "*.intermediate.dense"),
        post_act=("*.output.dense",),
        not_post_act=("*.attention.output.dense",),  # the attention output projection reads the context
        norm_consumers=(("attention.output.LayerNorm", ("intermediate.dense",)),),
        exclusive_norms=False,
        inner_inputs=("attention.output.dense", "output.dense"),
        qkv=("attention.self.query", "attention.self.key", "attention.self.value"),
        qkv_from_previous="output.LayerNorm",
        first_qkv_norm="embeddings.LayerNorm",
    ),
    "llama": _LLAMA,
    # Same layer layout and names as LLaMA (Qwen2 adds biases to q/k/v, which the RMSNorm fold's
    # shared zero point leaves alone; Mistral's sliding window arrives in the mask the model builds).
    "mistral": replace(_LLAMA, attention=("MistralAttention",)),
    "qwen2": replace(_LLAMA, attention=("Qwen2Attention",)),
    # Pre-LN OPT (every size but 350m); :func:`_spec` turns it into the post-LN layout where the
    # config says ``do_layer_norm_before=False``.
    "opt": HFFamily(
        attention=("OPTAttention",),
        blocks=r"(?:.*\.)?decoder\.layers\.\d+",
        post_norm=("*.self_attn.q_proj", "*.self_attn.k_proj", "*.self_attn.v_proj", "*.fc1"),
        post_act=("*.fc2",),
        norm_consumers=(("self_attn_layer_norm", _OPT_QKV), ("final_layer_norm", ("fc1",))),
        exclusive_norms=True,
        inner_inputs=("self_attn.out_proj", "fc2"),
        producer_inputs=(("fc2", "fc1"),),  # relu(fc1(x)): ReLU is positively homogeneous
        relu_module="activation_fn",
    ),
}
# The families that are LLaMA's table but for the attention class: same layer layout and names.
LLAMA_LAYOUT = tuple(f for f, spec in HF_FAMILIES.items() if replace(spec, attention=_LLAMA.attention) == _LLAMA)
# Post-LN OPT: each norm ends a residual branch, so its output is also the residual stream; the
# attention norm feeds fc1, the final norm the next layer's q/k/v (the first layer's read the embeddings).
_OPT_POST_LN = replace(HF_FAMILIES["opt"], norm_consumers=(("self_attn_layer_norm", ("fc1",)),),
                       exclusive_norms=False, qkv=_OPT_QKV, qkv_from_previous="final_layer_norm")
# (module path, class name) of the attention classes registered with the attention adapters.
_HF_CLASSES = (("transformers.models.bert.modeling_bert", "BertSelfAttention"),
               ("transformers.models.llama.modeling_llama", "LlamaAttention"),
               ("transformers.models.mistral.modeling_mistral", "MistralAttention"),
               ("transformers.models.qwen2.modeling_qwen2", "Qwen2Attention"),
               ("transformers.models.opt.modeling_opt", "OPTAttention"))
_ALWAYS = 2  # the first classes (the zoo's families) are imported and registered on the first call
_REGISTERED: set[str] = set()  # attention classes registered so far
_FUNCTION_REGISTERED = False


def _float_class_name(module: nn.Module) -> str:
    """The class name before adaptation (the adapter swaps in a subclass)."""
    return getattr(type(module), "_reparq_float_class", type(module)).__name__


def hf_family(model: nn.Module) -> str | None:
    """A key of :data:`HF_FAMILIES` ('bert', 'llama', 'mistral', 'qwen2', 'opt') or None, from
    the attention classes the model contains."""
    names = {_float_class_name(m) for m in model.modules()}
    return next((f for f, spec in HF_FAMILIES.items() if names.intersection(spec.attention)), None)


def _spec(model: nn.Module, family: str) -> HFFamily:
    """The family's table, for this model's configuration (post-LN OPT has its own)."""
    config = getattr(model, "config", None)
    if family == "opt" and config is not None and not getattr(config, "do_layer_norm_before", True):
        return _OPT_POST_LN
    return HF_FAMILIES[family]


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every HF attention module of a known family (adapted or not), in registration order."""
    classes = {c for spec in HF_FAMILIES.values() for c in spec.attention}
    return [(n, m) for n, m in model.named_modules() if _float_class_name(m) in classes]


# ----------------------------------------------------------------------------------------------
# The attention function


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, H_kv, T, D] -> [B, H_kv * n_rep, T, D] (grouped-query attention), as LLaMA's eager code."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def _additive_mask(mask: torch.Tensor | None, module: nn.Module, scores: torch.Tensor) -> torch.Tensor | None:
    """Eager's additive float mask from whatever the model built: a float mask as is, a boolean
    mask (True = attend, SDPA's form) as 0 / dtype-min, and none on a causal module as causal."""
    if mask is None:
        q_len, k_len = scores.shape[-2:]
        if not getattr(module, "is_causal", False) or q_len == 1:
            return None
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).tril(k_len - q_len)
    if mask.ndim == 4 and mask.shape[0] not in (1, scores.shape[0]):
        mask = _shared_mask(mask)
    if mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=scores.dtype, device=scores.device)
        return torch.where(mask, zero, torch.finfo(scores.dtype).min)
    return mask


def _shared_mask(mask: torch.Tensor) -> torch.Tensor:
    """A mask built for another batch size (block reconstruction replays the first batch's
    arguments on other batches): fine when every sample had the same mask (causal, no padding)."""
    if not torch.equal(mask, mask[:1].expand_as(mask)):
        raise ReparqError("block reconstruction replays one batch's attention mask on every batch, but these "
                          "samples have different padding; calibrate with unpadded fixed-length token windows")
    return mask[:1]


def quantized_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                        **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention (BERT's and LLaMA's, op for op) with quantizers on both matmuls' inputs.

    k is quantized before the grouped-query repeat: the repeat copies values, so a per-tensor
    quantizer gives the same result and a kernel stores only the un-repeated heads.
    """
    mq = getattr(module, "matmul_quant", None)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    if mq is not None:
        query, key = mq.q(query), mq.k(key)
    n_rep = getattr(module, "num_key_value_groups", 1)
    key, value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    mask = _additive_mask(attention_mask, module, scores)
    if mask is not None:
        scores = scores + mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    out = mq.attend(probs, value) if mq is not None else torch.matmul(probs, value)
    return out.transpose(1, 2).contiguous(), probs


# ----------------------------------------------------------------------------------------------
# Registration and the adapter pass


def use_reparq_attention(module: nn.Module) -> None:
    """Give ``module`` its own config copy that selects ``"reparq"`` (the model's config is untouched)."""
    config = getattr(module, "config", None)
    if config is None:
        raise ReparqError(f"{type(module).__name__} has no config; build the model with transformers' "
                          f"from_pretrained or from_config")
    if config._attn_implementation != ATTN_IMPLEMENTATION:
        own = copy.deepcopy(config)
        own._attn_implementation = ATTN_IMPLEMENTATION
        module.config = own


def _hf_attention_forward(self, *args, **kwargs):
    """The HF class's own forward, with ``"reparq"`` as its attention function."""
    use_reparq_attention(self)
    return self._reparq_float_class.forward(self, *args, **kwargs)


def register_hf_attention() -> None:
    """Register ``"reparq"`` with transformers and the HF classes with the attention adapters
    (each once; safe to call again).

    The mask builder registered for ``"reparq"`` is eager's, for a model whose own config a
    user switches to ``"reparq"``.
    """
    import sys

    global _FUNCTION_REGISTERED
    if not _FUNCTION_REGISTERED:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
        from transformers.modeling_utils import AttentionInterface

        AttentionInterface.register(ATTN_IMPLEMENTATION, quantized_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, eager_mask)
        _FUNCTION_REGISTERED = True
    from reparq.model.attention_adapters import register_attention

    # The other families only once their modeling module is imported (a model of theirs exists):
    # importing every family's code for a BERT would cost time for nothing. Called again on every
    # quantization (attention_adapters), so a family imported later is picked up then.
    for i, (module_path, class_name) in enumerate(_HF_CLASSES):
        if class_name not in _REGISTERED and (i < _ALWAYS or module_path in sys.modules):
            register_attention(getattr(importlib.import_module(module_path), class_name))(_hf_attention_forward)
            _REGISTERED.add(class_name)


def adapt_hf_attention(model: nn.Module, a_bits: int, probs: str = "uniform",
                       ignore: tuple[str, ...] = ()) -> list[str]:
    """Attach MatmulQuantizers to every attention module of a known HF family (in place); returns their names.

    The shared pass :func:`reparq.model.attention_adapters.adapt_attention` (``probs``:
    ``"uniform"`` for baselines, ``"logsqrt2"``/``"log2"`` for RepQ-ViT / RepQuant), once the
    HF classes are registered; the adapted modules switch to ``"reparq"`` right away.
    """
    from reparq.model.attention_adapters import adapt_attention

    hf = {n for n, _ in attention_modules(model)}
    if not hf:
        return []
    register_hf_attention()
    names = [n for n in adapt_attention(model, a_bits, probs=probs, ignore=ignore) if n in hf]
    for name in names:
        use_reparq_attention(model.get_submodule(name))
    return names


# ----------------------------------------------------------------------------------------------
# Quantization points and norm -> consumer pairs


@dataclass(frozen=True)
class QuantPoint:
    """One quantizer's place: ``kind`` is weight, post_norm, post_act, other_input or matmul."""

    name: str
    kind: str


def _linear_input_kind(name: str, spec: HFFamily | None) -> str:
    def hit(patterns) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in patterns)

    if spec is None:
        return "other_input"
    if hit(spec.post_norm):
        return "post_norm"
    if hit(spec.post_act) and not hit(spec.not_post_act):
        return "post_act"
    return "other_input"


def quantization_points(model: nn.Module) -> list[QuantPoint]:
    """Every quantization point of an HF model: Linear weights and inputs, and matmul inputs.

    Linear layers count whether or not they were already swapped for QLinear (a float model
    shows what would be quantized); matmul inputs count where an adapter attached them.
    """
    family = hf_family(model)
    spec = _spec(model, family) if family else None
    points: list[QuantPoint] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            points.append(QuantPoint(f"{name}.weight", "weight"))
            points.append(QuantPoint(f"{name}.input", _linear_input_kind(name, spec)))
        elif isinstance(module, MatmulQuantizers):
            points += [QuantPoint(f"{name}.{t}", "matmul") for t in ("q", "k", "v", "probs")]
    return points


def count_points(model: nn.Module) -> dict[str, int]:
    """Number of quantization points per kind."""
    counts: dict[str, int] = {}
    for p in quantization_points(model):
        counts[p.kind] = counts.get(p.kind, 0) + 1
    return counts


def _family_blocks(model: nn.Module) -> tuple[str | None, dict[str, nn.Module], list[str]]:
    """(family, modules by name, block names in order); no family: (None, {}, [])."""
    family = hf_family(model)
    if family is None:
        return None, {}, []
    modules = dict(model.named_modules())
    return family, modules, [n for n in modules if re.fullmatch(HF_FAMILIES[family].blocks, n)]


def inner_inputs(model: nn.Module) -> list[str]:
    """Full names of the block-inner Linears no norm feeds (attention output projection, fc2)."""
    family, modules, blocks = _family_blocks(model)
    if family is None:
        return []
    return [f"{b}.{rel}" for b in blocks for rel in _spec(model, family).inner_inputs if f"{b}.{rel}" in modules]


def producer_inputs(model: nn.Module) -> list[tuple[str, str]]:
    """Full (consumer, producer) names of the inner inputs that can take a per-channel division in
    the producer's rows (LLaMA's up_proj -> down_proj, OPT's fc1 -> ReLU -> fc2); none in a block
    whose activation is not a ReLU (GELU does not commute with a positive scale)."""
    family, modules, blocks = _family_blocks(model)
    if family is None:
        return []
    spec = _spec(model, family)
    return [(f"{b}.{c}", f"{b}.{p}") for b in blocks for c, p in spec.producer_inputs
            if f"{b}.{c}" in modules and f"{b}.{p}" in modules
            and (not spec.relu_module or isinstance(modules.get(f"{b}.{spec.relu_module}"), nn.ReLU))]


def norm_consumers(model: nn.Module) -> list[tuple[str, list[str], bool]]:
    """(norm name, consumer Linear names, exclusive) for every norm that feeds qkv or fc1.

    ``exclusive`` False: the norm output is also the residual stream (BERT, post-LN OPT), so a
    per-channel scale cannot be folded into the norm itself, only into its consumers.
    """
    family, modules, blocks = _family_blocks(model)
    if family is None:
        return []
    spec = _spec(model, family)
    out = []
    first = spec.first_qkv_norm
    prev_norm = next((n for n in modules if first and n.endswith(first)), None)
    for block in blocks:
        if spec.qkv_from_previous:  # post-LN: qkv read the previous layer's (or the embeddings') output norm
            qkv = [f"{block}.{p}" for p in spec.qkv]
            if prev_norm is not None and all(n in modules for n in qkv):
                out.append((prev_norm, qkv, spec.exclusive_norms))
            prev_norm = f"{block}.{spec.qkv_from_previous}"
        for norm, consumers in spec.norm_consumers:
            names = [f"{block}.{c}" for c in consumers]
            if f"{block}.{norm}" in modules and all(n in modules for n in names):
                out.append((f"{block}.{norm}", names, spec.exclusive_norms))
    return out
