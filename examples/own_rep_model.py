"""Your own Rep block: teach reparq to merge it, then quantize the merged model.

A RepVGG-style block trains with three parallel branches (3x3 conv+BN, 1x1 conv+BN, identity
BN) and deploys as one 3x3 conv. reparq quantizes the *deployed* form, so it must know how to
merge your block: register one function with ``reparq.register_merger``. After that every
recipe (and ``--dry-run``, and the family-free presets, which now see a "rep" model) handles it.

Run: ``python examples/own_rep_model.py`` (well under a minute on one CPU core).
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import reparq
from reparq.data import calibration_subset, load_fashion_mnist


class MyRepBlock(nn.Module):
    """relu(bn3(conv3(x)) + bn1(conv1(x)) + bn_id(x)); the identity branch only when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv3, self.bn3 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 1, stride, 0, bias=False), nn.BatchNorm2d(cout)
        self.bn_id = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn3(self.conv3(x)) + self.bn1(self.conv1(x))
        if self.bn_id is not None:
            y = y + self.bn_id(x)
        return F.relu(y)


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """bn(x) == a * x + b per channel, in eval mode."""
    a = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return a, bn.bias - bn.running_mean * a


@reparq.register_merger(MyRepBlock)
@torch.no_grad()
def merge_my_rep_block(block: MyRepBlock) -> nn.Module:
    """The single conv (+ReLU) equal to the block in eval mode: each branch becomes a 3x3 kernel
    scaled by its BN, and the kernels and biases add up."""
    conv = block.conv3
    a3, b3 = _bn_affine(block.bn3)
    kernel = conv.weight * a3.reshape(-1, 1, 1, 1)
    bias = b3.clone()
    a1, b1 = _bn_affine(block.bn1)
    kernel += F.pad(block.conv1.weight, [1, 1, 1, 1]) * a1.reshape(-1, 1, 1, 1)
    bias += b1
    if block.bn_id is not None:
        ident = torch.zeros_like(kernel)
        ident[torch.arange(kernel.shape[0]), torch.arange(kernel.shape[0]), 1, 1] = 1.0
        a0, b0 = _bn_affine(block.bn_id)
        kernel += ident * a0.reshape(-1, 1, 1, 1)
        bias += b0
    merged = nn.Conv2d(conv.in_channels, conv.out_channels, 3, conv.stride, 1, bias=True)
    merged.weight.copy_(kernel)
    merged.bias.copy_(bias)
    return nn.Sequential(merged, nn.ReLU())


class MyRepNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(MyRepBlock(1, 16, 2), MyRepBlock(16, 16), MyRepBlock(16, 32, 2),
                                    MyRepBlock(32, 32))
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).mean((2, 3)))


def train_briefly(model: nn.Module, steps: int = 100, seed: int = 0) -> None:
    x, y = load_fashion_mnist("train")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (64,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def main() -> int:
    torch.manual_seed(0)
    model = MyRepNet()
    train_briefly(model)
    test_x, test_y = load_fashion_mnist("test")
    test_x, test_y = test_x[:1000], test_y[:1000]

    # The merge is exact: the deployed graph computes what the trained one does.
    from reparq.model.merge import merge_branches

    merged = copy.deepcopy(model)
    print(f"merged {merge_branches(merged)} blocks; max |trained - merged| = "
          f"{(model(test_x[:256]) - merged(test_x[:256])).abs().max().item():.2e}")

    calib = calibration_subset(128, seed=0)
    fp = reparq.evaluate(model, test_x, test_y)
    print(f"MyRepNet FP: {fp:.2f}% top-1 (1000 test images)")
    # "w4a4-fast" sees a Rep model (a registered merger) and picks RepAPQ; reparq finds our blocks
    # (blocks.0..3, one stage) from the repeated modules. Fewer iterations keep the demo short.
    for preset, extra in (("w8a8-fast", {}), ("w4a4-fast", {"iters": 40})):
        qmodel = reparq.quantize(model, calib, config=preset, **extra)
        acc = reparq.evaluate(qmodel, test_x, test_y)
        info = qmodel.reparq_info
        print(f"{preset}: recipe {info.recipe} W{info.config['w_bits']}A{info.config['a_bits']}: {acc:.2f}% "
              f"({acc - fp:+.2f}), calibrated in {info.calib_seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
