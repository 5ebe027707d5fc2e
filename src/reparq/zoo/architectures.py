"""Reduced-width timm architectures sized for Fashion-MNIST (28x28, one channel, 10 classes).

They are the real timm classes (ByobNet RepVGG/MobileOne blocks, VisionTransformer,
SwinTransformer), only narrower and shallower, so that everything timm knows about them
(branch reparameterization, attention modules) applies unchanged.
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn
from timm.models.byobnet import ByobNet, ByoBlockCfg, ByoModelCfg
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

IN_CHANS, NUM_CLASSES, IMG_SIZE = 1, 10, 28


def _repvgg_cfg(depths: tuple[int, ...], widths: tuple[int, ...], strides: tuple[int, ...], stem: int) -> ByoModelCfg:
    blocks = tuple(ByoBlockCfg(type="rep", d=d, c=c, s=s, gs=0) for d, c, s in zip(depths, widths, strides))
    return ByoModelCfg(blocks=blocks, stem_type="rep", stem_chs=stem, stem_pool=None)


def _mobileone_cfg(depths: tuple[int, ...], widths: tuple[int, ...], strides: tuple[int, ...], stem: int,
                   branches: int) -> ByoModelCfg:
    """MobileOne stage = (depthwise 'one' block, pointwise 'one' block) pairs, as in timm's s0..s4."""
    stages, prev = [], stem
    for d, c, s in zip(depths, widths, strides):
        stage = []
        for i in range(d):
            kw = dict(num_conv_branches=branches)
            stage.append(ByoBlockCfg(type="one", d=1, c=prev, s=s if i == 0 else 1, gs=1, block_kwargs=kw))
            stage.append(ByoBlockCfg(type="one", d=1, c=c, s=1, gs=0, block_kwargs=dict(kw, kernel_size=1)))
            prev = c
        stages.append(tuple(stage))
    return ByoModelCfg(blocks=tuple(stages), stem_type="one", stem_chs=stem, stem_pool=None)


def repvgg_fm() -> nn.Module:
    return ByobNet(_repvgg_cfg((2, 3, 3, 1), (24, 48, 96, 192), (1, 2, 2, 1), stem=24),
                   in_chans=IN_CHANS, num_classes=NUM_CLASSES)


def repvgg_deep_fm() -> nn.Module:
    return ByobNet(_repvgg_cfg((2, 4, 8, 1), (24, 48, 96, 192), (1, 2, 2, 1), stem=24),
                   in_chans=IN_CHANS, num_classes=NUM_CLASSES)


def mobileone_fm() -> nn.Module:
    return ByobNet(_mobileone_cfg((1, 2, 3, 1), (32, 64, 128, 192), (1, 2, 2, 1), stem=24, branches=4),
                   in_chans=IN_CHANS, num_classes=NUM_CLASSES)


def deit_fm() -> nn.Module:
    return VisionTransformer(img_size=IMG_SIZE, patch_size=4, in_chans=IN_CHANS, num_classes=NUM_CLASSES,
                             embed_dim=64, depth=6, num_heads=2, mlp_ratio=2.0, drop_path_rate=0.05,
                             global_pool="avg", class_token=False)


def swin_fm() -> nn.Module:
    return SwinTransformer(img_size=IMG_SIZE, patch_size=2, in_chans=IN_CHANS, num_classes=NUM_CLASSES,
                           window_size=7, embed_dim=32, depths=(2, 2), num_heads=(2, 4), mlp_ratio=2.0,
                           drop_path_rate=0.05)


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "repvgg_fm": repvgg_fm,
    "repvgg_deep_fm": repvgg_deep_fm,
    "mobileone_fm": mobileone_fm,
    "deit_fm": deit_fm,
    "swin_fm": swin_fm,
}
