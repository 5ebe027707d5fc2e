"""RepQuant ablation on the zoo transformers: which part buys what.

Run: ``.venv/bin/python benchmarks/repquant_ablation.py`` (``--seeds 0 1 2`` for the paired tests);
writes benchmarks/results/repquant_ablation.{md,json}. Top-1 on the 10k Fashion-MNIST test split,
1024 calibration images (the seed picks them and seeds the recipe, as in ptq_baselines). Each
variant is the ``repquant`` recipe with one recipe option changed (``reparq.quantize(..., **options)``
through ``run_grid``); ``repqvit`` is the no-learning reference.

Resumable like ptq_baselines: rows present (same variant, bits, seed, steps, checkpoint) are kept
unless ``--rerun``; each row records ``code``, and its per-image right/wrong goes to
``results/per_item/repquant_ablation.json``, so that ``paired_significance.py --sources
repquant_ablation`` can test every variant against ``repquant`` image by image.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ablation_grid import Ablation, run_ablation
from reparq.recipes.repquant import CLIP_ITERS, RepQuantOptions

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


def plan(iters: int, clip_iters: int):
    """A variant's recipe, options and recorded steps, at ``iters`` / ``clip_iters`` steps per block."""
    def variant_plan(variant: str) -> tuple[str, dict, dict]:
        recipe, changed = VARIANTS[variant]
        options = {"iters": iters, "clip_iters": clip_iters, **changed} if recipe == "repquant" else dict(changed)
        recorded = {"iters": options.get("iters", 0), "clip_iters": options.get("clip_iters", 0)}
        if options.get("reparam") is False:
            recorded["clip_iters"] = 0  # nothing per channel, so nothing to clip: record what ran
        return recipe, options, recorded
    return variant_plan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["deit_fm", "swin_fm"])
    parser.add_argument("--bits", nargs="*", default=["W4A4", "W6A6"])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--iters", type=int, default=RepQuantOptions.iters,
                        help="quantized weight reconstruction steps per block (repquant's default)")
    parser.add_argument("--clip-iters", type=int, default=CLIP_ITERS,
                        help="dual-clipping steps per block (repquant's default)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--rerun", action="store_true", help="measure the selected rows even if present")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    command = ("python benchmarks/repquant_ablation.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    defaults = (args.iters, args.clip_iters) == (RepQuantOptions.iters, CLIP_ITERS)
    ablation = Ablation("repquant_ablation", args.variants, plan(args.iters, args.clip_iters), _order, NOTES,
                        recorded=("iters", "clip_iters"),
                        item_suffix="" if defaults else f"|iters{args.iters}|clip{args.clip_iters}")
    run_ablation(ablation, args.out, command, args.models, args.bits, args.seeds, args.rerun)
    return 0


def _order(row: dict) -> tuple:
    names = list(VARIANTS)
    return (row["model"], row["w_bits"], row["a_bits"],
            names.index(row["method"]) if row["method"] in names else len(names), row.get("iters") or 0,
            row.get("seed") or 0)


NOTES = ("Variants of the repquant recipe (first and last layer at 8 bits, weights per output channel, activations"
         " per tensor). `repquant` = its defaults: per-channel post-norm ranges from RepQ-ViT's percentile search,"
         " learnable dual clipping of those ranges (`clip_iters` steps per block, block reconstruction loss), "
         "exact fold into layer-wise quantizers, block-wise quantized weight reconstruction (AdaRound + LSQ "
         "activation steps, `iters` steps per block; activations dropped to float with p=0.5 above 4 bits), "
         "probabilities on a log-sqrt2 grid deployed as log2 + parity in the attention modules where it fits the "
         'calibration probabilities better than a uniform grid, uniform elsewhere (probs="auto"). Each other row '
         "changes one option: `no_reparam` (reparam=False: the qkv/fc1/reduction inputs stay per-tensor, hence no "
         'dual clipping either), `uniform_probs` (probs="uniform": a uniform grid on every softmax output, range '
         'by percentile search), `log2_probs` (probs="log2": one level per octave instead of two, everywhere), '
         "`no_dualclip` (clip_iters=0: the percentile per-channel bounds are folded as they are), "
         "`no_weight_recon` (iters=0: no reconstruction after the fold), `consumer_fold` (consumer_fold=True: also"
         " the attention output projection and fc2 inputs per channel, folded at the consumer through an input "
         "affine; repquant's default turns this on only for post-LN models), `gptq` (gptq=True: the weights "
         "rounded by GPTQ on each layer's quantized inputs instead of AdaRound, the steps then learn only the "
         "activation step sizes; repquant's default above 4-bit activations on post-LN models and at W4A8), "
         "`no_drop` (drop_prob=0: no QDrop-style dropping of activation quantization in the weight reconstruction,"
         " which repquant's default does on image models above 4-bit activations, so at W4A4 this row is repquant "
         "itself). `repqvit` is RepQ-ViT (statistics only, no learning) for reference. Read differences of a few "
         "tenths of a point at one seed as noise; `paired_significance.py --sources repquant_ablation` tests them "
         "image by image. calib s / peak MB: wall time and peak RSS of the calibration on a 2-core machine shared "
         "with other jobs, one thread (noisy).")


if __name__ == "__main__":
    sys.exit(main())
