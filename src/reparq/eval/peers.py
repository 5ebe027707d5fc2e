"""Other PTQ tools (NNCF, ONNX Runtime, Intel Neural Compressor) run as their docs tell a user.

Private API, for ``benchmarks/peers.py``: a comparison with the tools a user already has is only
fair if every tool gets the *same* float model and the *same* calibration tensors and is scored
by the same evaluator. So each adapter here takes the float model and a
:class:`CalibrationFeed` (the calibration batches, which records every batch a tool pulls, so a
test can check that all tools consumed the same tensors) and returns a :class:`PeerModel`: a
``predict`` callable from input tensors to the first output, whatever runtime it runs in.

A tool that is not installed raises :class:`PeerUnavailable` (a one-line reason), which the
benchmark writes into its results as "skipped", never as a measured row.

Settings, per tool's docs (defaults unless said):

- ``nncf``: ``nncf.quantize(model, nncf.Dataset(batches), subset_size=<all batches>)`` on the
  PyTorch model; transformers with ``model_type=nncf.ModelType.TRANSFORMER``, which in NNCF 3.x
  already runs SmoothQuant (``AdvancedSmoothQuantParameters(matmul=0.95)``, convolutions off) on
  the torch backend. ``nncf-no-smoothquant`` is the same call with SmoothQuant switched off
  (``matmul=-1``), to show what it contributes. ``subset_size`` counts dataset items, i.e. our
  batches: set to all of them, because its default (300 items) would use a different number of
  samples than the other tools.
- ``ort-minmax`` / ``ort-percentile`` / ``ort-entropy``: ``quant_pre_process`` then
  ``quantize_static`` of the float ONNX export (QDQ, per-channel s8 weights, u8 activations).
- ``inc-default``: ``neural_compressor.torch``'s PT2E path, ``export`` -> ``prepare`` with
  ``get_default_static_config()`` -> calibration forward passes -> ``convert``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn

from reparq.errors import ReparqError
from reparq.eval.measure import Measurement, measure

Batch = tuple[torch.Tensor, ...]


class PeerUnavailable(ReparqError):
    """A peer tool is not installed (or cannot run here): the benchmark skips it and says so."""


def fingerprint(batch: Batch) -> str:
    """A short hash of a batch's tensors (shape, dtype and bytes): equal only for the same data."""
    h = hashlib.sha1()
    for t in batch:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class CalibrationFeed:
    """The calibration batches every tool gets; iterating records each batch handed out (``consumed``).

    A tool may iterate more than once (NNCF's bias correction does): ``consumed`` keeps every
    hand-out, :meth:`consumed_set` what was seen at all."""

    batches: list[Batch]
    consumed: list[str] = field(default_factory=list)

    @classmethod
    def from_tensor(cls, x: torch.Tensor, batch_size: int = 32) -> "CalibrationFeed":
        return cls([(b,) for b in x.split(batch_size)])

    def __iter__(self) -> Iterator[Batch]:
        for b in self.batches:
            self.consumed.append(fingerprint(b))
            yield b

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def samples(self) -> int:
        return sum(int(b[0].shape[0]) for b in self.batches)

    def fingerprints(self) -> list[str]:
        return [fingerprint(b) for b in self.batches]

    def consumed_set(self) -> set[str]:
        return set(self.consumed)


@dataclass
class OnnxSpec:
    """How the float model is exported for ONNX Runtime (names and dynamic axes of its inputs)."""

    input_names: Sequence[str] = ("input",)
    output_names: Sequence[str] = ("output",)
    dynamic_axes: dict | None = None


@dataclass
class PeerModel:
    """What the common evaluator scores: ``predict(*inputs) -> first output`` and how it was made."""

    method: str
    runtime: str  # "torch" or "onnxruntime"
    predict: Callable[..., torch.Tensor]
    calib_seconds: float
    settings: dict = field(default_factory=dict)
    peak_mem_mb: float = 0.0
    onnx_path: Path | None = None
    session: object | None = None  # the ORT session (timing) where runtime is onnxruntime


TOOLS = {"nncf": ("nncf", "nncf"), "onnxruntime": ("onnxruntime.quantization", "onnxruntime"),
         "inc": ("neural_compressor.torch.quantization", "neural-compressor-pt")}
METHOD_TOOL = {"nncf": "nncf", "nncf-no-smoothquant": "nncf", "ort-minmax": "onnxruntime",
               "ort-percentile": "onnxruntime", "ort-entropy": "onnxruntime", "inc-default": "inc",
               "nncf-int4": "nncf", "nncf-int4-awq": "nncf", "inc-rtn": "inc", "inc-gptq": "inc"}


