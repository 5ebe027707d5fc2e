"""The ONNX graph rewrites that let ONNX Runtime run less float work, each on a hand-built graph:
the rewritten graph must compute the same values as the original (exactly where the integers are
the same, to float rounding where one product is reassociated) and ORT's optimized form must lose
the float op the rewrite targets."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from reparq.deploy import ort_runner  # noqa: E402
from reparq.eval.latency import has_vnni  # noqa: E402
from reparq.deploy.onnx_passes import (fold_scalar_mul_into_dequantize, fuse_linear_bias_for_onnxruntime,  # noqa: E402
                                       quantize_before_split)

# Full-range int8 weight codes where the CPU sums u8 x s8 products in 32 bits (VNNI/AMX); without
# it ORT's vpmaddubsw saturates pair sums above 32767 in an order-dependent way, so a rewritten and
# an original graph could differ there for that reason alone: codes within +-64 cannot saturate.
WEIGHT_CODE = 127 if has_vnni() else 64
RNG = np.random.default_rng(0)


def _model(nodes, inputs, outputs, inits, ort_ops: bool = False):
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("com.microsoft", 1)] if ort_ops else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


def _run(model, tmp_path, name, feeds):
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return ort_runner.make_session(path).run(None, feeds), ort_runner.optimized_op_counts(path)


def _qdq(name, x, scale, zero_point):
    return [helper.make_node("QuantizeLinear", [x, scale, zero_point], [f"{name}_q"]),
            helper.make_node("DequantizeLinear", [f"{name}_q", scale, zero_point], [f"{name}_dq"])]


def _linear_graph(bias: bool, weights: str = "int8", activations: str = "uint8"):
    """x -> QDQ -> MatMul(DQ(W, per column)) [-> Add(b)], x: [batch, 5, 16], W: [16, 24]; weights int8
    (zero point 0) or uint8 + 128, activations uint8 (zero point 120) or int8 (symmetric)."""
    offset = 128 if weights == "uint8" else 0
    inits = {"sx": np.array(0.05, np.float32),
             "zx": np.array(120, np.uint8) if activations == "uint8" else np.array(0, np.int8),
             "W": (RNG.integers(-WEIGHT_CODE, WEIGHT_CODE + 1, (16, 24)) + offset).astype(weights),
             "sw": (RNG.random(24) * 0.01 + 0.002).astype(np.float32), "zw": np.full(24, offset, weights),
             "b": RNG.standard_normal(24).astype(np.float32)}
    nodes = _qdq("x", "x", "sx", "zx") + [
        helper.make_node("DequantizeLinear", ["W", "sw", "zw"], ["W_dq"], axis=1),
        helper.make_node("MatMul", ["x_dq", "W_dq"], ["mm" if bias else "y"])]
    if bias:
        nodes.append(helper.make_node("Add", ["mm", "b"], ["y"]))
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5, 16])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)


@pytest.mark.parametrize("weights, activations", [("int8", "uint8"), ("uint8", "uint8"), ("int8", "int8")])
def test_linear_bias_goes_into_matmul_integer_to_float(tmp_path, weights, activations):
    x = RNG.standard_normal((3, 5, 16)).astype(np.float32)
    model = _linear_graph(bias=True, weights=weights, activations=activations)
    (ref,), before = _run(model, tmp_path, "before", {"x": x})
    assert before["Add"] == 1  # ORT's own fusion leaves the bias in float
    assert fuse_linear_bias_for_onnxruntime(model) == 1
    assert [n.op_type for n in model.graph.node] == ["QuantizeLinear", "MatMulIntegerToFloat"]
    (got,), after = _run(model, tmp_path, "after", {"x": x})
    assert after.get("Add", 0) == 0 and after["MatMulIntegerToFloat"] == 1
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))


def test_bias_fusion_leaves_a_linear_without_bias_to_ort(tmp_path):
    model = _linear_graph(bias=False)
    assert fuse_linear_bias_for_onnxruntime(model) == 0
    assert not any(o.domain == "com.microsoft" for o in model.opset_import)


def test_scalar_mul_after_quantized_matmul_folds_into_the_scale(tmp_path):
    """(DQ(q) @ DQ(k)^T) * c, Hugging Face BERT's score scaling: c moves into q's scale."""
    inits = {"sq": np.array(0.03, np.float32), "zq": np.array(128, np.uint8), "sk": np.array(0.02, np.float32),
             "zk": np.array(131, np.uint8), "c": np.array(0.125, np.float32)}
    nodes = _qdq("q", "q", "sq", "zq") + _qdq("k", "k", "sk", "zk") + [
        helper.make_node("Transpose", ["k_dq"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q_dq", "kt"], ["scores"]), helper.make_node("Mul", ["scores", "c"], ["y"])]
    spec = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 7, 8]) for n in ("q", "k")]
    model = _model(nodes, spec, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    feeds = {n: RNG.standard_normal((2, 7, 8)).astype(np.float32) for n in ("q", "k")}
    (ref,), before = _run(model, tmp_path, "before", feeds)
    assert before["Mul"] == 1
    assert fold_scalar_mul_into_dequantize(model) == 1
    (got,), after = _run(model, tmp_path, "after", feeds)
    assert after.get("Mul", 0) == 0
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_scalar_mul_is_kept_when_the_matmul_output_has_another_reader():
    inits = {"s": np.array(0.03, np.float32), "z": np.array(128, np.uint8), "c": np.array(0.5, np.float32)}
    nodes = _qdq("a", "a", "s", "z") + [helper.make_node("MatMul", ["a_dq", "a_dq"], ["m"]),
                                        helper.make_node("Mul", ["m", "c"], ["y"])]
    spec = [helper.make_tensor_value_info("a", TensorProto.FLOAT, [4, 4])]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "m")]
    assert fold_scalar_mul_into_dequantize(_model(nodes, spec, outs, inits)) == 0


def _qkv_graph(perm, shape=(0, 6, 3, 2, 4)):
    """qkv [batch, 6, 3*2*4] -> Reshape [batch, 6, 3, 2, 4] -> Transpose(perm) -> Split(axis 0) -> Squeeze
    -> QDQ with three different grids (timm Attention's q, k, v)."""
    inits = {"shape": np.array(shape, np.int64), "sizes": np.ones(3, np.int64),
             "axes": np.array([0], np.int64)}
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("Transpose", ["r"], ["t"], perm=perm),
             helper.make_node("Split", ["t", "sizes"], ["s0", "s1", "s2"], axis=0)]
    outputs = []
    for i, (scale, zero_point) in enumerate([(0.02, 128), (0.05, 100), (0.013, 140)]):
        inits[f"sc{i}"], inits[f"zp{i}"] = np.array(scale, np.float32), np.array(zero_point, np.uint8)
        nodes += [helper.make_node("Squeeze", [f"s{i}", "axes"], [f"sq{i}"])] + _qdq(f"o{i}", f"sq{i}", f"sc{i}", f"zp{i}")
        outputs.append(helper.make_tensor_value_info(f"o{i}_dq", TensorProto.FLOAT, None))
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6, 24])], outputs, inits)


