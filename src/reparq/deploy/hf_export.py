"""Export to a Hugging Face checkpoint in the compressed-tensors format: a directory that
``transformers.AutoModelForCausalLM.from_pretrained`` (and vLLM) load as a plain model of the
source's architecture (LLaMA layout, OPT) with integer weights.

What is written: ``config.json`` with a ``quantization_config`` (quant_method
``compressed-tensors``; one config group per scheme; ``ignore`` lists the Linear layers left
float, e.g. ``lm_head``), the tensors in safetensors (one file per source shard, so a streamed
model is converted a layer at a time), the source's tokenizer and generation config.

Why the integers are exactly reparq's: each quantized layer's weight is rebuilt from its saved
integers and scales (``q * s``, float32) and handed to compressed-tensors' own compressor
(pack-quantized packs 32 integers into int32 words; int-quantized stores int8), which
re-quantizes it with the same scales to the same integers; the export checks that the
compressor's decompression gives back ``q * s`` bit for bit. The model is written in float32
(``config.json``'s dtype), the precision reparq computes in; each float tensor is stored as
float16 where that is lossless (the zoo's embeddings, untouched norms), float32 otherwise, so a
float16-trained checkpoint does not double in size while every value loads unchanged.

The reparameterizations are already in the weights (the post-norm fold writes into the norm's
gain and the consumers' weights during calibration); what could not be folded into a plain model
(:mod:`reparq.deploy.hf_scheme`) is refused before anything is written. A tied output layer that
reparq quantized is untied: the embedding keeps the quantized matrix in float (what reparq's
embedding reads), ``lm_head`` gets the integers.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from reparq.deploy.hf_scheme import (FLOAT_BITS, LayerScheme, attention_refusals, layer_scheme, needs_value, refuse,
                                     state_refusals)
from reparq.deploy.hf_source import ReparqSource, from_directory, from_model
from reparq.errors import ReparqError

INDEX_FILE, SINGLE_FILE = "model.safetensors.index.json", "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja")
_QUANT_SUFFIXES = (".weight_int", ".weight_quantizer.scale", ".weight_quantizer.zero_point",
                   ".input_quantizer.scale", ".input_quantizer.zero_point")


# ----------------------------------------------------------------------------------------------
# The source's configuration and tokenizer


def _source_dir(source: str | Path | None) -> Path | None:
    if source is None:
        return None
    text = str(source)
    if text.startswith("zoo:"):
        return None
    path = Path(text.removeprefix("hf:"))
    return path if path.is_dir() else None


def _resolve_config(src: ReparqSource, source: str | None):
    """The transformers config: the model's own, the source directory's, or the zoo model's."""
    if src.config is not None:
        return src.config
    directory = _source_dir(source)
    if directory is not None and (directory / "config.json").exists():
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(directory), local_files_only=True)
    if source and str(source).startswith("zoo:"):
        from reparq.zoo import load_model

        return load_model(str(source).removeprefix("zoo:")).config
    raise ReparqError("the export needs the model's Hugging Face config: pass source='zoo:NAME' or the float "
                      "model's directory (source=PATH; CLI: --source)")


def _copy_tokenizer(source: str | None, out_dir: Path, config) -> list[str]:
    """Copy the source's tokenizer files and generation config; returns the names written."""
    written = []
    directory = _source_dir(source)
    if directory is not None:
        for name in TOKENIZER_FILES:
            if (directory / name).exists():
                shutil.copy2(directory / name, out_dir / name)
                written.append(name)
    elif source and str(source).startswith("zoo:"):
        from reparq.zoo.train_lm import EOS, tokenizer_path

        path = tokenizer_path(str(source).removeprefix("zoo:"))
        if path.exists():
            shutil.copy2(path, out_dir / "tokenizer.json")
            (out_dir / "tokenizer_config.json").write_text(json.dumps(
                {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "bos_token": EOS,
                 "unk_token": EOS, "model_max_length": getattr(config, "max_position_embeddings", 2048)},
                indent=1) + "\n")
            written += ["tokenizer.json", "tokenizer_config.json"]
    if "generation_config.json" not in written:
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(config).save_pretrained(str(out_dir))
        written.append("generation_config.json")
    return written


