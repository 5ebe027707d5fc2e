"""Recipe registry: a recipe is a named function ``(model, batches, config, seed) -> model``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from reparq.errors import ReparqError


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    run: Callable
    defaults: dict


_RECIPES: dict[str, Recipe] = {}


def register_recipe(name: str, description: str, **defaults):
    def deco(fn: Callable) -> Callable:
        _RECIPES[name] = Recipe(name, description, fn, defaults)
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
    from reparq.recipes import baselines  # noqa: F401  (registers on import)
