"""Datasets and calibration loaders (no download code: data comes from system packages)."""

from reparq.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    calibration_subset,
    load_fashion_mnist,
    read_idx,
)

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "calibration_subset",
    "load_fashion_mnist",
    "read_idx",
]
