"""Deployment: saving and loading quantized models (ONNX export follows in issue 7)."""

from reparq.deploy.serialize import load, save

__all__ = ["load", "save"]
