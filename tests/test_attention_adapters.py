"""Attention adapters: every quantization point of timm ViT/DeiT and Swin is found, the adapted
model equals the original with quantizers off (fused attention, relative position bias and
shifted-window masks included), and calibration passes range the matmul inputs on the float model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from timm.layers.attention import Attention
from timm.models.swin_transformer import SwinTransformer, WindowAttention
from timm.models.vision_transformer import VisionTransformer

import reparq
from reparq.model.attention_adapters import adapt_attention, attention_modules, is_adapted, register_attention
from reparq.nn.attention import MatmulQuantizers, matmul_quantizers
from reparq.nn.qmodules import QConv2d, QLinear, quantized_layers
from reparq.quant.log import LogQuantizer
from reparq.quant.uniform import UniformQuantizer
from reparq.config import QuantConfig
from reparq.recipes.calibrate import init_activation_ranges, set_quant_enabled


def tiny_vit(seed: int = 0, depth: int = 2, avg: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    kw = dict(global_pool="avg", class_token=False) if avg else {}
    return VisionTransformer(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=depth,
                             num_heads=2, mlp_ratio=2.0, **kw).eval()


def tiny_swin(seed: int = 0) -> nn.Module:
    """8x8 tokens, window 4: the second block of stage 0 is shifted (mask), stage 1 follows a patch merging."""
    torch.manual_seed(seed)
    return SwinTransformer(img_size=16, patch_size=2, in_chans=1, num_classes=10, window_size=4, embed_dim=16,
                           depths=(2, 2), num_heads=(2, 2), mlp_ratio=2.0).eval()


def _randomize_bias_tables(model: nn.Module) -> None:
    """timm initializes the relative position bias near zero; make it matter for the comparison."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, WindowAttention):
                m.relative_position_bias_table.normal_(0, 1.0)


def test_adapted_models_equal_originals_with_quantizers_off():
    x = torch.randn(4, 1, 16, 16)
    for build in (tiny_vit, tiny_swin):
        model = build()
        _randomize_bias_tables(model)
        fused = [m.fused_attn for m in model.modules() if isinstance(m, (Attention, WindowAttention))]
        ref = model(x)
        adapted = copy.deepcopy(model)
        names = adapt_attention(adapted, a_bits=4, probs="logsqrt2")
        assert names and all(is_adapted(adapted.get_submodule(n)) for n in names)
        set_quant_enabled(adapted, weights=False, inputs=False)
        torch.testing.assert_close(adapted(x), ref, rtol=1e-5, atol=1e-6)
        # The originals ran timm's own path (fused SDPA where timm enables it): the comparison is real.
        assert all(isinstance(f, bool) for f in fused)
        # Quantizers calibrated and on: a different, finite output of the same shape.
        init_activation_ranges(adapted, [x], QuantConfig(w_bits=4, a_bits=4))
        out = adapted(x)
        assert out.shape == ref.shape and bool(torch.isfinite(out).all())
        assert not torch.allclose(out, ref, atol=1e-4)


def test_swin_fixture_exercises_shifted_masks_and_position_bias():
    model = tiny_swin()
    blocks = [b for stage in model.layers for b in stage.blocks]
    shifted = [b for b in blocks if any(s > 0 for s in (b.shift_size if isinstance(b.shift_size, tuple) else (b.shift_size,)))]
    assert shifted and all(b.attn_mask is not None for b in shifted)
    # With quantizers off, a wrong mask or a missing bias would show: dropping the mask changes the output.
    x = torch.randn(2, 1, 16, 16)
    _randomize_bias_tables(model)
    ref = model(x)
    adapt_attention(model, a_bits=8)
    set_quant_enabled(model, False, False)
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)
    saved = [b.attn_mask.clone() for b in shifted]
    for b in shifted:
        b.attn_mask.zero_()
    assert not torch.allclose(model(x), ref, atol=1e-4)
    for b, m in zip(shifted, saved):
        b.attn_mask.copy_(m)


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_every_quantization_point_is_found(family):
    """Count: Linear/Conv weights and inputs, and four matmul inputs per attention."""
    if family == "vit":
        model, depth = tiny_vit(depth=3), 3
        n_attn, n_linear = depth, 1 + 4 * depth + 1  # patch conv, qkv/proj/fc1/fc2 per block, head
    else:
        model = tiny_swin()
        n_attn = 4
        n_linear = 1 + 4 * 4 + 1 + 1  # patch conv, 4 per block, one patch-merging reduction, head
    q = reparq.quantize(model, torch.randn(16, 1, 16, 16), recipe="minmax", w_bits=4, a_bits=4)
    layers = quantized_layers(q)
    assert len(layers) == n_linear
    assert sum(isinstance(l, QConv2d) for _, l in layers) == 1
    assert all(isinstance(l, (QConv2d, QLinear)) for _, l in layers)
    mqs = matmul_quantizers(q)
    assert len(mqs) == n_attn == len(attention_modules(q))
    points = [qq for _, mq in mqs for qq in (mq.q, mq.k, mq.v, mq.probs)]
    assert len(points) == 4 * n_attn
    assert all(p.initialized and p.enabled for p in points)
    # The baseline quantizes the probabilities on a uniform grid.
    assert all(isinstance(mq.probs, UniformQuantizer) for _, mq in mqs)
    out = q(torch.randn(3, 1, 16, 16))
    assert out.shape == (3, 10) and bool(torch.isfinite(out).all())


