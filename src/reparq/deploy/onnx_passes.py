"""Rewrites of the exported QDQ graph so that ONNX Runtime's fusions find the int8 patterns.

ORT turns ``DQ -> Conv -> Q`` into ``QLinearConv`` and ``DQ -> MatMul`` into
``MatMulIntegerToFloat``/``QLinearMatMul`` only for exact node patterns. What the TorchScript
exporter writes from a fake-quant model misses them in three places, each fixed here:

* a conv + ReLU whose output is not quantized again (the last conv before pooling) has no
  output scale: :func:`requantize_unfused_convs` adds one from the range recorded at
  calibration (a deliberate extra rounding, measured by ``reparq export --check``); where it
  cannot (no range, no ReLU), :func:`float_weights_where_unfused` stores its weight in float;
* ``DQ(q) * c @ k^T`` or ``(DQ(q) @ DQ(k)^T) * c`` (attention's 1/sqrt(d)): ORT folds the first
  Mul into a float ``FusedMatMul`` and runs the second as a float pass;
  :func:`fold_scalar_mul_into_dequantize` moves ``c`` into the scale.

A consumer-side fold's ``LN(x) * m + a`` in front of each of a post-LN norm's quantized consumers
goes into the norm's affine (:func:`absorb_input_affines_into_norms`), the residual reading the
plain values back through one Mul.

One more, ORT-only (opt-in, the graph then needs ONNX Runtime): the Linear bias taken into
``MatMulIntegerToFloat`` (:func:`fuse_linear_bias_for_onnxruntime`).

Each pass edits the ``onnx.ModelProto`` in place and returns what it changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

WEIGHT_SUFFIX = ".w_int"  # the integer-weight initializer of layer NAME is "NAME.w_int" (ExportConv2d)


@dataclass
class _GraphIndex:
    const: dict[str, np.ndarray]
    producers: dict[str, Any]
    consumers: dict[str, list] = field(default_factory=dict)
    outputs: set[str] = field(default_factory=set)


def _index(graph) -> _GraphIndex:
    from onnx import numpy_helper

    const = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    const.update({node.output[0]: numpy_helper.to_array(node.attribute[0].t) for node in graph.node
                  if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value"})
    for node in graph.node:  # the exporter shares equal initializers through Identity nodes
        if node.op_type == "Identity" and node.input[0] in const:
            const[node.output[0]] = const[node.input[0]]
    index = _GraphIndex(const, {out: node for node in graph.node for out in node.output},
                        outputs={o.name for o in graph.output})
    for node in graph.node:
        for name in node.input:
            index.consumers.setdefault(name, []).append(node)
    return index


def _attrs(node) -> dict:
    """A node's attributes by name, as Python values (ints, lists of ints, ...)."""
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _drop_unused_initializers(graph) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def _conv_runs_int8(conv, index: _GraphIndex) -> bool:
    """Mirror of ORT's QDQ Conv fusion condition: the output goes to one QuantizeLinear, directly or
    through one Relu that the Q's zero-point at the type minimum makes redundant."""
    nxt = index.consumers.get(conv.output[0], [])
    if len(nxt) == 1 and nxt[0].op_type == "Relu":
        after = index.consumers.get(nxt[0].output[0], [])
        if len(after) != 1 or after[0].op_type != "QuantizeLinear" or len(after[0].input) < 3:
            return False
        zp = index.const.get(after[0].input[2])
        return zp is not None and zp.size == 1 and int(zp.reshape(-1)[0]) == int(
            np.iinfo(np.uint8 if zp.dtype.kind == "u" else np.int8).min)
    return len(nxt) == 1 and nxt[0].op_type == "QuantizeLinear"


def _weight_dequantize(conv, index: _GraphIndex):
    """The ``DequantizeLinear`` of a conv's constant integer weight, or None."""
    dq = index.producers.get(conv.input[1])
    if dq is None or dq.op_type != "DequantizeLinear" or not all(i in index.const for i in dq.input):
        return None
    return dq


