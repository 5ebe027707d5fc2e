"""The real architectures users deploy (timm RepVGG, MobileOne, DeiT, Swin; a BERT encoder) export to
ONNX graphs whose optimized form runs every quantized Conv and MatMul on integers.

Random weights and a few synthetic samples: which kernels ORT picks depends on the graph, not on
trained weights. Kept small (fewer blocks, smaller inputs) so the file runs in seconds; the
ImageNet-size speed is measured by benchmarks/latency_real.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
timm = pytest.importorskip("timm")

import reparq  # noqa: E402
from reparq.deploy import ort_runner  # noqa: E402
from reparq.deploy.onnx_export import runs_in_float  # noqa: E402
from reparq.nn.attention import matmul_quantizers  # noqa: E402
from reparq.nn.qmodules import QConv2d, QLinear, quantized_layers  # noqa: E402

# The ORT int8 graph against the PyTorch fake-quant model: the requantized conv outputs and ORT's
# integer rounding differ from it by a few output grid steps, no more.
MIN_COSINE = 0.999
MAX_REL_DIFF = 0.05
INT8_MATMULS = ("MatMulIntegerToFloat", "QLinearMatMul", "QGemm")

# name: (timm kwargs, input size, convs left in float: patch embeddings, which have no ReLU to requantize)
TIMM_CASES = {
    "repvgg_a0": ({}, 64, 0),
    "mobileone_s0": ({}, 64, 0),
    "deit_tiny_patch16_224": ({"depth": 2, "img_size": 64}, 64, 1),
    "swin_tiny_patch4_window7_224": ({"depths": (2, 2, 2, 2)}, 224, 1),
}


def _expected_int8(qmodel: nn.Module) -> tuple[int, int]:
    """(convs, matmuls) that should run on integers: every quantized conv that is not a float stem,
    every quantized Linear, and both matmuls of every quantized attention."""
    layers = [layer for _, layer in quantized_layers(qmodel)]
    convs = sum(isinstance(layer, QConv2d) and not runs_in_float(layer) for layer in layers)
    matmuls = sum(isinstance(layer, QLinear) for layer in layers) + 2 * len(matmul_quantizers(qmodel))
    return convs, matmuls


def _assert_close(got, ref) -> None:
    got, ref = torch.from_numpy(got).flatten(1), torch.from_numpy(ref).flatten(1)
    cosine = torch.nn.functional.cosine_similarity(got, ref, dim=1)
    assert float(cosine.min()) >= MIN_COSINE
    assert float((got - ref).abs().max()) <= MAX_REL_DIFF * float(ref.abs().max())


def _assert_all_int8(path, qmodel: nn.Module, float_convs: int = 0) -> None:
    counts = ort_runner.optimized_op_counts(path)
    convs, matmuls = _expected_int8(qmodel)
    assert convs + matmuls > 0
    assert counts.get("QLinearConv", 0) == convs - float_convs
    assert sum(counts.get(op, 0) for op in INT8_MATMULS) == matmuls
    # No MatMul or Gemm left in float; Convs only those expected.
    assert ort_runner.float_kernels(counts) == ({"Conv": float_convs} if float_convs else {})


@pytest.mark.parametrize("name", list(TIMM_CASES))
def test_timm_architecture_exports_every_layer_to_int8(tmp_path, name):
    kwargs, size, float_convs = TIMM_CASES[name]
    torch.manual_seed(0)
    net = timm.create_model(name, pretrained=False, **kwargs).eval()
    gen = torch.Generator().manual_seed(1)
    qmodel = reparq.quantize(net, torch.randn(8, 3, size, size, generator=gen), recipe="minmax", batch_size=4)
    path = reparq.export_onnx(qmodel, tmp_path / f"{name}.onnx", torch.zeros(1, 3, size, size))
    _assert_all_int8(path, qmodel, float_convs)
    # The RGB 3x3 stride-2 stems run as SpaceToDepth + a 2x2 int8 conv; patch embeddings are left alone.
    import onnx

    stems = sum(n.op_type == "SpaceToDepth" for n in onnx.load(str(path)).graph.node)
    assert stems == (1 if name in ("repvgg_a0", "mobileone_s0") else 0)
    x = torch.randn(4, 3, size, size, generator=gen)
    got = ort_runner.run(ort_runner.make_session(path), x)
    _assert_close(got, ort_runner.torch_outputs(qmodel, x))


class _Encoder(nn.Module):
    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _bert_export(tmp_path, **export_kwargs):
    """A 2-layer random BERT quantized with minmax and exported: (path, quantized BERT, encoder,
    held-out ids, mask)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=64, attn_implementation="eager")
    bert = transformers.BertModel(config, add_pooling_layer=False).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 500, (12, 32), generator=gen)
    mask = torch.ones_like(ids)
    qbert = reparq.quantize(bert, {"input_ids": ids[:8], "attention_mask": mask[:8]}, recipe="minmax", batch_size=4)
    encoder = _Encoder(qbert).eval()
    path = reparq.export_onnx(encoder, tmp_path / "bert.onnx", (ids[:1], mask[:1]),
                              input_names=["input_ids", "attention_mask"], output_names=["hidden"],
                              dynamic_axes={"input_ids": {0: "batch"}, "attention_mask": {0: "batch"},
                                            "hidden": {0: "batch"}}, **export_kwargs)
    return path, qbert, encoder, ids[8:], mask[8:]


