"""Quantize a timm model from a local weights file (no downloads).

We build timm's tiny ``test_byobnet`` for Fashion-MNIST (1 channel, 10 classes), train it for a
few seconds so its accuracy means something, and save its weights, standing in for the weights
file you already have. From there on it is what you would run on your own model:

    reparq quantize --model timm:test_byobnet --weights byobnet.safetensors --preset w8a8-fast

Run: ``python examples/timm_model.py`` (well under a minute on one CPU core).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import reparq
from reparq.data import calibration_subset, load_fashion_mnist
from reparq.sources import load_model_source


def train_briefly(model: torch.nn.Module, steps: int = 100, seed: int = 0) -> None:
    """A hundred AdamW steps on the training split: about 70% top-1, enough to make accuracy mean something."""
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
    net = timm.create_model("test_byobnet", num_classes=10, in_chans=1)
    train_briefly(net)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "byobnet.safetensors"
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
        # What `--model timm:test_byobnet --weights FILE` does: build the architecture with the
        # class count and input channels the file was trained with, then load it strictly.
        model = load_model_source("timm:test_byobnet", weights=str(weights))

    calib = calibration_subset(128, seed=0)
    test_x, test_y = load_fashion_mnist("test")
    test_x, test_y = test_x[:1000], test_y[:1000]
    fp = reparq.evaluate(model, test_x, test_y)
    print(f"test_byobnet FP: {fp:.2f}% top-1 (1000 test images)")
    # Family-free presets pick the family from the model: no Rep blocks, no attention -> "cnn".
    for preset in ("w8a8-fast", "w6a6-fast"):
        qmodel = reparq.quantize(model, calib, config=preset)
        acc = reparq.evaluate(qmodel, test_x, test_y)
        info = qmodel.reparq_info
        print(f"{preset}: recipe {info.recipe} W{info.config['w_bits']}A{info.config['a_bits']}: {acc:.2f}% "
              f"({acc - fp:+.2f}), calibrated in {info.calib_seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
