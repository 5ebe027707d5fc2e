"""What `consumer_fold="norms"` costs on the real MiniLM: the speed option against the default.

`repquant` on a post-LN encoder (BERT) calibrates per channel at the norm outputs (qkv, fc1) and,
by default, also at the block-inner inputs (attention output projection, fc2). In the ONNX graph
the norm outputs' per-channel affines are absorbed by the norms (one Mul on the residual is left);
the inner inputs keep a float Mul + Add each, which `latency_real` measures. This runs both
settings on all-MiniLM-L6-v2 with the `transformers_real` task (same calibration sentences, same
held-out sentences, same seed) and tests the per-sentence cosines against each other (paired).

    OMP_NUM_THREADS=2 python benchmarks/consumer_fold_minilm.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from transformers_real import MiniLMTask  # noqa: E402

from reparq import quantize  # noqa: E402
from reparq.eval.grid import Bits  # noqa: E402
from reparq.eval.significance import paired_sign_test, sign_flip_p  # noqa: E402
from reparq.report.results import source_version, write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODES = {"auto (norms + inner inputs)": None, "norms": "norms"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", nargs="*", default=["W8A8"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    command = ("OMP_NUM_THREADS=2 python benchmarks/consumer_fold_minilm.py " + " ".join(given)).strip()
    code = source_version()  # the source this process imported, read before anything can edit it
    task = MiniLMTask(1024, 512)
    calib = task.calibration(args.seed)
    rows, sections = [], []
    for text in args.bits:
        bits = Bits.parse(text)
        per_sentence = {}
        for label, mode in MODES.items():
            torch.manual_seed(args.seed)
            t0 = time.perf_counter()
            qmodel = quantize(task.model, calib, recipe="repquant", w_bits=bits.w, a_bits=bits.a, seed=args.seed,
                              recon_batch_size=8, consumer_fold=mode)
            seconds = time.perf_counter() - t0
            measured, items = task.measure(qmodel, str(bits))
            per_sentence[label] = torch.tensor(items["cosine"], dtype=torch.float64)
            for row in measured:
                rows.append({"model": "minilm", "method": f"repquant, consumer_fold={label}", "bits": str(bits),
                             "w_bits": bits.w, "a_bits": bits.a, "metric": row["metric"],
                             "value": round(row["quant"], 5), "fp": row["fp"],
                             "quant": row["quant"], "delta": row["delta"], "calib_seconds": round(seconds, 1),
                             "seed": args.seed, "code": code})
            print(text, label, measured[0]["quant"], measured[1]["quant"], round(seconds), flush=True)
        a, b = per_sentence.values()
        sign = paired_sign_test(a, b)
        sections.append(f"- {text}: the default has the higher cosine on {sign.a_ahead} of {len(a)} held-out "
                        f"sentences, `norms` on {sign.b_ahead} (sign test p = {sign.p_value:.2g}); mean "
                        f"difference {float((a - b).mean()):+.5f} (sign-flip p = {sign_flip_p(a, b):.2g}).")
    notes = ("all-MiniLM-L6-v2, the `transformers_real` MiniLM task: 1024 calibration sentences packed into "
             "64-token windows, 512 held-out sentences, cosine of the mean-pooled embeddings to FP32 and "
             "nearest-neighbour agreement; `repquant` with its defaults except `consumer_fold`.")
    write_results(args.out, "consumer_fold_minilm", command, rows, notes,
                  extra_sections="Paired over the held-out sentences:\n\n" + "\n".join(sections),
                  extra_columns=("metric", "value"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
