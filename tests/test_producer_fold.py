"""The producer fold: a per-channel grid on LLaMA's down_proj input (``act(gate) * up``) and OPT's
fc2 input (``relu(fc1)``) made layer-wise by dividing the producer's output rows, with no op left
at run time (SmoothQuant's migration, exact)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import reparq  # noqa: E402
from reparq.config import QuantConfig  # noqa: E402
from reparq.errors import ReparqError  # noqa: E402
from reparq.model.postnorm import find_producer_groups, fold_into_producer  # noqa: E402
from reparq.nn.qmodules import quantized_layers  # noqa: E402
from reparq.progress import SILENT  # noqa: E402
from reparq.recipes.insert import insert_quantizers  # noqa: E402
from reparq.recipes.reparam import fold_postnorm_pairs, reparam_groups  # noqa: E402
from reparq.recipes.repqvit import RepQViTOptions, prepare_transformer  # noqa: E402
from tests.test_hf_adapters import LAYERS, tiny_llama  # noqa: E402
from tests.test_hf_decoders import tiny_opt  # noqa: E402


def _ids(n: int = 24, t: int = 12) -> torch.Tensor:
    return torch.randint(1, 64, (n, t), generator=torch.Generator().manual_seed(0))


def test_groups_per_family():
    """LLaMA: down_proj fed by up_proj; OPT with ReLU: fc2 fed by fc1; OPT with GELU: none (GELU does
    not commute with a per-channel scale)."""
    llama = find_producer_groups(tiny_llama())
    assert [(g.consumers, g.producer) for g in llama] == [
        ((f"model.layers.{i}.mlp.down_proj",), f"model.layers.{i}.mlp.up_proj") for i in range(LAYERS)]
    opt = tiny_opt()
    assert opt.config.activation_function == "relu"
    assert [g.producer for g in find_producer_groups(opt)] == [f"model.decoder.layers.{i}.fc1" for i in range(LAYERS)]
    opt.model.decoder.layers[1].activation_fn = torch.nn.GELU()
    assert [g.producer for g in find_producer_groups(opt)] == ["model.decoder.layers.0.fc1"]


def test_consumer_fold_does_not_take_a_produced_input_twice():
    model = tiny_llama()
    insert_quantizers(model, QuantConfig(w_bits=8, a_bits=8))
    groups = reparam_groups(model, norms=False, consumer_fold=True, producer_fold=True)
    consumers = [c for g in groups for c in g.consumers]
    assert len(consumers) == len(set(consumers)) == 2 * LAYERS  # o_proj (affine) and down_proj (producer)
    assert {g.consumers[0].rsplit(".", 1)[-1] for g in groups if g.producer} == {"down_proj"}


def test_fold_into_producer_needs_one_zero_point():
    producer, consumer = torch.nn.Linear(4, 6), torch.nn.Linear(6, 3)
    with pytest.raises(ReparqError, match="one zero point"):
        fold_into_producer(producer, [consumer], torch.rand(6) + 0.1, torch.tensor([1., 2, 3, 4, 5, 6]), 8)


@pytest.mark.parametrize("build", [tiny_llama, tiny_opt])
def test_model_level_fold_is_exact_and_adds_no_op(build):
    """Every activation quantized, weights in float: the per-channel down_proj / fc2 grids before
    the fold and the layer-wise grids after it give the same logits; the producers' rows changed,
    no input affine was added, and the consumers' grids had one zero point."""
    model = build().double()
    ids = _ids()
    batches = [{"input_ids": b} for b in ids.split(8)]
    cfg = QuantConfig(w_bits=4, a_bits=4, keep_first_last_8bit=False)
    pairs = prepare_transformer(model, batches, cfg, RepQViTOptions(producer_fold=True), seed=0, reporter=SILENT)
    produced = [p for p in pairs if p.producer]
    assert len(produced) == LAYERS
    for p in produced:
        aq = model.get_submodule(p.consumers[0]).input_quantizer
        assert aq.scale.numel() > 1 and aq.zero_point.unique().numel() == 1
    for _, layer in quantized_layers(model):
        layer.weight_quantizer.enabled = False
    rows_before = {p.producer: model.get_submodule(p.producer).weight.clone() for p in produced}
    with torch.no_grad():
        before = model(input_ids=ids).logits
        changed = fold_postnorm_pairs(model, pairs)
        after = model(input_ids=ids).logits
    assert set(rows_before) <= set(changed)
    assert all(not torch.allclose(model.get_submodule(n).weight, w) for n, w in rows_before.items())
    assert not any(m._modules.get("input_affine") is not None for m in model.modules())
    for p in produced:
        aq = model.get_submodule(p.consumers[0]).input_quantizer
        assert aq.scale.numel() == 1 and aq.channel_axis is None
    torch.testing.assert_close(after, before, rtol=1e-9, atol=1e-9)


def test_repquant_folds_into_producers_by_default():
    """The recipe's default: down_proj calibrated per channel and folded into up_proj (the float
    model's function unchanged where quantization is off, which the fold test covers); against
    producer_fold=False the up_proj weights differ and down_proj's grid differs."""
    model = tiny_llama()
    batches = [{"input_ids": b} for b in _ids().split(8)]
    kw = dict(recipe="repquant", w_bits=8, a_bits=8, seed=0, iters=0, clip_iters=0, gptq=False)
    on = reparq.quantize(model, batches, **kw)
    off = reparq.quantize(model, batches, producer_fold=False, **kw)
    up = "model.layers.0.mlp.up_proj"
    assert "model.layers.0.mlp.down_proj" in on.reparq_postnorm_pairs
    assert "model.layers.0.mlp.down_proj" not in off.reparq_postnorm_pairs
    assert not torch.allclose(on.get_submodule(up).weight, off.get_submodule(up).weight)


def test_dry_run_plan_shows_the_producer_fold():
    """repquant's plan marks up_proj's rows and down_proj's per-channel input; repqvit's does not."""
    from reparq.recipes.plan import plan

    cfg = QuantConfig(w_bits=8, a_bits=8)
    points = {p["point"]: p for p in plan(tiny_llama(), cfg, recipe="repquant")["points"]}
    down, up = "model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"
    assert "producer fold" in points[f"{down}.input"]["reparam"]
    assert points[f"{down}.input"]["granularity"] == "per-channel→per-tensor"
    assert "producer fold (out ÷ r1)" in points[f"{up}.weight"]["reparam"]
    plain = {p["point"]: p for p in plan(tiny_llama(), cfg, recipe="repqvit", options=RepQViTOptions())["points"]}
    assert "producer fold" not in plain[f"{down}.input"]["reparam"]
