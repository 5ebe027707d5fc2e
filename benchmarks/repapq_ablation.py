"""RepAPQ ablation on the merged zoo RepVGG: which part buys what (a first, single-seed version).

Run: ``.venv/bin/python benchmarks/repapq_ablation.py``; writes
benchmarks/results/repapq_ablation.{md,json}. Top-1 on the 10k test split, 1024 calibration images.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


from reparq.data import calibration_subset, load_fashion_mnist
from reparq.eval.grid import Bits, run_grid
from reparq.report.results import write_results
from reparq.zoo import load_model

RESULTS = Path(__file__).parent / "results"
VARIANTS = {
    "repapq": {},
    "repapq-no_equalize": {"equalize": False},
    "repapq-alpha0.5": {"equalize_alpha": 0.5},
    "repapq-mae_weights": {"w_estimator": "mae"},
    "repapq-no_qprep": {"qprep": False},
    "repapq-no_abc": {"abc": False},
    "repapq-mse_loss": {"loss_p": 2.0, "a_estimator": "mse"},
    "repapq-lambda0.3": {"abc_lambda": 0.3},
    "repapq-lambda3": {"abc_lambda": 3.0},
    "repapq-quantized_tail": {"quantized_tail": True},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="repvgg_fm")
    parser.add_argument("--bits", nargs="*", default=["W4A4", "W6A6"])
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    calib = calibration_subset(1024, seed=0)
    test_x, test_y = load_fashion_mnist("test")
    model = load_model(args.model)
    path = args.out / "repapq_ablation.json"
    # Incremental and resumable: rows already measured (same variant, bits, iterations) are kept.
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    done = {(r["model"], r["method"], r["w_bits"], r["a_bits"], r["iters"]) for r in rows}
    command = "python benchmarks/repapq_ablation.py " + " ".join(sys.argv[1:] if argv is None else argv)
    for variant in args.variants:
        for b in args.bits:
            bits = Bits.parse(b)
            if (args.model, variant, bits.w, bits.a, args.iters) in done:
                continue
            for r in run_grid(model, args.model, calib, test_x, test_y, ["repapq"], [bits],
                              iters=args.iters, **VARIANTS[variant]):
                r["method"], r["iters"] = variant, args.iters
                print(r, flush=True)
                rows.append(r)
            _write(args.out, command, rows)
    _write(args.out, command, rows)
    return 0


def _write(out: Path, command: str, rows: list[dict]) -> None:
    notes = ("Variants of the repapq recipe (seed 0): `repapq` = channel equalization across ReLU (alpha searched "
             "per layer pair), MSE weight ranges, MAE activation ranges, L1 loss, QPRep, across-block calibration (lambda 1, float stage tail), AdaRound rounding and activation step "
             "sizes; each other row changes one thing (no_equalize: the paper's recipe without our equalization; alpha0.5: one fixed alpha for every pair; lambdaX: ABC weight X; quantized_tail: the stage tail runs quantized instead of float). Single seed: read differences of a point or two as noise.")
    write_results(out, "repapq_ablation", command.strip(), rows, notes, extra_columns=("iters",))


if __name__ == "__main__":
    sys.exit(main())
