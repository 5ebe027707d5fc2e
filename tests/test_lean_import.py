"""`import reparq` must not pull in the heavy optional dependencies."""

import subprocess
import sys


def test_import_reparq_is_lean():
    code = ("import sys, reparq; heavy = [m for m in ('timm', 'transformers', 'onnx', 'onnxruntime', 'matplotlib') "
            "if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
