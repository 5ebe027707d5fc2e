"""The consumer-side fold: per-channel input ranges turned layer-wise where no upstream op can
take the per-channel division (post-LN BERT norms that also feed the residual, fc2 after the
activation, the attention output projection), through an input affine in front of the consumer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

import reparq  # noqa: E402
from reparq.config import QuantConfig  # noqa: E402
from reparq.model.postnorm import find_consumer_side_groups, fold_at_consumers  # noqa: E402
from reparq.nn.qmodules import QLinear, quantized_layers  # noqa: E402
from reparq.progress import SILENT  # noqa: E402
from reparq.quant.uniform import UniformQuantizer  # noqa: E402
from reparq.recipes.reparam import balanced_channel_params, fold_postnorm_pairs  # noqa: E402
from reparq.recipes.repqvit import RepQViTOptions, prepare_transformer  # noqa: E402
from tests.test_hf_adapters import LAYERS, tiny_bert, tiny_llama, token_batch  # noqa: E402


def _linear(seed: int = 0, bias: bool = True) -> QLinear:
    torch.manual_seed(seed)
    return QLinear.from_float(torch.nn.Linear(12, 5, bias=bias), 4, 4)


def test_groups_per_family():
    """BERT: every norm is also the residual (embeddings + 2 per layer, the last layer's output norm
    feeds no Linear) plus attention output projection and fc2; LLaMA: only o_proj and down_proj."""
    bert = find_consumer_side_groups(tiny_bert())
    assert len(bert) == 4 * LAYERS
    assert sum(1 for g in bert if g.norm) == 2 * LAYERS and not any(g.exclusive for g in bert)
    assert ("", ("encoder.layer.1.output.dense",)) in {(g.norm, g.consumers) for g in bert}
    llama = find_consumer_side_groups(tiny_llama())
    assert {g.consumers[0].rsplit(".", 2)[-2] + "." + g.consumers[0].rsplit(".", 1)[-1] for g in llama} == \
        {"self_attn.o_proj", "mlp.down_proj"}
    assert len(llama) == 2 * LAYERS and all(g.norm == "" for g in llama)


@pytest.mark.parametrize("bias", [True, False])
def test_fold_at_consumers_is_exact_per_element(bias):
    """Per-channel quantizer on the input == layer-wise quantizer after the input affine, weights
    in float, in float64 (same integers, same products)."""
    layer = _linear(bias=bias).double()
    x = torch.randn(64, 12, dtype=torch.float64) * torch.linspace(0.1, 8, 12, dtype=torch.float64) + 3.0
    aq = UniformQuantizer(4, symmetric=False, channel_axis=-1)
    lo, hi = x.min(0).values, x.max(0).values
    scale = (hi - lo) / 15
    aq.set_params(scale, torch.round(-lo / scale))
    layer.input_quantizer = aq
    layer.weight_quantizer.enabled = False
    with torch.no_grad():
        before = layer(x)
        s_t, z_t = fold_at_consumers([layer], aq.scale, aq.zero_point, 4)
        fresh = UniformQuantizer(4, symmetric=False)
        fresh.set_params(s_t, z_t)
        layer.input_quantizer = fresh
        after = layer(x)
    assert layer.input_affine is not None and s_t.numel() == 1
    torch.testing.assert_close(after, before, rtol=1e-10, atol=1e-10)


def test_offset_is_removed_with_the_quantized_weight():
    """The affine's offset enters the product and leaves it through W_q: with the weights on a
    4-bit grid the output is exactly W_q (x * mul) + b, however large the offset."""
    layer = _linear()
    with torch.no_grad():
        layer.weight_quantizer.set_params(layer.weight.abs().amax(1) / 7, torch.zeros(5))
    layer.input_quantizer.enabled = False
    from reparq.nn.qmodules import attach_input_affine

    mul, add = torch.rand(12) + 0.5, torch.randn(12) * 100.0
    attach_input_affine(layer, mul, add)
    x = torch.randn(8, 12)
    with torch.no_grad():
        wq = layer.quantized_weight()
        torch.testing.assert_close(layer(x), F.linear(x * mul, wq, layer.bias), rtol=0, atol=1e-3)
        assert not torch.allclose(wq, layer.weight)  # the weights are really quantized


def test_second_affine_composes():
    from reparq.nn.qmodules import attach_input_affine

    layer = _linear()
    attach_input_affine(layer, torch.full((12,), 2.0), torch.ones(12))
    attach_input_affine(layer, torch.full((12,), 3.0), torch.full((12,), -1.0))
    x = torch.randn(4, 12)
    torch.testing.assert_close(layer.input_affine(x), (x * 2 + 1) * 3 - 1)


def test_balanced_grids_cover_every_channel_and_shrink_the_weight_spread():
    g = torch.Generator().manual_seed(0)
    width = torch.rand(32, generator=g) * 0.5 + 0.05
    width[3] = 40.0  # one outlier channel
    lo, hi = -width * torch.rand(32, generator=g), width
    scale = (hi - lo) / 255
    zp = torch.round(-lo / scale)
    wmax = torch.rand(32, generator=g) + 0.1
    full_scale, _ = balanced_channel_params(scale, zp, wmax, 8, 1.0)
    torch.testing.assert_close(full_scale, scale)  # alpha 1: the plain per-channel grids
    step, centre = balanced_channel_params(scale, zp, wmax, 8, 0.5)
    assert ((0 - centre) * step <= lo + step / 2).all() and ((255 - centre) * step >= hi - step / 2).all()
    # Weight column c is multiplied by a factor proportional to the step: the spread of the scaled
    # columns' maxima shrinks (the outlier's column no longer dominates the row).
    spread = lambda s: ((s * wmax).max() / (s * wmax).median()).item()  # noqa: E731
    assert spread(step) < spread(full_scale) / 3


def _bert_model_output(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


def test_bert_consumer_fold_exact_and_state_round_trips(tmp_path):
    """Whole tiny BERT, float64, weights in float: per-channel before, layer-wise + affines after,
    same output; then a saved and reloaded quantized BERT gives the same output."""
    model = tiny_bert().double()
    batches = [token_batch(4, 12, seed=s, pad=False) for s in range(3)]
    cfg = QuantConfig(w_bits=6, a_bits=6, keep_first_last_8bit=False)
    pairs = prepare_transformer(model, batches, cfg, RepQViTOptions(consumer_fold=True), seed=0, reporter=SILENT)
    assert len(pairs) == 4 * LAYERS  # all consumer-side (BERT has no exclusive norm)
    for _, layer in quantized_layers(model):
        layer.weight_quantizer.enabled = False
    x = token_batch(4, 12, seed=9, pad=False)
    before = _bert_model_output(model, x)
    fold_postnorm_pairs(model, pairs)
    after = _bert_model_output(model, x)
    assert sum(1 for _, l in quantized_layers(model) if l._modules.get("input_affine") is not None) == 6 * LAYERS
    torch.testing.assert_close(after, before, rtol=1e-9, atol=1e-9)

    qmodel = reparq.quantize(tiny_bert(), batches, recipe="repqvit", w_bits=6, a_bits=6, consumer_fold=True,
                             keep_first_last_8bit=False)
    reparq.save(qmodel, tmp_path)
    loaded = reparq.load(tmp_path, model=tiny_bert(seed=5))
    np.testing.assert_array_equal(_bert_model_output(loaded, x).numpy(), _bert_model_output(qmodel, x).numpy())


def test_vit_with_input_affines_exports_to_int8_onnx(tmp_path):
    """The affines export as float Mul/Add in front of the QuantizeLinear; ORT still runs every
    Linear on integers and reproduces the fake-quant model."""
    from reparq.deploy import ort_runner
    from tests.test_onnx_export import EXACT_ATOL, _ort, _tiny_vit, _torch, _vit_images

    qmodel = reparq.quantize(_tiny_vit(), _vit_images(64, 1), recipe="repqvit", consumer_fold=True)
    assert {n.rsplit(".", 1)[-1] for n, l in quantized_layers(qmodel) if l._modules.get("input_affine")} \
        == {"proj", "fc2"}
    path = reparq.export_onnx(qmodel, tmp_path / "vit.onnx", torch.zeros(1, 1, 8, 8), requantize=False)
    x = _vit_images(48, 2)
    assert np.abs(_ort(path, x, optimize=False) - _torch(qmodel, x)).max() <= EXACT_ATOL
    kernels = ort_runner.int8_kernels(ort_runner.optimized_op_counts(path))
    assert kernels.get("MatMulIntegerToFloat", 0) + kernels.get("QLinearMatMul", 0) >= 5


def test_alpha_search_picks_the_least_output_error():
    """One input channel 60x wider than the rest. At 4-bit weights full migration (alpha 1) would
    make its weight column dominate every row's grid, so the search keeps part of the spread on
    the activations; the chosen grids have the smallest proxy error of all candidates."""
    from reparq.recipes.reparam import ALPHAS, _folded_output_error, _search_alpha, channel_params

    g = torch.Generator().manual_seed(0)
    rows = torch.randn(2048, 12, generator=g)
    rows[:, 4] *= 60.0
    errors = {}
    for w_bits in (4, 8):
        torch.manual_seed(0)
        layer = QLinear.from_float(torch.nn.Linear(12, 16), w_bits, 6)
        scale, zp = channel_params(rows, 6, "minmax")
        chosen = _search_alpha(rows, [layer], scale, zp, 6)
        wmax = layer.weight.detach().abs().amax(dim=0)
        candidates = {a: balanced_channel_params(scale, zp, wmax, 6, a) for a in ALPHAS}
        errors[w_bits] = {a: _folded_output_error(rows, [layer], *c, 6) for a, c in candidates.items()}
        best = min(errors[w_bits], key=errors[w_bits].get)
        torch.testing.assert_close(chosen[0], candidates[best][0])
        if w_bits == 4:
            assert best < 1.0 and errors[4][best] < 0.8 * errors[4][1.0]


def test_repquant_auto_defaults_follow_the_norm_placement():
    """repquant's automatic choices: the consumer-side fold and the MSE ranges on post-LN BERT
    only; on pre-norm models (timm ViT, LLaMA) RepQ-ViT's norm fold and percentile search."""
    from reparq.recipes.reparam import is_post_ln, reparam_groups
    from reparq.recipes.repquant import RepQuantOptions
    from reparq.recipes.repqvit import uses_percentile_ranges
    from tests.test_onnx_export import _tiny_vit

    options = RepQuantOptions()
    bert, vit, llama = tiny_bert(), _tiny_vit(), tiny_llama()
    assert is_post_ln(bert) and not is_post_ln(vit) and not is_post_ln(llama)
    assert not uses_percentile_ranges(bert, options) and uses_percentile_ranges(vit, options)
    assert uses_percentile_ranges(bert, RepQViTOptions())  # the baseline keeps RepQ-ViT's search
    from reparq.recipes.insert import insert_quantizers

    for model in (bert, vit, llama):
        insert_quantizers(model, QuantConfig(w_bits=6, a_bits=6, keep_first_last_8bit=False))
    side = lambda m, fold: [p for p in reparam_groups(m, consumer_fold=fold) if not p.folds_into_norm]  # noqa: E731
    assert len(side(bert, options.consumer_fold)) == 4 * LAYERS
    assert side(vit, options.consumer_fold) == [] and side(llama, options.consumer_fold) == []
    assert len(side(vit, True)) == 2  # forced on: attn.proj and fc2 of the one block


