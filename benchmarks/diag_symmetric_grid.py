"""Diagnostic: the symmetric weight step, covering (``max(-lo / 2^(b-1), hi / (2^(b-1) - 1))``,
reparq's rule) against the centred one it replaced (``max|w| / (2^b - 1) * 2``, i.e. ``/ 7.5`` at
4 bits), which clips the largest positive weight of each channel or group by half a step.

Why it exists: Intel Neural Compressor's 4-bit RTN (``max|w| / 7``, group 32, lm_head float) led
reparq's W4A16 rows on llama_fm in ``peers.md``. Its weights had a larger mean squared error than
reparq's, yet a lower perplexity: the clipped extremes were what cost reparq. This script
measures both rules on the same model, calibration and held-out windows, W4A16.

Prints one line per (rule, variant): perplexity difference to FP on all held-out windows.
Usage: ``OMP_NUM_THREADS=2 python benchmarks/diag_symmetric_grid.py [--calib 256] [--variants ...]``.
Nothing is written: the figures quoted in the README are this script's printed output.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager

import torch

import reparq
import reparq.quant.percentile_search as percentile_search
import reparq.quant.ranges as ranges
from reparq.eval.text_metrics import perplexity
from reparq.quant.uniform import int_range
from reparq.zoo import load_model
from transformers_real import DecoderTask

VARIANTS = {
    "minmax-g32-lm_head-float": dict(recipe="minmax", w_group_size=32, ignore=("lm_head",)),
    "minmax-per-channel": dict(recipe="minmax"),
    "repquant-g32": dict(recipe="repquant", w_group_size=32),
    "repquant-per-channel": dict(recipe="repquant"),
}


def centred_params(lo, hi, bits, symmetric, narrow=False):
    """The rule before: step ``max(-lo, hi) / ((qmax - qmin) / 2)``."""
    if not symmetric:
        return _covering(lo, hi, bits, symmetric, narrow)
    lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
    qmin, qmax = int_range(bits, symmetric, narrow)
    scale = (torch.maximum(-lo, hi) / ((qmax - qmin) / 2)).clamp_min(torch.finfo(torch.float32).eps)
    return scale, torch.zeros_like(scale)


_covering = ranges.params_from_range


@contextmanager
def rule(name: str):
    modules = (ranges, percentile_search)  # every module that looks the rule up by name
    if name == "centred":
        for module in modules:
            module.params_from_range = centred_params
    try:
        yield
    finally:
        for module in modules:
            module.params_from_range = _covering


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=256, help="calibration windows (128 tokens)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--rules", nargs="*", default=["centred", "covering"], choices=["centred", "covering"])
    args = parser.parse_args(argv)
    task = DecoderTask("llama_fm", args.calib, None)
    calib, held = task.calibration(0), task.held
    fp = perplexity(task.model, held)
    print(f"llama_fm FP perplexity {fp:.3f} on {held.shape[0]} windows; {args.calib} calibration windows", flush=True)
    for name in args.variants:
        for r in args.rules:
            with rule(r):
                q = reparq.quantize(load_model("llama_fm"), calib, w_bits=4, a_bits=16, batch_size=8, seed=0,
                                    **VARIANTS[name])
            print(f"{r:9s} {name:26s} {perplexity(q, held) - fp:+.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