def require(tool: str):
    """The tool's module, or :class:`PeerUnavailable` naming the package to install."""
    module, package = TOOLS[tool]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise PeerUnavailable(f"{package} is not installed ({exc}); pip install 'reparq[peers]'") from None


def _first(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return _first(out[0])
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    raise ReparqError(f"cannot read a tensor from a {type(out).__name__} output")


def torch_predict(model: nn.Module) -> Callable[..., torch.Tensor]:
    def predict(*inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return _first(model(*inputs))
    return predict


def _timed(fn: Callable[[], object]) -> tuple[object, Measurement]:
    """Wall time and peak RSS of one tool's calibration, measured the way reparq's own rows are."""
    with measure() as m:
        out = fn()
    m.seconds = round(m.seconds, 2)
    return out, m


# --- NNCF -----------------------------------------------------------------------------------------

def quantize_nncf(model: nn.Module, feed: CalibrationFeed, *, transformer: bool = False,
                  smoothquant: bool = True) -> PeerModel:
    """``nncf.quantize`` on a copy of the PyTorch model with every calibration batch (defaults otherwise)."""
    nncf = require("nncf")
    kwargs: dict = {"subset_size": len(feed)}
    settings = {"subset_size": len(feed), "model_type": "default"}
    if transformer:
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
        settings["model_type"] = "TRANSFORMER"
        settings["smoothquant"] = "matmul alpha 0.95 (NNCF default)" if smoothquant else "off"
        if not smoothquant:
            from nncf.quantization.advanced_parameters import (AdvancedQuantizationParameters,
                                                               AdvancedSmoothQuantParameters)

            kwargs["advanced_parameters"] = AdvancedQuantizationParameters(
                smooth_quant_alphas=AdvancedSmoothQuantParameters(convolution=-1, matmul=-1))
    elif not smoothquant:
        raise ReparqError("nncf-no-smoothquant is a transformer variant: NNCF applies SmoothQuant only there")
    # NNCF's torch backend calls model(*item) for a tuple item, model(item) for a tensor.
    dataset = nncf.Dataset(feed, lambda b: b[0] if len(b) == 1 else b)
    work = copy.deepcopy(model).eval()
    qmodel, cost = _timed(lambda: nncf.quantize(work, dataset, **kwargs))
    method = "nncf" if smoothquant else "nncf-no-smoothquant"
    return PeerModel(method, "torch", torch_predict(qmodel), cost.seconds,
                     settings, cost.peak_mem_mb)


def quantize_nncf_weights(model: nn.Module, feed: CalibrationFeed, *, data_aware: bool = False) -> PeerModel:
    """NNCF's 4-bit weight-only compression for LLMs (``nncf.compress_weights``, ``INT4_SYM``).

    Data-free: NNCF's defaults for the mode (group size 128, embeddings and the last layer kept in
    8-bit). ``data_aware``: the data-aware setting NNCF's LLM guide recommends for accuracy (AWQ and
    scale estimation on the calibration batches, every one of them)."""
    nncf = require("nncf")
    # NNCF's torch backend traces the model on the dataset even when the algorithm is data-free
    kwargs: dict = {"mode": nncf.CompressWeightsMode.INT4_SYM,
                    "dataset": nncf.Dataset(feed, lambda b: b[0] if len(b) == 1 else b)}
    settings: dict = {"mode": "INT4_SYM", "group_size": "128 (default)", "ratio": "1 (default)"}
    if data_aware:
        kwargs.update(subset_size=feed.samples, awq=True, scale_estimation=True)
        settings.update(awq=True, scale_estimation=True, subset_size=feed.samples)
    work = copy.deepcopy(model).eval()
    qmodel, cost = _timed(lambda: nncf.compress_weights(work, **kwargs))
    if not data_aware:
        for _ in feed:  # data-free (tracing only): drained so the harness's consumption check holds
            pass
    return PeerModel("nncf-int4-awq" if data_aware else "nncf-int4", "torch", torch_predict(qmodel), cost.seconds,
                     settings, cost.peak_mem_mb)


# --- ONNX Runtime ---------------------------------------------------------------------------------

class _Reader:
    """ORT's ``CalibrationDataReader`` protocol (``get_next`` until None) over the feed's batches."""

    def __init__(self, feed: CalibrationFeed, names: Sequence[str]) -> None:
        self._it = iter(feed)
        self._names = list(names)

    def get_next(self):
        batch = next(self._it, None)
        return None if batch is None else {n: t.numpy() for n, t in zip(self._names, batch)}


ORT_METHODS = {"ort-minmax": "MinMax", "ort-percentile": "Percentile", "ort-entropy": "Entropy"}


def export_float_onnx(model: nn.Module, path: Path, example: Batch, spec: OnnxSpec) -> Path:
    """The float ONNX graph a user of ONNX Runtime starts from (the same exporter as reparq's)."""
    from reparq.deploy.onnx_export import torch_to_onnx

    return torch_to_onnx(model, path, example, list(spec.input_names), list(spec.output_names), spec.dynamic_axes)


def ort_session_predict(path: Path, names: Sequence[str], threads: int = 1):
    """(session, predict) for an ONNX file, with the session settings of the latency benchmarks."""
    from reparq.deploy import ort_runner

    session = ort_runner.make_session(path, threads=threads)

    def predict(*inputs: torch.Tensor) -> torch.Tensor:
        feed = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs)}
        return torch.from_numpy(np.asarray(session.run(None, feed)[0]))
    return session, predict


