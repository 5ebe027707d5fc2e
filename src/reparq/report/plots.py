"""The report's three figures, as small PNGs: per-layer SQNR bars, range histograms of the
worst layers, reconstruction loss curves. matplotlib is an optional dependency (``reparq[plots]``),
imported only here and only when a figure is drawn.
"""

from __future__ import annotations

import math
from pathlib import Path

from reparq.errors import ReparqError

DPI = 80
_BIT_COLORS = {2: "#b2182b", 3: "#d6604d", 4: "#f4a582", 5: "#fddbc7", 6: "#92c5de", 7: "#4393c3", 8: "#2166ac"}


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display, no GUI toolkit
        import matplotlib.pyplot as plt
    except ImportError:
        raise ReparqError("the report's figures need matplotlib: pip install 'reparq[plots]'") from None
    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", metadata={"Software": None})  # no version stamp: stable files
    _pyplot().close(fig)
    return path


def sqnr_bars(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Horizontal bars of per-layer SQNR (dB), in execution order, coloured by weight bits."""
    plt = _pyplot()
    names = [r["layer"] for r in rows]
    values = [r["sqnr_db"] if math.isfinite(r["sqnr_db"]) else 0.0 for r in rows]
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(rows) + 1.2))
    colors = [_BIT_COLORS.get(min(r["w_bits"], r["a_bits"]), "#999999") for r in rows]
    ax.barh(range(len(rows)), values, color=colors)
    ax.set_yticks(range(len(rows)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("SQNR of the layer output vs float (dB, higher is better)")
    for bits in sorted({min(r["w_bits"], r["a_bits"]) for r in rows}):
        ax.bar(0, 0, color=_BIT_COLORS.get(bits, "#999999"), label=f"{bits}-bit" if bits < 16 else "float")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title or "Per-layer SQNR", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def range_histograms(samples: list[dict], path: str | Path) -> Path:
    """One row per layer: its input values with the quantizer's kept range, and its weights over
    their channel's clipping bound (outside ±1 is clipped)."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(samples), 2, figsize=(8, 2.0 * len(samples) + 0.3), squeeze=False)
    for row, s in zip(axes, samples):
        ax = row[0]
        ax.hist(s["acts"].numpy(), bins=120, color="#4393c3", log=True)
        if s["act_range"]:
            for x in s["act_range"]:
                ax.axvline(x, color="#b2182b", lw=1)
        ax.set_title(f"{s['layer']} input (A{s['a_bits']}, {100 * s['act_clipped']:.2f}% clipped)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax = row[1]
        if s["weights"] is not None:
            ax.hist(s["weights"].numpy(), bins=120, color="#92c5de", log=True)
            for x in (-1.0, 1.0):
                ax.axvline(x, color="#b2182b", lw=1)
            ax.set_title(f"weights / channel clip (W{s['w_bits']})", fontsize=8)
        else:
            ax.set_axis_off()
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return _save(fig, path)


def loss_curves(curves: dict[str, list[float]], path: str | Path) -> Path:
    """Reconstruction loss of each unit against its (thinned) iteration index, log scale."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    cmap = plt.get_cmap("viridis")
    for i, (unit, values) in enumerate(curves.items()):
        xs = [j / max(1, len(values) - 1) for j in range(len(values))]
        ax.plot(xs, values, lw=1, color=cmap(i / max(1, len(curves) - 1)), label=unit)
    ax.set_yscale("log")
    ax.set_xlabel("fraction of the unit's iterations")
    ax.set_ylabel("reconstruction loss")
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.grid(alpha=0.3)
    return _save(fig, path)
