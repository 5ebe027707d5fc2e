"""The loop both ablations share: each variant of a recipe (one option changed) on each model, width
and seed, resumable, with a ``code`` stamp per row and per-image scores for the paired tests.

Rows already in the results file (same model, variant, bits, seed, recorded settings and
checkpoint) are kept unless ``rerun``; every save merges this run's rows into the file as it is on
disk then (:func:`reparq.report.results.merge_rows`), so runs on other models or seeds may share it.
A variant's per-image right/wrong goes to ``results/per_item/<name>.json`` under
:func:`reparq.report.results.row_key`, the key ``paired_significance.py --sources <name>`` looks up,
plus ``item_suffix`` for a run at non-default settings, which must not be paired as the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from reparq.data import calibration_subset, load_fashion_mnist
from reparq.eval.accuracy import top1
from reparq.eval.grid import Bits, run_grid
from reparq.eval.significance import encode_hits
from reparq.report.results import (command_history, measured_keys, merge_rows, results_on_disk, row_key,
                                   source_version, update_per_item, write_results)
from reparq.zoo import load_model

BASE_KEY = ("model", "method", "w_bits", "a_bits", "seed")
CALIB_SIZE = 1024  # calibration images, as in ptq_baselines


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
    test_x, test_y = load_fashion_mnist("test")
    path = out / f"{ablation.name}.json"
    code = source_version()
    mine: list[dict] = []  # rows measured by this run
    hits: dict[str, dict] = {}  # their per-image right/wrong, not yet on disk
    loaded, fps = {}, {}

    def stale(r: dict) -> bool:  # measured on another checkpoint (other FP accuracy) than this run's
        return fps.get(r["model"], r["fp"]) != r["fp"]

    def save() -> None:
        old = results_on_disk(path)
        rows = sorted(merge_rows(old["rows"], mine, ablation.key, stale), key=ablation.order)
        write_results(out, ablation.name, command_history(old["command"], command), rows, ablation.notes,
                      extra_columns=("seed", *ablation.recorded, "code"))
        if hits:
            update_per_item(out, ablation.name, hits)
            hits.clear()

    for width in widths:  # all of the first width first: the later ones are the part that may be cut short
        bits = Bits.parse(width)
        for name in models:
            if name not in loaded:
                loaded[name] = load_model(name)
                fps[name] = round(top1(loaded[name], test_x, test_y), 2)
            for seed in seeds:
                calib = None
                for variant in ablation.variants:
                    recipe, options, recorded = ablation.plan(variant)
                    identity = ablation.key({"model": name, "method": variant, "w_bits": bits.w, "a_bits": bits.a,
                                             "seed": seed, **recorded})
                    if identity in measured_keys(results_on_disk(path)["rows"], mine, ablation.key, stale, rerun):
                        continue
                    if calib is None:  # the seed picks the calibration subset and seeds the recipe
                        calib = calibration_subset(CALIB_SIZE, seed=seed)

                    def keep_hits(row: dict, correct, variant: str = variant) -> None:
                        hits[row_key({**row, "method": variant}) + ablation.item_suffix] = {
                            "code": code, "images": int(correct.numel()), "hits": encode_hits(correct)}

                    for r in run_grid(loaded[name], name, calib, test_x, test_y, [recipe], [bits], seeds=(seed,),
                                      fp=fps[name], on_hits=keep_hits, **options):
                        r.update(method=variant, **recorded, code=code)
                        print(r, flush=True)
                        mine.append(r)
                    save()
    save()
    return mine
