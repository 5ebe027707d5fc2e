"""The deploy package is a leaf: it imports nothing from the entry points (``reparq.api``,
``reparq.cli``, ``reparq.runconfig``) or the package root, directly or through the modules it
imports at module level. ``api`` -> ``runconfig`` -> ``deploy.serialize`` -> ``api`` was a
circle; this keeps it (and one through the Hugging Face export) from coming back."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ENTRY_POINTS = {"reparq", "reparq.api", "reparq.cli", "reparq.runconfig"}


def _module_file(name: str) -> Path | None:
    base = SRC.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """reparq modules that ``path`` imports (``from reparq import x`` counts as the root)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "reparq"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                node.module.split(".")[0] == "reparq":
            found.add(node.module)
            # ``from reparq.deploy import serialize`` imports the submodule
            found |= {f"{node.module}.{a.name}" for a in node.names if _module_file(f"{node.module}.{a.name}")}
    return found


def _closure(start: str) -> set[str]:
    """Every reparq module loaded at import time from ``start`` (module-level imports, and the
    packages above each module, whose ``__init__`` runs first), except the package root."""
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _module_file(name)
        if path is None:
            continue
        parents = {".".join(name.split(".")[:i]) for i in range(2, len(name.split(".")))}
        todo += sorted((_imports(path, top_level_only=True) | parents) - {"reparq"})
    return seen


DEPLOY_MODULES = sorted(f"reparq.deploy.{p.stem}" for p in (SRC / "reparq" / "deploy").glob("*.py")
                        if p.stem != "__init__") + ["reparq.deploy"]


@pytest.mark.parametrize("module", DEPLOY_MODULES)
def test_deploy_module_imports_no_entry_point(module):
    path = _module_file(module)
    direct = _imports(path, top_level_only=False)  # lazy imports inside functions count too
    assert not direct & ENTRY_POINTS, f"{module} imports {sorted(direct & ENTRY_POINTS)}"
    reached = _closure(module)
    assert not reached & ENTRY_POINTS, f"{module} reaches {sorted(reached & ENTRY_POINTS)} at import time"


def test_checker_sees_a_circle():
    """The closure does find api where it is imported (so the tests above can fail)."""
    assert "reparq.api" in _imports(SRC / "reparq" / "__init__.py", top_level_only=True)
    assert "reparq.api" in _imports(SRC / "reparq" / "stream" / "calibrate.py", top_level_only=False)
    assert "reparq.quant.uniform" in _closure("reparq.nn.qmodules")
