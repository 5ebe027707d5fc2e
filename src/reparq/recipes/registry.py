"""Recipe registry: a recipe is a named function ``(model, batches, config, seed) -> model``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from reparq.errors import ReparqError


@dataclass(frozen=True)
class Recipe:
    """``defaults`` preset QuantConfig fields; ``options`` is the dataclass of recipe-only options
    (e.g. reconstruction iterations), or None when the recipe has none."""

    name: str
    description: str
    run: Callable
    defaults: dict
    options: type | None = None


_RECIPES: dict[str, Recipe] = {}


def register_recipe(name: str, description: str, options: type | None = None, **defaults):
    def deco(fn: Callable) -> Callable:
        _RECIPES[name] = Recipe(name, description, fn, defaults, options)
        return fn

    return deco


def list_recipes() -> list[str]:
    _load_builtin()
    return list(_RECIPES)


def get_recipe(name: str) -> Recipe:
    _load_builtin()
    if name not in _RECIPES:
        raise ReparqError(f"unknown recipe {name!r}; choose one of: {', '.join(_RECIPES)}")
    return _RECIPES[name]


def _load_builtin() -> None:
    from reparq.recipes import baselines, block_recon, repapq, repqvit, repquant  # noqa: F401  (register on import)
