"""Grouped weight scales (``w_group_size``): one scale per output row and per run of input
columns. The math is checked against per-row quantization of each group done by hand; the
recipes, GPTQ, save/load and the compressed-tensors export carry the groups exactly; what
cannot hold them is refused with the fix named."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import reparq
from reparq.config import QuantConfig
from reparq.errors import ReparqError
from reparq.nn.qmodules import QLinear, quantized_layers
from reparq.quant.gptq import HessianAccumulator, gptq_round
from reparq.quant.ranges import minmax_params
from reparq.quant.uniform import UniformQuantizer


def _weight(out: int = 6, inp: int = 32, seed: int = 0) -> torch.Tensor:
    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))
    w[:, 3] *= 20  # one outlier column: per row, it sets the step for every weight of the row
    return w


def _grouped_quantizer(w: torch.Tensor, group: int, bits: int = 4) -> UniformQuantizer:
    q = UniformQuantizer(bits, symmetric=True, channel_axis=0, group_size=group)
    data, axis = q.estimation_view(w)
    q.set_params(*minmax_params(data, bits, True, axis))
    return q


def test_grouped_fake_quant_is_per_row_quantization_of_each_group():
    w, group = _weight(), 8
    q = _grouped_quantizer(w, group)
    assert q.scale.numel() == 6 * 4
    # by hand: every (row, group) is a channel of its own
    rows = w.reshape(-1, group)
    by_hand = UniformQuantizer(4, symmetric=True, channel_axis=0)
    by_hand.set_params(*minmax_params(rows, 4, True, 0))
    assert torch.equal(q(w), by_hand(rows).reshape(w.shape))
    assert torch.equal(q.to_int(w), by_hand.to_int(rows).reshape(w.shape))
    # the groups without the outlier get their own (finer) step: the error falls
    per_row = UniformQuantizer(4, symmetric=True, channel_axis=0)
    per_row.set_params(*minmax_params(w, 4, True, 0))
    assert (q(w) - w).pow(2).mean() < 0.5 * (per_row(w) - w).pow(2).mean()


def test_group_scales_must_fit_the_weight():
    q = _grouped_quantizer(_weight(), 8)
    with pytest.raises(ReparqError, match="group scales"):
        q(_weight(out=5))
    with pytest.raises(ReparqError, match="divides"):
        q(torch.randn(6, 30))
    with pytest.raises(ReparqError, match="channel_axis=0"):
        UniformQuantizer(4, symmetric=True, channel_axis=None, group_size=8)


@pytest.mark.parametrize("bad", [0, 1, True, 2.5, "32"])
def test_config_rejects_bad_group_sizes(bad):
    with pytest.raises(ReparqError, match="w_group_size"):
        QuantConfig(w_group_size=bad)


def test_config_needs_per_channel_weights_for_groups():
    with pytest.raises(ReparqError, match="w_per_channel"):
        QuantConfig(w_group_size=32, w_per_channel=False)


class _Mlp(nn.Module):
    def __init__(self, width: int = 48) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc1, self.fc2, self.fc3 = nn.Linear(16 * 4, width), nn.Linear(width, width), nn.Linear(width, 10)

    def forward(self, x):
        x = torch.relu(self.conv(x)).flatten(1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _images(n: int = 32) -> torch.Tensor:
    return torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(2))


def test_quantize_groups_linear_layers_and_keeps_convs_per_channel():
    torch.manual_seed(0)
    q = reparq.quantize(_Mlp(), _images(), recipe="minmax", w_bits=4, a_bits=16, w_group_size=16,
                        keep_first_last_8bit=False)
    layers = dict(quantized_layers(q))
    assert layers["conv"].weight_quantizer.group_size is None and layers["conv"].weight_quantizer.scale.numel() == 4
    assert layers["fc2"].weight_quantizer.group_size == 16 and layers["fc2"].weight_quantizer.scale.numel() == 48 * 3
    for name in ("fc1", "fc2", "fc3"):  # every weight on its group's grid
        layer = layers[name]
        s, _ = layer.weight_quantizer.shaped_params(layer.weight)
        k = layer.quantized_weight() / s
        assert torch.allclose(k, k.round(), atol=1e-4) and k.abs().max() <= 8


def test_group_size_that_does_not_divide_a_layer_is_refused():
    with pytest.raises(ReparqError, match="does not divide the 48 input features"):
        reparq.quantize(_Mlp(), _images(), recipe="minmax", w_bits=4, a_bits=16, w_group_size=32)


def _gptq_problem(out: int = 24, inp: int = 64, n: int = 512, group: int = 16):
    g = torch.Generator().manual_seed(3)
    w = _weight(out, inp, seed=3)
    x = torch.randn(n, inp, generator=g) @ torch.randn(inp, inp, generator=g) * 0.3 + torch.randn(inp, generator=g)
    acc = HessianAccumulator(inp)
    acc.add(x)
    q = _grouped_quantizer(w, group)
    return w, x, q, acc.hessian()


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_rounds_onto_the_group_grid_and_beats_nearest(act_order):
    w, x, q, h = _gptq_problem()
    grid, _ = q.shaped_params(w)
    rounded = gptq_round(w, h, grid, q.qmin, q.qmax, act_order=act_order)
    k = rounded / grid
    assert torch.allclose(k, k.round(), atol=1e-5) and k.round().min() >= q.qmin and k.round().max() <= q.qmax
    assert torch.equal(q(rounded), rounded)  # the quantizer reproduces it
    err_gptq = ((rounded - w) @ x.T).pow(2).mean()
    err_nearest = ((q(w) - w) @ x.T).pow(2).mean()
    assert err_gptq < 0.7 * err_nearest


def test_gptq_with_a_flat_grid_equals_the_per_row_path():
    """A grid expanded from one scale per row gives the per-row call's result exactly."""
    w, _, _, h = _gptq_problem()
    s = w.abs().amax(1) / 7
    full = s[:, None].expand_as(w).contiguous()
    assert torch.equal(gptq_round(w, h, full, -8, 7), gptq_round(w, h, s, -8, 7))


