"""Wall time and peak resident memory of a piece of work.

Peak RSS is sampled by a background thread (every 5 ms) from /proc, because the process-wide
``ru_maxrss`` never goes down and so cannot attribute a peak to one run among many.
"""

from __future__ import annotations

import resource
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

_STATUS = Path("/proc/self/status")


def current_rss_mb() -> float:
    if _STATUS.exists():
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class Measurement:
    seconds: float = 0.0
    peak_mem_mb: float = 0.0


@contextmanager
def measure(interval: float = 0.005):
    result = Measurement()
    result.peak_mem_mb = current_rss_mb()
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(interval):
            result.peak_mem_mb = max(result.peak_mem_mb, current_rss_mb())

    thread = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    thread.start()
    try:
        yield result
    finally:
        result.seconds = time.perf_counter() - start
        stop.set()
        thread.join()
        result.peak_mem_mb = round(max(result.peak_mem_mb, current_rss_mb()), 1)
