"""Timing deployed graphs on a shared CPU: interleaved repeats and the CPU's int8 instructions.

Shared by every speed benchmark (``benchmarks/latency*.py``, the peers' ORT rows) so that their
ratios come from one harness. Absolute times on a shared 2-core machine are noise; a ratio of two
variants timed in the same run, interleaved so that load from other processes hits both alike,
is what can be quoted.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

# x86 feature flags (as /proc/cpuinfo names them) that decide which int8 kernels ONNX Runtime's
# MLAS can pick: AVX2 (vpmaddubsw, 16-bit pair sums), AVX512-VNNI / AVX-VNNI (vpdpbusd), AMX tiles.
INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags; empty where the file cannot be read (non-Linux, containers)."""
    try:
        with open(cpuinfo) as f:
            line = next(line for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(line.split(":", 1)[-1].split())


def cpu_isa(flags: set[str] | None = None) -> str:
    """``avx2=yes, avx512f=yes, avx512_vnni=yes, avx_vnni=no, amx_int8=no``: recorded with every speed row."""
    flags = cpu_flags() if flags is None else flags
    if not flags:
        return "unknown"
    return ", ".join(f"{f}={'yes' if f in flags else 'no'}" for f in INT8_FLAGS)


def int8_instructions(flags: set[str] | None = None) -> str:
    """The best int8 dot-product path the CPU has: ``AMX``, ``AVX512-VNNI``, ``AVX-VNNI``, ``AVX2`` or ``none``."""
    flags = cpu_flags() if flags is None else flags
    for flag, name in (("amx_int8", "AMX"), ("avx512_vnni", "AVX512-VNNI"), ("avx_vnni", "AVX-VNNI"),
                       ("avx2", "AVX2")):
        if flag in flags:
            return name
    return "none" if flags else "unknown"


def has_vnni(flags: set[str] | None = None) -> bool:
    """Whether u8 x s8 products are summed in 32 bits (no int16 saturation): VNNI or AMX."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def time_interleaved(runs: dict[str, Callable[[], object]], repeats: int, inner: int = 1,
                     warmup: int = 3) -> dict[str, float]:
    """Median over ``repeats`` of the mean time (ms) of ``inner`` calls, variants interleaved.

    Each repeat runs every variant once, starting at a rotating position, so that a burst of load
    from another process does not land on one variant only.
    """
    if repeats < 1 or inner < 1:
        raise ValueError("repeats and inner must be at least 1")
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    names = list(runs)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            for _ in range(inner):
                runs[name]()
            samples[name].append((time.perf_counter() - t0) * 1000.0 / inner)
    return {n: float(np.median(v)) for n, v in samples.items()}


__all__ = ["INT8_FLAGS", "cpu_flags", "cpu_isa", "has_vnni", "int8_instructions", "time_interleaved"]
