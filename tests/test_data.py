"""IDX reading and the Fashion-MNIST loaders, on tiny fake files written into tmp_path."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from reparq.data.fashion_mnist import MEAN, STD, calibration_subset, load_fashion_mnist, read_idx
from reparq.errors import ReparqError


def idx_bytes(arr: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.tobytes()


def write_idx(path: Path, arr: np.ndarray, type_code: int = 0x08) -> Path:
    raw = idx_bytes(arr, type_code)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def fake_split(root: Path, split: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
    prefix = "train" if split == "train" else "t10k"
    write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
    write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return images, labels


# ------------------------------------------------------------------------------------------ read_idx

def test_read_idx_gzip_uint8_images(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4) * 7
    out = read_idx(write_idx(tmp_path / "imgs-idx3-ubyte.gz", images))
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
    assert np.array_equal(out, images)


def test_read_idx_plain_uint8_labels(tmp_path):
    labels = np.array([3, 0, 9, 9, 1], dtype=np.uint8)
    path = write_idx(tmp_path / "labels-idx1-ubyte", labels)
    assert path.read_bytes()[:8] == b"\x00\x00\x08\x01\x00\x00\x00\x05"  # really uncompressed
    out = read_idx(path)
    assert out.shape == (5,) and np.array_equal(out, labels)


def test_read_idx_big_endian_int16_to_native(tmp_path):
    values = np.array([-2, 300, 1000, -32768], dtype=">i2")
    out = read_idx(write_idx(tmp_path / "x-idx1", values, type_code=0x0B))
    assert out.dtype == np.dtype("int16") and out.dtype.isnative
    assert out.tolist() == [-2, 300, 1000, -32768]


@pytest.mark.parametrize("raw", [b"\x01\x00\x08\x01\x00\x00\x00\x01\x05", b"\x00\x07\x08\x01", b"", b"\x00\x00"])
def test_read_idx_bad_magic_raises(tmp_path, raw):
    path = tmp_path / "bad-idx"
    path.write_bytes(raw)
    with pytest.raises(ReparqError, match="bad magic"):
        read_idx(path)


def test_read_idx_unknown_type_raises(tmp_path):
    path = tmp_path / "odd-idx"
    path.write_bytes(b"\x00\x00\x42\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ReparqError, match="unknown IDX element type 0x42"):
        read_idx(path)


@pytest.mark.parametrize("cut", [1, 10])
def test_read_idx_truncated_data_raises(tmp_path, cut):
    raw = idx_bytes(np.zeros((3, 4, 4), dtype=np.uint8))
    path = tmp_path / "short-idx3-ubyte"
    path.write_bytes(raw[:-cut])
    with pytest.raises(ReparqError, match="truncated"):
        read_idx(path)


def test_read_idx_truncated_gzip_data_raises(tmp_path):
    path = tmp_path / "short-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((3, 4, 4), dtype=np.uint8))[:-5]))
    with pytest.raises(ReparqError, match="truncated"):
        read_idx(path)


def test_read_idx_trailing_bytes_raise(tmp_path):
    path = tmp_path / "long-idx1-ubyte"
    path.write_bytes(idx_bytes(np.zeros(4, dtype=np.uint8)) + b"\x00")
    with pytest.raises(ReparqError):
        read_idx(path)


def test_read_idx_truncated_header_raises(tmp_path):
    # Declares 3 dimensions but the file ends inside the dimension sizes.
    path = tmp_path / "hdr-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x08\x03\x00\x00\x00\x02\x00\x00")
    with pytest.raises(ReparqError):
        read_idx(path)


def test_read_idx_truncated_gzip_stream_raises(tmp_path):
    # A download cut short: the compressed stream itself ends early.
    blob = gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8).reshape(2, 10, 10)))
    path = tmp_path / "cut-idx3-ubyte.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ReparqError):
        read_idx(path)


# ------------------------------------------------------------------------------- load_fashion_mnist

@pytest.mark.parametrize("split", ["train", "test"])
def test_load_fashion_mnist_from_fake_root(tmp_path, split):
    images, labels = fake_split(tmp_path, split, n=6, seed=0)
    x, y = load_fashion_mnist(split, root=tmp_path)
    assert x.shape == (6, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (6,) and y.dtype == torch.int64
    assert y.tolist() == labels.astype(int).tolist()
    expected = (torch.from_numpy(images.astype(np.float32)) / 255.0 - MEAN) / STD
    torch.testing.assert_close(x[:, 0], expected, rtol=0, atol=1e-6)
    # Pixel 0 and 255 map to the normalized ends.
    assert x.min().item() == pytest.approx((0 - MEAN) / STD, abs=1e-6)
    assert x.max().item() == pytest.approx((1 - MEAN) / STD, abs=1e-6)


def test_load_fashion_mnist_missing_files_hint(tmp_path):
    with pytest.raises(ReparqError, match="apt-get install dataset-fashion-mnist") as exc:
        load_fashion_mnist("test", root=tmp_path)
    assert "t10k-images-idx3-ubyte.gz" in str(exc.value)
    # Only the labels missing is reported too.
    fake_split(tmp_path, "train", n=3, seed=0)
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ReparqError, match="apt-get install dataset-fashion-mnist") as exc:
        load_fashion_mnist("train", root=tmp_path)
    assert "train-labels-idx1-ubyte.gz" in str(exc.value)


def test_load_fashion_mnist_bad_split_and_mismatched_counts(tmp_path):
    with pytest.raises(ReparqError, match="unknown Fashion-MNIST split 'val'"):
        load_fashion_mnist("val", root=tmp_path)
    fake_split(tmp_path, "test", n=4, seed=0)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(3, dtype=np.uint8))
    with pytest.raises(ReparqError, match="disagree on the number of samples"):
        load_fashion_mnist("test", root=tmp_path)


# ------------------------------------------------------------------------------- calibration_subset

def test_calibration_subset_seeded(tmp_path):
    fake_split(tmp_path, "train", n=40, seed=1)
    fake_split(tmp_path, "test", n=5, seed=2)
    a = calibration_subset(size=8, seed=0, root=tmp_path)
    b = calibration_subset(size=8, seed=0, root=tmp_path)
    c = calibration_subset(size=8, seed=1, root=tmp_path)
    assert a.shape == (8, 1, 28, 28)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Drawn from the training split without repetition.
    train_x, _ = load_fashion_mnist("train", root=tmp_path)
    flat_train = train_x.reshape(40, -1)
    idx = [int((flat_train == img.reshape(1, -1)).all(1).nonzero()[0]) for img in a]
    assert len(set(idx)) == 8
    g = torch.Generator().manual_seed(0)
    assert idx == torch.randperm(40, generator=g)[:8].tolist()


@pytest.mark.parametrize("size", [0, 41])
def test_calibration_subset_bad_size(tmp_path, size):
    fake_split(tmp_path, "train", n=40, seed=1)
    with pytest.raises(ReparqError, match="calibration size must be in 1..40"):
        calibration_subset(size=size, root=tmp_path)
