"""BN folding and branch merging are exact: fuse_conv_bn, fold_batchnorm, zoo merges, the merger registry."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import reparq
from reparq.model import fold_batchnorm, fuse_conv_bn, list_mergers, merge_branches
from reparq.model import merge as merge_mod
from reparq.recipes.prepare import prepare_for_deployment
from reparq.zoo.architectures import ARCHITECTURES

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=0, atol=1e-10)}


@torch.no_grad()
def randomize_bn(model: nn.Module, seed: int) -> None:
    """Non-trivial eval-mode statistics and affine parameters for every BatchNorm2d."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            shape = m.running_mean.shape
            m.running_mean.copy_(torch.randn(shape, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(shape, generator=g) * 1.5 + 0.3)
            if m.affine:
                m.weight.copy_(torch.rand(shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(shape, generator=g) * 0.3)


def count_bn(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


# ------------------------------------------------------------------------------------ fuse_conv_bn

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("bias, groups, affine", [(True, 1, True), (False, 1, True), (True, 2, True),
                                                  (False, 4, True), (True, 1, False)])
def test_fuse_conv_bn_exact(dtype, bias, groups, affine):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=groups, bias=bias).to(dtype)
    bn = nn.BatchNorm2d(8, eps=1e-3, affine=affine).to(dtype)
    randomize_bn(bn, seed=1)
    bn.eval()
    x = torch.randn(2, 4, 9, 9, dtype=dtype)
    with torch.no_grad():
        ref = bn(conv(x))
        fused = fuse_conv_bn(conv, bn)
        assert isinstance(fused, nn.Conv2d) and fused.bias is not None
        assert (fused.groups, fused.stride, fused.padding) == (groups, (2, 2), (1, 1))
        # The fused conv keeps the dtype of the conv it replaces (a float64 model stays float64).
        assert fused.weight.dtype == dtype, f"fuse_conv_bn returned {fused.weight.dtype} weights for a {dtype} conv"
        out = fused(x)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    # The inputs are left alone.
    assert (conv.bias is None) == (not bias)


def test_fuse_conv_bn_math_by_hand():
    # 1x1 conv, one channel: y = w*x + c; bn: gamma*(y - mu)/sqrt(var + eps) + beta
    conv = nn.Conv2d(1, 1, 1, bias=True)
    bn = nn.BatchNorm2d(1, eps=0.0).eval()
    with torch.no_grad():
        conv.weight.fill_(2.0)
        conv.bias.fill_(1.0)
        bn.running_mean.fill_(3.0)
        bn.running_var.fill_(4.0)
        bn.weight.fill_(6.0)
        bn.bias.fill_(0.5)
    fused = fuse_conv_bn(conv, bn)
    # a = 6 / 2 = 3 -> weight 2 * 3 = 6; bias = 1 * 3 + (0.5 - 3 * 3) = -5.5
    assert fused.weight.item() == 6.0
    assert fused.bias.item() == -5.5


# ---------------------------------------------------------------------------------- fold_batchnorm

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_fold_batchnorm_sequential(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU()).to(dtype)
    randomize_bn(model, seed=2)
    model.eval()
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    with torch.no_grad():
        ref = model(x)
        assert fold_batchnorm(model) == 2
        assert count_bn(model) == 0
        assert isinstance(model[1], nn.Identity) and isinstance(model[4], nn.Identity)
        out = model(x)
    torch.testing.assert_close(out, ref, **TOL[dtype])


class ConvBN(nn.Module):
    """timm ConvNormAct-style module: ``conv`` and ``bn`` attributes run in that order."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_fold_batchnorm_conv_bn_attributes():
    torch.manual_seed(0)
    model = nn.Sequential(ConvBN(3, 5), nn.ReLU(), ConvBN(5, 2))
    randomize_bn(model, seed=3)
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        ref = model(x)
        assert fold_batchnorm(model) == 2
        out = model(x)
    assert count_bn(model) == 0
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


# ------------------------------------------------------------------------------- zoo merge exactness

@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_prepare_for_deployment_is_exact_on_every_zoo_family(name):
    torch.manual_seed(0)
    model = ARCHITECTURES[name]()
    randomize_bn(model, seed=4)
    model = model.double().eval()
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
        info = prepare_for_deployment(model)
        out = model(x)
    scale = max(1.0, ref.abs().max().item())
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-9 * scale)
    if name in ("repvgg_fm", "repvgg_deep_fm", "mobileone_fm"):
        assert info["merged_blocks"] > 0
        assert count_bn(model) == 0
        # Every Rep block now holds its single merged conv and no training-time branch.
        from timm.models.byobnet import MobileOneBlock, RepVggBlock

        blocks = [m for m in model.modules() if isinstance(m, (RepVggBlock, MobileOneBlock))]
        assert len(blocks) == info["merged_blocks"]
        for b in blocks:
            assert isinstance(b.reparam_conv, nn.Conv2d)
            assert not hasattr(b, "conv_kxk") and not hasattr(b, "identity")


# ------------------------------------------------------------------------------------ merger registry

class RepBlock(nn.Module):
    """Plain-torch RepVGG block: (3x3 conv + BN) + (1x1 conv + BN) + BN(identity), then ReLU."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv3 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.bn_id = nn.BatchNorm2d(channels)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn3(self.conv3(x)) + self.bn1(self.conv1(x)) + self.bn_id(x))


@torch.no_grad()
def merge_rep_block(block: RepBlock) -> nn.Module:
    c = block.conv3.in_channels
    dtype = block.conv3.weight.dtype
    f3 = fuse_conv_bn(block.conv3, block.bn3)
    f1 = fuse_conv_bn(block.conv1, block.bn1)
    identity = nn.Conv2d(c, c, 3, padding=1, bias=False).to(dtype)
    identity.weight.zero_()
    for i in range(c):
        identity.weight[i, i, 1, 1] = 1.0
    fid = fuse_conv_bn(identity, block.bn_id)
    merged = nn.Conv2d(c, c, 3, padding=1, bias=True).to(dtype)
    merged.weight.copy_(f3.weight + F.pad(f1.weight, [1, 1, 1, 1]) + fid.weight)
    merged.bias.copy_(f3.bias + f1.bias + fid.bias)
    return nn.Sequential(merged, block.act)


@pytest.fixture
def rep_merger():
    reparq.register_merger(RepBlock)(merge_rep_block)
    try:
        yield
    finally:
        merge_mod._MERGERS.pop(RepBlock, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_registered_merger_replaces_blocks_exactly(rep_merger, dtype):
    assert "RepBlock" in list_mergers()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 1), RepBlock(4), nn.Sequential(nn.Identity(), RepBlock(4)),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten())
    randomize_bn(model, seed=5)
    model = model.to(dtype).eval()
    x = torch.randn(3, 2, 7, 7, dtype=dtype)
    with torch.no_grad():
        ref = model(x)
        assert merge_branches(model) == 2
        out = model(x)
    assert not any(isinstance(m, RepBlock) for m in model.modules())
    assert count_bn(model) == 0
    assert isinstance(model[1][0], nn.Conv2d) and model[1][0].kernel_size == (3, 3)
    assert isinstance(model[2][1][0], nn.Conv2d)
    torch.testing.assert_close(out, ref, **TOL[dtype])


def test_registry_is_clean_without_the_fixture():
    assert RepBlock not in merge_mod._MERGERS
    model = nn.Sequential(RepBlock(2))
    assert merge_branches(model) == 0
    assert isinstance(model[0], RepBlock)
