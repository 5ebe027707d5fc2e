"""What a quantized model remembers about how it was made, and the package version.

A module of its own (not ``reparq.api``) so that the deploy package, which writes and reads
this record, depends on nothing above it: ``api`` -> ``runconfig`` -> ``deploy.serialize``
would otherwise close an import circle back to ``api``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__version__ = "0.1.0"


@dataclass
class QuantInfo:
    """What a quantized model remembers about how it was made (``model.reparq_info``)."""

    recipe: str
    config: dict
    seed: int
    calib_samples: int
    calib_seconds: float = 0.0
    peak_mem_mb: float = 0.0
    extra: dict = field(default_factory=dict)
