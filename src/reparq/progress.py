"""A minimal progress protocol, so library code reports work without depending on a UI.

The CLI passes a rich-backed reporter; library callers pass nothing (silent) or their own.
"""

from __future__ import annotations


class Reporter:
    """Silent by default. ``stage`` starts a named piece of work of ``total`` steps; ``label``
    names the job the stages belong to (set by whoever runs several jobs)."""

    label: str = ""

    def stage(self, description: str, total: int) -> None:  # pragma: no cover - interface
        pass

    def advance(self, n: int = 1, info: str = "") -> None:  # pragma: no cover - interface
        pass


SILENT = Reporter()