def test_repquant_on_post_ln_rounds_by_gptq_and_skips_dual_clipping():
    """The other two post-LN choices (measured on MiniLM, see repquant.gptq_for / clip_iters_for):
    GPTQ weights and no learned clipping on BERT; dual clipping on pre-norm models, which round
    by GPTQ only where the weights have fewer bits than the (above 4-bit) activations."""
    from reparq.recipes.reparam import is_post_ln
    from reparq.recipes.repquant import CLIP_ITERS, RepQuantOptions, clip_iters_for, gptq_for
    from tests.test_onnx_export import _tiny_vit

    options, bert, vit, llama = RepQuantOptions(), tiny_bert(), _tiny_vit(), tiny_llama()
    post_ln = {m: bool(is_post_ln(m)) for m in (bert, vit, llama)}
    assert post_ln == {bert: True, vit: False, llama: False}
    assert all(gptq_for(options, post_ln[bert], w, a) for w, a in ((8, 8), (6, 6), (4, 8)))
    assert not any(gptq_for(options, post_ln[m], w, a) for m in (vit, llama) for w, a in ((8, 8), (6, 6)))
    assert gptq_for(options, post_ln[vit], 4, 8) and gptq_for(options, post_ln[llama], 4, 8)  # weight-dominated error
    assert not any(gptq_for(options, post_ln[m], 4, 4) for m in (bert, vit, llama))  # AdaRound's block loss sees A4
    assert clip_iters_for(options, post_ln[bert]) == 0
    assert clip_iters_for(options, post_ln[vit]) == CLIP_ITERS == clip_iters_for(options, post_ln[llama])
    assert not gptq_for(RepQuantOptions(gptq=False), True, 8, 8) and clip_iters_for(RepQuantOptions(clip_iters=7), True) == 7
    calib = [token_batch(4, 16, seed=s, pad=False) for s in range(2)]
    q = reparq.quantize(bert, calib, recipe="repquant", w_bits=4, a_bits=8, seed=0, iters=3,
                        keep_first_last_8bit=False)
    phases = [s["unit"] for s in q.reparq_recon_stats]
    assert phases and not any(u.endswith(":clip") for u in phases)  # no dual-clipping phase ran
    # GPTQ moved weights off plain nearest rounding of the folded weight, and left them on the grid.
    layer = q.get_submodule("encoder.layer.0.intermediate.dense")
    ints = layer.weight / layer.weight_quantizer.shaped_params(layer.weight)[0]
    assert torch.allclose(ints, ints.round(), atol=1e-4)
    plain = reparq.quantize(bert, calib, recipe="repquant", w_bits=4, a_bits=8, seed=0, iters=3, gptq=False,
                            keep_first_last_8bit=False)
    assert not torch.equal(plain.get_submodule("encoder.layer.0.intermediate.dense").weight, layer.weight)