# ----------------------------------------------------------------------------------------------
# The plan: schemes, ignore list, untying, and every refusal


def _skeleton_keys(config) -> tuple[dict[str, tuple[int, ...]], list[str], str | None]:
    """(state-dict shapes, Linear module names, the input embedding's weight name) of the
    architecture, built on the meta device (no memory)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    embed = model.get_input_embeddings()
    embed_name = next((f"{n}.weight" for n, m in model.named_modules() if m is embed), None)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return shapes, [n for n, m in model.named_modules() if isinstance(m, nn.Linear)], embed_name


class Plan:
    """Every decision of the export, made before anything is written."""

    def __init__(self, src: ReparqSource, config, activations: str, quantize_embedding: bool = False) -> None:
        problems = attention_refusals(src.attention)
        keys = src.keys()
        self.schemes: dict[str, LayerScheme | None] = {}
        for name, meta in src.layers.items():
            if name + ".weight_int" in keys:
                out_features, scale_numel = src.shape(name + ".weight_int")[0], _numel(src.shape(
                    name + ".weight_quantizer.scale"))
            else:
                out_features, scale_numel = 0, 0
            self.schemes[name] = layer_scheme(name, meta, scale_numel, out_features, activations, problems)
        problems += state_refusals(keys, src.load([k for k in keys if needs_value(k)]))
        tied = bool(getattr(config, "tie_word_embeddings", False))
        quantized = {n for n, s in self.schemes.items() if s is not None}
        self.untie = tied and "lm_head" in quantized
        self.config = copy.deepcopy(config)
        if self.untie:
            self.config.tie_word_embeddings = False
        self.config.use_cache = True
        self.config.dtype = torch.float32
        expected, linears, self.embed_name = _skeleton_keys(self.config)
        # An untied embedding holds the output layer's quantized matrix: in float (every runtime
        # reads it), or with quantize_embedding as the same integers (transformers decompresses a
        # quantized nn.Embedding; vLLM does not quantize embeddings).
        lm_head = self.schemes.get("lm_head")
        # naive-quantized: an int8 ``weight`` (transformers' init of an Embedding needs one)
        self.embed_scheme = LayerScheme(lm_head.w_bits, lm_head.w_strategy, FLOAT_BITS, storage="naive-quantized",
                                        group_size=lm_head.group_size) \
            if self.untie and quantize_embedding and lm_head is not None else None
        self.ignore = [n for n in linears if n not in quantized]
        float_keys = {k for k in keys if self.passes(k)}
        unexpected = sorted(float_keys - set(expected))
        for key in unexpected[:3]:
            hint = " (a post-norm fold gave a bias-free consumer a bias: calibrate with one shared zero point)" \
                if key.endswith(".bias") else ""
            problems.append(f"{key} has no place in {type(self.config).__name__}'s {config.model_type} "
                            f"architecture{hint}")
        produced = float_keys | {f"{n}.weight" for n in quantized}
        if self.untie:
            produced.add(self.embed_name)
        missing = sorted(k for k in set(expected) - produced if not (k == "lm_head.weight" and tied and not self.untie))
        if missing:
            problems.append(f"the saved model lacks {', '.join(missing[:3])} of the architecture")
        refuse(problems)

    def passes(self, key: str) -> bool:
        """Whether a saved tensor goes to the export as it is (a float tensor of the architecture)."""
        if key.endswith(_QUANT_SUFFIXES) or ".matmul_quant." in key or ".input_affine." in key:
            return False
        layer = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and self.schemes.get(layer) is not None:
            return False  # a quantized layer's float weight (a tied copy): written from its integers
        tied = bool(getattr(self.config, "tie_word_embeddings", False))
        return not (key == "lm_head.weight" and tied)  # tied: transformers ties it to the embedding


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ----------------------------------------------------------------------------------------------
# Writing


def _compact(t: torch.Tensor) -> torch.Tensor:
    """float16 where that keeps every value (the model loads in float32), else float32."""
    t = t.detach().cpu()
    if not torch.is_floating_point(t):
        return t.contiguous()
    t = t.float()
    half = t.half()
    return (half if torch.equal(half.float(), t) else t).contiguous()


def _compressor(fmt: str):
    from compressed_tensors.compressors import BaseCompressor

    return BaseCompressor.get_value_from_registry(fmt)


def _format_scale(scale: torch.Tensor, scheme: LayerScheme, out_features: int) -> torch.Tensor:
    """reparq's flat weight scales in the format's shape: ``[out, 1]`` per channel, ``[out, in / g]``
    per group (reparq stores a row's groups one after another), ``[1]`` per tensor."""
    scale = scale.float().reshape(-1)
    if scheme.w_strategy == "channel":
        return scale.reshape(-1, 1)
    if scheme.w_strategy == "group":
        return scale.reshape(out_features, -1)
    return scale.reshape(1)


def _per_weight(scale: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A format-shaped scale broadcast against the weight: groups repeated over their columns."""
    if scale.ndim == 2 and scale.shape[1] > 1:
        return scale.repeat_interleave(shape[1] // scale.shape[1], dim=1)
    return scale if scale.ndim == 2 else scale.reshape(1, 1)


def _layer_tensors(name: str, scheme: LayerScheme, ct_scheme, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one quantized layer, from reparq's integers and scales."""
    ints = t[name + ".weight_int"].to(torch.int32)
    scale = _format_scale(t[name + ".weight_quantizer.scale"], scheme, ints.shape[0])
    weight = ints.float() * _per_weight(scale, ints.shape)  # what reparq's layer multiplies
    compressor = _compressor(scheme.format)
    local = compressor.compress({"weight": weight, "weight_scale": scale}, ct_scheme)
    back = compressor.decompress(dict(local), ct_scheme)["weight"]
    if not torch.equal(back.float(), weight):  # the integers are reparq's, or nothing is claimed
        raise ReparqError(f"{name}: compressed-tensors' {scheme.format} round trip changed the weights "
                          f"(max {float((back.float() - weight).abs().max()):.3g}); please report this")
    local.pop("weight_zero_point", None)  # symmetric: the format stores none
    if not scheme.weight_only and scheme.activations == "static":
        a_scale = t[name + ".input_quantizer.scale"].float().reshape(1)
        local["input_scale"] = a_scale
        if not scheme.a_symmetric:  # reparq's unsigned grid [0, 2^b-1] is the signed one shifted by 2^(b-1)
            zp = t[name + ".input_quantizer.zero_point"].reshape(1) - 2 ** (scheme.a_bits - 1)
            local["input_zero_point"] = zp.round().to(torch.int8)
    return {f"{name}.{k}": v.contiguous().clone() for k, v in local.items()}  # no storage shared between layers


def _shard_tensors(src_keys: list[str], load, plan: "Plan", ct_schemes: dict) -> dict[str, torch.Tensor]:
    """The export's tensors for one source shard."""
    t = load(src_keys)
    out: dict[str, torch.Tensor] = {}
    for name, scheme in plan.schemes.items():
        if scheme is None or name + ".weight_int" not in t:
            continue
        out.update(_layer_tensors(name, scheme, ct_schemes[name], t))
        if plan.untie and name == "lm_head" and plan.embed_scheme is not None:  # the same integers
            embed = plan.embed_name.removesuffix(".weight")
            renamed = {embed + k.removeprefix(name): v for k, v in t.items() if k.startswith(name + ".")}
            out.update(_layer_tensors(embed, plan.embed_scheme, ct_schemes[embed], renamed))
        elif plan.untie and name == "lm_head":  # the embedding reads the quantized matrix, in float
            ints = t[name + ".weight_int"].float()
            scale = _format_scale(t[name + ".weight_quantizer.scale"], scheme, ints.shape[0])
            out[plan.embed_name] = _compact(ints * _per_weight(scale, ints.shape))
    for key in src_keys:
        if plan.passes(key):
            out[key] = _compact(t[key])
    return out


def _group_schemes(plan: Plan):
    """compressed-tensors config groups: the commonest scheme targets every ``Linear``, the others
    (e.g. the 8-bit first and last layers) name their layers, which take precedence."""
    by_scheme: dict[LayerScheme, list[str]] = {}
    for name, scheme in plan.schemes.items():
        if scheme is not None:
            by_scheme.setdefault(scheme, []).append(name)
    if not by_scheme:
        raise ReparqError("the model has no quantized Linear layer to export")
    # The named groups come first: compressed-tensors' matcher stops at a module's first matching
    # target in config order (and would warn that the names matched nothing).
    ranked = sorted(by_scheme, key=lambda s: len(by_scheme[s]))
    groups, per_layer = {}, {}
    if plan.embed_scheme is not None:  # an Embedding: only a target by name reaches it
        embed = plan.embed_name.removesuffix(".weight")
        groups["embedding"] = per_layer[embed] = plan.embed_scheme.to_ct([embed])
    for i, scheme in enumerate(ranked):
        ct = scheme.to_ct(["Linear"] if i == len(ranked) - 1 else sorted(by_scheme[scheme]))
        groups[f"group_{i}"] = ct
        per_layer.update(dict.fromkeys(by_scheme[scheme], ct))
    return groups, per_layer, ranked


def _quantization_config(plan: Plan, groups: dict, ranked: list[LayerScheme]):
    from compressed_tensors.quantization import QuantizationConfig

    formats = {s.format for s in ranked} | ({plan.embed_scheme.format} if plan.embed_scheme else set())
    return QuantizationConfig(config_groups=groups, format=formats.pop() if len(formats) == 1 else "mixed-precision",
                              quantization_status="compressed", ignore=plan.ignore)


def export_hf(qmodel_or_dir: nn.Module | str | Path, out_dir: str | Path, source: str | Path | None = None,
              activations: str = "static", quantize_embedding: bool = False) -> Path:
    """Write a quantized model as a Hugging Face compressed-tensors checkpoint in ``out_dir``.

    ``qmodel_or_dir``: a model from ``reparq.quantize`` / ``reparq.load``, or a directory written
    by ``reparq.save`` or ``reparq stream`` (converted one shard, i.e. one decoder layer, at a
    time). ``source``: where the float model's config, tokenizer and generation config come from
    (``"zoo:NAME"`` or a Hugging Face model directory), when the saved model does not say.
    ``activations``: for W8A8, ``"static"`` writes reparq's calibrated per-tensor input ranges
    (the exported model computes what reparq's does); ``"dynamic"`` asks the runtime for
    per-token dynamic ranges instead (usually as accurate, no longer reparq's integers).
    ``quantize_embedding``: where a tied embedding is untied (reparq quantized the output layer),
    store it as the output layer's integers too instead of in float32: a much smaller file that
    transformers loads exactly; vLLM does not load quantized embeddings, so it is off by default.

    Raises :class:`~reparq.errors.ReparqError`, before anything is written, when the model holds
    what the format cannot (see :mod:`reparq.deploy.hf_scheme`). ``out_dir`` must be empty or new.
    """
    from compressed_tensors.compressors import ModelCompressor

    src = from_model(qmodel_or_dir) if isinstance(qmodel_or_dir, nn.Module) else from_directory(qmodel_or_dir)
    source = str(source) if source is not None else src.source
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ReparqError(f"{out_dir} exists and is not empty; choose a new or empty directory")
    config = _resolve_config(src, source)
    plan = Plan(src, config, activations, quantize_embedding)
    groups, per_layer, ranked = _group_schemes(plan)
    qconfig = _quantization_config(plan, groups, ranked)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_tensors(src, plan, per_layer, out_dir)
    plan.config.save_pretrained(str(out_dir))
    ModelCompressor(quantization_config=qconfig).update_config(str(out_dir))
    _copy_tokenizer(source, out_dir, plan.config)
    return out_dir


def _write_tensors(src: ReparqSource, plan: Plan, per_layer: dict, out_dir: Path) -> None:
    from safetensors.torch import save_file

    n = len(src.shards)
    weight_map, total = {}, 0
    for i, shard in enumerate(src.shards):
        tensors = _shard_tensors(list(shard.shapes), shard.load, plan, per_layer)
        if not tensors:
            continue
        name = SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(tensors, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    if n > 1:
        (out_dir / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                     indent=1) + "\n")


__all__ = ["export_hf"]