@pytest.mark.parametrize("perm, shape, crosses_transpose", [([2, 0, 3, 1, 4], (0, 6, 3, 2, 4), True),
                                                            ([4, 0, 1, 2, 3], (0, 6, 2, 4, 3), False)])
def test_one_per_axis_quantize_before_split_gives_the_same_integers(tmp_path, perm, shape, crosses_transpose):
    """timm's perm puts the q/k/v axis (2) first: the Q moves above the Transpose too. A perm that
    brings the last axis to the split axis keeps the Transpose in float (ORT's per-axis Q over a
    last axis is slow) and quantizes between Transpose and Split."""
    model = _qkv_graph(perm, shape)
    x = (RNG.standard_normal((3, 6, 24)) * 3).astype(np.float32)
    before, _ = _run(model, tmp_path, "before", {"x": x})
    assert quantize_before_split(model) == 1
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") == 1
    quantize = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    assert (ops.index("QuantizeLinear") < ops.index("Transpose")) == crosses_transpose
    assert {a.name: a.i for a in quantize.attribute}["axis"] == (2 if crosses_transpose else 0)
    after, _ = _run(model, tmp_path, "after", {"x": x})
    for got, ref in zip(after, before):
        np.testing.assert_array_equal(got, ref)  # same integers, same dequantization


