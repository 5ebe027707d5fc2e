"""Is any recipe significantly ahead of ``repquant`` on the zoo transformers? A paired test per cell.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/paired_significance.py`` (default: DeiT and
Swin at W8A8 / W6A6 / W4A8, seeds 0-2); writes benchmarks/results/paired_significance.{md,json}.

A mean over three seeds that differs by 0.05 points is five of 10k test images, so the question
the means cannot answer is whether such a gap is more than the test split's noise. For every cell
where some recipe's mean (in ``ptq_baselines.json``) is at least ``repquant``'s, both are re-run
on the same seeds (``reproduced``: whether every re-run row of the cell equals its committed one;
rows measured at earlier commits can differ by a few images, and the test uses the re-runs), and
each test image gets ``d = (seeds repquant classifies it right) - (seeds the rival
does)``. Images are independent draws and seeds are not, so the test is over images: an exact
two-sided sign test on the images with ``d != 0`` (McNemar's exact test, pooled over seeds
without counting one image twice; :mod:`reparq.eval.significance`). ``p_value`` is its p;
``rival_ahead`` / ``repquant_ahead`` count the images each side wins.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from reparq.data import calibration_subset, load_fashion_mnist
from reparq.eval.accuracy import correct_predictions, top1
from reparq.eval.grid import Bits, run_grid
from reparq.eval.significance import paired_sign_test
from reparq.report.results import command_history, write_results
from reparq.zoo import load_model

RESULTS = Path(__file__).parent / "results"
REFERENCE = "repquant"
RIVALS = ("minmax", "percentile", "mse", "brecq", "qdrop", "repqvit")


def rivals_to_test(rows: list[dict], model: str, bits: Bits, seeds: list[int], recipes: list[str]) -> list[str]:
    """The recipes whose committed mean delta over ``seeds`` is at least ``repquant``'s."""
    def mean(method: str) -> float | None:
        deltas = [r["delta"] for r in rows if r["model"] == model and r["method"] == method
                  and (r["w_bits"], r["a_bits"]) == (bits.w, bits.a) and r["seed"] in seeds]
        return statistics.mean(deltas) if len(deltas) == len(seeds) else None

    ref = mean(REFERENCE)
    if ref is None:
        raise SystemExit(f"{model} {bits}: ptq_baselines.json lacks repquant rows for seeds {seeds}; run it first")
    return [m for m in recipes if (v := mean(m)) is not None and v >= ref]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["deit_fm", "swin_fm"])
    parser.add_argument("--bits", nargs="*", default=["W8A8", "W6A6", "W4A8"])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--recipes", nargs="*", default=list(RIVALS), help="rivals considered")
    parser.add_argument("--baselines", type=Path, default=RESULTS / "ptq_baselines.json")
    parser.add_argument("--name", default="paired_significance")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    committed = json.loads(args.baselines.read_text())["rows"]
    test_x, test_y = load_fashion_mnist("test")
    command = "python benchmarks/paired_significance.py " + " ".join(sys.argv[1:] if argv is None else argv)
    rows: list[dict] = []

    path = args.out / f"{args.name}.json"

    def save() -> None:
        # Runs over other models may write the same file at once: merge this run's rows into it.
        old = json.loads(path.read_text()) if path.exists() else {"rows": [], "command": ""}
        key = lambda r: (r["model"], r["method"], r["w_bits"], r["a_bits"])  # noqa: E731
        mine = {key(r) for r in rows}
        merged = sorted([r for r in old["rows"] if key(r) not in mine] + rows,
                        key=lambda r: (r["model"], -r["w_bits"], -r["a_bits"], r["method"]))
        commands = command_history(old["command"], command)
        notes = __doc__.split("\n\n", 1)[1].strip() + (
            "\n\n`delta` is the rival's mean over the seeds, `repquant_delta` repquant's (top-1 points); "
            "calib_seconds / peak_mem_mb are the rival's mean / max.")
        write_results(args.out, args.name, commands, merged, notes,
                      extra_columns=("repquant_delta", "rival_ahead", "repquant_ahead", "p_value", "reproduced"))

    for name in args.models:
        model = load_model(name)
        fp = round(top1(model, test_x, test_y), 2)
        for b in map(Bits.parse, args.bits):
            rivals = rivals_to_test(committed, name, b, args.seeds, args.recipes)
            if not rivals:
                print(f"{name} {b}: repquant's mean is ahead of every rival; nothing to test", flush=True)
                continue
            wins: dict[str, torch.Tensor] = {}  # per method: per-image count of seeds classified right
            measured: dict[str, list[dict]] = {}
            for seed in args.seeds:
                calib = calibration_subset(1024, seed=seed)
                for method in [REFERENCE, *rivals]:
                    def keep(row: dict, qmodel: torch.nn.Module, method: str = method) -> None:
                        hits = correct_predictions(qmodel, test_x, test_y).long()
                        wins[method] = wins.get(method, torch.zeros_like(hits)) + hits
                        measured.setdefault(method, []).append(row)

                    run_grid(model, name, calib, test_x, test_y, [method], [b], seeds=(seed,), fp=fp, on_model=keep)
            old = {(r["method"], r["seed"]): r["delta"] for r in committed if r["model"] == name
                   and (r["w_bits"], r["a_bits"]) == (b.w, b.a)}
            same = all(old.get((m, r["seed"])) == r["delta"] for m, rs in measured.items() for r in rs)
            ref_delta = round(statistics.mean(r["delta"] for r in measured[REFERENCE]), 3)
            for method in rivals:
                test = paired_sign_test(wins[REFERENCE], wins[method])
                rs = measured[method]
                row = {"model": name, "method": method, "w_bits": b.w, "a_bits": b.a, "metric": "top1", "fp": fp,
                       "quant": round(statistics.mean(r["quant"] for r in rs), 3),
                       "delta": round(statistics.mean(r["delta"] for r in rs), 3), "repquant_delta": ref_delta,
                       "rival_ahead": test.b_ahead, "repquant_ahead": test.a_ahead,
                       "p_value": round(test.p_value, 4), "reproduced": same,
                       "calib_seconds": round(statistics.mean(r["calib_seconds"] for r in rs), 2),
                       "peak_mem_mb": max(r["peak_mem_mb"] for r in rs), "seed": None, "seeds": list(args.seeds)}
                rows.append(row)
                print(row, flush=True)
            save()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
