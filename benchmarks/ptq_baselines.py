"""Range-based PTQ baselines on every zoo model: {minmax, percentile, mse, mae} x {W8A8, W6A6, W4A8, W4A4}.

Run: ``.venv/bin/python benchmarks/ptq_baselines.py`` (or ``make bench``); writes
benchmarks/results/ptq_baselines.{md,json}. Accuracy is top-1 on the 10k Fashion-MNIST test
split; calibration uses 1024 seeded training images. Rep models are merged before quantization.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


from reparq.data import calibration_subset, load_fashion_mnist
from reparq.eval.grid import Bits, run_grid
from reparq.report.results import write_results
from reparq.zoo import list_models, load_model

RESULTS = Path(__file__).parent / "results"
RECIPES = ("minmax", "percentile", "mse", "mae")
RECON_RECIPES = ("adaround", "brecq", "qdrop")
BITS = ("W8A8", "W6A6", "W4A8", "W4A4")


def summary(rows: list[dict], recipes: tuple[str, ...]) -> str:
    """W4A4 drop per model and recipe, the headline of this table."""
    models = sorted({r["model"] for r in rows})
    lines = ["## W4A4 drop vs FP (points)", "", "| model | FP | " + " | ".join(recipes) + " |",
             "|---|---|" + "---|" * len(recipes)]
    for m in models:
        cells = {r["method"]: r for r in rows if r["model"] == m and r["w_bits"] == 4 and r["a_bits"] == 4}
        fp = next(r["fp"] for r in rows if r["model"] == m)
        lines.append(f"| {m} | {fp:.2f} | " + " | ".join(f"{cells[k]['delta']:+.2f}" if k in cells else "-"
                                                      for k in recipes) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=None, help="zoo models (default: all trained)")
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES),
                        help=f"default: the range baselines; add {' '.join(RECON_RECIPES)} for reconstruction")
    parser.add_argument("--name", default="ptq_baselines", help="results file name")
    parser.add_argument("--calib-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of other models already in the results file (run models one at a time)")
    args = parser.parse_args(argv)
    models = args.models or list_models()
    calib = calibration_subset(args.calib_size, seed=args.seed)
    test_x, test_y = load_fashion_mnist("test")
    rows: list[dict] = []
    for name in models:
        model = load_model(name)
        rows += run_grid(model, name, calib, test_x, test_y, args.recipes, [Bits.parse(b) for b in BITS],
                         seeds=(args.seed,), on_row=lambda r: print(r, flush=True))
    command = "python benchmarks/ptq_baselines.py " + " ".join(sys.argv[1:] if argv is None else argv)
    previous = args.out / f"{args.name}.json"
    if args.merge and previous.exists():
        old = json.loads(previous.read_text())
        rows = [r for r in old["rows"] if r["model"] not in models] + rows
        rows.sort(key=lambda r: (r["model"], args.recipes.index(r["method"]) if r["method"] in args.recipes else 99))
        command = "; ".join(dict.fromkeys(old["command"].split("; ") + [command.strip()]))
    notes = ("Top-1 (%) on the Fashion-MNIST test split (10k). Calibration: 1024 training images, seed "
             f"{args.seed}. First and last layer kept at 8 bits. Weights per output channel (symmetric), "
             "activations per tensor (asymmetric). Rep models merged before quantization. calib_seconds and "
             "peak_mem_mb are wall time and peak RSS of the calibration on a shared 2-core machine (noisy).")
    write_results(args.out, args.name, command.strip(), rows, notes, summary(rows, tuple(args.recipes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
