"""Calibration beyond one machine's memory: layer-streamed quantization of sharded Hugging Face
decoders (:func:`quantize_streamed`), resumable, data-parallel under ``torchrun``."""

from reparq.stream.calibrate import STREAMABLE, StreamResult, quantize_streamed
from reparq.stream.checkpoint import LazyCheckpoint, write_sharded

__all__ = ["LazyCheckpoint", "STREAMABLE", "StreamResult", "quantize_streamed", "write_sharded"]
