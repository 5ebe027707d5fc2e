"""Pass: swap Conv2d/Linear for their quantized versions, by type, honoring ignore globs and overrides."""

from __future__ import annotations

import fnmatch
import warnings

import torch.nn as nn

from reparq.config import QuantConfig
from reparq.errors import ReparqError
from reparq.nn.qmodules import QUANTIZED_TYPES

# Weight-carrying layer types we know of but do not quantize (yet); `strict` makes them errors.
UNSUPPORTED_TYPES = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Bilinear)


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantizable_layers(model: nn.Module, config: QuantConfig) -> list[str]:
    """Names of the layers the pass will quantize, in registration order (≈ execution order)."""
    names = []
    for name, module in model.named_modules():
        if type(module) in QUANTIZED_TYPES and not _matches(name, config.ignore):
            names.append(name)
        elif isinstance(module, UNSUPPORTED_TYPES) and config.strict and not _matches(name, config.ignore):
            raise ReparqError(f"layer {name!r} of type {type(module).__name__} cannot be quantized; "
                              f"add it to the ignore list or drop the strict flag")
    return names


def layer_bits(names: list[str], config: QuantConfig) -> dict[str, tuple[int, int]]:
    bits = {n: (config.w_bits, config.a_bits) for n in names}
    if config.keep_first_last_8bit and names:
        for edge in {names[0], names[-1]}:
            bits[edge] = (max(8, config.w_bits), max(8, config.a_bits))
    for pattern, override in config.overrides.items():
        hit = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hit:
            warnings.warn(f"override pattern {pattern!r} matches no quantizable layer", stacklevel=3)
        for n in hit:
            bits[n] = tuple(override)
    return bits


def insert_quantizers(model: nn.Module, config: QuantConfig,
                      bits: dict[str, tuple[int, int]] | None = None) -> dict[str, tuple[int, int]]:
    """Replace layers in place; returns {layer name: (w_bits, a_bits)}.

    ``bits``: the bit widths decided on the whole model, when ``model`` holds only part of it
    (streamed calibration: the first/last-layer rule must see the whole model); its layers
    not named there are left in float."""
    names = quantizable_layers(model, config)
    if bits is not None:
        names = [n for n in names if n in bits]
    if not names:
        raise ReparqError("the model has no Conv2d or Linear layer left to quantize (check the ignore list)")
    if bits is None:
        for pattern in config.ignore:
            if not any(fnmatch.fnmatchcase(n, pattern) for n, _ in model.named_modules()):
                warnings.warn(f"ignore pattern {pattern!r} matches no module", stacklevel=2)
    bits = layer_bits(names, config) if bits is None else bits
    for name in names:
        module = model.get_submodule(name)
        w_bits, a_bits = bits[name]
        qcls = QUANTIZED_TYPES[type(module)]
        _set_submodule(model, name, qcls.from_float(module, w_bits, a_bits, config.w_per_channel, config.w_group_size))
    return bits
