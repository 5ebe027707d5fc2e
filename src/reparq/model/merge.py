"""Branch merging for structurally reparameterized models (RepVGG, MobileOne and kin).

The reparameterization protocol, in one place: a *merger* is a function that takes a module
with parallel training-time branches and returns (or turns it in place into) the single-conv
inference form, exactly. timm blocks carry their own (``reparameterize`` / ``fuse`` /
``switch_to_deploy``); a user's own block type is merged by registering one function:

    @reparq.register_merger(MyRepBlock)
    def merge_my_block(block): ...  # return the replacement module
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

Merger = Callable[[nn.Module], nn.Module | None]
_MERGERS: dict[type, Merger] = {}
_TIMM_METHODS = ("reparameterize", "switch_to_deploy")


def register_merger(module_type: type) -> Callable[[Merger], Merger]:
    def deco(fn: Merger) -> Merger:
        _MERGERS[module_type] = fn
        return fn

    return deco


def list_mergers() -> list[str]:
    return sorted(t.__qualname__ for t in _MERGERS)


def _merge_one(child: nn.Module) -> nn.Module | None:
    """Merged replacement for ``child``, or None if it has no branches to merge."""
    for module_type, fn in _MERGERS.items():
        if isinstance(child, module_type):
            out = fn(child)
            return child if out is None else out
    if hasattr(child, "fuse") and callable(child.fuse) and not isinstance(child, nn.Sequential):
        return child.fuse()
    for method in _TIMM_METHODS:
        if callable(getattr(child, method, None)):
            getattr(child, method)()
            return child
    return None


def merge_branches(model: nn.Module) -> int:
    """Merge every registered or timm-reparameterizable block in place; returns how many."""
    merged = 0
    for name, child in list(model.named_children()):
        replacement = _merge_one(child)
        if replacement is None:
            merged += merge_branches(child)
            continue
        if replacement is not child:
            setattr(model, name, replacement)
        merged += 1 + merge_branches(replacement)
    return merged
