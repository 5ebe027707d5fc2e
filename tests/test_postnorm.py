"""Post-norm reparameterization: per-channel fake-quant path == folded layer-wise path, exactly (to
float tolerance), for LayerNorm and RMSNorm, on random layers and on random and trained models."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from reparq.config import QuantConfig
from reparq.errors import ReparqError
from reparq.model.postnorm import (ShiftedNorm, find_postnorm_pairs, fold_postnorm, fold_rmsnorm,
                                   shared_zero_point_params)
from reparq.nn.qmodules import quantized_layers
from reparq.progress import SILENT
from reparq.quant.percentile_search import percentile_search_params, unwidened_params
from reparq.quant.uniform import UniformQuantizer
from reparq.recipes.insert import insert_quantizers
from reparq.recipes.reparam import calibrate_postnorm, fold_postnorm_pairs, observe_norm_outputs
from reparq.recipes.repqvit import RepQViTOptions, prepare_transformer
from tests.test_attention_adapters import tiny_swin, tiny_vit

BITS = 4


def _outlier_inputs(n: int, c: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g, dtype=torch.float64) * 2 + 1


def _per_channel_quantizer(y: torch.Tensor, bits: int = BITS, shared_zp: bool = False) -> UniformQuantizer:
    q = UniformQuantizer(bits, symmetric=False, channel_axis=-1)
    lo, hi = y.min(0).values.float(), y.max(0).values.float()
    scale, zp = shared_zero_point_params(lo, hi, bits) if shared_zp else unwidened_params(lo, hi, bits)
    q.set_params(scale, zp)
    return q


def _layerwise(scale, zp, bits: int = BITS) -> UniformQuantizer:
    q = UniformQuantizer(bits, symmetric=False)
    q.set_params(scale, zp)
    return q


def _norm_and_consumers(kind: str, c: int = 24, seed: int = 0):
    torch.manual_seed(seed)
    norm = nn.LayerNorm(c) if kind == "layernorm" else nn.RMSNorm(c)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(c) * torch.logspace(-1, 1, c))  # severe inter-channel variation
        if kind == "layernorm":
            norm.bias.copy_(torch.randn(c) * 3)
    consumers = [nn.Linear(c, 16), nn.Linear(c, 8, bias=False)]
    return norm.double(), [m.double() for m in consumers]


@pytest.mark.parametrize("kind,shared_zp", [("layernorm", False), ("rmsnorm", True), ("rmsnorm", False)])
def test_fold_equals_per_channel_path(kind, shared_zp):
    norm, consumers = _norm_and_consumers(kind)
    x = _outlier_inputs(512, 24)
    with torch.no_grad():
        y = norm(x)
        pq = _per_channel_quantizer(y, shared_zp=shared_zp)
        expected = [layer(pq(y)) for layer in consumers]
        codes = pq.to_int(y)
        bias_before = [None if l.bias is None else l.bias.clone() for l in consumers]
        result = fold_postnorm(norm, consumers, pq.scale, pq.zero_point, BITS)
        lq = _layerwise(result.scale, result.zero_point)
        y_folded = result.norm(x)
        # The layer-wise integers are the per-channel integers, element for element.
        assert torch.equal(lq.to_int(y_folded), codes)
        for layer, exp in zip(consumers, expected):
            torch.testing.assert_close(layer(lq(y_folded)), exp, rtol=1e-10, atol=1e-10)
    assert 0 <= result.zero_point.item() <= 2 ** BITS - 1 and result.zero_point.item() == round(result.zero_point.item())
    assert result.scale.item() == pytest.approx(pq.scale.double().mean().item(), rel=1e-6)
    if shared_zp:
        # RMSNorm with one shared zero point: no shift, no new parameters anywhere.
        assert result.norm is norm
        assert consumers[1].bias is None and torch.equal(consumers[0].bias, bias_before[0])
    elif kind == "rmsnorm":
        # Per-channel zero points on a bias-free norm: the shift lives in a wrapper, bias-free consumers get one.
        assert isinstance(result.norm, ShiftedNorm) and consumers[1].bias is not None
    else:
        assert result.norm is norm  # LayerNorm absorbs the shift in its own bias


def test_fold_rmsnorm_on_plain_torch_rmsnorm_single_consumer():
    """The function the HF adapters call: plain torch RMSNorm, bias-free consumer, shared zero point."""
    norm, consumers = _norm_and_consumers("rmsnorm", seed=3)
    x = _outlier_inputs(256, 24, seed=3)
    layer = consumers[1]
    with torch.no_grad():
        y = norm(x)
        pq = _per_channel_quantizer(y, bits=6, shared_zp=True)
        expected = layer(pq(y))
        weight_before = norm.weight.clone()
        result = fold_rmsnorm(norm, [layer], pq.scale, pq.zero_point, 6)
        got = layer(_layerwise(result.scale, result.zero_point, bits=6)(result.norm(x)))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert result.norm is norm and layer.bias is None
    r1 = pq.scale.double() / result.scale.double()
    torch.testing.assert_close(norm.weight, weight_before / r1)


def test_shared_zero_point_covers_every_channel():
    torch.manual_seed(0)
    y = torch.randn(1000, 12) * torch.logspace(-2, 1, 12) + torch.linspace(-1, 1, 12)
    scale, zp = shared_zero_point_params(y.min(0).values, y.max(0).values, 4)
    assert len(set(zp.tolist())) == 1
    q = UniformQuantizer(4, symmetric=False, channel_axis=-1)
    q.set_params(scale, zp)
    ints = torch.round(y / scale) + zp
    assert ints.min() >= 0 and ints.max() <= 15  # nothing is clipped
    assert ((q(y) - y).abs() <= scale / 2 + 1e-6).all()


def test_fold_rejects_bad_parameters():
    norm, consumers = _norm_and_consumers("layernorm")
    with pytest.raises(ReparqError, match="integer zero points"):
        fold_postnorm(norm, consumers, torch.ones(24), torch.full((24,), 0.5), BITS)
    with pytest.raises(ReparqError, match="channels"):
        fold_postnorm(norm, [nn.Linear(7, 3).double()], torch.ones(24), torch.zeros(24), BITS)


def test_pairs_found_on_each_family():
    vit = tiny_vit(depth=3)
    pairs = find_postnorm_pairs(vit)
    assert [(p.norm, p.consumers) for p in pairs] == [("fc_norm", ("head",))] + [
        (f"blocks.{i}.norm{j}", (f"blocks.{i}.{c}",)) for i in range(3) for j, c in ((1, "attn.qkv"), (2, "mlp.fc1"))]
    swin_pairs = find_postnorm_pairs(tiny_swin())
    assert len(swin_pairs) == 4 * 2 + 1  # two per block, one patch merging
    assert ("layers.1.downsample.norm", ("layers.1.downsample.reduction",)) in [(p.norm, p.consumers) for p in swin_pairs]
    # A ViT with a class token has no fc_norm: only the block pairs.
    assert len(find_postnorm_pairs(tiny_vit(depth=2, avg=False))) == 4


def _train(model: nn.Module, steps: int = 60, seed: int = 0) -> nn.Module:
    """A few steps on a seeded synthetic task: norms and weights move away from their init."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 1, 16, 16, generator=g)
    y = (x[:, 0, :8].mean((1, 2)) > 0).long() + 2 * (x[:, 0, :, :8].mean((1, 2)) > 0).long()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for i in range(steps):
        idx = torch.randint(0, 256, (32,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("consumer_fold", [False, True])
@pytest.mark.parametrize("build,trained", [(tiny_vit, False), (tiny_swin, False), (tiny_vit, True), (tiny_swin, True)])
def test_model_level_fold_is_exact(build, trained, consumer_fold):
    """Whole model, every activation quantized (matmul inputs included), weights in float: the
    per-channel path before the fold and the layer-wise path after it give the same output
    (``consumer_fold``: also attn.proj and fc2, folded through their input affines)."""
    model = build()
    if trained:
        model = _train(model)
    model = model.double()
    x = torch.randn(48, 1, 16, 16, dtype=torch.float64)
    batches = list(x.split(16))
    cfg = QuantConfig(w_bits=4, a_bits=4, keep_first_last_8bit=False)
    options = RepQViTOptions(consumer_fold=consumer_fold, consumer_alpha=0.5)
    pairs = prepare_transformer(model, batches, cfg, options, seed=0, reporter=SILENT)
    blocks = len([m for m in model.modules() if type(m).__name__ in ("Block", "SwinTransformerBlock")])
    assert len(pairs) == len(find_postnorm_pairs(model)) + (2 * blocks if consumer_fold else 0) > 0
    consumers = [model.get_submodule(c) for p in pairs for c in p.consumers]
    assert all(l.input_quantizer.scale.numel() > 1 for l in consumers)  # per channel before
    for _, layer in quantized_layers(model):
        layer.weight_quantizer.enabled = False
    with torch.no_grad():
        before = model(x)
        norms_before = {p.norm: model.get_submodule(p.norm).weight.clone() for p in pairs if p.norm}
        fold_postnorm_pairs(model, pairs)
        after = model(x)
    assert all(l.input_quantizer.scale.numel() == 1 and l.input_quantizer.channel_axis is None for l in consumers)
    assert any(not torch.equal(model.get_submodule(n).weight, w) for n, w in norms_before.items() if n)
    with_affine = {c for p in pairs for c in p.consumers if model.get_submodule(c)._modules.get("input_affine")}
    assert with_affine == {c for p in pairs if not p.folds_into_norm for c in p.consumers}
    assert bool(with_affine) == consumer_fold
    torch.testing.assert_close(after, before, rtol=1e-9, atol=1e-9)


def test_float32_fold_agrees_except_rare_rounding_ties():
    """In float32 the folded norm's output differs from y / r1 by float rounding, so an element
    sitting on a rounding tie may flip one code; the outputs still agree closely."""
    model = _train(tiny_vit())
    x = torch.randn(64, 1, 16, 16)
    cfg = QuantConfig(w_bits=4, a_bits=4, keep_first_last_8bit=False)
    pairs = prepare_transformer(model, list(x.split(32)), cfg, RepQViTOptions(), seed=0, reporter=SILENT)
    for _, layer in quantized_layers(model):
        layer.weight_quantizer.enabled = False
    with torch.no_grad():
        before = model(x)
        fold_postnorm_pairs(model, pairs)
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-3, atol=1e-3)


def test_calibration_uses_each_channel_range():
    """The per-channel quantizer of a norm output covers each channel's own (percentile) range."""
    model = tiny_vit()
    with torch.no_grad():
        model.blocks[0].norm1.bias.copy_(torch.linspace(-5, 5, 32))  # channels far from 0
    insert_quantizers(model, QuantConfig(w_bits=8, a_bits=4))
    pairs = [p for p in find_postnorm_pairs(model) if p.norm == "blocks.0.norm1"]
    rows = observe_norm_outputs(model, pairs, [torch.randn(32, 1, 16, 16)])
    assert rows["blocks.0.norm1"].shape[1] == 32
    calibrate_postnorm(model, pairs, rows, "minmax")
    aq = model.blocks[0].attn.qkv.input_quantizer
    lo = (aq.qmin - aq.zero_point) * aq.scale
    hi = (aq.qmax - aq.zero_point) * aq.scale
    r = rows["blocks.0.norm1"]
    # The grid spans each channel's min..max, up to the half step that rounding the zero point moves it.
    assert (lo <= r.min(0).values + aq.scale / 2 + 1e-5).all() and (hi >= r.max(0).values - aq.scale / 2 - 1e-5).all()
    # Ranges are not widened to 0: channel 0 (shift -5) ends below zero, channel 31 starts above it.
    assert hi[0] < 0 < lo[-1]
    pct_scale, _ = percentile_search_params(r, 4, False, axis=-1, widen=False)
    assert (pct_scale <= aq.scale + 1e-7).all()  # percentile ranges are never wider than min/max


def test_llama_rmsnorm_pairs_fold_exactly():
    """LLaMA's input/post-attention RMSNorms pair with q/k/v and gate/up (bias-free consumers:
    the shared zero point leaves no shift), and the model-level fold is exact."""
    from tests.test_hf_adapters import LAYERS, tiny_llama

    model = tiny_llama(kv_heads=2).double()
    pairs = find_postnorm_pairs(model)
    assert [(p.norm, p.consumers) for p in pairs] == [
        pair for i in range(LAYERS) for pair in (
            (f"model.layers.{i}.input_layernorm", tuple(f"model.layers.{i}.self_attn.{c}_proj" for c in "qkv")),
            (f"model.layers.{i}.post_attention_layernorm", (f"model.layers.{i}.mlp.gate_proj", f"model.layers.{i}.mlp.up_proj")))]
    ids = torch.randint(1, 64, (24, 12), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": b} for b in ids.split(8)]
    cfg = QuantConfig(w_bits=4, a_bits=4, keep_first_last_8bit=False)
    got = prepare_transformer(model, batches, cfg, RepQViTOptions(), seed=0, reporter=SILENT)
    assert len(got) == len(pairs)
    for _, layer in quantized_layers(model):
        layer.weight_quantizer.enabled = False
    with torch.no_grad():
        before = model(input_ids=ids).logits
        fold_postnorm_pairs(model, got)
        after = model(input_ids=ids).logits
    assert not any(isinstance(model.get_submodule(p.norm), ShiftedNorm) for p in got)  # no extra op
    torch.testing.assert_close(after, before, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_group_with_a_consumer_at_more_bits_is_folded(family):
    """The first Linear kept at 8 bits beside 4-bit siblings. LLaMA (RMSNorm fold: the norm's output
    changes for q, k and v alike): the group is calibrated per channel at 4 bits and folded exactly
    for k/v, and q_proj reads the folded tensor on an 8-bit layer-wise grid over the same range.
    BERT (consumer-side fold: an input affine per consumer): the query stays out of the group,
    untouched, and key/value are folded exactly."""
    from tests.test_hf_adapters import tiny_bert, tiny_llama, token_batch

    if family == "llama":
        model, names = tiny_llama(kv_heads=2).double(), [f"model.layers.0.self_attn.{c}_proj" for c in "qkv"]
        ids = torch.randint(1, 64, (24, 12), generator=torch.Generator().manual_seed(0))
        batches, x = [{"input_ids": b} for b in ids.split(8)], {"input_ids": ids}
    else:
        model = tiny_bert().double()
        names = [f"encoder.layer.0.attention.self.{c}" for c in ("query", "key", "value")]
        batches = [token_batch(4, 12, seed=s, pad=False) for s in range(3)]
        x = token_batch(4, 12, seed=9, pad=False)
    q, k, v = names
    get = model.get_submodule
    cfg = QuantConfig(w_bits=4, a_bits=4, keep_first_last_8bit=True)
    pairs = prepare_transformer(model, batches, cfg, RepQViTOptions(consumer_fold=family == "bert"), seed=0,
                                reporter=SILENT)
    group = next(p for p in pairs if k in p.consumers)
    assert v in group.consumers and (q in group.consumers) == (family == "llama")
    assert get(q).input_quantizer.bits == 8 and get(q).input_quantizer.channel_axis is None  # not per channel
    assert get(k).input_quantizer.bits == 4 and get(k).input_quantizer.scale.numel() > 1  # per channel
    q_before = (get(q).weight.detach().clone(), get(q).input_quantizer.scale.clone())
    for _, layer in quantized_layers(model):
        layer.weight_quantizer.enabled = False
    get(q).input_quantizer.enabled = False  # the exact part: the 4-bit consumers
    seen: dict[str, torch.Tensor] = {}
    hooks = [get(n).register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, o)) for n in (k, v)]
    with torch.no_grad():
        model(**x)
        before = dict(seen)
        fold_postnorm_pairs(model, pairs)
        model(**x)
    for h in hooks:
        h.remove()
    for n in (k, v):
        torch.testing.assert_close(seen[n], before[n], rtol=1e-9, atol=1e-9)
    kq, qq = get(k).input_quantizer, get(q).input_quantizer
    assert kq.scale.numel() == 1 and qq.scale.numel() == 1 and qq.bits == 8
    if family == "bert":  # left alone: same weight, same grid, no input affine
        assert torch.equal(get(q).weight, q_before[0]) and torch.equal(qq.scale, q_before[1])
        assert get(q)._modules.get("input_affine") is None
        return
    k_range = ((kq.qmin - kq.zero_point) * kq.scale, (kq.qmax - kq.zero_point) * kq.scale)
    q_range = ((qq.qmin - qq.zero_point) * qq.scale, (qq.qmax - qq.zero_point) * qq.scale)
    torch.testing.assert_close(qq.scale, kq.scale * 15 / 255)
    for a, b in zip(q_range, k_range):  # the same range, up to rounding the 8-bit zero point
        assert abs(float(a - b)) <= float(qq.scale) / 2 + 1e-9
