"""Result tables: rich for the terminal, Markdown for benchmarks/results."""

from __future__ import annotations

import statistics

from rich.table import Table

COLUMNS = (("model", "model"), ("method", "method"), ("bits", "W/A"), ("fp", "FP"), ("quant", "quant"),
           ("delta", "Δ"), ("calib_seconds", "calib s"), ("peak_mem_mb", "peak MB"))


def _cell(row: dict, key: str) -> str:
    if key == "bits":
        return "FP32" if row["w_bits"] >= 32 else f"W{row['w_bits']}A{row['a_bits']}"
    if row.get("method") == "fp" and key in ("delta", "calib_seconds", "peak_mem_mb"):
        return "-"
    value = row.get(key)
    if key == "delta" and isinstance(value, (int, float)):
        return f"{value:+.2f}"
    if isinstance(value, float):
        return f"{value:.2f}" if key in ("fp", "quant") else f"{value:g}"
    return "" if value is None else str(value)


def _columns(extra: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """The standard columns, with a benchmark's own keys (e.g. ``iters``) after the bit widths."""
    return COLUMNS[:3] + tuple((k, k) for k in extra) + COLUMNS[3:]


def rich_table(rows: list[dict], title: str | None = None, extra: tuple[str, ...] = ()) -> Table:
    table = Table(title=title)
    for key, header in _columns(extra):
        table.add_column(header, justify="left" if key in ("model", "method", "bits") else "right", no_wrap=True)
    for row in rows:
        table.add_row(*(_cell(row, k) for k, _ in _columns(extra)))
    return table


def markdown_table(rows: list[dict], extra: tuple[str, ...] = ()) -> str:
    cols = _columns(extra)
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r, k) for k, _ in cols) + " |" for r in rows]
    return "\n".join(lines)


def mean_std(values: list[float]) -> str:
    """A signed accuracy difference, or ``mean ± std`` over seeds when there are several."""
    if len(values) == 1:
        return f"{values[0]:+.2f}"
    return f"{statistics.mean(values):+.2f} ± {statistics.stdev(values):.2f}"
