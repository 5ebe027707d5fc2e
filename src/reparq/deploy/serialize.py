"""Save and load quantized models: safetensors (integer weights, scales, zero-points, the other
float tensors) plus a JSON description. Loading rebuilds the deployed form directly (merge, BN
fold, quantized layers with the saved bits) without calibration data, and never unpickles.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from reparq.errors import ReparqError
from reparq.info import QuantInfo, __version__
from reparq.model.attention_adapters import describe_attention, rebuild_attention
from reparq.model.postnorm import add_folded_biases
from reparq.nn.qmodules import QUANTIZED_TYPES, attach_input_affine, parameter_names, quantized_layers
from reparq.recipes.prepare import prepare_for_deployment

FORMAT, FORMAT_VERSION = "reparq-quantized", 1
META_FILE, TENSOR_FILE = "reparq.json", "model.safetensors"
_INT_SUFFIX = ".weight_int"


def _quantizer_meta(q) -> dict:
    meta = {"bits": q.bits, "symmetric": q.symmetric, "narrow": q.narrow, "channel_axis": q.channel_axis,
            "initialized": q.initialized}
    if getattr(q, "group_size", None) is not None:  # written only when set: older readers see the same files
        meta["group_size"] = q.group_size
    return meta


def save(qmodel: nn.Module, directory: str | Path, source: str | None = None) -> Path:
    """Write ``directory/reparq.json`` and ``directory/model.safetensors``.

    ``source`` says how to rebuild the float architecture at load time (``zoo:NAME``); without
    it, :func:`load` needs the float model passed in.
    """
    info = getattr(qmodel, "reparq_info", None)
    if info is None:
        raise ReparqError("only models returned by reparq.quantize can be saved")
    layers, tensors = export_state(qmodel)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / TENSOR_FILE), metadata={"format": FORMAT})
    write_meta(directory, info, layers, describe_attention(qmodel), type(qmodel).__name__,
               source or info.extra.get("source"))
    return directory


def export_state(module: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """(per-layer quantizer description, tensors) of a quantized model or of a part of one whose
    submodules carry their full-model names (streamed calibration saves one decoder layer at a
    time this way): integer weights for quantized layers, every other tensor as it is."""
    layers = {}
    tensors: dict[str, torch.Tensor] = {}
    int_weights: set[int] = set()  # ids of the weights stored as integers
    with torch.no_grad():
        for name, layer in quantized_layers(module):
            wq = layer.weight_quantizer
            layers[name] = {"type": type(layer).__name__, "weight": _quantizer_meta(wq),
                            "input": _quantizer_meta(layer.input_quantizer)}
            if not wq.is_float and wq.initialized:
                tensors[name + _INT_SUFFIX] = wq.to_int(layer.quantized_weight()).to(torch.int8).cpu()
                int_weights.add(id(layer.weight))
    # Under every name they have: a tied input embedding is stored as its output layer's integers.
    as_ints = {key for pid, keys in parameter_names(module).items() if pid in int_weights for key in keys}
    for key, value in module.state_dict().items():
        if key not in as_ints:
            tensors[key] = value.detach().cpu().contiguous()
    return layers, tensors


def write_meta(directory: Path, info, layers: dict, attention: dict, architecture: str, source: str | None,
               shards: list[str] | None = None) -> None:
    """``reparq.json``; ``shards`` lists the tensor files when there is more than ``model.safetensors``."""
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "reparq_version": __version__,
            "source": source, "architecture": architecture, "info": asdict(info), "layers": layers,
            "attention": attention}
    if shards:
        meta["shards"] = shards
    (Path(directory) / META_FILE).write_text(json.dumps(meta, indent=1, default=str) + "\n")


def read_meta(directory: Path) -> dict:
    """The metadata of a directory that ``reparq.save`` or ``reparq stream`` wrote, checked for
    format and version: one reader for ``reparq.load`` and the Hugging Face export, so both refuse
    the same foreign or newer directories with the same message."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.exists():
        raise ReparqError(f"{directory} is not a saved reparq model (needs {META_FILE} and {TENSOR_FILE}); "
                          "quantize and save first")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ReparqError(f"{meta_path} is corrupt: {exc}") from exc
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ReparqError(f"{directory} holds format {meta.get('format')!r} version {meta.get('format_version')!r}; "
                          f"this reparq reads {FORMAT!r} version {FORMAT_VERSION}")
    return meta


