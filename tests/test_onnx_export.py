"""ONNX QDQ export: ORT computes what the PyTorch fake-quant model computes, with int8 kernels.

Two tolerances, for two different claims:
- ORT with graph optimizations *off* evaluates the QDQ graph op by op in float, i.e. the same
  arithmetic as the fake-quant model; outputs agree to 1e-4 (float summation order only).
- ORT with optimizations *on* runs QLinearConv / MatMulIntegerToFloat: integer accumulation,
  then one requantization per layer, whose rounding can move an activation by one grid step.
  Top-1 agrees on every sample here and logits agree to 1% of their range. That holds with
  uint8 weights for any input, and with the default "auto" storage for inputs like the
  calibration data; int8 weights everywhere are not tested against it, because on x86 CPUs
  without VNNI ORT's u8 x s8 kernels saturate (see ``weight_storage``): machine-dependent.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import numpy_helper

import reparq
from reparq.cli import main
from reparq.deploy import ort_runner
from reparq.deploy.onnx_export import export_module, weight_storage
from reparq.errors import ReparqError
from reparq.model.qprep import attach_qprep
from reparq.nn.qmodules import quantized_layers
from reparq.quant.log import LogQuantizer
from reparq.zoo.registry import checkpoint_path

EXACT_ATOL = 1e-4
INT8_REL_TOL = 0.01


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),  # RGB 3x3 stem: 27 products, int8
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())  # output pooled: requantized from its recorded range
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def _images(n: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(n, 3, 12, 12, generator=torch.Generator().manual_seed(seed)) * scale


def _quantized_cnn(w_bits: int = 8, a_bits: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return reparq.quantize(TinyCNN().eval(), _images(64, 1), recipe="mse", w_bits=w_bits, a_bits=a_bits)


def _ort(path, x: torch.Tensor, optimize: bool) -> np.ndarray:
    return ort_runner.run(ort_runner.make_session(path, optimize=optimize), x)


def _torch(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    return ort_runner.torch_outputs(model, x)


def _assert_int8_close(got: np.ndarray, ref: np.ndarray) -> None:
    assert (got.argmax(1) == ref.argmax(1)).all()
    assert np.abs(got - ref).max() <= INT8_REL_TOL * np.abs(ref).max()


@pytest.mark.parametrize("w_bits, a_bits", [(8, 8), (4, 4)])
def test_cnn_export_matches_pytorch_and_runs_int8(tmp_path, w_bits, a_bits):
    qmodel = _quantized_cnn(w_bits, a_bits)
    path = reparq.export_onnx(qmodel, tmp_path / "cnn.onnx", torch.zeros(1, 3, 12, 12))
    x = _images(48, 2)
    _assert_int8_close(_ort(path, x, optimize=True), _torch(qmodel, x))
    # Out-of-range inputs (3x the calibration spread) exercise the clipping of every grid.
    x = _images(48, 2, scale=3.0)
    ref = _torch(qmodel, x)
    exact = reparq.export_onnx(qmodel, tmp_path / "exact.onnx", torch.zeros(1, 3, 12, 12), requantize=False)
    assert np.abs(_ort(exact, x, optimize=False) - ref).max() <= EXACT_ATOL
    path_u8 = reparq.export_onnx(qmodel, tmp_path / "cnn_u8.onnx", torch.zeros(1, 3, 12, 12), weight_dtype="uint8")
    _assert_int8_close(_ort(path_u8, x, optimize=True), ref)
    # Every conv runs on integers: the last one (its output is pooled) through the requantization of
    # its output; the head is a MatMulIntegerToFloat, not a float Gemm. Nothing computes in float.
    kernels = ort_runner.optimized_op_counts(path)
    assert kernels["QLinearConv"] == 4 and kernels["MatMulIntegerToFloat"] == 1
    assert not ort_runner.float_kernels(kernels)
    # Without the requantization the last conv has no output scale and runs in float, on the fake-quant values.
    kernels = ort_runner.optimized_op_counts(exact)
    assert kernels["QLinearConv"] == 3 and sum(ort_runner.float_kernels(kernels).values()) == 1
    assert not ort_runner.float_kernels(kernels).keys() - {"Conv", "FusedConv"}


def test_unfused_conv_output_is_requantized_on_its_recorded_range(tmp_path):
    calib = _images(64, 1)
    qmodel = _quantized_cnn()
    last = dict(quantized_layers(qmodel))["features.7"]
    seen = []
    handle = last.register_forward_hook(lambda m, i, out: seen.append(out))
    with torch.no_grad():
        qmodel(calib)
    handle.remove()
    lo, hi = float(seen[0].min()), float(seen[0].max())
    ranges = qmodel.reparq_info.extra["output_ranges"]
    assert ranges["features.7"] == pytest.approx([lo, hi], rel=1e-6) and set(ranges) == {
        "features.0", "features.3", "features.5", "features.7"}
    path = reparq.export_onnx(qmodel, tmp_path / "m.onnx", torch.zeros(1, 3, 12, 12))
    proto = onnx.load(str(path))
    assert {p.key: p.value for p in proto.metadata_props}["reparq.requantized"] == "features.7"
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    # After the ReLU: [0, max] on uint8 with zero-point 0, so ORT folds the ReLU into the QLinearConv.
    assert float(inits["features.7.out_scale"]) == pytest.approx(hi / 255, rel=1e-6)
    assert int(inits["features.7.out_zero_point"]) == 0
    # One extra 8-bit rounding of the pooled features: within the int8 tolerance, not exact.
    x = _images(48, 2)
    ref = _torch(qmodel, x)
    _assert_int8_close(_ort(path, x, optimize=False), ref)
    # The range travels with the saved model.
    reparq.save(qmodel, tmp_path / "saved")
    loaded = reparq.load(tmp_path / "saved", TinyCNN())
    assert loaded.reparq_info.extra["output_ranges"] == ranges


def test_stems_on_raw_pixels_run_in_float_only_with_a_short_reduction():
    from reparq.deploy.onnx_export import runs_in_float
    from reparq.nn.qmodules import QConv2d

    def conv(c_in, k, groups=1):
        return QConv2d(c_in, 8 * groups, k, groups=groups)

    assert runs_in_float(conv(1, 3))  # 9 products per output: the zoo's gray stems
    assert not runs_in_float(conv(3, 3))  # RGB 3x3 stem: 27
    assert not runs_in_float(conv(3, 16))  # ViT patch embedding: 768
    assert not runs_in_float(conv(8, 1))  # not on raw pixels


def test_sub_8_bit_grids_are_clipped_on_the_int8_type(tmp_path):
    qmodel = _quantized_cnn(4, 4)
    graph = onnx.load(str(reparq.export_onnx(qmodel, tmp_path / "w4a4.onnx", torch.zeros(1, 3, 12, 12)))).graph
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"}
    consts.update({i.name: numpy_helper.to_array(i) for i in graph.initializer})
    clips = [(int(consts[n.input[1]]), int(consts[n.input[2]])) for n in graph.node
             if n.op_type == "Clip" and consts[n.input[1]].dtype == np.uint8]
    # First and last layer stay 8-bit (no clip); the three middle layers' 4-bit inputs are clipped to [0, 15].
    assert clips == [(0, 15)] * 3
    ints = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert any(numpy_helper.to_array(i).max() <= 7 and numpy_helper.to_array(i).min() >= -8 for i in ints)


def test_weights_are_exported_as_integers_on_their_grid(tmp_path):
    qmodel = _quantized_cnn()
    graph = onnx.load(str(reparq.export_onnx(qmodel, tmp_path / "m.onnx", torch.zeros(1, 3, 12, 12),
                                             weight_dtype="int8"))).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    conv2 = dict(quantized_layers(qmodel))["features.3"]
    expected = conv2.weight_quantizer.to_int(conv2.quantized_weight()).numpy()
    np.testing.assert_array_equal(inits["features.3.w_int"], expected)
    assert inits["features.3.w_int"].dtype == np.int8
    np.testing.assert_array_equal(inits["features.3.w_scale"], conv2.weight_quantizer.scale.detach().numpy())


def test_weight_storage_auto_and_uint8_give_identical_values(tmp_path):
    qmodel = _quantized_cnn()
    layers = dict(quantized_layers(qmodel))
    # Without VNNI: after a ReLU (zero-point 0) int8; the stem sees two-sided raw pixels: uint8.
    assert float(layers["features.0"].input_quantizer.zero_point) > 0
    assert weight_storage(layers["features.0"], vnni=False) == "uint8"
    assert weight_storage(layers["features.3"], vnni=False) == "int8"
    assert weight_storage(layers["features.3"], "uint8") == "uint8"
    two_sided = copy.deepcopy(layers["features.5"])
    two_sided.input_quantizer.zero_point.fill_(100.0)  # e.g. a LayerNorm output: large codes everywhere
    assert weight_storage(two_sided, vnni=False) == "uint8"
    low_bits = dict(quantized_layers(_quantized_cnn(4, 4)))["features.5"]
    low_bits.input_quantizer.zero_point.fill_(8.0)
    assert weight_storage(low_bits, vnni=False) == "int8"  # 4-bit codes cannot saturate a 16-bit pair sum
    seven = dict(quantized_layers(_quantized_cnn(7, 8)))["features.5"]
    seven.input_quantizer.zero_point.fill_(100.0)  # 8-bit two-sided codes, 7-bit weights: 2*255*64 <= 32767
    assert seven.weight_quantizer.qmin == -64 and weight_storage(seven, vnni=False) == "int8"
    # With VNNI or AMX products are summed in 32 bits: int8 everywhere, the fast path.
    assert {weight_storage(layer, vnni=True) for layer in [two_sided, *layers.values()]} == {"int8"}
    x = _images(16, 3)
    a = reparq.export_onnx(qmodel, tmp_path / "a.onnx", torch.zeros(1, 3, 12, 12), weight_dtype="int8")
    b = reparq.export_onnx(qmodel, tmp_path / "b.onnx", torch.zeros(1, 3, 12, 12), weight_dtype="uint8")
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(b)).graph.initializer}
    assert inits["features.3.w_int"].dtype == np.uint8 and (inits["features.3.w_zero_point"] == 128).all()
    np.testing.assert_array_equal(_ort(a, x, optimize=False), _ort(b, x, optimize=False))


def test_qprep_affine_still_attached_is_folded_on_export(tmp_path):
    qmodel = _quantized_cnn()
    layer = dict(quantized_layers(qmodel))["features.3"]
    affine = attach_qprep(layer)
    with torch.no_grad():
        affine.gamma.copy_(torch.linspace(-1.5, 2.0, 16))
        affine.beta.copy_(torch.linspace(-0.3, 0.3, 16))
    path = reparq.export_onnx(qmodel, tmp_path / "qprep.onnx", torch.zeros(1, 3, 12, 12), requantize=False)
    assert hasattr(layer, "output_affine")  # the caller's model is untouched
    x = _images(32, 4)
    assert np.abs(_ort(path, x, optimize=False) - _torch(qmodel, x)).max() <= EXACT_ATOL


def _tiny_vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=5, embed_dim=16, depth=1,
                             num_heads=2, mlp_ratio=2.0, global_pool="avg", class_token=False).eval()


def _vit_images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_vit_export_matches_pytorch_and_runs_int8(tmp_path):
    qmodel = reparq.quantize(_tiny_vit(), _vit_images(64, 1), recipe="mse")
    path = reparq.export_onnx(qmodel, tmp_path / "vit.onnx", torch.zeros(1, 1, 8, 8))
    exact = reparq.export_onnx(qmodel, tmp_path / "exact.onnx", torch.zeros(1, 1, 8, 8), requantize=False)
    x = _vit_images(48, 2)
    ref = _torch(qmodel, x)
    assert np.abs(_ort(exact, x, optimize=False) - ref).max() <= EXACT_ATOL
    _assert_int8_close(_ort(path, x, optimize=True), ref)
    counts = ort_runner.optimized_op_counts(path)
    kernels = ort_runner.int8_kernels(counts)
    # qkv, proj, fc1, fc2, the head and both attention matmuls run on integers: q k^T too, its
    # 1/sqrt(d) folded into the query's dequantize scale (else ORT makes it a float FusedMatMul).
    assert kernels.get("MatMulIntegerToFloat", 0) + kernels.get("QLinearMatMul", 0) == 7
    # The 4x4 patch embedding (16 products: not a float stem) has no ReLU: not requantized, float.
    assert ort_runner.float_kernels(counts) == {"Conv": 1}


def test_log_quantized_attention_probabilities_export_as_float_fake_quant(tmp_path):
    from reparq.nn.attention import matmul_quantizers

    qmodel = reparq.quantize(_tiny_vit(), _vit_images(64, 1), recipe="mse")
    (_, mq), = matmul_quantizers(qmodel)
    mq.probs = LogQuantizer(4, "logsqrt2")  # 16 levels, half an octave apart: visibly coarse
    path = reparq.export_onnx(qmodel, tmp_path / "log.onnx", torch.zeros(1, 1, 8, 8), requantize=False)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"Log", "Round", "Pow"} <= ops
    x = _vit_images(32, 3)
    ref = _torch(qmodel, x)
    mq.probs.enabled = False
    effect = np.abs(_torch(qmodel, x) - ref).max()  # what the quantizer changes in the output...
    assert effect > 0
    # ...is reproduced by the export at least 100 times more closely.
    assert np.abs(_ort(path, x, optimize=False) - ref).max() <= min(EXACT_ATOL, effect / 100)


def test_export_module_equals_fake_quant_model():
    qmodel = _quantized_cnn(6, 6)
    x = _images(16, 5, scale=2.0)
    with torch.no_grad():
        torch.testing.assert_close(export_module(qmodel)(x), qmodel(x), rtol=0, atol=1e-5)


def test_user_errors(tmp_path):
    with pytest.raises(ReparqError, match="no quantized layers"):
        reparq.export_onnx(TinyCNN().eval(), tmp_path / "f.onnx", torch.zeros(1, 3, 12, 12))
    qmodel = _quantized_cnn()
    # quantize() records the calibration input shape, so no example input is needed ...
    assert reparq.export_onnx(qmodel, tmp_path.parent / f"{tmp_path.name}_auto.onnx").exists()
    # ... but a model calibrated on dict batches (no recorded shape) must be given one.
    del qmodel.reparq_info.extra["input_shape"]
    with pytest.raises(ReparqError, match="example input"):
        reparq.export_onnx(qmodel, tmp_path / "m.onnx")
    with pytest.raises(ReparqError, match=r"\.onnx"):
        reparq.export_onnx(qmodel, tmp_path / "m.txt", torch.zeros(1, 3, 12, 12))
    with pytest.raises(ReparqError, match="weight_dtype"):
        reparq.export_onnx(qmodel, tmp_path / "m.onnx", torch.zeros(1, 3, 12, 12), weight_dtype="int4")
    with pytest.raises(ReparqError, match="runtime must be one of any, onnxruntime"):
        reparq.export_onnx(qmodel, tmp_path / "m.onnx", torch.zeros(1, 3, 12, 12), runtime="tensorrt")
    layer = dict(quantized_layers(qmodel))["features.3"]
    layer.input_quantizer.initialized = False
    with pytest.raises(ReparqError, match="no range yet"):
        reparq.export_onnx(qmodel, tmp_path / "m.onnx", torch.zeros(1, 3, 12, 12))
    layer.input_quantizer.channel_axis = 1
    layer.input_quantizer.set_params(torch.full((8,), 0.1), torch.zeros(8))
    with pytest.raises(ReparqError, match="per-channel activation"):
        reparq.export_onnx(qmodel, tmp_path / "m.onnx", torch.zeros(1, 3, 12, 12))
    with pytest.raises(ReparqError, match="ONNX export failed"):  # wrong input shape: nothing is written
        reparq.export_onnx(_quantized_cnn(), tmp_path / "bad.onnx", torch.zeros(1, 5, 12, 12))
    assert not list(tmp_path.iterdir())


def test_cli_export_from_corrupt_saved_directory_fails_clearly(tmp_path, capsys):
    saved = tmp_path / "saved"
    reparq.save(_quantized_cnn(), saved, source="zoo:repvgg_fm")
    (saved / "model.safetensors").write_bytes(b"\x00" * 16)
    out = tmp_path / "m.onnx"
    assert main(["export", str(saved), str(out)]) == 2
    err = capsys.readouterr().err
    assert "corrupt" in err and "Traceback" not in err
    assert not out.exists()
    assert main(["export", str(tmp_path / "missing"), str(out)]) == 2
    assert "not a saved reparq model" in capsys.readouterr().err


def test_cli_export_needs_a_source(tmp_path, capsys):
    assert main(["export", str(tmp_path / "m.onnx")]) == 2
    assert "--model" in capsys.readouterr().err


def test_compare_reports_agreement_and_kernels(tmp_path):
    qmodel = _quantized_cnn()
    path = reparq.export_onnx(qmodel, tmp_path / "m.onnx", torch.zeros(1, 3, 12, 12))
    x = _images(40, 6)
    labels = torch.as_tensor(_torch(qmodel, x).argmax(1))
    result = ort_runner.compare(qmodel, path, x, labels)
    assert result.samples == 40 and result.agreement == 100.0 and result.torch_top1 == 100.0
    assert result.ort_top1 == result.agreement  # labels are PyTorch's own predictions
    assert result.int8_kernels["QLinearConv"] == 4 and "QLinearConv x4" in result.summary()
    with pytest.raises(ReparqError, match="does not exist"):
        ort_runner.make_session(tmp_path / "missing.onnx")


@pytest.mark.skipif(not checkpoint_path("repvgg_fm").exists(), reason="zoo checkpoint not trained")
def test_cli_exports_a_saved_zoo_model_and_checks_it(tmp_path, capsys):
    import re

    from reparq.data import calibration_subset
    from reparq.zoo import load_model

    qmodel = reparq.quantize(load_model("repvgg_fm"), calibration_subset(64), recipe="mse")
    reparq.save(qmodel, tmp_path / "saved", source="zoo:repvgg_fm")
    out = tmp_path / "repvgg.onnx"
    assert main(["export", str(tmp_path / "saved"), str(out), "--check", "--check-size", "300"]) == 0
    text = capsys.readouterr().out
    agreement = float(re.search(r"top-1 agreement ([\d.]+)%", text).group(1))
    assert agreement >= 99.0 and "QLinearConv x9" in text  # the 1-channel stem runs in float, the last conv is requantized
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["reparq.recipe"] == "mse" and meta["reparq.w_bits"] == "8" and meta["reparq.runtime"] == "any"
    assert all(n.domain in ("", "ai.onnx") for n in onnx.load(str(out)).graph.node)  # standard operators only
    # --runtime onnxruntime: the classifier's bias inside ORT's MatMulIntegerToFloat, same agreement.
    ort_out = tmp_path / "repvgg_ort.onnx"
    assert main(["export", str(tmp_path / "saved"), str(ort_out), "--runtime", "onnxruntime", "--check",
                 "--check-size", "300"]) == 0
    text = capsys.readouterr().out
    assert float(re.search(r"top-1 agreement ([\d.]+)%", text).group(1)) >= 99.0
    ort_model = onnx.load(str(ort_out))
    assert {p.key: p.value for p in ort_model.metadata_props}["reparq.runtime"] == "onnxruntime"
    assert [n.op_type for n in ort_model.graph.node if n.domain == "com.microsoft"] == ["MatMulIntegerToFloat"]


def _tiny_repvgg() -> nn.Module:
    from timm.models.byobnet import ByobNet

    from reparq.zoo.architectures import _repvgg_cfg

    torch.manual_seed(0)
    return ByobNet(_repvgg_cfg((1, 2), (8, 16), (1, 2), stem=8), in_chans=1, num_classes=5).eval()


@pytest.mark.parametrize("recipe", reparq.list_recipes())
@pytest.mark.parametrize("family", ["repvgg", "vit"])
def test_every_recipe_output_exports(tmp_path, recipe, family):
    import dataclasses

    from reparq.recipes.registry import get_recipe

    spec = get_recipe(recipe)
    fields = {f.name for f in dataclasses.fields(spec.options)} if spec.options else set()
    options = {k: v for k, v in {"iters": 4, "clip_iters": 2}.items() if k in fields}
    model, shape = (_tiny_repvgg(), (1, 1, 16, 16)) if family == "repvgg" else (_tiny_vit(), (1, 1, 8, 8))
    x = torch.randn(32, *shape[1:], generator=torch.Generator().manual_seed(1))
    qmodel = reparq.quantize(model, x, recipe=recipe, w_bits=4, a_bits=4, **options)
    path = reparq.export_onnx(qmodel, tmp_path / "m.onnx", torch.zeros(shape), requantize=False)
    ref = _torch(qmodel, x)
    assert ref.std() > 1e-3  # outputs that vary, so the comparison below means something
    assert np.abs(_ort(path, x, optimize=False) - ref).max() <= EXACT_ATOL * max(1.0, np.abs(ref).max())