def test_split_with_one_float_reader_is_left_alone():
    model = _qkv_graph([2, 0, 3, 1, 4])
    squeeze = next(n for n in model.graph.node if n.op_type == "Squeeze" and n.output[0] == "sq2")
    model.graph.node.remove(next(n for n in model.graph.node if n.input and n.input[0] == "sq2"))
    model.graph.output.append(helper.make_tensor_value_info(squeeze.output[0], TensorProto.FLOAT, None))
    assert quantize_before_split(model) == 0


def _stem_graph(weight_dtype=np.int8, weight_zero=0, height=16):
    """RGB stem as exported: Q -> DQ -> Conv 3x3 stride 2 pad 1 (DQ'd integer weight) -> Relu -> Q."""
    weight = RNG.integers(-WEIGHT_CODE, WEIGHT_CODE + 1, (8, 3, 3, 3)) + weight_zero
    inits = {"sx": np.array(0.02, np.float32), "zx": np.array(128, np.uint8), "W": weight.astype(weight_dtype),
             "sw": (RNG.random(8) * 0.01 + 0.001).astype(np.float32), "zw": np.full(8, weight_zero, weight_dtype),
             "b": (RNG.standard_normal(8) * 0.1).astype(np.float32), "so": np.array(0.01, np.float32),
             "zo": np.array(0, np.uint8)}
    nodes = _qdq("x", "x", "sx", "zx") + [
        helper.make_node("DequantizeLinear", ["W", "sw", "zw"], ["W_dq"], axis=0),
        helper.make_node("Conv", ["x_dq", "W_dq", "b"], ["c"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]), helper.make_node("QuantizeLinear", ["r", "so", "zo"], ["y"])]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, height, height])],
                  [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)


@pytest.mark.parametrize("weight_dtype, weight_zero", [(np.int8, 0), (np.uint8, 128)])
def test_space_to_depth_stem_gives_the_same_integers(tmp_path, weight_dtype, weight_zero):
    """The 3x3 stride-2 stem as SpaceToDepth + 2x2 conv: same integer sums, so the uint8 output is
    identical (int8 weights, and the uint8 + 128 storage whose unused taps hold the zero point)."""
    from reparq.deploy.onnx_passes import space_to_depth_stems

    model = _stem_graph(weight_dtype, weight_zero)
    x = (RNG.standard_normal((2, 3, 16, 16)) * 2).astype(np.float32)
    (ref,), before = _run(model, tmp_path, "before", {"x": x})
    assert len(space_to_depth_stems(model)) == 1
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    assert {a.name: list(a.ints) for a in conv.attribute}["kernel_shape"] == [2, 2]
    (got,), after = _run(model, tmp_path, "after", {"x": x})
    assert after["QLinearConv"] == before["QLinearConv"] == 1 and after["SpaceToDepth"] == 1
    np.testing.assert_array_equal(got, ref)


def test_space_to_depth_needs_an_even_input():
    from reparq.deploy.onnx_passes import space_to_depth_stems

    assert space_to_depth_stems(_stem_graph(height=15)) == []


def test_equal_quantizers_of_one_tensor_become_one(tmp_path):
    """q, k, v Linears reading one LayerNorm output through equal grids: one QuantizeLinear, same
    outputs; a different grid on the same tensor stays its own."""
    from reparq.deploy.onnx_passes import merge_duplicate_quantizers

    inits = {"s": np.array(0.05, np.float32), "z": np.array(128, np.uint8), "s_again": np.array(0.05, np.float32),
             "z_again": np.array(128, np.uint8), "s_other": np.array(0.04, np.float32)}
    nodes = (_qdq("a", "x", "s", "z") + _qdq("b", "x", "s_again", "z_again") + _qdq("c", "x", "s_other", "z"))
    outs = [helper.make_tensor_value_info(f"{n}_dq", TensorProto.FLOAT, None) for n in "abc"]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])], outs, inits)
    x = RNG.standard_normal((4, 8)).astype(np.float32) * 4
    before, _ = _run(model, tmp_path, "before", {"x": x})
    assert merge_duplicate_quantizers(model) == 1
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) == 2
    after, _ = _run(model, tmp_path, "after", {"x": x})
    for got, ref in zip(after, before):
        np.testing.assert_array_equal(got, ref)