def _read(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    meta = read_meta(directory)
    tensors: dict[str, torch.Tensor] = {}
    for name in meta.get("shards") or [TENSOR_FILE]:
        path = directory / name
        if not path.exists():
            raise ReparqError(f"{directory} is not a complete saved reparq model: {name} is missing")
        try:
            tensors.update(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ReparqError(f"{path} is corrupt: {exc}") from exc
    return meta, tensors


def _model_from_source(directory: Path, source: str) -> nn.Module:
    if source.startswith("zoo:"):
        from reparq.zoo import load_model

        return load_model(source.removeprefix("zoo:"))
    if source.startswith("hf:"):  # the architecture from its config; every weight comes from the saved state
        from reparq.stream.skeleton import load_config

        from transformers import AutoModelForCausalLM

        config = load_config(source.removeprefix("hf:"))
        config.use_cache = False
        return AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    raise ReparqError(f"{directory} does not say how to build its model; pass it: reparq.load(dir, model=...)")


def _restore_quantizer(q, meta: dict, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
    q.narrow, q.channel_axis = meta["narrow"], meta["channel_axis"]
    q.group_size = meta.get("group_size")
    if meta["initialized"]:
        q.set_params(scale, zero_point)


def _tied_to_loaded(model: nn.Module, loaded) -> set[str]:
    """Parameter names that share their tensor with a loaded one (a tied input embedding, which
    :func:`export_state` stores only as the output layer's integers)."""
    loaded = set(loaded)
    return {k for group in parameter_names(model).values() if loaded.intersection(group) for k in group}


def load(directory: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a saved quantized model. ``model`` is the float architecture when the saved source
    is not a zoo model (its weights are replaced by the saved ones)."""
    directory = Path(directory)
    meta, tensors = _read(directory)
    if model is None:
        model = _model_from_source(directory, meta.get("source") or "")
    model.eval()
    prepare_for_deployment(model)
    by_type = {cls.__name__: (float_cls, cls) for float_cls, cls in QUANTIZED_TYPES.items()}
    for name, layer_meta in meta["layers"].items():
        try:
            float_layer = model.get_submodule(name)
        except AttributeError:
            raise ReparqError(f"{directory}: layer {name!r} does not exist in the given model") from None
        float_cls, q_cls = by_type[layer_meta["type"]]
        if type(float_layer) is not float_cls:
            raise ReparqError(f"{directory}: layer {name!r} is {type(float_layer).__name__}, saved as {layer_meta['type']}")
        q = q_cls.from_float(float_layer, layer_meta["weight"]["bits"], layer_meta["input"]["bits"])
        for role in ("weight", "input"):
            quantizer = getattr(q, f"{role}_quantizer")
            prefix = f"{name}.{role}_quantizer."
            _restore_quantizer(quantizer, layer_meta[role], tensors.pop(prefix + "scale"), tensors.pop(prefix + "zero_point"))
        if name + ".input_affine.mul" in tensors:  # a consumer-side fold's multiply-add (values loaded below)
            attach_input_affine(q, torch.ones_like(tensors[name + ".input_affine.mul"]),
                                torch.zeros_like(tensors[name + ".input_affine.add"]))
        ints = tensors.pop(name + _INT_SUFFIX, None)
        if ints is not None:
            scale, _ = q.weight_quantizer.shaped_params(q.weight)
            tensors[name + ".weight"] = ints.float() * scale.detach()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
    # Transformers: re-attach the attention matmul quantizers (their ranges come with the state),
    # and the biases that a post-norm fold gave to bias-free consumers.
    rebuild_attention(model, meta.get("attention", {}))
    add_folded_biases(model, tensors.keys())
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = _tied_to_loaded(model, tensors.keys())
    missing = [k for k in missing if not k.endswith((".scale", ".zero_point")) and k not in tied]
    if missing or unexpected:
        raise ReparqError(f"{directory} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    info = meta["info"]
    model.reparq_info = QuantInfo(**info)
    return model.eval()
