"""Deployment: saving and loading quantized models, ONNX QDQ export and the ONNX Runtime runner
(``reparq.deploy.onnx_export``, ``reparq.deploy.ort_runner``; imported on use, they need onnx)."""

from reparq.deploy.serialize import load, save

__all__ = ["load", "save"]
