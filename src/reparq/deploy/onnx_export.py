"""ONNX QDQ export: the quantized model as standard ONNX ops that ONNX Runtime runs as int8 kernels.

Everything the recipes reparameterized (Rep branches, BN, QPRep's affine, RepQuant's scale
folds) is already folded into the weights and quantizer parameters of the fake-quant model (a
QPRep affine still attached is folded on the export copy), so the exported graph needs nothing
beyond opset-17 operators:

* weights: 8-bit integer initializers (the integers ``weight_quantizer.to_int`` gives, on the
  narrow or sub-8-bit grid the recipe chose) and ``DequantizeLinear`` with one scale per output
  channel; stored as int8 (zero-point 0), or as uint8 + 128 (zero-point 128) where x86 CPUs
  without VNNI would saturate (:func:`weight_storage`);
* layer inputs: ``QuantizeLinear -> DequantizeLinear`` with one scale and integer zero-point,
  ``uint8`` for the asymmetric grids (``int8`` for symmetric ones);
* bit widths below 8: the grid is a sub-range of the 8-bit type with the same scale and
  zero-point, so an integer ``Clip`` between ``QuantizeLinear`` and ``DequantizeLinear``
  (e.g. to [0, 15] for 4 bits) gives exactly the fake-quant values. ORT still fuses
  ``DQ -> Conv -> Q`` into ``QLinearConv``; the Clip then runs on the uint8 tensor between two
  integer convolutions;
* attention matmul inputs (q, k, v; uniform probabilities): QDQ like layer inputs;
* log2 / log-sqrt2 quantizers (post-Softmax probabilities): no ONNX operator consumes
  log-coded integers, so they are exported as their fake-quant written in float ops (Log,
  Round, Clip, Pow) and run in float.

How the graph is produced: an export-only copy of the model in which each quantized module is
replaced by one whose forward computes the same fake-quant values and whose ``symbolic`` (an
``autograd.Function`` the TorchScript exporter honours) emits the QDQ nodes; no onnxscript (the
dynamo exporter's dependency, not installed here). Passes over the ONNX graph follow
(:mod:`reparq.deploy.onnx_passes`): outputs requantized where no layer does, scalar multiplies
folded into scales, q/k/v quantized before their Split, a post-LN norm's input affines absorbed
by the norm, RGB stems as SpaceToDepth + 2x2 conv, float
weights where a conv stays float. ``onnx`` and ``torch.onnx`` are imported only when a
function of this module runs.
"""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from reparq.deploy.onnx_passes import (absorb_input_affines_into_norms, fold_scalar_mul_into_dequantize,
                                      float_weights_where_unfused, fuse_linear_bias_for_onnxruntime,
                                      merge_duplicate_quantizers,
                                      quantize_before_split, requantize_unfused_convs, space_to_depth_stems)
from reparq.errors import ReparqError
from reparq.nn.qmodules import QConv2d, QLinear, QuantizedLayer, quantized_layers
from reparq.quant.log import LogQuantizer
from reparq.quant.uniform import UniformQuantizer

OPSET = 17
# Weight storage: signed int8 (zero-point 0), or uint8 shifted by 128 (zero-point 128). Same values;
# "auto" picks per layer (see weight_storage).
WEIGHT_OFFSET = {"int8": 0, "uint8": 128}
WEIGHT_DTYPES = ("auto", *WEIGHT_OFFSET)
# "any": standard opset-17 operators only (QDQ; TensorRT, OpenVINO, ORT all read it); "onnxruntime":
# plus ORT contrib kernels where ORT's own optimizer leaves float work behind (onnx_passes).
RUNTIMES = ("any", "onnxruntime")
_PAIR_SUM_LIMIT = 2 ** 15 - 1  # the int16 that x86 AVX2 u8 x s8 kernels (vpmaddubsw) add product pairs into