def _output_qparams(lo: float, hi: float) -> tuple[float, int] | None:
    """uint8 scale and zero-point covering [lo, hi] (widened to hold 0, as activation grids do)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if not hi > lo:
        return None
    scale = (hi - lo) / 255.0
    return scale, int(np.clip(round(-lo / scale), 0, 255))


def requantize_unfused_convs(proto, ranges: dict[str, list[float]]) -> list[str]:
    """Give every int8-input conv followed by a ReLU whose output nothing requantizes a ``Q -> DQ``
    after the ReLU, so that ORT runs it as a ``QLinearConv`` with the ReLU folded in.

    ``ranges``: ``{layer name: [min, max]}`` of the conv's fake-quant output on calibration data
    (``reparq_info.extra["output_ranges"]``); the pair quantizes [0, max] on uint8 with zero-point
    0, the whole grid for a one-sided tensor. Only after a ReLU: that is where it matters (the
    wide last conv before pooling in RepVGG and MobileOne) and costs least. A conv without one (a
    ViT's patch embedding, whose output starts the residual stream) stays float with exact values:
    a two-sided 8-bit requantization there moved the tiny test ViT's logits by 1.5% for a conv
    that is ~1% of DeiT-S's compute. Graph outputs are left alone. Returns the layers changed.
    """
    from onnx import helper, numpy_helper

    graph = proto.graph
    index = _index(graph)
    changed = []
    for conv in [n for n in graph.node if n.op_type == "Conv"]:
        dq = _weight_dequantize(conv, index)
        data = index.producers.get(conv.input[0])
        if dq is None or not dq.input[0].endswith(WEIGHT_SUFFIX) or data is None \
                or data.op_type != "DequantizeLinear" or _conv_runs_int8(conv, index):
            continue
        layer = dq.input[0][:-len(WEIGHT_SUFFIX)]
        if layer not in ranges:
            continue
        nxt = index.consumers.get(conv.output[0], [])
        if len(nxt) != 1 or nxt[0].op_type != "Relu":
            continue
        after, target = nxt[0], nxt[0].output[0]
        qparams = _output_qparams(0.0, ranges[layer][1])
        if qparams is None or target in index.outputs:
            continue
        scale, zero_point = qparams
        s_name, z_name = f"{layer}.out_scale", f"{layer}.out_zero_point"
        graph.initializer.append(numpy_helper.from_array(np.array(scale, dtype=np.float32), s_name))
        graph.initializer.append(numpy_helper.from_array(np.array(zero_point, dtype=np.uint8), z_name))
        q_out, dq_out = f"{target}_requant_q", f"{target}_requant"
        for consumer in index.consumers.get(target, []):
            for i, name in enumerate(consumer.input):
                if name == target:
                    consumer.input[i] = dq_out
        position = list(graph.node).index(after) + 1
        graph.node.insert(position, helper.make_node("QuantizeLinear", [target, s_name, z_name], [q_out],
                                                     name=f"/{layer}/requant/QuantizeLinear"))
        graph.node.insert(position + 1, helper.make_node("DequantizeLinear", [q_out, s_name, z_name], [dq_out],
                                                         name=f"/{layer}/requant/DequantizeLinear"))
        changed.append(layer)
    return changed


def float_weights_where_unfused(proto) -> list[str]:
    """Store the on-grid weights of convs whose output is not requantized as float initializers.

    ORT has no int8 kernel for such a conv (QLinearConv needs an output scale), so it runs in
    float either way; but a ``DequantizeLinear`` weight is dequantized again on every run and hides
    the weight from ORT's float layout optimizer (NCHWc), which made the last RepVGG conv ~30%
    slower than in the FP32 model. The values are the floats DequantizeLinear computes
    (``(q - zero_point) * scale`` in float32). Only convs that cannot fuse are changed: for a
    ``DQ -> Conv -> Q`` with a float weight, ORT would quantize the weight again with its own
    (coarser) scales. Returns the names of the convs changed.
    """
    from onnx import numpy_helper

    graph = proto.graph
    index = _index(graph)
    changed, dropped = [], []
    for conv in [n for n in graph.node if n.op_type == "Conv"]:
        dq = _weight_dequantize(conv, index)
        if dq is None or _conv_runs_int8(conv, index):
            continue
        w_int = index.const[dq.input[0]]
        axis = _attrs(dq).get("axis", 1)
        shape = [1] * w_int.ndim
        scale = index.const[dq.input[1]]
        zero_point = index.const[dq.input[2]] if len(dq.input) > 2 else np.zeros(1)
        if scale.size > 1:
            shape[axis] = -1
        weight = (w_int.astype(np.float32) - zero_point.astype(np.float32).reshape(shape)) * scale.reshape(shape)
        name = f"{dq.output[0]}_float"
        graph.initializer.append(numpy_helper.from_array(weight.astype(np.float32), name))
        conv.input[1] = name
        changed.append(conv.name)
        if len(index.consumers[dq.output[0]]) == 1:
            dropped.append(dq)
    for dq in dropped:
        graph.node.remove(dq)
    _drop_unused_initializers(graph)
    return changed


def _scalable_dequantize(name: str, index: _GraphIndex):
    """The DequantizeLinear producing ``name`` if its scale is one constant and it feeds one node."""
    dq = index.producers.get(name)
    if dq is None or dq.op_type != "DequantizeLinear" or len(index.consumers.get(name, [])) != 1 \
            or name in index.outputs:
        return None
    scale = index.const.get(dq.input[1])
    return dq if scale is not None and scale.size == 1 else None


def fold_scalar_mul_into_dequantize(proto) -> int:
    """Fold a multiply by a positive constant scalar ``c`` into a per-tensor DequantizeLinear scale:

    * ``DQ(x, s, z) * c`` -> ``DQ(x, s * c, z)`` (attention's 1/sqrt(d) on the quantized query, timm);
    * ``MatMul(DQ(a, s, z), B) * c`` -> ``MatMul(DQ(a, s * c, z), B)`` (the same scale applied to
      the scores, Hugging Face BERT): otherwise ORT runs the product as ``MatMulIntegerToFloat``
      and the Mul as one more float pass over a [batch, heads, seq, seq] tensor, ~6% of
      MiniLM's int8 time, where the FP32 graph folds it into its ``FusedMatMul``.

    The same values to float rounding (one product reassociated). Only where the DQ (and the
    MatMul) feed nothing else. Returns how many Muls were folded."""
    from onnx import numpy_helper

    graph = proto.graph
    index = _index(graph)
    folded = []
    for mul in [n for n in graph.node if n.op_type == "Mul"]:
        for side in (0, 1):
            c = index.const.get(mul.input[1 - side])
            if c is None or c.size != 1 or not float(c.reshape(())) > 0:
                continue
            head, source = None, mul.input[side]
            dq = _scalable_dequantize(source, index)
            if dq is None:
                head = index.producers.get(source)
                if head is None or head.op_type != "MatMul" or len(index.consumers.get(source, [])) != 1 \
                        or source in index.outputs:
                    continue
                dq = next((d for d in (_scalable_dequantize(i, index) for i in head.input) if d is not None), None)
                if dq is None:
                    continue
            scale = index.const[dq.input[1]]
            name = f"{dq.output[0]}_scale_x{len(folded)}"
            graph.initializer.append(numpy_helper.from_array(
                (scale.astype(np.float32) * np.float32(c.reshape(()))).reshape(scale.shape), name))
            dq.input[1] = name
            # The DQ (or the MatMul after it) now produces what the Mul did: it fed only the Mul.
            (dq if head is None else head).output[0] = mul.output[0]
            folded.append(mul)
            break
    for mul in folded:
        graph.node.remove(mul)
    _drop_unused_initializers(graph)
    return len(folded)


ORT_DOMAIN = "com.microsoft"


def fuse_linear_bias_for_onnxruntime(proto) -> int:
    """``MatMul(DQ(x_q), DQ(W_q)) + b`` -> ONNX Runtime's ``MatMulIntegerToFloat(x_q, W_q, ..., b)``.

    ORT's own QDQ fusion turns the MatMul into ``MatMulIntegerToFloat`` but leaves the bias as a
    separate float ``Add``, one more pass over every Linear's output (on DeiT-Ti at batch 32,
    ~7% of the int8 time; the FP32 graph pays it too, but there it is a smaller share). The
    contrib op takes the bias into its output loop. Same values to float rounding (the bias is
    added in the kernel instead of after it). The file then needs ONNX Runtime (the op is in the
    ``com.microsoft`` domain), hence opt-in (``export_onnx(..., runtime="onnxruntime")``).
    Only for a per-tensor activation DQ, a constant integer weight DQ (per tensor or per output
    column) and a constant 1-D bias of the output width. Returns how many Linears were fused.
    """
    from onnx import helper

    graph = proto.graph
    index = _index(graph)
    fused, removed = 0, []
    for matmul in [n for n in graph.node if n.op_type == "MatMul"]:
        act, wdq = (index.producers.get(i) for i in matmul.input)
        after = index.consumers.get(matmul.output[0], [])
        if act is None or wdq is None or act.op_type != "DequantizeLinear" or len(after) != 1                 or after[0].op_type != "Add" or matmul.output[0] in index.outputs:
            continue
        if _weight_dequantize(matmul, index) is None or len(act.input) < 3:
            continue
        a_scale, w_int = index.const.get(act.input[1]), index.const[wdq.input[0]]
        add = after[0]
        axis = _attrs(wdq).get("axis", 1)
        w_scale = index.const[wdq.input[1]]
        k = _constant_bias_input(add, index, w_int.shape[1]) if w_int.ndim == 2 else None
        if a_scale is None or a_scale.size != 1 or k is None or w_int.shape[1] < 2 \
                or (w_scale.size > 1 and axis != 1) or len(wdq.input) < 3:
            continue
        bias_name = add.input[k]
        position = list(graph.node).index(add)
        graph.node.insert(position, helper.make_node(
            "MatMulIntegerToFloat", [act.input[0], wdq.input[0], act.input[1], wdq.input[1], act.input[2],
                                     wdq.input[2], bias_name], [add.output[0]],
            name=f"{matmul.name}/MatMulIntegerToFloat", domain=ORT_DOMAIN))
        removed += [matmul, add]
        for dq in (act, wdq):
            if len(index.consumers.get(dq.output[0], [])) == 1:
                removed.append(dq)
        fused += 1
    for node in removed:
        graph.node.remove(node)
    if fused and not any(o.domain == ORT_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(ORT_DOMAIN, 1))
    _drop_unused_initializers(graph)
    return fused


def _per_tensor_quantize(node, index: _GraphIndex) -> tuple[np.ndarray, np.ndarray] | None:
    """``(scale, zero_point)`` of a QuantizeLinear with one constant scale and zero-point, or None."""
    if node.op_type != "QuantizeLinear" or len(node.input) < 3:
        return None
    scale, zero_point = index.const.get(node.input[1]), index.const.get(node.input[2])
    if scale is None or zero_point is None or scale.size != 1 or zero_point.size != 1:
        return None
    return scale, zero_point


def quantize_before_split(proto) -> int:
    """``Split -> [Squeeze] -> QuantizeLinear`` on every output -> one per-axis ``QuantizeLinear``
    before the Split (and before a Transpose feeding it), so the data movement runs on 8-bit codes.

    Attention's fused ``qkv`` projection is split into q, k and v, each with its own input
    quantizer; ORT cannot move three different Q nodes above the Split, so the [3, B, H, N, d]
    tensor was transposed and split in float (on DeiT-Ti at batch 32 the float Split alone was ~5%
    of the int8 time) and then quantized three times. One ``QuantizeLinear`` with ``axis`` on the
    split axis and the three scales gives the same integers (each slice sees its own scale and
    zero-point). The Transpose is crossed only when the split axis does not land on the last axis
    before it: ORT's per-axis QuantizeLinear over a last axis is ~50x slower than per tensor.
    Returns how many Splits were rewritten.
    """
    from onnx import helper, numpy_helper

    graph = proto.graph
    index = _index(graph)
    done = 0
    for split in [n for n in graph.node if n.op_type == "Split"]:
        axis = _attrs(split).get("axis", 0)
        sizes = index.const.get(split.input[1]) if len(split.input) > 1 and split.input[1] else None
        if sizes is None or len(sizes) != len(split.output):
            continue
        chain = []  # per output: (squeeze or None, quantize)
        for out in split.output:
            nxt = index.consumers.get(out, [])
            if len(nxt) != 1 or out in index.outputs:
                break
            squeeze = None
            if nxt[0].op_type == "Squeeze":
                squeeze, nxt = nxt[0], index.consumers.get(nxt[0].output[0], [])
                if len(nxt) != 1 or squeeze.output[0] in index.outputs:
                    break
            if _per_tensor_quantize(nxt[0], index) is None:
                break
            chain.append((squeeze, nxt[0]))
        if len(chain) != len(split.output):
            continue
        params = [_per_tensor_quantize(q, index) for _, q in chain]
        if len({p[1].dtype for p in params}) != 1:
            continue
        scales = np.concatenate([np.full(int(n), p[0].reshape(()), np.float32) for n, p in zip(sizes, params)])
        zeros = np.concatenate([np.full(int(n), p[1].reshape(()), p[1].dtype) for n, p in zip(sizes, params)])
        source, q_axis, before = split.input[0], axis, split
        transpose = index.producers.get(source)
        if transpose is not None and transpose.op_type == "Transpose" and len(index.consumers.get(source, [])) == 1:
            perm = _attrs(transpose).get("perm")
            if perm is not None and axis >= 0 and perm[axis] != len(perm) - 1:
                source, q_axis, before = transpose.input[0], perm[axis], transpose
        name = f"{split.name}/quantized"
        s_name, z_name = f"{name}/scale", f"{name}/zero_point"
        graph.initializer.append(numpy_helper.from_array(scales, s_name))
        graph.initializer.append(numpy_helper.from_array(zeros, z_name))
        q_out = f"{source}_quantized"
        before.input[0] = q_out
        graph.node.insert(list(graph.node).index(before), helper.make_node(
            "QuantizeLinear", [source, s_name, z_name], [q_out], name=f"{name}/QuantizeLinear", axis=q_axis))
        for i, (squeeze, quantize) in enumerate(chain):
            (squeeze.output if squeeze is not None else split.output)[0 if squeeze is not None else i] = \
                quantize.output[0]
            graph.node.remove(quantize)
        done += 1
    _drop_unused_initializers(graph)
    return done


def space_to_depth_stems(proto, max_channels: int = 4) -> list[str]:
    """A 3x3 stride-2 int8 conv on few input channels (an RGB stem) -> ``SpaceToDepth(2)`` on its
    uint8 input and a 2x2 stride-1 conv over the 4x as many channels.

    Same products, same int32 sums, same requantization, so the same integers out (tests): tap
    (ky, kx) of the 3x3 kernel reads pixel (2i + ky - 1, 2j + kx - 1), which is offset
    (dy, dx) = ((ky + 1) % 2, (kx + 1) % 2) of 2x2 block (i - 1 + (ky + 1) // 2, ...), so the
    new kernel holds each old tap once (and zeros at the 7 positions of 16 that no tap reaches:
    more products, all in the GEMM). Why: ORT's int8 conv gathers an im2col row of 27 bytes from 9
    places for a 3-channel input; on MobileOne-S0 at 224x224, batch 32, the stem took ~27% of the
    int8 graph's time, as long as its float conv. The gather gets 4x longer runs and the
    reduction 48 instead of 27. Only where the input's height and width are even (the stride-2
    conv then never reads its bottom/right padding) and the conv runs int8. Returns the convs
    changed.
    """
    from onnx import helper, numpy_helper, shape_inference

    graph = proto.graph
    index = _index(graph)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in [*shape_inference.infer_shapes(proto).graph.value_info, *graph.input]}
    changed = []
    for conv in [n for n in graph.node if n.op_type == "Conv"]:
        attrs = _attrs(conv)
        wdq, data = _weight_dequantize(conv, index), index.producers.get(conv.input[0])
        if wdq is None or data is None or data.op_type != "DequantizeLinear" or not _conv_runs_int8(conv, index):
            continue
        w_int = index.const[wdq.input[0]]
        shape = shapes.get(conv.input[0]) or shapes.get(data.input[0])
        if w_int.ndim != 4 or w_int.shape[1] > max_channels or w_int.shape[2:] != (3, 3) \
                or list(attrs.get("strides", [1, 1])) != [2, 2] or list(attrs.get("pads", [0] * 4)) != [1] * 4 \
                or attrs.get("group", 1) != 1 or list(attrs.get("dilations", [1, 1])) != [1, 1] \
                or shape is None or len(shape) != 4 or any(d is None or d % 2 for d in shape[2:]):
            continue
        out_c, in_c = w_int.shape[:2]
        zero = np.asarray(index.const[wdq.input[2]]).reshape(-1)  # the weight's zero point (0 or 128) pads
        w_new = np.empty((out_c, 4 * in_c, 2, 2), w_int.dtype)
        w_new[...] = zero.reshape(-1, 1, 1, 1).astype(w_int.dtype) if zero.size > 1 else zero[0].astype(w_int.dtype)
        for ky in range(3):
            for kx in range(3):
                dy, dx = (ky + 1) % 2, (kx + 1) % 2
                block = (dy * 2 + dx) * in_c  # SpaceToDepth's channel order: (dy, dx, c)
                w_new[:, block:block + in_c, (ky + 1) // 2, (kx + 1) // 2] = w_int[:, :, ky, kx]
        name = conv.name or conv.output[0]
        w_name, s2d_out, dq_out = f"{wdq.input[0]}_s2d", f"{data.input[0]}_s2d", f"{data.output[0]}_s2d"
        graph.initializer.append(numpy_helper.from_array(w_new, w_name))
        wdq.input[0] = w_name
        position = list(graph.node).index(conv)
        graph.node.insert(position, helper.make_node("SpaceToDepth", [data.input[0]], [s2d_out], blocksize=2,
                                                     name=f"{name}/SpaceToDepth"))
        graph.node.insert(position + 1, helper.make_node("DequantizeLinear", [s2d_out, *data.input[1:]], [dq_out],
                                                         name=f"{name}/s2d/DequantizeLinear"))
        conv.input[0] = dq_out
        for key in ("kernel_shape", "strides", "pads"):
            for a in [a for a in conv.attribute if a.name == key]:
                conv.attribute.remove(a)
        conv.attribute.extend([helper.make_attribute("kernel_shape", [2, 2]), helper.make_attribute("strides", [1, 1]),
                               helper.make_attribute("pads", [1, 1, 0, 0])])
        if not index.consumers.get(data.output[0], [])[1:]:  # the old DQ fed only this conv
            graph.node.remove(data)
        changed.append(name)
    _drop_unused_initializers(graph)
    return changed


def merge_duplicate_quantizers(proto) -> int:
    """One ``QuantizeLinear`` where several quantize the same tensor with equal scale and zero point.

    Hugging Face BERT's query, key and value Linears read the same LayerNorm output, each through
    its own input quantizer; calibrated on the same tensor, their grids are equal, but ORT runs
    every QuantizeLinear (its common-subexpression pass does not compare constant values): three
    passes over the hidden states per layer where one gives the same integers. Returns how many
    were removed.
    """
    graph = proto.graph
    index = _index(graph)
    kept: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    removed = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or len(node.input) < 3 or node.output[0] in index.outputs:
            continue
        scale, zero_point = index.const.get(node.input[1]), index.const.get(node.input[2])
        if scale is None or zero_point is None:
            continue
        axis = _attrs(node).get("axis", 1)
        key = (node.input[0], scale.dtype.str, scale.shape, scale.tobytes(), zero_point.dtype.str, zero_point.tobytes(),
               axis if scale.size > 1 else None)
        if key in kept:
            rename[node.output[0]] = kept[key]
            removed.append(node)
        else:
            kept[key] = node.output[0]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    for node in removed:
        graph.node.remove(node)
    _drop_unused_initializers(graph)
    return len(removed)


def _input_affine_chain(mul, index: _GraphIndex, source: str):
    """``(mul, add, m, a)`` where ``mul`` starts ``source * m + a`` whose result only
    QuantizeLinear nodes read (a consumer-side fold's input affine, ``InputAffine``), else None."""
    if mul.op_type != "Mul" or len(mul.input) != 2:
        return None
    m = index.const.get(mul.input[1] if mul.input[0] == source else mul.input[0])
    after = index.consumers.get(mul.output[0], [])
    if m is None or m.ndim != 1 or len(after) != 1 or after[0].op_type != "Add" or mul.output[0] in index.outputs:
        return None
    add = after[0]
    a = index.const.get(add.input[1] if add.input[0] == mul.output[0] else add.input[0])
    readers = index.consumers.get(add.output[0], [])
    if a is None or a.shape != m.shape or not readers or add.output[0] in index.outputs \
            or any(r.op_type != "QuantizeLinear" for r in readers):
        return None
    return mul, add, m, a


def _constant_bias_input(add, index: _GraphIndex, width: int) -> int | None:
    """The position of ``add``'s constant 1-D input of ``width`` (a Linear's bias), or None."""
    for k, inp in enumerate(add.input):
        bias = index.const.get(inp)
        if bias is not None and bias.ndim == 1 and bias.shape[0] == width:
            return k
    return None


def _bias_add(name: str, index: _GraphIndex, width: int):
    """The ``Add`` of a constant 1-D bias of ``width`` that produces ``name`` and feeds nothing
    else, with the bias input's position, or None."""
    node = index.producers.get(name)
    if node is None or node.op_type != "Add" or len(index.consumers.get(name, [])) != 1 or name in index.outputs:
        return None
    k = _constant_bias_input(node, index, width)
    return None if k is None else (node, k)


def absorb_input_affines_into_norms(proto) -> int:
    """A LayerNorm's output read through per-channel ``* m + a`` affines: the norm computes the
    affine's result instead, and its other readers get the plain output back through one ``Mul``.

    A post-LN model's consumer-side fold (BERT: the norm's output is also the residual) leaves
    ``LN(x) * m + a`` in front of every quantized consumer: for query, key and value the same
    affine three times, each a float pass over the hidden states, where ORT fuses nothing.
    With ``gamma' = gamma m`` and ``beta' = beta m + a`` the norm writes the affine's output
    itself; the residual reads ``LN'(x) / m - a / m``, whose constant goes into the bias of the
    Linear it is added to (the sublayer output ``dense(h) + residual``), leaving one Mul. The
    quantizers then read one tensor, so :func:`merge_duplicate_quantizers` keeps one of them.
    Same values to float rounding (a code can flip where an input lands within rounding of a
    half step). Only where every affine on the norm's output is equal, nonzero, and read only by
    QuantizeLinear. Returns how many norms absorbed one."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    index = _index(graph)
    absorbed = 0
    for norm in [n for n in graph.node if n.op_type == "LayerNormalization"]:
        out = norm.output[0]
        if len(norm.input) < 3 or any(index.consumers.get(o) for o in norm.output[1:]) or out in index.outputs:
            continue
        gamma, beta = index.const.get(norm.input[1]), index.const.get(norm.input[2])
        readers = index.consumers.get(out, [])
        chains = [c for c in (_input_affine_chain(r, index, out) for r in readers) if c is not None]
        if gamma is None or beta is None or not chains or gamma.ndim != 1:
            continue
        m, a = chains[0][2], chains[0][3]
        if m.shape != gamma.shape or not all(np.array_equal(c[2], m) and np.array_equal(c[3], a) for c in chains) \
                or not np.all(np.isfinite(m)) or np.any(m == 0) or not np.all(np.isfinite(a)):
            continue
        in_chain = {id(n) for c in chains for n in c[:2]}
        # A Shape reads the same shape either way; every other reader needs the plain values back.
        restore = [r for r in readers if id(r) not in in_chain and r.op_type != "Shape"]
        m64, a64 = m.astype(np.float64), a.astype(np.float64)
        offset = (-a64 / m64).astype(np.float32)
        # Every reader that needs the plain values must take the offset into a bias, or keep an Add.
        folds = []
        for reader in restore:
            other = next((i for i in reader.input if i != out), None) if reader.op_type == "Add" else None
            found = _bias_add(other, index, m.shape[0]) if other is not None else None
            folds.append(found)
        name = norm.name or out
        gamma_name, beta_name = f"{name}/absorbed_gamma", f"{name}/absorbed_beta"
        graph.initializer.extend([
            numpy_helper.from_array((gamma.astype(np.float64) * m64).astype(np.float32), gamma_name),
            numpy_helper.from_array((beta.astype(np.float64) * m64 + a64).astype(np.float32), beta_name)])
        norm.input[1], norm.input[2] = gamma_name, beta_name
        for mul, add, _, _ in chains:
            for r in index.consumers[add.output[0]]:
                r.input[list(r.input).index(add.output[0])] = out
            graph.node.remove(mul)
            graph.node.remove(add)
        if restore:
            position = list(graph.node).index(norm) + 1
            inv_name, plain = f"{name}/restore_scale", f"{name}/restored"
            graph.initializer.append(numpy_helper.from_array((1.0 / m64).astype(np.float32), inv_name))
            new = [helper.make_node("Mul", [out, inv_name], [plain], name=f"{name}/restore_mul")]
            if any(f is None for f in folds):
                off_name, shifted = f"{name}/restore_offset", f"{name}/restored_shifted"
                graph.initializer.append(numpy_helper.from_array(offset, off_name))
                new.append(helper.make_node("Add", [plain, off_name], [shifted], name=f"{name}/restore_add"))
            for node in reversed(new):
                graph.node.insert(position, node)
            for reader, found in zip(restore, folds):
                target = plain if found is not None else new[-1].output[0]
                reader.input[list(reader.input).index(out)] = target
                if found is not None:
                    bias_node, k = found
                    bias = index.const[bias_node.input[k]].astype(np.float64)
                    bias_name = f"{bias_node.name or bias_node.output[0]}/bias_with_restore_offset"
                    graph.initializer.append(numpy_helper.from_array((bias + offset).astype(np.float32), bias_name))
                    bias_node.input[k] = bias_name
        absorbed += 1
    _drop_unused_initializers(graph)
    return absorbed