def test_repquant_drops_activation_quantization_only_on_image_models_above_4_bits(monkeypatch):
    """QDrop's dropping in the weight reconstruction (repquant.drop_prob_for): on models that read
    images, above 4-bit activations only, never in the dual-clipping phase, never on text models;
    and the recipe hands the resolved probability to the engine's weight phase."""
    import reparq.recipes.repquant as repquant_mod
    from reparq.recipes.repquant import DROP_PROB, RepQuantOptions, drop_prob_for, reads_images
    from tests.test_onnx_export import _tiny_vit, _vit_images

    options = RepQuantOptions()
    assert drop_prob_for(options, True, 8) == drop_prob_for(options, True, 6) == DROP_PROB == 0.5
    assert drop_prob_for(options, True, 4) == 0.0 and drop_prob_for(options, False, 8) == 0.0
    assert drop_prob_for(RepQuantOptions(drop_prob=0.25), False, 4) == 0.25
    images, tokens = [torch.randn(4, 3, 32, 32)], [token_batch(4, 16, seed=s, pad=False) for s in range(2)]
    assert reads_images(images) and not reads_images(tokens) and not reads_images([{"input_ids": tokens[0]}])
    seen = []
    real = repquant_mod.reconstruct

    def spy(model, units, batches, cfg, **kwargs):
        seen.append((cfg.round_weights, cfg.drop_prob))
        return real(model, units, batches, cfg, **kwargs)

    monkeypatch.setattr(repquant_mod, "reconstruct", spy)
    vit_calib = _vit_images(8, seed=0)
    for model, calib, bits, weights_drop in ((_tiny_vit(), vit_calib, 6, DROP_PROB), (_tiny_vit(), vit_calib, 4, 0.0),
                                             (tiny_llama(), tokens, 6, 0.0)):
        seen.clear()
        reparq.quantize(model, calib, recipe="repquant", w_bits=bits, a_bits=bits, seed=0, iters=2, clip_iters=2,
                        keep_first_last_8bit=False)
        assert seen == [(False, 0.0), (True, weights_drop)]


