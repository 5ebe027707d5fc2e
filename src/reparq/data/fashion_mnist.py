"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (IDX gzip files).

We read the IDX format ourselves (it is twenty lines) instead of pulling in torchvision's
dataset classes, whose code path is built around downloading.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch

from reparq.errors import ReparqError

FASHION_MNIST_DIR = Path(os.environ.get("REPARQ_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
INSTALL_HINT = "install it with: sudo apt-get install dataset-fashion-mnist (or set REPARQ_FASHION_MNIST_DIR)"
FASHION_MNIST_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)
# Pixel statistics of the training split, so every model sees inputs of mean 0 and std 1.
MEAN, STD = 0.2860, 0.3530

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_SPLIT_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzip or plain) into an array of its declared dtype and shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (EOFError, OSError) as exc:  # a cut-off or corrupt gzip stream
        raise ReparqError(f"{path}: cannot read ({exc}); reinstall the data package") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ReparqError(f"{path} is not an IDX file (bad magic number)")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise ReparqError(f"{path}: unknown IDX element type 0x{type_code:02x}")
    if len(raw) < 4 + 4 * ndim:
        raise ReparqError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[type_code])
    count = int(np.prod(shape)) if shape else 1
    offset = 4 + 4 * ndim
    if len(raw) - offset != count * dtype.itemsize:
        raise ReparqError(f"{path}: truncated IDX file (expected {count} elements of shape {shape})")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def normalize_images(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images [N, 28, 28] to float tensors [N, 1, 28, 28] with the training-split statistics."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32).div_(255.0)
    return x.sub_(MEAN).div_(STD).unsqueeze(1)


def load_fashion_mnist(split: str = "test", root: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return normalized images [N, 1, 28, 28] and int64 labels [N] of one split."""
    if split not in _SPLIT_FILES:
        raise ReparqError(f"unknown Fashion-MNIST split {split!r}; choose 'train' or 'test'")
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    img_file, lbl_file = (root / name for name in _SPLIT_FILES[split])
    for f in (img_file, lbl_file):
        if not f.exists():
            raise ReparqError(f"Fashion-MNIST file {f} not found; {INSTALL_HINT}")
    images, labels = read_idx(img_file), read_idx(lbl_file)
    if images.shape[0] != labels.shape[0]:
        raise ReparqError(f"{img_file} and {lbl_file} disagree on the number of samples")
    return normalize_images(images), torch.as_tensor(labels.astype(np.int64))


def calibration_subset(size: int = 1024, seed: int = 0, root: str | Path | None = None) -> torch.Tensor:
    """A seeded random subset of the *training* split: calibration never sees test images."""
    images, _ = load_fashion_mnist("train", root)
    if not 1 <= size <= images.shape[0]:
        raise ReparqError(f"calibration size must be in 1..{images.shape[0]}, got {size}")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(images.shape[0], generator=gen)[:size]
    return images[idx].clone()
