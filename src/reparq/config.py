"""Configuration of one quantization run, validated on construction."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from reparq.errors import ReparqError
from reparq.quant.ranges import ESTIMATORS
from reparq.quant.uniform import check_bits


@dataclass
class QuantConfig:
    """What to quantize and how ranges are set.

    ``keep_first_last_8bit``: the first layer (it sees raw pixels) and the last (the
    classifier) stay at 8 bits, as the RepAPQ, BRECQ and RepQ-ViT papers do; switch it off to
    quantize them at the requested bits too.
    ``overrides``: ``{glob on module names: (w_bits, a_bits)}``, applied after that default.
    ``ignore``: globs of module names left in float.
    ``w_group_size``: one weight scale per ``w_group_size`` input columns of each Linear's output
    row instead of one per row (weight-only 4-bit LLMs: 32-128 is usual); Conv2d layers stay per
    channel. Needs ``w_per_channel``.
    ``strict``: fail on weight-carrying layer types the pass cannot quantize, instead of
    leaving them in float.
    """

    w_bits: int = 8
    a_bits: int = 8
    w_estimator: str = "minmax"
    a_estimator: str = "minmax"
    percentile: float = 99.99
    w_per_channel: bool = True
    w_group_size: int | None = None
    keep_first_last_8bit: bool = True
    ignore: tuple[str, ...] = ()
    overrides: dict[str, tuple[int, int]] = field(default_factory=dict)
    strict: bool = False
    observer_samples: int = 1 << 18

    def __post_init__(self) -> None:
        check_bits(self.w_bits, "w_bits")
        check_bits(self.a_bits, "a_bits")
        for key in ("w_estimator", "a_estimator"):
            if getattr(self, key) not in ESTIMATORS:
                raise ReparqError(f"{key} must be one of {', '.join(ESTIMATORS)}, got {getattr(self, key)!r}")
        if not (50.0 < self.percentile <= 100.0) or math.isnan(self.percentile):
            raise ReparqError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.w_group_size is not None:
            if not isinstance(self.w_group_size, int) or isinstance(self.w_group_size, bool) or self.w_group_size < 2:
                raise ReparqError(f"w_group_size must be an integer >= 2 (or None for one scale per channel), "
                                  f"got {self.w_group_size!r}")
            if not self.w_per_channel:
                raise ReparqError("w_group_size needs per-channel weights (w_per_channel=True)")
        self.ignore = tuple(self.ignore)
        for pattern, bits in self.overrides.items():
            if not (isinstance(bits, (tuple, list)) and len(bits) == 2):
                raise ReparqError(f"override {pattern!r} must be (w_bits, a_bits), got {bits!r}")
            check_bits(bits[0], f"w_bits of override {pattern!r}")
            check_bits(bits[1], f"a_bits of override {pattern!r}")
        if self.observer_samples < 1024:
            raise ReparqError(f"observer_samples must be at least 1024, got {self.observer_samples}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
