"""Classification accuracy on a held-out split."""

from __future__ import annotations

import torch
import torch.nn as nn

from reparq.progress import SILENT, Reporter


@torch.no_grad()
def top1(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500,
         reporter: Reporter = SILENT) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = 0
    reporter.stage("evaluate", total=-(-images.shape[0] // batch_size))
    for i in range(0, images.shape[0], batch_size):
        correct += int((model(images[i:i + batch_size]).argmax(dim=1) == labels[i:i + batch_size]).sum())
        reporter.advance(1)
    return 100.0 * correct / images.shape[0]
