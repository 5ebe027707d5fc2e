"""Classification accuracy on a held-out split."""

from __future__ import annotations

import torch
import torch.nn as nn

from reparq.progress import SILENT, Reporter


@torch.no_grad()
def correct_predictions(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500,
                        reporter: Reporter = SILENT) -> torch.Tensor:
    """Per image, whether the top-1 class is the label (paired comparisons need the images, not the count)."""
    model.eval()
    reporter.stage("evaluate", total=-(-images.shape[0] // batch_size))
    hits = []
    for i in range(0, images.shape[0], batch_size):
        hits.append(model(images[i:i + batch_size]).argmax(dim=1) == labels[i:i + batch_size])
        reporter.advance(1)
    return torch.cat(hits)


def top1(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500,
         reporter: Reporter = SILENT) -> float:
    """Top-1 accuracy in percent."""
    correct = int(correct_predictions(model, images, labels, batch_size, reporter).sum())
    return 100.0 * correct / images.shape[0]
