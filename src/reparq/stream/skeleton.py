"""A decoder model without memory: the architecture on the meta device (accelerate's empty-weight
init), with one submodule at a time given real weights from a lazy checkpoint and freed again.

accelerate's :func:`init_empty_weights` puts parameters on ``meta`` and leaves buffers real, so
the rotary embedding's frequencies exist and the skeleton can run the part of its forward that
needs no weights: building the causal mask and position embeddings that every decoder layer is
called with (:func:`layer_call`).
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


@torch.no_grad()
def materialize(module: nn.Module, prefix: str, checkpoint: LazyCheckpoint, device: str | torch.device = "cpu",
                aliases: dict[str, str] | None = None) -> nn.Module:
    """Give ``module`` (named ``prefix`` in the full model) its real weights, in place.

    ``aliases`` maps a missing tensor name to the one that holds it (tied output embedding ->
    input embedding). Every parameter and persistent buffer must be found."""
    module.to_empty(device=device)
    names = {f"{prefix}.{k}" if prefix else k: k for k in module.state_dict()}
    wanted = {full: full if full in checkpoint else (aliases or {}).get(full, full) for full in names}
    tensors = checkpoint.load(set(wanted.values()))
    state = {names[full]: tensors[src] for full, src in wanted.items()}
    module.load_state_dict(state, strict=True, assign=False)
    return module


def to_device(obj, device):
    """Tensors inside (nested tuples/lists of) ``obj`` moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    return obj


def free(module: nn.Module) -> None:
    """Drop a submodule's storage (back to the meta device)."""
    module.to("meta")


@torch.no_grad()
def layer_call(skeleton: nn.Module, layers: nn.ModuleList, batch_shape: tuple[int, int], device) -> tuple[tuple, dict]:
    """The arguments after the hidden states with which the model calls its first decoder layer
    on a batch of ``batch_shape`` (batch, tokens): mask, position ids, rotary (cos, sin).
    Computed by the skeleton itself from zero input embeddings, stopped at the first layer."""
    hidden = skeleton.config.hidden_size
    caught: dict = {}

    def hook(module, args, kwargs):
        caught["args"], caught["kwargs"] = args[1:], kwargs
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    base = getattr(skeleton, skeleton.base_model_prefix, skeleton)
    try:  # on the CPU (the skeleton's real buffers live there), then moved to the layer's device
        base(inputs_embeds=torch.zeros(*batch_shape, hidden))
    except _Stop:
        pass
    finally:
        handle.remove()
    if "kwargs" not in caught:
        raise ReparqError("the model's forward never reached its first decoder layer")
    kwargs = {k: to_device(v, device) for k, v in without_caches(caught["kwargs"]).items()}
    caught["args"] = to_device(caught["args"], device)
    return caught["args"], kwargs


__all__ = ["build_skeleton", "decoder_layers", "free", "layer_call", "load_config", "materialize"]
