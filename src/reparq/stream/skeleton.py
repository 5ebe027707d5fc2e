"""A decoder model without memory: the architecture on the meta device (accelerate's empty-weight
init), with one submodule at a time given real weights from a lazy checkpoint and freed again.

accelerate's :func:`init_empty_weights` puts parameters on ``meta`` and leaves buffers real, so
the rotary embedding's frequencies exist. With the few modules outside the layers given their
weights (embeddings, learned positions, final norm: :func:`outer_modules`), the skeleton runs its
own forward up to the first layer, which gives the layer's inputs and the causal mask and
position arguments every layer is called with (:func:`first_layer_inputs`), whatever the family
adds to the token embedding (OPT's learned positions).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn

from reparq.errors import ReparqError
from reparq.recipes.reconstruct import without_caches
from reparq.stream.checkpoint import LazyCheckpoint


class _Stop(Exception):
    pass


def load_config(model_dir: str | Path):
    from transformers import AutoConfig

    path = Path(model_dir)
    if not (path / "config.json").exists():
        raise ReparqError(f"{path} has no config.json: streamed calibration needs a Hugging Face model directory")
    return AutoConfig.from_pretrained(str(path), local_files_only=True)


def build_skeleton(config) -> nn.Module:
    """The causal-LM on the meta device, eager attention, no KV cache."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    config.use_cache = False
    config._attn_implementation = "eager"
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.eval()


def decoder_layers(skeleton: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, module list) of the decoder layers (``model.layers`` in LLaMA-style models)."""
    for name, module in skeleton.named_modules():
        if name.endswith("layers") and isinstance(module, nn.ModuleList):
            return name, module
    raise ReparqError(f"{type(skeleton).__name__} has no decoder layer list (…layers)")


def state_names(module: nn.Module, prefix: str, recurse: bool = True) -> dict[str, str]:
    """{full name in the checkpoint: name in ``module``} of the tensors it stores (its parameters
    and persistent buffers; with ``recurse=False`` only its own)."""
    if recurse:
        local = list(module.state_dict())
    else:
        local = [k for k, _ in module.named_parameters(recurse=False)]
        local += [k for k, _ in module.named_buffers(recurse=False) if k not in module._non_persistent_buffers_set]
    return {f"{prefix}.{k}" if prefix else k: k for k in local}


@torch.no_grad()
def materialize(module: nn.Module, prefix: str, checkpoint: LazyCheckpoint, device: str | torch.device = "cpu",
                aliases: dict[str, str] | None = None, recurse: bool = True) -> nn.Module:
    """Give ``module`` (named ``prefix`` in the full model) its real weights, in place; with
    ``recurse=False`` only its own parameters and buffers, not its children's.

    ``aliases`` maps a missing tensor name to the one that holds it (tied output embedding ->
    input embedding). Every parameter and persistent buffer must be found."""
    module.to_empty(device=device, recurse=recurse)
    names = state_names(module, prefix, recurse)
    wanted = {full: full if full in checkpoint else (aliases or {}).get(full, full) for full in names}
    tensors = checkpoint.load(set(wanted.values()))
    state = {names[full]: tensors[src] for full, src in wanted.items()}
    if recurse:
        module.load_state_dict(state, strict=True, assign=False)
    else:
        for key, value in state.items():
            getattr(module, key).copy_(value)
    return module


def to_device(obj, device):
    """Tensors inside (nested tuples/lists of) ``obj`` moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    return obj


def free(module: nn.Module, recurse: bool = True) -> None:
    """Drop a submodule's storage (back to the meta device); ``recurse=False``: only its own."""
    module._apply(lambda t: t.to("meta"), recurse=recurse)


def _base(skeleton: nn.Module) -> nn.Module:
    return getattr(skeleton, skeleton.base_model_prefix, skeleton)


def outer_modules(skeleton: nn.Module, layers: nn.ModuleList) -> dict[str, nn.Module]:
    """The base model's modules outside the decoder layers that hold weights of their own
    (embeddings, learned positions, the final norm), by full name: what runs around the layers.
    Modules with buffers only (LLaMA's rotary embedding) are left alone, their buffers are real."""
    inside = {id(m) for m in layers.modules()}
    prefix = skeleton.base_model_prefix
    return {f"{prefix}.{n}" if n else prefix: m for n, m in _base(skeleton).named_modules()
            if id(m) not in inside and any(True for _ in m.parameters(recurse=False))}


def final_norm(skeleton: nn.Module, layers: nn.ModuleList) -> str:
    """Full name of the norm the base model applies after its last layer (LLaMA ``model.norm``,
    OPT ``model.decoder.final_layer_norm``): the last norm outside the layers, in definition order."""
    norms = [n for n, m in outer_modules(skeleton, layers).items() if "norm" in type(m).__name__.lower()]
    if not norms:
        raise ReparqError(f"{type(skeleton).__name__} has no norm after its decoder layers")
    return norms[-1]


@torch.no_grad()
def first_layer_inputs(skeleton: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor,
                       device) -> tuple[torch.Tensor, tuple, dict]:
    """(hidden states, further positional arguments, keyword arguments) with which the model calls
    its first decoder layer on ``input_ids``: the embedding (with learned positions where the
    architecture has them) and the mask, position ids and rotary tables every layer is called with.
    Run by the model's own forward on the CPU (where the skeleton's real buffers live), stopped at
    the first layer; the modules before it must hold their weights there (:func:`outer_modules`).
    The hidden states stay on the CPU (they are cached there), the rest moves to ``device``."""
    caught: dict = {}

    def hook(module, args, kwargs):
        caught["args"], caught["kwargs"] = args, kwargs
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        _base(skeleton)(input_ids=input_ids.cpu())
    except _Stop:
        pass
    finally:
        handle.remove()
    if "kwargs" not in caught:
        raise ReparqError("the model's forward never reached its first decoder layer")
    kwargs = without_caches(caught["kwargs"])
    args = caught["args"]
    hidden = args[0] if args else kwargs.pop("hidden_states")
    return hidden, to_device(tuple(args[1:]), device), {k: to_device(v, device) for k, v in kwargs.items()}


__all__ = ["build_skeleton", "decoder_layers", "final_norm", "first_layer_inputs", "free", "load_config", "materialize",
           "outer_modules",
           "state_names"]
