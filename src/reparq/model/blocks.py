"""Block and stage discovery: the units that block reconstruction calibrates one at a time.

Model-family knowledge is data: a table from architecture class name to glob patterns on
module names (``*`` matches one dotted component). A model the table does not name (a head class
such as ``LlamaForSequenceClassification``, a user's own network) gets its blocks from its
structure: the finest run of repeated same-class children that loses no quantized layer
(:func:`infer_layout`). ``block_globs`` (and optionally ``stage_globs``) override both. Quantized
layers that no block contains (the stem conv of a ViT, the classifier) become single-layer units
of their own.
"""

from __future__ import annotations

import re
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


def _stack(module: nn.Module, min_len: int, min_layers: int = 1) -> bool:
    """A ModuleList / Sequential of ``min_len`` or more same-class composite children that each
    hold ``min_layers`` quantized layers: the shape a stack of layers or residual blocks takes."""
    if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < min_len:
        return False
    children = list(module.children())
    return (len({type(c) for c in children}) == 1 and not isinstance(children[0], QuantizedLayer)
            and all(_holds_quantized(c, min_layers) for c in children))


def _split(name: str, module: nn.Module) -> list[tuple[str, str]]:
    """(block, stage) pairs for one block of a stack, split further where it is a stage.

    A block splits when it is itself a stack (ByobNet's ``stages.0``, its RepVGG blocks the units)
    or when a direct child is a stack of multi-layer blocks (Swin's and ConvNeXt's stages:
    ``blocks`` plus a ``downsample`` that becomes a unit of its own). A stack deeper inside a block
    (a LLaMA layer's MoE experts under ``mlp``) does not split it: attention would fall outside.
    """
    def join(child: str) -> str:
        return f"{name}.{child}" if name else child

    if _stack(module, 1):
        return [(join(c), name) for c, _ in module.named_children()]
    inner = [c for c, child in module.named_children() if _stack(child, 2, min_layers=2)]
    if not inner:
        return [(name, "")]
    pairs = []
    for c, child in module.named_children():
        if c in inner:
            pairs += [(f"{join(c)}.{b}", name) for b, _ in child.named_children()]
        elif _holds_quantized(child):
            pairs.append((join(c), name))
    return pairs


def infer_layout(model: nn.Module) -> FamilyLayout | None:
    """Blocks from repeated structure, for a model the family table does not name.

    The outermost stacks (a transformer's layers, a ResNet's ``layer1``) give the blocks, each
    stack their stage, unless a block is itself a stage (:func:`_split`). None when nothing
    repeats.
    """
    stacks = [(n, m) for n, m in model.named_modules() if _stack(m, 2)]
    stacks = [(n, m) for n, m in stacks if not any(o != n and _contains(o, n) for o, _ in stacks)]
    if not stacks:
        return None
    pairs = []
    for name, stack in stacks:
        for child, module in stack.named_children():
            full = f"{name}.{child}" if name else child
            pairs += [(b, s or name) for b, s in _split(full, module)]
    return FamilyLayout(blocks=tuple(b for b, _ in pairs), stages=tuple(dict.fromkeys(s for _, s in pairs if s)))


def discover_units(model: nn.Module, block_globs: tuple[str, ...] | None = None,
                   stage_globs: tuple[str, ...] | None = None) -> list[Unit]:
    """Blocks (by the family table or the user's globs) plus uncovered quantized layers.

    Units are listed in registration order; :func:`reparq.recipes.reconstruct` re-orders them
    by execution. Raises with a hint when no block can be found.
    """
    layout = FAMILY_LAYOUTS.get(type(model).__name__)
    if block_globs is None:
        layout = layout or infer_layout(model)
        if layout is None:
            raise ReparqError(f"no block layout known for {type(model).__name__} and no repeated blocks found "
                              f"in it; name its blocks with block_globs=('layers.*',) (CLI: --blocks 'layers.*')")
        block_globs, stage_globs = layout.blocks, layout.stages if stage_globs is None else stage_globs
    stage_globs = tuple(stage_globs or ())
    modules = dict(model.named_modules())
    qlayers = [n for n, m in modules.items() if isinstance(m, QuantizedLayer)]
    block_names = [n for n in modules if n and _match_any(n, block_globs)]
    # Drop blocks nested inside other blocks: the outer one is the unit.
    block_names = [b for b in block_names if not any(o != b and _contains(o, b) for o in block_names)]
    stage_names = [n for n in modules if _match_any(n, stage_globs)]
    units: list[Unit] = []
    covered: set[str] = set()
    for b in block_names:
        inside = [q for q in qlayers if _contains(b, q)]
        covered.update(inside)
        stage = max((s for s in stage_names if _contains(s, b) and s != b), key=len, default=None)  # innermost
        if inside:  # a block without quantized layers (an Identity placeholder) has nothing to learn
            units.append(Unit(b, "block", stage, inside))
    if not any(u.layers for u in units):
        raise ReparqError(f"no block with quantized layers found in {type(model).__name__} "
                          f"(patterns {', '.join(block_globs)}); pass block_globs to name its blocks")
    for q in qlayers:
        if q not in covered:
            units.append(Unit(q, "layer", None, [q]))
    return units
