"""RepQuant ablation on the zoo transformers: which part buys what (a first, single-seed version).

Run: ``.venv/bin/python benchmarks/repquant_ablation.py``; writes
benchmarks/results/repquant_ablation.{md,json}. Top-1 on the 10k Fashion-MNIST test split, 1024
calibration images (seed 0). Each variant is the ``repquant`` recipe with one recipe option changed
(``reparq.quantize(..., **options)`` through ``run_grid``); ``repqvit`` is the no-learning reference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from reparq.data import calibration_subset, load_fashion_mnist
from reparq.eval.accuracy import top1
from reparq.eval.grid import Bits, run_grid
from reparq.recipes.repquant import CLIP_ITERS, RepQuantOptions
from reparq.report.results import command_history, write_results
from reparq.zoo import load_model

RESULTS = Path(__file__).parent / "results"
# variant -> (recipe, options changed from the recipe's defaults)
VARIANTS = {
    "repquant": ("repquant", {}),
    "repquant-no_reparam": ("repquant", {"reparam": False}),
    "repquant-uniform_probs": ("repquant", {"probs": "uniform"}),
    "repquant-log2_probs": ("repquant", {"probs": "log2"}),
    "repquant-no_dualclip": ("repquant", {"clip_iters": 0}),
    "repquant-no_weight_recon": ("repquant", {"iters": 0}),
    "repquant-consumer_fold": ("repquant", {"consumer_fold": True}),
    "repquant-gptq": ("repquant", {"gptq": True}),
    "repquant-no_drop": ("repquant", {"drop_prob": 0.0}),
    "repqvit": ("repqvit", {}),
}
KEY = ("model", "method", "w_bits", "a_bits", "iters", "clip_iters")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["deit_fm", "swin_fm"])
    parser.add_argument("--bits", nargs="*", default=["W4A4", "W6A6"])
    parser.add_argument("--iters", type=int, default=RepQuantOptions.iters,
                        help="quantized weight reconstruction steps per block (repquant's default)")
    parser.add_argument("--clip-iters", type=int, default=CLIP_ITERS,
                        help="dual-clipping steps per block (repquant's default)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    calib = calibration_subset(1024, seed=0)
    test_x, test_y = load_fashion_mnist("test")
    path = args.out / "repquant_ablation.json"
    # Incremental and resumable: rows already measured (same variant, bits, iterations) are kept.
    old = json.loads(path.read_text()) if path.exists() else {"rows": [], "command": ""}
    rows = old["rows"]
    done = {tuple(r.get(k) for k in KEY) for r in rows}
    command = ("python benchmarks/repquant_ablation.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    # Every invocation that contributed rows, as the other benchmarks record it.
    command = command_history(old["command"], command)
    models, fps = {}, {}
    for b in args.bits:  # all of W4A4 first: W6A6 is the part that may be cut short
        bits = Bits.parse(b)
        for name in args.models:
            for variant in args.variants:
                recipe, changed = VARIANTS[variant]
                options = dict(changed)
                if recipe == "repquant":
                    options = {"iters": args.iters, "clip_iters": args.clip_iters, **changed}
                iters, clip_iters = options.get("iters", 0), options.get("clip_iters", 0)
                if options.get("reparam") is False:
                    clip_iters = 0  # nothing per channel, so nothing to clip: record what ran
                if (name, variant, bits.w, bits.a, iters, clip_iters) in done:
                    continue
                if name not in models:
                    models[name] = load_model(name)
                    fps[name] = top1(models[name], test_x, test_y)
                for r in run_grid(models[name], name, calib, test_x, test_y, [recipe], [bits], fp=fps[name],
                                  **options):
                    r["method"], r["iters"], r["clip_iters"] = variant, iters, clip_iters
                    print(r, flush=True)
                    rows.append(r)
                _write(args.out, command, rows)
    _write(args.out, command, rows)
    return 0


def _order(row: dict) -> tuple:
    names = list(VARIANTS)
    return (row["model"], row["w_bits"], row["a_bits"],
            names.index(row["method"]) if row["method"] in names else len(names), row.get("iters") or 0)


def _write(out: Path, command: str, rows: list[dict]) -> None:
    rows.sort(key=_order)
    notes = ("Variants of the repquant recipe (seed 0; first and last layer at 8 bits, weights per output channel, "
             "activations per tensor). `repquant` = its defaults: per-channel post-norm ranges from RepQ-ViT's "
             "percentile search, learnable dual clipping of those ranges (`clip_iters` steps per block, block "
             "reconstruction loss), exact fold into layer-wise quantizers, block-wise quantized weight reconstruction "
             "(AdaRound + LSQ activation steps, `iters` steps per block; activations dropped to float with p=0.5 "
             "above 4 bits), log-sqrt2 probabilities deployed as "
             "log2 + parity. Each other row changes one option: `no_reparam` (reparam=False: the qkv/fc1/reduction "
             "inputs stay per-tensor, hence no dual clipping either), `uniform_probs` (probs=\"uniform\": a 4/6-bit "
             "uniform grid on the softmax output, range by percentile search), `log2_probs` (probs=\"log2\": one "
             "level per octave instead of two), `no_dualclip` (clip_iters=0: the percentile per-channel bounds are "
             "folded as they are), `no_weight_recon` (iters=0: no reconstruction after the fold), `consumer_fold` "
             "(consumer_fold=True: also the attention output projection and fc2 inputs per channel, folded at the "
             "consumer through an input affine; repquant's default turns this on only for post-LN models), `gptq` "
             "(gptq=True: the weights rounded by GPTQ on each layer's quantized inputs instead of AdaRound, the "
             "steps then learn only the activation step sizes; repquant's default above 4-bit activations on post-LN "
             "models and at W4A8), `no_drop` (drop_prob=0: no QDrop-style dropping of activation quantization in the "
             "weight reconstruction, which repquant's default does on image models above 4-bit activations, so at W4A4 "
             "this row is repquant itself). "
             "`repqvit` is "
             "RepQ-ViT (statistics only, no learning) for reference. Single seed: read differences of a few tenths "
             "of a point as noise. calib s / peak MB: wall time and peak RSS of the calibration on a 2-core machine "
             "shared with other jobs, one thread (noisy).")
    write_results(out, "repquant_ablation", command.strip(), rows, notes, extra_columns=("iters", "clip_iters"))


if __name__ == "__main__":
    sys.exit(main())
