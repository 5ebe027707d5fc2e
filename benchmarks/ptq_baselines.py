"""PTQ baselines on every zoo model: range baselines and block reconstruction, {W8A8, W6A6, W4A8, W4A4}.

Run: ``.venv/bin/python benchmarks/ptq_baselines.py`` (or ``make bench``); writes
benchmarks/results/ptq_baselines.{md,json}. Accuracy is top-1 on the 10k Fashion-MNIST test
split; calibration uses 1024 seeded training images. Rep models are merged before quantization.

The run is resumable and incremental: the results file is rewritten after every row, rows
already present (same model, recipe, bits, seed and the same FP accuracy, i.e. the same
checkpoint) are kept and not re-run, so a long grid can be run in pieces (``--models``,
``--recipes``, ``--seeds``) and survives interruption; ``--rerun`` measures the selected cells
again. Each row records ``code``, the library source that measured it
(:func:`reparq.report.results.source_version`), and each row's per-image right/wrong goes to
``results/per_item/ptq_baselines.json`` for the paired tests of ``paired_significance.py``.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from reparq.eval.grid import Bits
from reparq.report.tables import mean_std
from reparq.zoo import list_models
from resumable import CALIB_SIZE, ZooGrid

RESULTS = Path(__file__).parent / "results"
RANGE_RECIPES = ("minmax", "percentile", "mse", "mae")
RECON_RECIPES = ("adaround", "brecq", "qdrop")
RECIPE_ORDER = RANGE_RECIPES + RECON_RECIPES + ("repapq", "repqvit", "repquant")
BITS = ("W8A8", "W6A6", "W4A8", "W4A4")


def _key(r: dict) -> tuple:
    return (r["model"], r["method"], r["w_bits"], r["a_bits"], r["seed"])


def _sort_key(r: dict) -> tuple:
    order = RECIPE_ORDER.index(r["method"]) if r["method"] in RECIPE_ORDER else len(RECIPE_ORDER)
    return (r["model"], order, -r["w_bits"], -r["a_bits"], r["seed"] if r["seed"] is not None else -1)


def code_versions(rows: list[dict]) -> str:
    """How many rows each library source measured (rows from before ``code`` was recorded: 'unrecorded')."""
    counts = Counter(r.get("code") or "unrecorded" for r in rows)
    return "Rows by library source (`code`): " + ", ".join(f"{k} {v}" for k, v in counts.items()) + "."


def summary(rows: list[dict], bits: str = "W4A4") -> str:
    """Drop per model and recipe at one bit width (mean ± std over seeds where there are several)."""
    b = Bits.parse(bits)
    recipes = [m for m in RECIPE_ORDER if any(r["method"] == m for r in rows)]
    lines = [f"## {bits} drop vs FP (points; mean ± std over seeds where several)", "",
             "| model | FP | " + " | ".join(recipes) + " |", "|---|---|" + "---|" * len(recipes)]
    for m in sorted({r["model"] for r in rows}):
        fp = next(r["fp"] for r in rows if r["model"] == m)
        cells = []
        for k in recipes:
            deltas = [r["delta"] for r in rows if r["model"] == m and r["method"] == k
                      and r["w_bits"] == b.w and r["a_bits"] == b.a]
            cells.append(mean_std(deltas) if deltas else "-")
        lines.append(f"| {m} | {fp:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


NOTES = ("Top-1 (%) on the Fashion-MNIST test split (10k). Calibration: 1024 training images (the seed picks "
         "the subset and seeds the recipe). First and last layer kept at 8 bits. Weights per output channel "
         "(symmetric), activations per tensor (asymmetric). Rep models merged before quantization. Reconstruction "
         "recipes at their defaults (300 iterations per unit, batch 32). calib_seconds and peak_mem_mb are wall "
         "time and peak RSS of the calibration on a shared 2-core machine (noisy).")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=None, help="zoo models (default: all trained)")
    parser.add_argument("--recipes", nargs="*", default=list(RANGE_RECIPES + RECON_RECIPES))
    parser.add_argument("--bits", nargs="*", default=list(BITS))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--name", default="ptq_baselines", help="results file name")
    parser.add_argument("--calib-size", type=int, default=CALIB_SIZE)
    parser.add_argument("--rerun", action="store_true", help="measure the selected cells even if present")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    models = args.models or list_models()
    command = "python benchmarks/ptq_baselines.py " + " ".join(sys.argv[1:] if argv is None else argv)
    grid = ZooGrid(args.out, args.name, command, _key, _sort_key, NOTES, rerun=args.rerun, calib_size=args.calib_size,
                   sections=lambda rows: "\n\n".join([*(summary(rows, b) for b in ("W4A4", "W6A6")),
                                                       code_versions(rows)]))
    for name in models:
        grid.model(name)  # its FP top-1 tells rows of another checkpoint
        for seed in args.seeds:
            for recipe in args.recipes:
                for b in args.bits:
                    bits = Bits.parse(b)
                    if not grid.done((name, recipe, bits.w, bits.a, seed)):
                        grid.measure(name, recipe, bits, seed)
    grid.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
