"""RepAPQ ablation on the merged zoo RepVGG: which part buys what.

Run: ``.venv/bin/python benchmarks/repapq_ablation.py`` (``--seeds 0 1 2`` for the paired tests);
writes benchmarks/results/repapq_ablation.{md,json}. Top-1 on the 10k test split, 1024 calibration
images (the seed picks them and seeds the recipe, as in ptq_baselines). Resumable, with a ``code``
stamp and per-image scores per row, as ``repquant_ablation.py`` (:mod:`ablation_grid`):
``paired_significance.py --sources repapq_ablation`` tests every variant against ``repapq``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ablation_grid import Ablation, run_ablation

RESULTS = Path(__file__).parent / "results"
DEFAULT_ITERS = 300  # repapq's default steps per block
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
NOTES = ("Variants of the repapq recipe: `repapq` = channel equalization across ReLU (alpha searched per layer "
         "pair), MSE weight ranges, MAE activation ranges, L1 loss, QPRep, across-block calibration (lambda 1, "
         "float stage tail), AdaRound rounding and activation step sizes; each other row changes one thing "
         "(no_equalize: the paper's recipe without our equalization; alpha0.5: one fixed alpha for every pair; "
         "lambdaX: ABC weight X; quantized_tail: the stage tail runs quantized instead of float). Read differences "
         "of a point or two at one seed as noise; `paired_significance.py --sources repapq_ablation` tests them "
         "image by image.")


def _order(row: dict) -> tuple:
    names = list(VARIANTS)
    return (row["model"], names.index(row["method"]) if row["method"] in names else len(names), -row["w_bits"],
            -row["a_bits"], row.get("iters") or 0, row.get("seed") or 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="repvgg_fm")
    parser.add_argument("--bits", nargs="*", default=["W4A4", "W6A6"])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--iters", type=int, default=DEFAULT_ITERS)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--rerun", action="store_true", help="measure the selected rows even if present")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    command = ("python benchmarks/repapq_ablation.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    ablation = Ablation("repapq_ablation", args.variants,
                        lambda v: ("repapq", {"iters": args.iters, **VARIANTS[v]}, {"iters": args.iters}), _order,
                        NOTES, recorded=("iters",),
                        item_suffix="" if args.iters == DEFAULT_ITERS else f"|iters{args.iters}")
    run_ablation(ablation, args.out, command, [args.model], args.bits, args.seeds, args.rerun)
    return 0


if __name__ == "__main__":
    sys.exit(main())