class _QuantDequant(torch.autograd.Function):
    """Per-tensor fake-quant that exports as ``QuantizeLinear [-> Clip] -> DequantizeLinear``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int, signed: bool):
        # Same operations, in the same order, as reparq.quant.uniform.fake_quant.
        return (torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale

    @staticmethod
    def symbolic(g, x, scale: float, zero_point: int, qmin: int, qmax: int, signed: bool):
        int_dtype = torch.int8 if signed else torch.uint8
        info = torch.iinfo(int_dtype)
        s = g.op("Constant", value_t=torch.tensor(scale, dtype=torch.float32))
        z = g.op("Constant", value_t=torch.tensor(zero_point, dtype=int_dtype))
        q = g.op("QuantizeLinear", x, s, z)
        if qmin > info.min or qmax < info.max:  # a sub-8-bit (or narrow) grid inside the 8-bit type
            lo = g.op("Constant", value_t=torch.tensor(qmin, dtype=int_dtype))
            hi = g.op("Constant", value_t=torch.tensor(qmax, dtype=int_dtype))
            q = g.op("Clip", q, lo, hi)
        return g.op("DequantizeLinear", q, s, z)


class _DequantWeight(torch.autograd.Function):
    """Integer weights times their scales; exports as one ``DequantizeLinear`` on an int8 initializer."""

    @staticmethod
    def forward(ctx, w_int: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int):
        shape = [1] * w_int.ndim
        if scale.numel() > 1:
            shape[axis] = -1
        return (w_int.float() - zero_point.float().reshape(shape)) * scale.reshape(shape)

    @staticmethod
    def symbolic(g, w_int, scale, zero_point, axis: int):
        return g.op("DequantizeLinear", w_int, scale, zero_point, axis_i=axis)


class ExportQDQ(nn.Module):
    """Stand-in for a per-tensor :class:`UniformQuantizer` (layer inputs, attention q/k/v)."""

    enabled = True

    def __init__(self, quantizer: UniformQuantizer, where: str, as_qdq: bool = True) -> None:
        super().__init__()
        # as_qdq=False: the same fake-quant as plain float ops (Div, Round, Clip, ...), which ORT
        # does not read as a quantized input: for layers that run faster in float (see runs_in_float).
        self.as_qdq = as_qdq
        if not quantizer.initialized:
            raise ReparqError(f"{where} has no range yet; export a calibrated model (from reparq.quantize)")
        if quantizer.scale.numel() != 1:
            raise ReparqError(f"{where}: per-channel activation quantizers have no int8 kernel; fold them into "
                              f"a per-tensor quantizer first (the repquant recipe does)")
        self.scale = float(quantizer.scale.detach().reshape(()))
        self.zero_point = int(quantizer.zero_point.reshape(()))
        self.qmin, self.qmax, self.signed = quantizer.qmin, quantizer.qmax, quantizer.symmetric
        info = torch.iinfo(torch.int8 if self.signed else torch.uint8)
        if quantizer.bits > 8 or not (info.min <= self.zero_point <= info.max):
            raise ReparqError(f"{where}: a {quantizer.bits}-bit grid with zero-point {self.zero_point} does not fit "
                              f"the 8-bit ONNX type")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.as_qdq:
            return _QuantDequant.forward(None, x, self.scale, self.zero_point, self.qmin, self.qmax, self.signed)
        return _QuantDequant.apply(x, self.scale, self.zero_point, self.qmin, self.qmax, self.signed)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.4g}, zero_point={self.zero_point}, grid=[{self.qmin}, {self.qmax}]"


def is_log_quantizer(module: nn.Module) -> bool:
    """A log-grid quantizer: :class:`LogQuantizer`, or its deployed log2-with-parity form (same values,
    ``k`` levels per octave, codes up to ``qmax``, top value ``scale``)."""
    return isinstance(module, LogQuantizer) or (
        not isinstance(module, UniformQuantizer) and callable(getattr(module, "codes", None))
        and all(hasattr(module, a) for a in ("k", "qmax", "scale", "bits")))


class ExportLogQuant(nn.Module):
    """A log-grid quantizer's fake-quant in float ONNX ops (no runtime has int kernels for log codes).

    ``s * 2^(-q/k)`` with ``q = clamp(round(-k log2(a/s)), 0)`` and entries whose code exceeds
    ``qmax`` sent to 0, as :class:`LogQuantizer`. The log2-with-parity form is the same function
    (its shift-only kernel is a CPU/accelerator design, not an ONNX operator). Written with
    ``log``/``pow`` so every op has an opset-17 symbolic; a code can flip where ``-k log2(a)``
    lands within float rounding of a half-integer.
    """

    enabled = True

    def __init__(self, quantizer: nn.Module) -> None:
        super().__init__()
        self.scale = float(quantizer.scale.detach().reshape(()))
        self.k, self.qmax = int(quantizer.k), int(quantizer.qmax)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        ratio = torch.clamp(a / self.scale, min=torch.finfo(torch.float32).tiny)
        q = torch.clamp(torch.round(torch.log(ratio) * (-self.k / math.log(2.0))), min=0.0)
        keep = (q <= self.qmax) & (a > 0)
        a_hat = self.scale * torch.pow(2.0, torch.clamp(q, max=float(self.qmax)) * (-1.0 / self.k))
        return a_hat * keep.to(a.dtype)


class _ExportLayer(nn.Module):
    """Shared part of the Conv2d / Linear stand-ins: input QDQ and (integer or float) weight."""

    def _setup(self, layer: QuantizedLayer, name: str, weight_axis: int, transpose: bool, weight_dtype: str,
               in_float: bool = False) -> None:
        aq, wq = layer.input_quantizer, layer.weight_quantizer
        quantized_input = aq.enabled and not aq.is_float
        self.act = ExportQDQ(aq, f"{name}.input_quantizer", as_qdq=not in_float) if quantized_input else None
        affine = layer._modules.get("input_affine")  # float Mul + Add in front of the QuantizeLinear
        self.register_buffer("in_mul", None if affine is None else affine.mul.detach().clone())
        self.register_buffer("in_add", None if affine is None else affine.add.detach().clone())
        self.weight_axis = weight_axis
        with torch.no_grad():
            weight = layer.quantized_weight().detach()
            bias = layer.input_bias(weight)  # an input affine's offset, taken off with W_q
            self.register_buffer("bias", bias.detach().clone() if bias is not None else None)
            self.int_weight = wq.enabled and not wq.is_float and not in_float
            if self.int_weight:
                if not wq.initialized:
                    raise ReparqError(f"{name}.weight_quantizer has no range yet; export a calibrated model")
                if wq.group_size is not None:
                    raise ReparqError(f"{name} has grouped weight scales (w_group_size={wq.group_size}), which the "
                                      f"ONNX QDQ graph's per-channel integer kernels cannot hold; export it with "
                                      f"`--format hf` (compressed-tensors), or quantize per channel for ONNX")
                w_int = wq.to_int(weight)
                offset = WEIGHT_OFFSET[weight_dtype]
                scale = wq.scale.detach().reshape(-1).clone()
                if transpose:
                    w_int = w_int.t().contiguous()
                dtype = torch.uint8 if offset else torch.int8
                self.register_buffer("w_int", (w_int + offset).to(dtype))
                self.register_buffer("w_scale", scale if scale.numel() > 1 else scale.reshape(()))
                self.register_buffer("w_zero_point", torch.full_like(self.w_scale, offset, dtype=dtype))
            else:
                self.register_buffer("w_float", weight.t().contiguous() if transpose else weight.clone())

    def weight_value(self) -> torch.Tensor:
        if self.int_weight:
            return _DequantWeight.apply(self.w_int, self.w_scale, self.w_zero_point, self.weight_axis)
        return self.w_float

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_mul is not None:
            x = x * self.in_mul + self.in_add
        return x if self.act is None else self.act(x)


class ExportConv2d(_ExportLayer):
    def __init__(self, layer: QConv2d, name: str, weight_dtype: str = "int8") -> None:
        super().__init__()
        self._setup(layer, name, weight_axis=0, transpose=False, weight_dtype=weight_dtype,
                    in_float=runs_in_float(layer))
        # A weightless Conv2d keeps the geometry (stride, padding, padding_mode) and its _conv_forward.
        self.geometry = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                  layer.padding, layer.dilation, layer.groups, bias=False,
                                  padding_mode=layer.padding_mode)
        del self.geometry.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.geometry._conv_forward(self.quantize_input(x), self.weight_value(), self.bias)


class ExportLinear(_ExportLayer):
    """``x @ W^T + b`` as ``DQ(x) -> MatMul(DQ(W^T)) -> Add``.

    W is stored transposed ([in, out], scales on axis 1) so no Transpose sits between the weight's
    DequantizeLinear and the MatMul, which ORT's QDQ fusion requires. A 2-D input is given a
    leading unit axis: ORT fuses a 2-D ``MatMul + Add`` into a float Gemm before its QDQ fusion
    runs, which would leave e.g. a classifier head in float.
    """

    def __init__(self, layer: QLinear, name: str, weight_dtype: str = "int8") -> None:
        super().__init__()
        self._setup(layer, name, weight_axis=1, transpose=True, weight_dtype=weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.ndim == 2
        if flat:
            x = x.unsqueeze(0)
        y = torch.matmul(self.quantize_input(x), self.weight_value())
        if self.bias is not None:
            y = y + self.bias
        return y.squeeze(0) if flat else y


_EXPORT_TYPES = {QConv2d: ExportConv2d, QLinear: ExportLinear}


class _Passthrough(nn.Identity):
    """A disabled or float quantizer: nothing to export."""

    enabled = False


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    if not name:
        return module
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
    return model


# Convs on raw pixels (at most this many input channels) with fewer than this many products per
# output run in float: the zoo's 1-channel 3x3 stems (9 products) ran 2-5x slower as QLinearConv
# than as float convs. From an RGB 3x3 stem up (27 products) int8 pays: on RepVGG-A0 at 224x224,
# batch 32, the float stem with its float input fake-quant and layout reorders took ~75 ms of
# ~200 where ORT's int8 stem took ~15 (AMX CPU); a ViT's 16x16 patch embedding has 768.
MAX_FLOAT_STEM_CHANNELS = 4
MAX_FLOAT_STEM_REDUCTION = 16


def runs_in_float(layer: QuantizedLayer) -> bool:
    """Whether a conv is exported to compute in float, with the same values as its fake-quant.

    A stem on raw pixels with a short reduction is not faster as an int8 kernel; its input
    fake-quant is then written as float ops and its on-grid weights as float initializers, so ORT
    neither fuses it (it would otherwise re-quantize the float weights of a ``DQ -> Conv -> Q``
    pattern with its own scales) nor changes a value. Only stems: a layer in float has no
    quantized input, so the layer before it would lose its output scale and run in float too.
    """
    if not isinstance(layer, nn.Conv2d) or layer.groups != 1 or layer.in_channels > MAX_FLOAT_STEM_CHANNELS:
        return False
    return layer.in_channels * math.prod(layer.kernel_size) < MAX_FLOAT_STEM_REDUCTION


def weight_storage(layer: QuantizedLayer, weight_dtype: str = "auto", vnni: bool | None = None) -> str:
    """``"int8"`` or ``"uint8"`` for one layer's weights; only ``"auto"`` decides anything.

    ``vnni``: whether the CPU that will run the model sums u8 x s8 products in 32 bits
    (AVX512-VNNI, AVX-VNNI, AMX; ARM): then nothing saturates and "auto" is int8 everywhere.
    ``None`` reads it from the exporting machine (:func:`reparq.eval.latency.has_vnni`); export
    with ``weight_dtype="uint8"`` or "auto" on such a CPU only for deployment on one without.

    Why: ONNX Runtime's x86 kernels without VNNI multiply uint8 activations by int8 weights with
    ``vpmaddubsw``, which adds each pair of products in saturating int16. A pair can exceed
    32767 only if ``2 * max_activation_code * max_|weight|`` does, i.e. with 8-bit weights and
    8-bit activations. Whether it does in practice depends on the codes the data produces: layers
    whose input grid is two-sided (zero-point > 0: raw pixels, LayerNorm outputs) see large codes
    everywhere and measurably lose accuracy; layers after ReLU (zero-point 0) see mostly small
    codes (on the zoo CNNs, int8 weights there changed no output; inputs far outside the
    calibration range do saturate them). "auto" stores the first kind as uint8 (+128,
    zero-point 128; ORT's uint8 x uint8 kernels do not saturate, but are slower) and the rest as
    int8; on a VNNI/AMX CPU, all as int8 (the fast path, and nothing to saturate).
    ``reparq export --check`` shows whether the choice holds for a given model.
    """
    if weight_dtype != "auto":
        return weight_dtype
    if vnni is None:
        from reparq.eval.latency import has_vnni

        vnni = has_vnni()
    if vnni or runs_in_float(layer):  # no integer kernel will see its weights
        return "int8"
    wq, aq = layer.weight_quantizer, layer.input_quantizer
    if not (wq.enabled and not wq.is_float and aq.enabled and not aq.is_float):
        return "int8"
    max_weight = max(abs(wq.qmin), abs(wq.qmax))
    max_code = max(abs(aq.qmin), abs(aq.qmax)) if aq.symmetric else aq.qmax
    can_saturate = 2 * max_code * max_weight > _PAIR_SUM_LIMIT
    two_sided = aq.symmetric or float(aq.zero_point.reshape(-1)[0]) > 0
    return "uint8" if can_saturate and two_sided else "int8"


def export_module(qmodel: nn.Module, weight_dtype: str = "auto", vnni: bool | None = None) -> nn.Module:
    """The export-only copy: quantized layers and quantizers replaced by their ONNX stand-ins.

    Its forward gives the fake-quant model's outputs (to float rounding); the caller's model is
    not modified. QPRep affines still attached (mid-calibration models) are folded first.
    """
    from reparq.model.qprep import fold_qprep

    if weight_dtype not in WEIGHT_DTYPES:
        raise ReparqError(f"weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {weight_dtype!r}")
    if not quantized_layers(qmodel):
        raise ReparqError("the model has no quantized layers; export the output of reparq.quantize or reparq.load")
    if vnni is None and weight_dtype == "auto":
        from reparq.eval.latency import has_vnni

        vnni = has_vnni()
    model = copy.deepcopy(qmodel).eval()
    for name, layer in quantized_layers(model):
        if layer._modules.get("output_affine") is not None:
            fold_qprep(layer)
        if type(layer) not in _EXPORT_TYPES:
            raise ReparqError(f"layer {name!r} of type {type(layer).__name__} has no ONNX export")
        stand_in = _EXPORT_TYPES[type(layer)](layer, name, weight_storage(layer, weight_dtype, vnni))
        model = _set_submodule(model, name, stand_in)
    # Quantizers outside layers: attention matmul inputs (uniform) and probabilities (uniform or log).
    for name, module in list(model.named_modules()):
        active = getattr(module, "enabled", True) and getattr(module, "bits", 16) <= 8
        if isinstance(module, UniformQuantizer):
            model = _set_submodule(model, name, ExportQDQ(module, name) if active else _Passthrough())
        elif is_log_quantizer(module):
            model = _set_submodule(model, name, ExportLogQuant(module) if active else _Passthrough())
    return model.eval()


def _as_args(example_input: Any) -> tuple:
    return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)


def default_example_input(model: nn.Module) -> torch.Tensor | None:
    """One sample shaped like the calibration data, when ``reparq.quantize`` recorded its shape."""
    info = getattr(model, "reparq_info", None)
    shape = (getattr(info, "extra", None) or {}).get("input_shape") if info is not None else None
    return torch.zeros(1, *shape) if shape else None


def torch_to_onnx(model: nn.Module, path: str | Path, example_input: Any, input_names: Sequence[str] | None = None,
                  output_names: Sequence[str] | None = None, dynamic_axes: dict | None = None,
                  opset: int = OPSET) -> Path:
    """TorchScript-exporter call shared by the QDQ export and the FP32 reference export.

    Axis 0 of every input and output is dynamic unless ``dynamic_axes`` says otherwise.
    """
    args = _as_args(example_input)
    input_names = list(input_names or ([f"input{i}" for i in range(len(args))] if len(args) > 1 else ["input"]))
    with torch.no_grad():
        sample = model(*args)
    n_out = len(sample) if isinstance(sample, (tuple, list)) else 1
    output_names = list(output_names or ([f"output{i}" for i in range(n_out)] if n_out > 1 else ["output"]))
    if dynamic_axes is None:
        dynamic_axes = {n: {0: "batch"} for n in input_names + output_names}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter; failures still raise
        torch.onnx.export(model, args, str(path), dynamo=False, opset_version=opset, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True,
                          autograd_inlining=False)
    return path


def export_onnx(qmodel: nn.Module, path: str | Path, example_input: Any = None, *, weight_dtype: str = "auto",
                input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None,
                dynamic_axes: dict | None = None, opset: int = OPSET, requantize: bool = True,
                runtime: str = "any") -> Path:
    """Write ``qmodel`` (from ``reparq.quantize`` / ``reparq.load``) as an ONNX QDQ model.

    ``example_input``: one batch of inputs (a tensor, or a tuple for several inputs); the batch
    axis is exported as dynamic. The file carries the recipe and bit widths in its metadata.
    ``weight_dtype``: ``"int8"`` (zero-point 0, the QDQ standard and the fastest), ``"uint8"``
    (the same integers plus 128, zero-point 128) or ``"auto"``: uint8 only for the layers that
    x86 CPUs without VNNI would otherwise compute with saturated 16-bit sums (see
    :func:`weight_storage`; on a CPU with VNNI or AMX "auto" is int8 everywhere).
    ``requantize``: quantize the outputs of convs that nothing requantizes (the last conv before
    pooling) with the range recorded at calibration, so that they run as int8 kernels too; this
    adds one 8-bit rounding the fake-quant model does not have (``False``: the graph computes
    exactly the fake-quant values, those convs in float).
    ``runtime``: ``"any"`` writes standard ONNX operators only (a QDQ graph any int8 runtime
    reads); ``"onnxruntime"`` also writes ONNX Runtime's ``com.microsoft.MatMulIntegerToFloat``
    with the Linear bias taken in, which ORT's own QDQ fusion leaves as a float Add (faster
    transformers on ORT; the file then runs only there).
    Returns the path. Check it with :func:`reparq.deploy.ort_runner.compare`.
    """
    import onnx

    if not isinstance(qmodel, nn.Module):
        raise ReparqError(f"export_onnx needs a torch.nn.Module, got {type(qmodel).__name__}")
    if runtime not in RUNTIMES:
        raise ReparqError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if example_input is None:
        example_input = default_example_input(qmodel)
    if example_input is None:
        raise ReparqError("export_onnx needs an example input: "
                          "export_onnx(qmodel, path, example_input=torch.zeros(1, 1, 28, 28))")
    path = Path(path)
    if path.suffix != ".onnx":
        raise ReparqError(f"the output path should end in .onnx, got {str(path)!r}")
    model = export_module(qmodel, weight_dtype)
    tmp = path.with_name(path.name + ".partial")
    try:
        torch_to_onnx(model, tmp, example_input, input_names, output_names, dynamic_axes, opset)
        proto = onnx.load(str(tmp))
    except Exception as exc:  # the exporter's own message names the unsupported op
        tmp.unlink(missing_ok=True)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ReparqError(f"ONNX export failed: {first}") from exc
    tmp.unlink(missing_ok=True)
    proto.producer_name = "reparq"
    info = getattr(qmodel, "reparq_info", None)
    meta = {"reparq.format": "qdq", "reparq.weight_dtype": weight_dtype, "reparq.runtime": runtime}
    if info is not None:
        meta.update({"reparq.recipe": str(info.recipe), "reparq.w_bits": str(info.config.get("w_bits")),
                     "reparq.a_bits": str(info.config.get("a_bits")), "reparq.seed": str(info.seed)})
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    ranges = (getattr(info, "extra", None) or {}).get("output_ranges", {}) if requantize else {}
    requantized = requantize_unfused_convs(proto, ranges)
    if requantized:
        proto.metadata_props.add(key="reparq.requantized", value=",".join(requantized))
    fold_scalar_mul_into_dequantize(proto)
    quantize_before_split(proto)
    absorb_input_affines_into_norms(proto)
    merge_duplicate_quantizers(proto)
    space_to_depth_stems(proto)
    float_weights_where_unfused(proto)
    if runtime == "onnxruntime":
        fuse_linear_bias_for_onnxruntime(proto)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))  # written only once everything succeeded
    return path
