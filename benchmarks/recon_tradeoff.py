"""Iterations per unit vs W4A4 accuracy and calibration time for the reconstruction recipes.

Run: ``.venv/bin/python benchmarks/recon_tradeoff.py``; writes
benchmarks/results/recon_tradeoff.{md,json,png}. One CNN and one transformer from the zoo,
1024 calibration images, top-1 on the 10k test split.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reparq.eval.grid import Bits
from resumable import ZooGrid

RESULTS = Path(__file__).parent / "results"


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy against iterations and seconds, W4A4 at seed 0 (other bit widths and seeds are in the table)."""
    rows = [r for r in rows if (r["w_bits"], r["a_bits"], r["seed"]) == (4, 4, 0)]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for (model, method) in sorted({(r["model"], r["method"]) for r in rows}):
        pts = sorted((r["iters"], r["delta"], r["calib_seconds"]) for r in rows
                     if r["model"] == model and r["method"] == method)
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{model} {method}")
        axes[1].plot([p[2] for p in pts], [p[1] for p in pts], marker="o", label=f"{model} {method}")
    axes[0].set_xlabel("iterations per unit")
    axes[1].set_xlabel("calibration seconds (2 cores)")
    for ax in axes:
        ax.set_ylabel("W4A4 top-1 Δ vs FP (points)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Block reconstruction: iterations vs accuracy (Fashion-MNIST zoo)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _key(r: dict) -> tuple:
    return (r["model"], r["method"], r["w_bits"], r["a_bits"], r["iters"], r["seed"])


def _sort_key(r: dict) -> tuple:
    return (r["model"], r["method"], -r["w_bits"], -r["a_bits"], r["iters"], r["seed"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["repvgg_fm", "deit_fm"])
    parser.add_argument("--recipes", nargs="*", default=["brecq", "qdrop"])
    parser.add_argument("--iters", nargs="*", type=int, default=[0, 100, 300, 1000])
    parser.add_argument("--bits", default="W4A4")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0],
                        help="each seed picks the calibration subset and seeds the recipe (as ptq_baselines.py)")
    parser.add_argument("--rerun", action="store_true", help="measure the selected rows even if present")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    bits = Bits.parse(args.bits)
    # Incremental like ptq_baselines.py (resumable.ZooGrid): rows already there (same model, recipe,
    # bits, iterations, seed and FP accuracy) are kept and not re-run unless --rerun.
    command = "python benchmarks/recon_tradeoff.py " + " ".join(sys.argv[1:] if argv is None else argv)
    notes = ("Each row: one reconstruction run at the given iterations per unit (batch 32) and seed (the seed "
             "picks the 1024 calibration images and seeds the recipe). "
             "iters=0 is the MSE-initialized model with no learning. calib_seconds is the wall time of the "
             "calibration on a shared 2-core machine, one thread (noisy).")
    grid = ZooGrid(args.out, "recon_tradeoff", command, _key, _sort_key, notes, rerun=args.rerun,
                   extra_columns=("iters", "code"), per_item=False,
                   after_save=lambda rows: plot(rows, args.out / "recon_tradeoff.png"))
    for name in args.models:
        grid.model(name)  # its FP top-1 tells rows of another checkpoint
        for seed in args.seeds:
            for recipe in args.recipes:
                for iters in args.iters:
                    if not grid.done((name, recipe, bits.w, bits.a, iters, seed)):
                        grid.measure(name, recipe, bits, seed, recorded={"iters": iters}, iters=iters)
    grid.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
