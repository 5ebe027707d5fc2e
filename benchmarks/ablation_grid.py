"""The loop both ablations share: each variant of a recipe (one option changed) on each model, width
and seed, resumable, with a ``code`` stamp per row and per-image scores for the paired tests.

Rows already in the results file (same model, variant, bits, seed, recorded settings and
checkpoint) are kept unless ``rerun``; every save merges this run's rows into the file as it is on
disk then, so runs on other models or seeds may share it (:class:`resumable.ZooGrid`). A variant's
per-image right/wrong goes to ``results/per_item/<name>.json`` under
:func:`reparq.report.results.row_key`, the key ``paired_significance.py --sources <name>`` looks up,
plus ``item_suffix`` for a run at non-default settings, which must not be paired as the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from reparq.eval.grid import Bits
from resumable import ZooGrid

BASE_KEY = ("model", "method", "w_bits", "a_bits", "seed")


@dataclass
class Ablation:
    """One ablation benchmark. ``plan(variant)`` gives the recipe, its options and the settings
    recorded in the row (``recorded``, e.g. steps: part of the row's identity, so a run at other
    steps adds rows, and columns of its table)."""

    name: str
    variants: list[str]
    plan: Callable[[str], tuple[str, dict, dict]]
    order: Callable[[dict], tuple]
    notes: str
    recorded: tuple[str, ...] = ()
    item_suffix: str = ""

    def key(self, row: dict) -> tuple:
        return tuple(row.get(k) for k in BASE_KEY + self.recorded)


def run_ablation(ablation: Ablation, out: Path, command: str, models: list[str], widths: list[str],
                 seeds: list[int], rerun: bool = False) -> list[dict]:
    """Measure every variant x model x width x seed not yet measured; the rows this run measured."""
    grid = ZooGrid(out, ablation.name, command, ablation.key, ablation.order, ablation.notes, rerun=rerun,
                   extra_columns=("seed", *ablation.recorded, "code"))
    for width in widths:  # all of the first width first: the later ones are the part that may be cut short
        bits = Bits.parse(width)
        for name in models:
            grid.model(name)  # its FP top-1 tells rows of another checkpoint
            for seed in seeds:
                for variant in ablation.variants:
                    recipe, options, recorded = ablation.plan(variant)
                    identity = ablation.key({"model": name, "method": variant, "w_bits": bits.w, "a_bits": bits.a,
                                             "seed": seed, **recorded})
                    if not grid.done(identity):
                        grid.measure(name, recipe, bits, seed, method=variant, recorded=recorded,
                                     item_suffix=ablation.item_suffix, **options)
    grid.save()
    return list(grid.mine.values())