def _assert_bert_close(path, encoder, ids, mask) -> None:
    got = ort_runner.make_session(path).run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        ref = encoder(ids, mask).numpy()
    _assert_close(got, ref)


def test_bert_encoder_exports_every_matmul_to_int8(tmp_path):
    path, qbert, encoder, ids, mask = _bert_export(tmp_path)
    _assert_all_int8(path, qbert)
    _assert_bert_close(path, encoder, ids, mask)


def _biased_linears(qmodel: nn.Module) -> int:
    return sum(isinstance(layer, QLinear) and layer.bias is not None for _, layer in quantized_layers(qmodel))


def _bias_fused(nodes) -> int:
    """MatMulIntegerToFloat kernels in ORT's optimized graph that carry a bias (their 7th input)."""
    return sum(n.op_type == "MatMulIntegerToFloat" and len(n.input) == 7 and bool(n.input[6]) for n in nodes)


def test_vit_onnxruntime_export_fuses_biases_and_splits_qkv_on_integers(tmp_path):
    """runtime="onnxruntime": every Linear's bias inside its MatMulIntegerToFloat (none left as a
    float Add), q/k/v quantized once before the Split, and the same outputs as the fake-quant model."""
    import onnx

    torch.manual_seed(0)
    net = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=2, img_size=64).eval()
    gen = torch.Generator().manual_seed(1)
    qmodel = reparq.quantize(net, torch.randn(8, 3, 64, 64, generator=gen), recipe="minmax", batch_size=4)
    path = reparq.export_onnx(qmodel, tmp_path / "deit.onnx", torch.zeros(1, 3, 64, 64), runtime="onnxruntime")
    _assert_all_int8(path, qmodel, float_convs=1)
    nodes = ort_runner.optimized_nodes(path)
    assert _bias_fused(nodes) == _biased_linears(qmodel) > 0
    exported = onnx.load(str(path)).graph.node
    per_axis = [n for n in exported if n.op_type == "QuantizeLinear" and any(a.name == "axis" for a in n.attribute)]
    assert len(per_axis) == 2  # one per attention block, before its q/k/v Split
    x = torch.randn(4, 3, 64, 64, generator=gen)
    got = ort_runner.run(ort_runner.make_session(path), x)
    _assert_close(got, ort_runner.torch_outputs(qmodel, x))


def test_bert_export_folds_the_score_scale_and_onnxruntime_export_fuses_biases(tmp_path):
    """The 1/sqrt(d) multiply after q @ k^T goes into q's scale (no float Mul over the scores), and
    runtime="onnxruntime" takes every Linear's bias into its integer kernel."""
    path, qbert, encoder, ids, mask = _bert_export(tmp_path, runtime="onnxruntime")
    _assert_all_int8(path, qbert)
    import onnx

    exported = onnx.load(str(path)).graph.node
    made = {out: n for n in exported for out in n.output}
    for layer in range(2):  # query, key and value read one QuantizeLinear of their shared input
        quantizers = set()
        for part in ("query", "key", "value"):
            fused = next(n for n in exported if f"layer.{layer}/attention/self/{part}/MatMul" in n.name)
            quantizers.add(fused.input[0] if fused.op_type == "MatMulIntegerToFloat" else made[fused.input[0]].input[0])
        assert len(quantizers) == 1 and made[quantizers.pop()].op_type == "QuantizeLinear"
    nodes = ort_runner.optimized_nodes(path)
    producers = {out: n for n in nodes for out in n.output}
    after_matmul = [n for n in nodes if n.op_type == "Mul" and any(
        producers.get(i) is not None and producers[i].op_type in INT8_MATMULS for i in n.input)]
    assert after_matmul == []
    assert _bias_fused(nodes) == _biased_linears(qbert) > 0
    _assert_bert_close(path, encoder, ids, mask)