def quantize_ort(fp_onnx: Path, feed: CalibrationFeed, method: str, work: Path, spec: OnnxSpec,
                 threads: int = 1) -> PeerModel:
    """``quant_pre_process`` + ``quantize_static`` (QDQ, per-channel) with ``method``'s calibration.

    Settings as ``quantize_static``'s own docstring ("Choosing parameters for CPU inference") tells
    a user to: uint8 activations, int8 weights, and ``reduce_range`` (7-bit weights) exactly where the
    CPU has no VNNI/AMX, since without them ORT's u8 x s8 kernels add product pairs in saturating int16.
    """
    q = require("onnxruntime")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from reparq.eval.latency import has_vnni

    work, fp_onnx = Path(work).resolve(), Path(fp_onnx).resolve()
    pre, out = work / f"{fp_onnx.stem}_pre.onnx", work / f"{fp_onnx.stem}_{method}.onnx"
    settings = {"format": "QDQ", "per_channel": True, "weights": "QInt8", "activations": "QUInt8",
                "calibrate_method": ORT_METHODS[method], "reduce_range": not has_vnni()}

    def run() -> None:
        try:
            quant_pre_process(str(fp_onnx), str(pre))
        except Exception as exc:  # noqa: BLE001 - symbolic shape inference fails on some graphs (Swin)
            print(f"quant_pre_process: {exc}; retrying with skip_symbolic_shape=True", flush=True)
            settings["pre_process"] = "skip_symbolic_shape=True"
            quant_pre_process(str(fp_onnx), str(pre), skip_symbolic_shape=True)
        # No ``CalibMaxIntermediateOutputs``: in ORT 1.32 reaching it clears the held outputs without
        # merging their ranges (only the last chunk counts; "No data is collected" when the batches are
        # a multiple of it). MinMax holds only its ReduceMin/ReduceMax scalars, so it needs no bound.
        q.quantize_static(str(pre), str(out), _Reader(feed, spec.input_names), quant_format=q.QuantFormat.QDQ,
                          per_channel=True, activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                          calibrate_method=getattr(q.CalibrationMethod, ORT_METHODS[method]),
                          reduce_range=settings["reduce_range"])

    # ORT's shape inference leaves temporary files (``*.data``, ``sym_shape_infer_temp.onnx``) in the
    # working directory: run it inside ``work`` so a benchmark does not litter the checkout.
    with contextlib.chdir(work):
        _, cost = _timed(run)
    session, predict = ort_session_predict(out, spec.input_names, threads)
    return PeerModel(method, "onnxruntime", predict, cost.seconds, settings, cost.peak_mem_mb, onnx_path=out,
                     session=session)


# --- Intel Neural Compressor ----------------------------------------------------------------------

def quantize_inc(model: nn.Module, feed: CalibrationFeed, *, dynamic_dims: Sequence[dict] | None = None) -> PeerModel:
    """INC 3.x static PTQ for PyTorch without IPEX: its PT2E path (``export``, ``prepare``, run, ``convert``)."""
    inc = require("inc")
    from neural_compressor.torch.export import export

    example = feed.batches[0]
    dims = dynamic_dims or [{0: torch.export.Dim("batch")} for _ in example]

    def run() -> nn.Module:
        exported = export(copy.deepcopy(model).eval(), example_inputs=tuple(example), dynamic_shapes=tuple(dims))
        prepared = inc.prepare(exported, quant_config=inc.get_default_static_config(), example_inputs=tuple(example))
        with torch.no_grad():
            for batch in feed:
                prepared(*batch)
        return inc.convert(prepared)

    qmodel, cost = _timed(run)
    config = inc.get_default_static_config()
    settings = {k: getattr(config, k) for k in ("w_dtype", "w_sym", "w_granularity", "w_algo", "act_dtype",
                                                 "act_sym", "act_granularity", "act_algo") if hasattr(config, k)}
    return PeerModel("inc-default", "torch", torch_predict(qmodel), cost.seconds, {"path": "PT2E", **settings},
                     cost.peak_mem_mb)