def test_post_norm_statistics_in_passes_equal_one_pass(monkeypatch):
    """The rows of all groups need not be held at once: with a budget that forces a pass per few
    groups, every per-channel input grid is bit-identical to the one-pass calibration."""
    import reparq.recipes.reparam as reparam
    from reparq.recipes.insert import insert_quantizers

    batches = [token_batch(4, 12, seed=s, pad=False) for s in range(3)]
    cfg = QuantConfig(w_bits=6, a_bits=6, keep_first_last_8bit=False)
    max_rows = RepQViTOptions().max_rows
    model = tiny_bert()
    insert_quantizers(model, cfg)
    groups = reparam.reparam_groups(model, consumer_fold=True)
    width = {p.key: reparam._consumers(model, p)[0].weight.shape[-1] for p in groups}
    budget = max_rows * 4 * max(width.values())  # the widest group alone fills a pass
    passes = reparam.row_passes(model, groups, max_rows, budget)
    assert 1 < len(passes) < len(groups)
    assert [p.key for chunk in passes for p in chunk] == [p.key for p in groups]  # order kept
    assert all(sum(max_rows * 4 * width[p.key] for p in chunk) <= budget for chunk in passes)

    observe, calls = reparam.observe_norm_outputs, []
    monkeypatch.setattr(reparam, "observe_norm_outputs", lambda *a, **k: calls.append(1) or observe(*a, **k))

    def grids(budget: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        monkeypatch.setattr(reparam, "ROW_BUDGET_BYTES", budget)
        calls.clear()
        model = tiny_bert()
        pairs = prepare_transformer(model, batches, cfg, RepQViTOptions(consumer_fold=True), seed=0, reporter=SILENT)
        consumers = {c for p in pairs for c in p.consumers}
        return {name: (l.input_quantizer.scale.clone(), l.input_quantizer.zero_point.clone())
                for name, l in quantized_layers(model) if name in consumers}

    one = grids(1 << 40)
    assert len(calls) == 1
    several = grids(budget)
    assert len(calls) == len(passes)
    assert one.keys() == several.keys() and len(one) == 6 * LAYERS
    for name in one:
        assert one[name][0].numel() > 1  # per channel
        torch.testing.assert_close(several[name][0], one[name][0], rtol=0, atol=0)
        torch.testing.assert_close(several[name][1], one[name][1], rtol=0, atol=0)


def test_dry_run_plan_lists_dual_clipping_only_where_auto_runs_it():
    """The plan's transforms follow repquant's resolved "auto" clip_iters: none on post-LN BERT,
    dual clipping on pre-norm LLaMA, and on BERT again when asked for explicitly."""
    from reparq.recipes.plan import plan
    from reparq.recipes.repquant import RepQuantOptions

    cfg = QuantConfig(w_bits=6, a_bits=6)
    transforms = lambda m, o: plan(m, cfg, recipe="repquant", options=o)["transforms"]  # noqa: E731
    assert "dual-clip" not in transforms(tiny_bert(), RepQuantOptions())
    assert "dual-clip" in transforms(tiny_llama(), RepQuantOptions())
    assert "dual-clip" in transforms(tiny_bert(), RepQuantOptions(clip_iters=5))


def test_norms_mode_folds_only_norm_outputs():
    """``consumer_fold="norms"``: the post-LN norms' consumers (qkv, fc1), not the attention output
    projection and fc2; anything else is refused by name."""
    from reparq.errors import ReparqError
    from reparq.recipes.reparam import reparam_groups

    batches = [token_batch(4, 12, seed=s, pad=False) for s in range(2)]
    cfg = QuantConfig(w_bits=8, a_bits=8, keep_first_last_8bit=False)
    pairs = prepare_transformer(tiny_bert(), batches, cfg, RepQViTOptions(consumer_fold="norms"), seed=0,
                                reporter=SILENT)
    assert len(pairs) == 2 * LAYERS and all(g.norm for g in pairs)
    with pytest.raises(ReparqError, match="consumer_fold"):
        reparam_groups(tiny_bert(), consumer_fold="inner")
    with pytest.raises(ReparqError, match="consumer_fold"):
        RepQViTOptions(consumer_fold="all")


class _Hidden(torch.nn.Module):
    def __init__(self, bert) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def test_post_ln_affines_are_absorbed_by_the_norms_on_export(tmp_path):
    """A post-LN BERT's consumer-side affines on the norm outputs leave the exported graph: each
    norm computes its quantized readers' input itself and the residual takes the plain values back
    through one Mul; ORT reproduces the fake-quant model as before the rewrite."""
    import onnx

    from reparq.deploy import onnx_export, ort_runner

    batches = [token_batch(4, 12, seed=s, pad=False) for s in range(3)]
    qmodel = reparq.quantize(tiny_bert(), batches, recipe="repqvit", consumer_fold="norms",
                             keep_first_last_8bit=False)
    assert sum(1 for _, l in quantized_layers(qmodel) if l._modules.get("input_affine") is not None) == 4 * LAYERS
    x = token_batch(4, 12, seed=9, pad=False)
    example = (x["input_ids"][:1], x["attention_mask"][:1])
    names = ["input_ids", "attention_mask"]
    dynamic = {n: {0: "batch"} for n in names}
    path = reparq.export_onnx(_Hidden(qmodel), tmp_path / "bert.onnx", example, input_names=names,
                              output_names=["hidden"], dynamic_axes=dynamic)
    graph = onnx.load(str(path)).graph
    producers = {o: n for n in graph.node for o in n.output}
    quantized_norm_reads = [n for n in graph.node if n.op_type == "QuantizeLinear"
                            and producers[n.input[0]].op_type == "LayerNormalization"]
    assert len(quantized_norm_reads) == 2 * LAYERS  # qkv (one quantizer) and fc1 per layer
    assert sum(n.name.endswith("restore_mul") for n in graph.node) == 2 * LAYERS
    assert not any(n.name.endswith("restore_add") for n in graph.node)  # every offset went into a bias
    feeds = {k: v.numpy() for k, v in x.items()}
    got = ort_runner.make_session(path, optimize=False).run(None, feeds)[0]
    # The same export without the rewrite, as the reference for what changed.
    plain = tmp_path / "plain.onnx"
    onnx_export.torch_to_onnx(onnx_export.export_module(_Hidden(qmodel), "auto"), plain, example, names,
                              ["hidden"], dynamic, onnx_export.OPSET)
    ref = ort_runner.make_session(plain, optimize=False).run(None, feeds)[0]
    with torch.no_grad():
        fake = _Hidden(qmodel)(**x).numpy()
    assert np.abs(ref - fake).max() <= 1e-3 * np.abs(fake).max()
    assert np.abs(got - ref).max() <= 1e-3 * np.abs(fake).max()