def _norm_affine_graph(m_values, residual_from_bias: bool = True):
    """x -> LayerNorm -> y; three readers ``Q(y * m_i + a)`` (a consumer-side fold's affines), the
    residual ``(h @ W + b) + y`` (or ``h + y``) and ``Shape(y)``."""
    c = 8
    inits = {"gamma": (RNG.random(c) + 0.5).astype(np.float32), "beta": RNG.standard_normal(c).astype(np.float32),
             "a": RNG.standard_normal(c).astype(np.float32) * 0.3,
             "s": np.array(0.02, np.float32), "z": np.array(128, np.uint8),
             "W": RNG.standard_normal((c, c)).astype(np.float32), "b": RNG.standard_normal(c).astype(np.float32)}
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-5),
             helper.make_node("Shape", ["y"], ["shape"])]
    outs = [helper.make_tensor_value_info("shape", TensorProto.INT64, None)]
    for i, m in enumerate(m_values):
        inits[f"m{i}"] = m
        nodes += [helper.make_node("Mul", ["y", f"m{i}"], [f"ym{i}"]), helper.make_node("Add", [f"ym{i}", "a"], [f"ya{i}"])]
        nodes += _qdq(f"c{i}", f"ya{i}", "s", "z")
        outs.append(helper.make_tensor_value_info(f"c{i}_dq", TensorProto.FLOAT, None))
    if residual_from_bias:
        nodes += [helper.make_node("MatMul", ["h", "W"], ["hw"]), helper.make_node("Add", ["hw", "b"], ["dense"]),
                  helper.make_node("Add", ["dense", "y"], ["res"])]
    else:
        nodes.append(helper.make_node("Add", ["h", "y"], ["res"]))
    outs.append(helper.make_tensor_value_info("res", TensorProto.FLOAT, None))
    shape = [4, 6, c]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("x", "h")]
    feeds = {n: (RNG.standard_normal(shape) * 3).astype(np.float32) for n in ("x", "h")}
    return _model(nodes, inputs, outs, inits), feeds


@pytest.mark.parametrize("residual_from_bias", [True, False])
def test_norm_absorbs_its_readers_equal_input_affines(tmp_path, residual_from_bias):
    """The norm computes ``y * m + a`` itself: the three Mul + Add pairs are gone, one quantizer is
    left, the residual gets the plain values back through one Mul (its offset in the dense bias,
    or in one Add where the residual has no bias to take it). Same values to float rounding."""
    from reparq.deploy.onnx_passes import absorb_input_affines_into_norms, merge_duplicate_quantizers

    m = (RNG.random(8) * 3 + 0.2).astype(np.float32)
    model, feeds = _norm_affine_graph([m, m.copy(), m.copy()], residual_from_bias)
    before, _ = _run(model, tmp_path, "before", feeds)
    assert absorb_input_affines_into_norms(model) == 1
    assert merge_duplicate_quantizers(model) == 2
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Mul") == 1 and ops.count("QuantizeLinear") == 1
    # The offset went into the dense bias (Adds: bias, residual) or into an Add of its own (restore, residual).
    assert ops.count("Add") == 2
    assert any(n.name.endswith("restore_add") for n in model.graph.node) == (not residual_from_bias)
    after, counts = _run(model, tmp_path, "after", feeds)
    np.testing.assert_array_equal(after[0], before[0])  # the Shape reader
    step = 0.02
    for got, ref in zip(after[1:4], before[1:4]):  # the quantized readers: the same codes but at a half-step tie
        assert np.abs(got - ref).max() <= step * 1.001 and np.mean(got != ref) < 0.01
    np.testing.assert_allclose(after[4], before[4], rtol=1e-5, atol=1e-5)


def test_norm_keeps_readers_whose_affines_differ():
    """Two different affines on one norm: the norm can compute only one, so nothing changes."""
    from reparq.deploy.onnx_passes import absorb_input_affines_into_norms

    m = (RNG.random(8) + 0.5).astype(np.float32)
    model, _ = _norm_affine_graph([m, m * 2])
    nodes = [n.op_type for n in model.graph.node]
    assert absorb_input_affines_into_norms(model) == 0
    assert [n.op_type for n in model.graph.node] == nodes