def quantize_inc_weights(model: nn.Module, feed: CalibrationFeed, algo: str) -> PeerModel:
    """INC 3.x weight-only 4-bit for LLMs with the algorithm's default config (``prepare``/``convert``);
    GPTQ runs the calibration batches between them, RTN is data-free."""
    inc = require("inc")
    from neural_compressor.torch import quantization as incq

    config = incq.get_default_rtn_config() if algo == "rtn" else incq.get_default_gptq_config()

    def run() -> nn.Module:
        prepared = incq.prepare(copy.deepcopy(model).eval(), quant_config=config)
        with torch.no_grad():
            for batch in feed:
                if algo == "gptq":
                    prepared(*batch)
        return incq.convert(prepared)

    qmodel, cost = _timed(run)
    settings = {k: getattr(config, k) for k in ("bits", "use_sym", "group_size", "quant_lm_head") if hasattr(config, k)}
    return PeerModel(f"inc-{algo}", "torch", torch_predict(qmodel), cost.seconds, {"algo": algo, **settings},
                     cost.peak_mem_mb)


# --- dispatch -------------------------------------------------------------------------------------

PEER_METHODS = ("nncf", "nncf-no-smoothquant", "ort-minmax", "ort-percentile", "ort-entropy", "inc-default")
# 4-bit weight-only (W4A16) peers for LLMs
WEIGHT_ONLY_METHODS = ("nncf-int4", "nncf-int4-awq", "inc-rtn", "inc-gptq")
TRANSFORMER_ONLY = ("nncf-no-smoothquant",)


def run_peer(method: str, model: nn.Module, feed: CalibrationFeed, work: Path, *, transformer: bool = False,
             spec: OnnxSpec | None = None, fp_onnx: Path | None = None, threads: int = 1,
             dynamic_dims: Sequence[dict] | None = None) -> PeerModel:
    """Quantize ``model`` with the peer ``method`` (:data:`PEER_METHODS`) on ``feed``'s batches.

    ``fp_onnx``: the float ONNX export for the ORT methods (exported here when not given, so
    several ORT methods can share one export). ``dynamic_dims``: INC's ``torch.export`` dynamic
    dimensions per input (default: the batch axis of each)."""
    if method not in METHOD_TOOL:
        raise ReparqError(f"unknown peer method {method!r}; choose from {', '.join(PEER_METHODS)}")
    spec = spec or OnnxSpec()
    if method in ("nncf-int4", "nncf-int4-awq"):
        return quantize_nncf_weights(model, feed, data_aware=method == "nncf-int4-awq")
    if method in ("inc-rtn", "inc-gptq"):
        return quantize_inc_weights(model, feed, method.removeprefix("inc-"))
    if method.startswith("nncf"):
        return quantize_nncf(model, feed, transformer=transformer, smoothquant=method == "nncf")
    if method.startswith("ort-"):
        require("onnxruntime")
        if fp_onnx is None:
            fp_onnx = export_float_onnx(model, work / "float.onnx", feed.batches[0], spec)
        return quantize_ort(fp_onnx, feed, method, work, spec, threads)
    return quantize_inc(model, feed, dynamic_dims=dynamic_dims)


def quantize_reparq(model: nn.Module, feed: CalibrationFeed, config: str = "w8a8", seed: int = 0,
                    input_names: Sequence[str] | None = None, **options) -> PeerModel:
    """reparq's own row on the same feed: ``reparq.quantize(model, batches, config=...)``.

    ``input_names``: for a model with keyword inputs (a Hugging Face BERT), the names of the
    feed's tensors, so each batch goes in as ``model(**dict(zip(input_names, batch)))``."""
    from reparq.api import quantize

    batches = [dict(zip(input_names, b)) if input_names else b[0] if len(b) == 1 else b for b in feed]
    qmodel, cost = _timed(lambda: quantize(model, batches, config=config, seed=seed, **options))
    recipe = qmodel.reparq_info.recipe
    peer = PeerModel(recipe, "torch", torch_predict(qmodel), cost.seconds, {**({"config": config} if config else {}), **options},
                     cost.peak_mem_mb)
    peer.qmodel = qmodel  # type: ignore[attr-defined] - for export
    return peer


__all__ = ["CalibrationFeed", "OnnxSpec", "PEER_METHODS", "WEIGHT_ONLY_METHODS", "PeerModel", "PeerUnavailable", "export_float_onnx",
           "fingerprint", "ort_session_predict", "quantize_inc", "quantize_inc_weights", "quantize_nncf",
           "quantize_nncf_weights", "quantize_ort", "quantize_reparq",
           "require", "run_peer"]
