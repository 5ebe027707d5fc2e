"""Classification accuracy on a held-out split."""

from __future__ import annotations

import torch
import torch.nn as nn


@torch.no_grad()
def top1(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500, progress=None) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        correct += int((model(images[i:i + batch_size]).argmax(dim=1) == labels[i:i + batch_size]).sum())
        if progress is not None:
            progress(1)
    return 100.0 * correct / images.shape[0]
