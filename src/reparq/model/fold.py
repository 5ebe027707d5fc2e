"""Exact folding of BatchNorm into the convolution before it.

One utility (``fuse_conv_bn``) serves every caller: the BN-fold pass and branch merging.
"""

from __future__ import annotations

import torch
import torch.nn as nn


@torch.no_grad()
def bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (a, b) such that bn(x) == a * x + b in eval mode."""
    std = torch.sqrt(bn.running_var + bn.eps)
    a = bn.weight / std if bn.affine else 1.0 / std
    b = (bn.bias if bn.affine else 0.0) - bn.running_mean * a
    return a, b


@torch.no_grad()
def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new conv with bias equal to ``bn(conv(x))`` in eval mode."""
    a, b = bn_scale_shift(bn)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
                      device=conv.weight.device, dtype=conv.weight.dtype)
    fused.weight.copy_(conv.weight * a.reshape(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(a)
    fused.bias.copy_(bias * a + b)
    return fused


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every conv->BN pair the model has: in nn.Sequential order, or as the ``conv``/``bn``
    attributes of timm's ConvNormAct-style modules (which run them in that order). Returns the count."""
    folded = 0
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            for first, second in zip(names, names[1:]):
                conv, bn = module._modules[first], module._modules[second]
                if type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d):
                    module._modules[first] = fuse_conv_bn(conv, bn)
                    module._modules[second] = nn.Identity()
                    folded += 1
        conv, bn = getattr(module, "conv", None), getattr(module, "bn", None)
        if type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d) and not isinstance(module, nn.Sequential):
            module.conv = fuse_conv_bn(conv, bn)
            # timm's BatchNormAct2d applies its activation after the norm: keep it, drop the norm.
            kept = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
            module.bn = nn.Sequential(*kept) if kept else nn.Identity()
            folded += 1
    return folded
