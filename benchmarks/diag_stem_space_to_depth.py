"""Diagnostic: reparq's int8 export of a timm convnet with and without the SpaceToDepth stem
rewrite (``onnx_passes.space_to_depth_stems``), timed head to head in ONNX Runtime.

Why it exists: latency_real times each variant against ORT's own graph, and at batch 1 with two
threads its RepVGG-A0 rows scatter by ~8% (int8 there was slower at two threads than at one).
This script removes everything but the one rewrite: the same quantized model, exported twice,
interleaved, at batch 1 and 32 and one and two threads.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/diag_stem_space_to_depth.py [repvgg_a0|mobileone_s0|...]``.
Prints median ms per (threads, batch); nothing is written.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

import reparq  # noqa: E402
import reparq.deploy.onnx_export as onnx_export  # noqa: E402
import latency_real as lr  # noqa: E402
from reparq.deploy import ort_runner  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="repvgg_a0", choices=lr.CONVNETS)
    parser.add_argument("--calib", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    case = lr.timm_case(args.model, args)
    qmodel = reparq.quantize(case.net, case.calib, batch_size=8, seed=args.seed, recipe="minmax")
    rewrite = onnx_export.space_to_depth_stems
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"space_to_depth": reparq.export_onnx(qmodel, Path(tmp) / "s2d.onnx", case.example)}
        onnx_export.space_to_depth_stems = lambda proto: []
        try:
            paths["3x3 stem"] = reparq.export_onnx(qmodel, Path(tmp) / "plain.onnx", case.example)
        finally:
            onnx_export.space_to_depth_stems = rewrite
        for threads in (1, 2):
            sessions = {k: ort_runner.make_session(p, threads=threads) for k, p in paths.items()}
            for batch in (1, 32):
                feed = {"input": case.eval_inputs["input"][:batch]}
                inner, repeats = (20, 15) if batch == 1 else (1, 5)
                times = {k: [] for k in sessions}
                for _ in range(repeats):
                    for key, session in sessions.items():
                        session.run(None, feed)
                        t0 = time.perf_counter()
                        for _ in range(inner):
                            session.run(None, feed)
                        times[key].append((time.perf_counter() - t0) / inner * 1000)
                print(f"{args.model} threads {threads} batch {batch}: " + ", ".join(
                    f"{k} {np.median(v):.2f} ms" for k, v in times.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