def test_baseline_matmul_ranges_come_from_the_float_model():
    """minmax range of the q input == min/max of the float model's q over the calibration data."""
    model = tiny_vit()
    x = torch.randn(32, 1, 16, 16)
    seen = []
    attn = model.blocks[1].attn
    h = attn.qkv.register_forward_hook(lambda m, a, o: seen.append(o.detach()))
    model(x[:16]), model(x[16:])
    h.remove()
    qkv = torch.cat(seen)
    dim = attn.num_heads * attn.head_dim
    q_vals, v_vals = qkv[..., :dim], qkv[..., 2 * dim:]
    qm = reparq.quantize(model, x, recipe="minmax", w_bits=8, a_bits=6, batch_size=16)
    mq = qm.blocks[1].attn.matmul_quant
    for quant, vals in ((mq.q, q_vals), (mq.v, v_vals)):
        lo, hi = min(vals.min().item(), 0.0), max(vals.max().item(), 0.0)
        assert quant.scale.item() == pytest.approx((hi - lo) / 63, rel=1e-5)
        assert quant.zero_point.item() == round(-lo / quant.scale.item())


def test_brecq_learns_matmul_step_sizes_and_leaves_quantizers_on():
    model = tiny_vit()
    x = torch.randn(32, 1, 16, 16)
    base = reparq.quantize(model, x, recipe="mse", w_bits=4, a_bits=4)
    rec = reparq.quantize(model, x, recipe="brecq", w_bits=4, a_bits=4, iters=20, lr_act=1e-2)
    for (_, a), (_, b) in zip(matmul_quantizers(base), matmul_quantizers(rec)):
        assert a.q.scale.item() != b.q.scale.item() or a.k.scale.item() != b.k.scale.item()
        assert all(qq.enabled and not qq.scale.requires_grad for qq in (b.q, b.k, b.v))


class MyAttention(nn.Module):
    """A user's own single-head attention, registered below."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1) @ v)


@register_attention(MyAttention)
def _my_attention_forward(self, x):
    mq = self.matmul_quant
    q, k, v = self.qkv(x).chunk(3, dim=-1)
    probs = torch.softmax(mq.q(q) @ mq.k(k).transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
    return self.proj(mq.attend(probs, v))


def test_user_attention_class_via_registry():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), MyAttention(8), nn.Linear(8, 3)).eval()
    x = torch.randn(16, 5, 4)
    ref = model(x)
    q = reparq.quantize(model, x, recipe="minmax", w_bits=8, a_bits=8)
    assert isinstance(q[1], MyAttention) and isinstance(q[1].matmul_quant, MatmulQuantizers)
    assert not isinstance(model[1].__dict__.get("_modules", {}).get("matmul_quant"), MatmulQuantizers)  # copy only
    assert q[1].matmul_quant.q.initialized and isinstance(q[1].matmul_quant.probs, nn.Module)
    err = (q(x) - ref).abs().max().item()
    assert 0 < err < 0.05 * ref.abs().max().item()
    copy.deepcopy(q)  # the adapted class survives a deep copy
    # Switching the user's matmul quantizers off changes the output: they are on the path.
    q[1].matmul_quant.set_enabled(False)
    assert (q(x) - ref).abs().max().item() != err


def test_log_grid_for_repqvit_and_ignore_globs():
    model = tiny_vit()
    adapted = adapt_attention(model, a_bits=4, probs="logsqrt2", ignore=("blocks.0.*",))
    assert adapted == ["blocks.1.attn"]
    assert isinstance(model.blocks[1].attn.matmul_quant.probs, LogQuantizer)
    assert model.blocks[1].attn.matmul_quant.probs.base == "logsqrt2"
    assert not is_adapted(model.blocks[0].attn)
    with pytest.raises(ValueError, match="probs"):
        adapt_attention(model, a_bits=4, probs="cubic")


@pytest.mark.parametrize("recipe", ["minmax", "repqvit"])
def test_describe_and_rebuild_attention_for_loading(recipe):
    """What a loader needs: rebuild the adapted attention (and folded biases) on a fresh float
    model, load the saved state, and get the same outputs."""
    from reparq.model.attention_adapters import describe_attention, rebuild_attention
    from reparq.model.postnorm import add_folded_biases
    from reparq.recipes.insert import insert_quantizers

    model = tiny_swin()
    x = torch.randn(16, 1, 16, 16)
    q = reparq.quantize(model, x, recipe=recipe, w_bits=4, a_bits=4)
    desc = describe_attention(q)
    assert len(desc) == 4 and {d["probs"] for d in desc.values()} == ({"uniform"} if recipe == "minmax" else {"log2parity"})
    fresh = tiny_swin(seed=1)
    insert_quantizers(fresh, QuantConfig(w_bits=4, a_bits=4))
    rebuild_attention(fresh, desc)
    state = q.state_dict()
    add_folded_biases(fresh, state.keys())
    for name, layer in quantized_layers(q):  # per-channel shapes of the layer quantizers
        target = fresh.get_submodule(name)
        for role in ("weight_quantizer", "input_quantizer"):
            src, dst = getattr(layer, role), getattr(target, role)
            dst.channel_axis = src.channel_axis
            dst.set_params(src.scale, src.zero_point)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if not k.endswith("relative_position_index")]
    torch.testing.assert_close(fresh(x), q(x), rtol=1e-5, atol=1e-6)