# ---------------------------------------------------------------------------------------------
# decoders: save/load and the compressed-tensors export

transformers = pytest.importorskip("transformers")


def _decoder(family: str, tied: bool):
    from tests.test_export_hf import _model

    return _model(family, tied)


def _ids(n: int = 16, t: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (n, t), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("recipe", ["minmax", "repquant"])
def test_grouped_decoder_saves_and_loads_exactly(tmp_path, recipe):
    q = reparq.quantize(_decoder("llama", True), _ids(), recipe=recipe, w_bits=4, a_bits=16, batch_size=8,
                        w_group_size=16, **({"iters": 4} if recipe == "repquant" else {}))
    reparq.save(q, tmp_path / "q")
    meta = json.loads((tmp_path / "q" / "reparq.json").read_text())
    assert meta["layers"]["model.layers.0.mlp.up_proj"]["weight"]["group_size"] == 16
    back = reparq.load(tmp_path / "q", model=_decoder("llama", True))
    assert dict(quantized_layers(back))["model.layers.0.mlp.up_proj"].weight_quantizer.group_size == 16
    ids = _ids(3, 12, seed=5)
    assert torch.equal(_logits(back, ids), _logits(q, ids))


@pytest.mark.parametrize("family,tied", [("llama", True), ("opt", False)])
def test_grouped_w4a16_exports_as_compressed_tensors_group_strategy(tmp_path, family, tied):
    pytest.importorskip("compressed_tensors")
    q = reparq.quantize(_decoder(family, tied), _ids(), recipe="minmax", w_bits=4, a_bits=16, batch_size=8,
                        w_group_size=16)
    out = reparq.export_hf(q, tmp_path / "hf")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    for group in qc["config_groups"].values():
        assert (group["weights"]["strategy"], group["weights"]["group_size"]) == ("group", 16)
    from safetensors import safe_open

    name = "model.layers.1.mlp.up_proj" if family == "llama" else "model.decoder.layers.1.fc1"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert tuple(f.get_tensor(name + ".weight_scale").shape) == (64, 32 // 16)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
    ids = _ids(4, 12, seed=7)
    assert torch.allclose(_logits(hf, ids), _logits(q, ids), atol=1e-5, rtol=0)
    modules = dict(hf.named_modules())  # (decompressed on the first forward)
    for layer_name, layer in quantized_layers(q):  # the dequantized weights are reparq's, bit for bit
        assert torch.equal(modules[layer_name].weight, layer.quantized_weight().detach()), layer_name


def test_grouped_weights_with_quantized_inputs_are_refused_before_writing(tmp_path):
    pytest.importorskip("compressed_tensors")
    q = reparq.quantize(_decoder("opt", False), _ids(), recipe="minmax", w_bits=8, a_bits=8, batch_size=8,
                        w_group_size=16, ignore=("*self_attn",))
    with pytest.raises(ReparqError, match="grouped weight scales .* one weight scale per output channel"):
        reparq.export_hf(q, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_onnx_export_refuses_grouped_weights(tmp_path):
    pytest.importorskip("onnx")
    torch.manual_seed(0)
    q = reparq.quantize(_Mlp(), _images(), recipe="minmax", w_bits=8, a_bits=8, w_group_size=16)
    with pytest.raises(ReparqError, match="grouped weight scales .*--format hf"):
        reparq.export_onnx(q, tmp_path / "m.onnx", example_input=_images(1))


def test_qprep_refuses_grouped_weights():
    from reparq.model.qprep import attach_qprep

    layer = QLinear.from_float(nn.Linear(32, 8), 4, 8, w_group_size=16)
    with pytest.raises(ReparqError, match="per channel"):
        attach_qprep(layer)


def test_streamed_grouped_model_exports_and_loads(tmp_path):
    """``reparq stream`` carries the groups to its shards; the export reads them from there."""
    pytest.importorskip("compressed_tensors")
    from reparq.stream import quantize_streamed
    from tests.test_export_hf import _model

    _model("llama", tied=True, layers=3).save_pretrained(tmp_path / "fp", max_shard_size="20KB")
    quantize_streamed(tmp_path / "fp", _ids(), tmp_path / "q", recipe="repqvit", w_bits=4, a_bits=16, batch_size=8,
                      w_group_size=16)
    ref = reparq.load(tmp_path / "q")
    assert {l.weight_quantizer.group_size for _, l in quantized_layers(ref)} == {16}
    out = reparq.export_hf(tmp_path / "q", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
    ids = _ids(3, 12, seed=5)
    assert torch.allclose(_logits(hf, ids), _logits(ref, ids), atol=1e-5, rtol=0)


def test_cli_group_size_reaches_the_plan(capsys):
    from reparq.cli import main

    rc = main(["quantize", "--model", "zoo:llama_fm", "--recipe", "minmax", "--w-bits", "4", "--a-bits", "16",
               "--w-group-size", "32", "--dry-run", "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert rc == 0
    weights = [p for p in plan["points"] if p["kind"] == "weight"]
    assert weights and all(p["granularity"] == "per-group (32)" for p in weights)
    rc = main(["quantize", "--model", "zoo:llama_fm", "--w-group-size", "1", "--dry-run", "--json"])
    assert rc == 2 and "w_group_size must be an integer >= 2" in capsys.readouterr().err
