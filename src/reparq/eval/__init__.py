"""Evaluation: accuracy, time and memory."""

from reparq.eval.accuracy import top1
from reparq.eval.measure import Measurement, measure

__all__ = ["Measurement", "measure", "top1"]
