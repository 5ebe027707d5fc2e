"""Diagnostic: where ONNX Runtime spends its time in one latency_real graph, per operator type and
per node (summed over layers), FP32 against reparq's int8 export of the same model.

Why it exists: int8/FP32 ratios alone do not say which float work is left between the integer
kernels; ORT's profiler does (``SessionOptions.enable_profiling``). The export rewrites of issue 35
(bias inside ``MatMulIntegerToFloat``, q/k/v quantized before their Split, the score scale folded,
RGB stems as SpaceToDepth) were each found from this script's tables.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/profile_ort.py MODEL [--recipe minmax] [--runtime onnxruntime]
[--batch 32] [--threads 1]`` with a latency_real model name (``deit_tiny_patch16_224``, ``minilm``, ...).
Nothing is written to results/: this is for reading, the speed table is latency_real's.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import reparq  # noqa: E402
import latency_real as lr  # noqa: E402
from reparq.deploy.onnx_export import torch_to_onnx  # noqa: E402


def profile(path: Path, feed: dict, threads: int, runs: int, prefix: Path) -> tuple[collections.Counter, dict]:
    """Kernel microseconds per node name (one run's average) and each node's operator type."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.enable_profiling, options.profile_file_prefix, options.log_severity_level = True, str(prefix), 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session.run(None, feed)  # warm-up, excluded below by averaging over runs + 1 (it is in the trace)
    for _ in range(runs):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    times, ops = collections.Counter(), {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            name = event["name"][: -len("_kernel_time")]
            times[name] += event["dur"] / (runs + 1)
            ops[name] = event["args"].get("op_name", "?")
    return times, ops


def report(label: str, times: collections.Counter, ops: dict, top: int) -> None:
    by_op = collections.Counter()
    for name, us in times.items():
        by_op[ops[name]] += us
    print(f"== {label}: {sum(times.values()) / 1000:.1f} ms per run")
    for op, us in by_op.most_common(top):
        print(f"  {op:24s} {us / 1000:8.2f} ms")
    by_node = collections.Counter()  # the same node in every layer counted together
    for name, us in times.items():
        key = re.sub(r"_(token_)?\d+$", "", re.sub(r"(layer|blocks|stages)\.\d+", r"\1.N", name))
        by_node[(ops[name], key)] += us
    print(f"  -- nodes, summed over layers (top {top}):")
    for (op, key), us in by_node.most_common(top):
        print(f"  {op:22s} {key[:78]:78s} {us / 1000:7.2f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=[*lr.TIMM_MODELS, *lr.TEXT_MODELS])
    parser.add_argument("--recipe", default="minmax")
    parser.add_argument("--runtime", default="onnxruntime", choices=["any", "onnxruntime"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--calib", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    case = lr.text_case(args.model, args) if args.model in lr.TEXT_MODELS else lr.timm_case(args.model, args)
    feed = {k: v[:args.batch] for k, v in case.eval_inputs.items()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fp = torch_to_onnx(lr.float_graph(case), work / "fp32.onnx", case.example, case.input_names, ["output"],
                           case.dynamic_axes)
        qmodel = reparq.quantize(case.net, case.calib, batch_size=8, seed=args.seed, recipe=args.recipe)
        q = reparq.export_onnx(case.wrap(qmodel), work / "int8.onnx", case.example, input_names=case.input_names,
                               output_names=["output"], dynamic_axes=case.dynamic_axes, runtime=args.runtime)
        for label, path in (("FP32", fp), (f"int8 ({args.recipe}, runtime={args.runtime})", q)):
            report(label, *profile(path, feed, args.threads, args.runs, work / "prof"), args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
