"""Block and stage discovery: the units that block reconstruction calibrates one at a time.

Model-family knowledge is data: a table from architecture class name to glob patterns on
module names (``*`` matches one dotted component). A model the table does not name (a head class
such as ``LlamaForSequenceClassification``, torchvision's ResNet, a user's own network), or whose
table layout finds nothing, gets its blocks from its structure (:func:`infer_layout`). ``block_globs`` (and optionally ``stage_globs``) override both. Quantized
layers that no block contains (the stem conv of a ViT, the classifier) become single-layer units
of their own.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import torch.nn as nn

from reparq.errors import ReparqError
from reparq.nn.qmodules import QuantizedLayer


@dataclass(frozen=True)
class FamilyLayout:
    blocks: tuple[str, ...]
    stages: tuple[str, ...] = ()


# Keyed by the model's class name (timm and transformers classes), so nothing is imported here.
FAMILY_LAYOUTS: dict[str, FamilyLayout] = {
    "ByobNet": FamilyLayout(blocks=("stem", "stages.*.*", "final_conv"), stages=("stages.*",)),
    "VisionTransformer": FamilyLayout(blocks=("blocks.*",), stages=("blocks",)),
    "SwinTransformer": FamilyLayout(blocks=("layers.*.downsample", "layers.*.blocks.*"), stages=("layers.*",)),
    "BertModel": FamilyLayout(blocks=("encoder.layer.*",), stages=("encoder",)),
    "BertForSequenceClassification": FamilyLayout(blocks=("bert.encoder.layer.*",), stages=("bert.encoder",)),
    "LlamaModel": FamilyLayout(blocks=("layers.*",), stages=("layers",)),
    "LlamaForCausalLM": FamilyLayout(blocks=("model.layers.*",), stages=("model.layers",)),
    **{f"{family}{head}": FamilyLayout(blocks=(f"{prefix}layers.*",), stages=(f"{prefix}layers",))
       for family in ("Mistral", "Qwen2") for head, prefix in (("Model", ""), ("ForCausalLM", "model."))},
    "OPTModel": FamilyLayout(blocks=("decoder.layers.*",), stages=("decoder.layers",)),
    "OPTForCausalLM": FamilyLayout(blocks=("model.decoder.layers.*",), stages=("model.decoder.layers",)),
}


def glob_to_regex(pattern: str) -> re.Pattern:
    """'stages.*.*' -> one dotted component per '*'; '**' matches any number of components."""
    parts = []
    for comp in pattern.split("."):
        if comp == "**":
            parts.append(r"[^.]+(?:\.[^.]+)*")
        else:
            parts.append(re.escape(comp).replace(r"\*", r"[^.]*"))
    return re.compile(r"\.".join(parts) + r"\Z")


def _match_any(name: str, patterns) -> bool:
    return any(glob_to_regex(p).match(name) for p in patterns)


@dataclass
class Unit:
    """One reconstruction unit: a block, or a lone quantized layer."""

    name: str
    kind: str  # "block" | "layer"
    stage: str | None = None
    layers: list[str] = field(default_factory=list)  # quantized layers inside, full names


def _contains(parent: str, child: str) -> bool:
    return parent == "" or child == parent or child.startswith(parent + ".")


def _holds_quantized(module: nn.Module, at_least: int = 1) -> bool:
    return sum(isinstance(m, QuantizedLayer) for m in module.modules()) >= at_least


def _block_children(module: nn.Module, min_repeat: int, min_layers: int = 1) -> list[str]:
    """The children of a ModuleList / Sequential that are blocks (composite, holding a quantized
    layer), provided ``min_repeat`` of them share a class and hold ``min_layers`` quantized layers
    each: the shape a stack of layers or residual blocks takes, also with a stem and a final
    block of other classes in the same list (MobileNetV2's ``features``). Empty otherwise."""
    if not isinstance(module, (nn.ModuleList, nn.Sequential)):
        return []
    blocks = [(n, c) for n, c in module.named_children() if not isinstance(c, QuantizedLayer) and _holds_quantized(c)]
    repeats = Counter(type(c) for _, c in blocks if _holds_quantized(c, min_layers))
    return [n for n, _ in blocks] if repeats and max(repeats.values()) >= min_repeat else []


def _split(name: str, module: nn.Module) -> list[tuple[str, str]]:
    """(block, stage) pairs for one block of a stack, split further where it is a stage.

    A block splits when it is itself a list of blocks (ByobNet's ``stages.0``, its RepVGG blocks
    the units) or when a direct child is a stack of multi-layer blocks (Swin's and ConvNeXt's
    stages: ``blocks`` plus a ``downsample`` that becomes a unit of its own). A stack deeper inside
    a block (a LLaMA layer's MoE experts under ``mlp``) does not split it: attention would fall
    outside.
    """
    def join(child: str) -> str:
        return f"{name}.{child}" if name else child

    own = _block_children(module, 1)
    if own:
        return [(join(c), name) for c in own]
    inner = {c: _block_children(child, 2, min_layers=2) for c, child in module.named_children()}
    if not any(inner.values()):
        return [(name, "")]
    pairs = []
    for c, child in module.named_children():
        if inner[c]:
            pairs += [(f"{join(c)}.{b}", name) for b in inner[c]]
        elif _holds_quantized(child):
            pairs.append((join(c), name))
    return pairs


def infer_layout(model: nn.Module) -> FamilyLayout | None:
    """Blocks from repeated structure, for a model the family table does not name.

    The outermost stacks (a transformer's layers, a ResNet's ``layer1``) give the blocks, each
    stack their stage, unless a block is itself a stage (:func:`_split`). None when nothing
    repeats.
    """
    stacks = {n: bs for n, m in model.named_modules() if (bs := _block_children(m, 2))}
    outer = [n for n in stacks if not any(o != n and _contains(o, n) for o in stacks)]
    if not outer:
        return None
    pairs = []
    for name in outer:
        for child in stacks[name]:
            full = f"{name}.{child}" if name else child
            pairs += [(b, s or name) for b, s in _split(full, model.get_submodule(full))]
    return FamilyLayout(blocks=tuple(b for b, _ in pairs), stages=tuple(dict.fromkeys(s for _, s in pairs if s)))


def _units(model: nn.Module, block_globs: tuple[str, ...], stage_globs: tuple[str, ...] | None) -> list[Unit]:
    """The blocks the globs name that hold quantized layers, outermost where they nest."""
    stage_globs = tuple(stage_globs or ())
    modules = dict(model.named_modules())
    qlayers = [n for n, m in modules.items() if isinstance(m, QuantizedLayer)]
    block_names = [n for n in modules if n and _match_any(n, block_globs)]
    # Drop blocks nested inside other blocks: the outer one is the unit.
    block_names = [b for b in block_names if not any(o != b and _contains(o, b) for o in block_names)]
    stage_names = [n for n in modules if _match_any(n, stage_globs)]
    units = []
    for b in block_names:
        inside = [q for q in qlayers if _contains(b, q)]
        stage = max((s for s in stage_names if _contains(s, b) and s != b), key=len, default=None)  # innermost
        if inside:  # a block without quantized layers (an Identity placeholder) has nothing to learn
            units.append(Unit(b, "block", stage, inside))
    return units


def _default_layouts(model: nn.Module):
    """The family table's layout for the model's class, then the one its structure gives. The
    table is keyed by class name, which another library may reuse (torchvision's
    VisionTransformer is not timm's), so a table layout that finds nothing gives way."""
    table = FAMILY_LAYOUTS.get(type(model).__name__)
    if table is not None:
        yield table
    inferred = infer_layout(model)  # only computed when the table had nothing or found nothing
    if inferred is not None:
        yield inferred


def discover_units(model: nn.Module, block_globs: tuple[str, ...] | None = None,
                   stage_globs: tuple[str, ...] | None = None) -> list[Unit]:
    """Blocks (by the family table or the user's globs) plus uncovered quantized layers.

    Units are listed in registration order; :func:`reparq.recipes.reconstruct` re-orders them
    by execution. Raises with a hint when no block can be found.
    """
    if block_globs is not None:
        units = _units(model, block_globs, stage_globs)
    else:
        units = []
        for layout in _default_layouts(model):
            block_globs = layout.blocks
            units = _units(model, layout.blocks, layout.stages if stage_globs is None else stage_globs)
            if units:
                break
        if block_globs is None:
            raise ReparqError(f"no block layout known for {type(model).__name__} and no repeated blocks found "
                              f"in it; name its blocks with block_globs=('layers.*',) (CLI: --blocks 'layers.*')")
    if not units:
        raise ReparqError(f"no block with quantized layers found in {type(model).__name__} "
                          f"(patterns {', '.join(block_globs)}); pass block_globs to name its blocks")
    covered = {q for u in units for q in u.layers}
    qlayers = [n for n, m in model.named_modules() if isinstance(m, QuantizedLayer)]
    for q in qlayers:
        if q not in covered:
            units.append(Unit(q, "layer", None, [q]))
    return units
