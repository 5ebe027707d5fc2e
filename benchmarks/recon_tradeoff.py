"""Iterations per unit vs W4A4 accuracy and calibration time for the reconstruction recipes.

Run: ``.venv/bin/python benchmarks/recon_tradeoff.py``; writes
benchmarks/results/recon_tradeoff.{md,json,png}. One CNN and one transformer from the zoo,
1024 calibration images, top-1 on the 10k test split.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reparq.data import calibration_subset, load_fashion_mnist
from reparq.eval.accuracy import top1
from reparq.eval.grid import Bits, run_grid
from reparq.report.results import (command_history, measured_keys, merge_rows, results_on_disk, source_version,
                                   write_results)
from reparq.zoo import load_model

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
    test_x, test_y = load_fashion_mnist("test")
    bits = Bits.parse(args.bits)
    # Incremental like ptq_baselines.py: the results file is rewritten after every row, rows already
    # there (same model, recipe, bits, iterations, seed and FP accuracy) are kept and not re-run
    # unless --rerun. Each save merges this run's rows into the file as it is on disk then, so runs
    # over other models, seeds or iterations may write it at the same time.
    path = args.out / "recon_tradeoff.json"
    command = "python benchmarks/recon_tradeoff.py " + " ".join(sys.argv[1:] if argv is None else argv)
    code = source_version()
    mine: list[dict] = []  # rows measured by this run
    fps: dict[str, float] = {}

    def stale(r: dict) -> bool:  # measured on another checkpoint (other FP accuracy) than this run's
        return fps.get(r["model"], r["fp"]) != r["fp"]

    notes = ("Each row: one reconstruction run at the given iterations per unit (batch 32) and seed (the seed "
             "picks the 1024 calibration images and seeds the recipe). "
             "iters=0 is the MSE-initialized model with no learning. calib_seconds is the wall time of the "
             "calibration on a shared 2-core machine, one thread (noisy).")

    def save() -> None:
        old = results_on_disk(path)
        rows = merge_rows(old["rows"], mine, _key, stale)
        rows.sort(key=lambda r: (r["model"], r["method"], -r["w_bits"], -r["a_bits"], r["iters"], r["seed"]))
        write_results(args.out, "recon_tradeoff", command_history(old["command"], command), rows, notes,
                      extra_columns=("iters", "code"))
        plot(rows, args.out / "recon_tradeoff.png")

    for name in args.models:
        model = load_model(name)
        fp = fps[name] = round(top1(model, test_x, test_y), 2)
        for seed in args.seeds:
            calib = calibration_subset(1024, seed=seed)
            for recipe in args.recipes:
                for iters in args.iters:
                    done = measured_keys(results_on_disk(path)["rows"], mine, _key, stale, args.rerun)
                    if (name, recipe, bits.w, bits.a, iters, seed) in done:
                        continue
                    for r in run_grid(model, name, calib, test_x, test_y, [recipe], [bits], seeds=(seed,), fp=fp,
                                      iters=iters):
                        r["iters"], r["code"] = iters, code
                        print(r, flush=True)
                        mine.append(r)
                    save()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
