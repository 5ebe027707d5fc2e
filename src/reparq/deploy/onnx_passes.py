"""Rewrites of the exported QDQ graph so that ONNX Runtime's fusions find the int8 patterns.

ORT turns ``DQ -> Conv -> Q`` into ``QLinearConv`` and ``DQ -> MatMul`` into
``MatMulIntegerToFloat``/``QLinearMatMul`` only for exact node patterns. What the TorchScript
exporter writes from a fake-quant model misses them in three places, each fixed here:

* a conv + ReLU whose output is not quantized again (the last conv before pooling) has no
  output scale: :func:`requantize_unfused_convs` adds one from the range recorded at
  calibration (a deliberate extra rounding, measured by ``reparq export --check``); where it
  cannot (no range, no ReLU), :func:`float_weights_where_unfused` stores its weight in float;
* ``DQ(q) * c @ k^T`` (attention's 1/sqrt(d) on the quantized query): ORT folds the Mul into a
  float ``FusedMatMul``; :func:`fold_scalar_mul_into_dequantize` moves ``c`` into the scale.

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
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
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


def fold_scalar_mul_into_dequantize(proto) -> int:
    """``DequantizeLinear(x, s, z) * c`` -> ``DequantizeLinear(x, s * c, z)`` for a per-tensor ``s``
    and a positive constant scalar ``c``; the same values to float rounding (one product
    reassociated). Only where the DQ feeds nothing else. Returns how many Muls were folded."""
    from onnx import numpy_helper

    graph = proto.graph
    index = _index(graph)
    folded = []
    for mul in [n for n in graph.node if n.op_type == "Mul"]:
        for side in (0, 1):
            dq, c = index.producers.get(mul.input[side]), index.const.get(mul.input[1 - side])
            if dq is None or dq.op_type != "DequantizeLinear" or c is None or c.size != 1 or not float(c) > 0:
                continue
            scale = index.const.get(dq.input[1])
            if scale is None or scale.size != 1 or len(index.consumers.get(dq.output[0], [])) != 1 \
                    or mul.output[0] in index.outputs:
                continue
            name = f"{dq.output[0]}_scale_x{len(folded)}"
            graph.initializer.append(numpy_helper.from_array(
                (scale.astype(np.float32) * np.float32(c.reshape(()))).reshape(scale.shape), name))
            dq.input[1] = name
            dq.output[0] = mul.output[0]  # the DQ now produces what the Mul did (it fed only the Mul)
            folded.append(mul)
            break
    for mul in folded:
        graph.node.remove(mul)
    _drop_unused_initializers(graph)
    return len(folded)
