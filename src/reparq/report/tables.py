"""Result tables: rich for the terminal, Markdown for benchmarks/results."""

from __future__ import annotations

from rich.table import Table

COLUMNS = (("model", "model"), ("method", "method"), ("bits", "W/A"), ("fp", "FP top-1"), ("quant", "quant top-1"),
           ("delta", "Δ"), ("calib_seconds", "calib s"), ("peak_mem_mb", "peak MB"))


def _cell(row: dict, key: str) -> str:
    if key == "bits":
        return f"W{row['w_bits']}A{row['a_bits']}"
    value = row.get(key)
    if key == "delta" and isinstance(value, (int, float)):
        return f"{value:+.2f}"
    if isinstance(value, float):
        return f"{value:.2f}" if key in ("fp", "quant") else f"{value:g}"
    return "" if value is None else str(value)


def rich_table(rows: list[dict], title: str | None = None) -> Table:
    table = Table(title=title)
    for key, header in COLUMNS:
        table.add_column(header, justify="left" if key in ("model", "method", "bits") else "right")
    for row in rows:
        table.add_row(*(_cell(row, k) for k, _ in COLUMNS))
    return table


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r, k) for k, _ in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)
