"""Quantizers (uniform, log) and range estimators."""

from reparq.quant.log import LogQuantizer
from reparq.quant.observer import ActivationObserver
from reparq.quant.ranges import ESTIMATORS, estimate_params, lp_search_params, minmax_params, percentile_params
from reparq.quant.uniform import UniformQuantizer, fake_quant, int_range, round_ste

__all__ = [
    "ESTIMATORS", "ActivationObserver", "LogQuantizer", "UniformQuantizer", "estimate_params", "fake_quant",
    "int_range", "lp_search_params", "minmax_params", "percentile_params", "round_ste",
]
