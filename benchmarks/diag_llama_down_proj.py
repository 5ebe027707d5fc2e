"""Why NNCF with SmoothQuant is ahead of repquant on llama_fm at W8A8: which Linear inputs cost
reparq the perplexity, and whether a per-channel grid on them (folded away) wins it back.

A diagnostic, not a table: a smaller setup than ``peers.py`` (128 calibration windows, 256
held-out windows, 50 reconstruction steps per block), one line per variant:
``variant  perplexity  delta-to-FP  seconds``.

    python benchmarks/diag_llama_down_proj.py [--iters 50] [--variants no-producer-fold,producer-fold,...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import reparq  # noqa: E402
from transformers_real import DecoderTask  # noqa: E402

VARIANTS = {  # repquant's options for each line (the producer fold is the default since 2026-12-07)
    "no-producer-fold": {"producer_fold": False},
    "down_proj-float": {"producer_fold": False, "ignore": ("*down_proj",)},
    "o_proj-float": {"producer_fold": False, "ignore": ("*o_proj",)},
    "consumer-fold": {"producer_fold": False, "consumer_fold": True},
    "producer-fold": {},
    "producer+consumer-fold": {"consumer_fold": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--calib", type=int, default=128)
    parser.add_argument("--eval", type=int, default=256)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    task = DecoderTask("llama_fm", args.calib, args.eval)
    calib = task.calibration(0)
    print(f"fp {task.fp_ppl:.3f}", flush=True)
    for label in args.variants.split(","):
        start = time.time()
        q = reparq.quantize(task.model, calib, recipe="repquant", w_bits=8, a_bits=8, seed=0, iters=args.iters,
                            **VARIANTS[label])
        rows, _ = task.measure(q, "W8A8")
        ppl = rows[0]["quant"]
        print(f"{label} {ppl:.3f} {ppl - task.fp_ppl:+.3f} {time.time() - start:.0f}", flush=True)


if __name__ == "__main__":
    main()
