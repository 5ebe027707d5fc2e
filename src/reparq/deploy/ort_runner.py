"""Run an exported model in ONNX Runtime (CPU) and check it against the PyTorch fake-quant model.

Two questions matter after an export: does ORT compute what PyTorch computed (top-1 agreement,
largest logit difference), and did ORT really run integer kernels? The second is answered from
the graph ORT itself optimized (``SessionOptions.optimized_model_filepath``): a QDQ model in
which the fusion did not fire still runs, in float, with extra Quantize/Dequantize work, and
nothing else would tell.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from reparq.errors import ReparqError

# Operators of an ORT-optimized graph that compute on integers.
INT8_KERNELS = ("QLinearConv", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "QGemm", "ConvInteger",
                "DynamicQuantizeMatMul", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "QLinearAveragePool",
                "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax")
# Compute-heavy operators that, when left in an optimized graph, run in float.
FLOAT_KERNELS = ("Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm")


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - onnxruntime is a dependency of the deploy extra
        raise ReparqError("onnxruntime is not installed; pip install onnxruntime") from exc
    return onnxruntime


def make_session(path: str | Path, threads: int = 1, optimize: bool = True,
                 optimized_model_path: str | Path | None = None):
    """A CPU ``InferenceSession``: all graph optimizations (what deployment uses) unless ``optimize`` is False."""
    ort = _ort()
    path = Path(path)
    if not path.is_file():
        raise ReparqError(f"{path} does not exist; export the model first (reparq export)")
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # the NCHWc "hardware specific" warning on saving is expected
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ReparqError(f"onnxruntime cannot load {path}: {first}") from exc


def run(session, inputs: Any, batch_size: int = 256) -> np.ndarray:
    """First output of ``session`` on ``inputs`` (tensor or array, batch axis 0), in batches."""
    x = inputs.detach().cpu().numpy() if isinstance(inputs, torch.Tensor) else np.asarray(inputs)
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, x.shape[0], batch_size)]
    return np.concatenate(outs, axis=0)


def optimized_nodes(path: str | Path, threads: int = 1) -> list:
    """The nodes of the graph ORT builds from ``path`` with all optimizations on (its fused kernels)."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "optimized.onnx"
        make_session(path, threads=threads, optimized_model_path=out)
        return list(onnx.load(str(out)).graph.node)


def optimized_op_counts(path: str | Path, threads: int = 1) -> Counter:
    """Operator types (with counts) of the graph ORT builds from ``path`` with all optimizations on."""
    return Counter(node.op_type for node in optimized_nodes(path, threads))


def int8_kernels(counts: Counter) -> dict[str, int]:
    return {op: counts[op] for op in INT8_KERNELS if counts.get(op)}


def float_kernels(counts: Counter) -> dict[str, int]:
    return {op: counts[op] for op in FLOAT_KERNELS if counts.get(op)}


@dataclass
class OrtCheck:
    """PyTorch fake-quant vs ORT on the same inputs."""

    samples: int
    agreement: float  # % of samples with the same argmax
    max_abs_diff: float  # largest |logit_torch - logit_ort|
    int8_kernels: dict[str, int] = field(default_factory=dict)
    float_kernels: dict[str, int] = field(default_factory=dict)
    torch_top1: float | None = None  # accuracy (%) of each side, when labels were given
    ort_top1: float | None = None

    def summary(self) -> str:
        ints = ", ".join(f"{k} x{v}" for k, v in self.int8_kernels.items()) or "none"
        floats = ", ".join(f"{k} x{v}" for k, v in self.float_kernels.items()) or "none"
        acc = (f"; top-1 PyTorch {self.torch_top1:.2f}% / ORT {self.ort_top1:.2f}%"
               if self.torch_top1 is not None else "")
        return (f"top-1 agreement {self.agreement:.2f}% on {self.samples} samples, max |logit diff| "
                f"{self.max_abs_diff:.4g}{acc}\nint8 kernels in ORT's optimized graph: {ints}\n"
                f"float compute ops left: {floats}")


@torch.no_grad()
def torch_outputs(model: nn.Module, inputs: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    model.eval()
    return torch.cat([model(inputs[i:i + batch_size]) for i in range(0, inputs.shape[0], batch_size)]).numpy()


def compare(model: nn.Module, onnx_path: str | Path, inputs: torch.Tensor, labels: torch.Tensor | None = None,
            batch_size: int = 256, threads: int = 1) -> OrtCheck:
    """Run ``model`` (PyTorch) and the ONNX file (ORT, all optimizations) on ``inputs`` and compare."""
    if inputs.shape[0] == 0:
        raise ReparqError("compare needs at least one input sample")
    ref = torch_outputs(model, inputs, batch_size)
    got = run(make_session(onnx_path, threads=threads), inputs, batch_size)
    if got.shape != ref.shape:
        raise ReparqError(f"ORT output shape {got.shape} differs from PyTorch's {ref.shape}; re-export the model")
    counts = optimized_op_counts(onnx_path, threads)
    got_top, ref_top = got.reshape(len(got), -1).argmax(1), ref.reshape(len(ref), -1).argmax(1)
    check = OrtCheck(samples=int(inputs.shape[0]), agreement=float((got_top == ref_top).mean() * 100.0),
                     max_abs_diff=float(np.abs(got - ref).max()), int8_kernels=int8_kernels(counts),
                     float_kernels=float_kernels(counts))
    if labels is not None:
        y = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        check.torch_top1 = float((ref_top == y).mean() * 100.0)
        check.ort_top1 = float((got_top == y).mean() * 100.0)
    return check
