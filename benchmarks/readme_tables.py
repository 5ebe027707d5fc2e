"""Regenerate the README's tables from the committed cards and benchmark results.

Run: ``.venv/bin/python benchmarks/readme_tables.py``. Each table lives between
``<!-- BEGIN name -->`` and ``<!-- END name -->`` in README.md, so the figures the README quotes
are always the ones in ``benchmarks/results/`` and ``src/reparq/zoo/checkpoints/``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from reparq.report.tables import mean_std  # the same formatting as the results files

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CARDS = ROOT / "src" / "reparq" / "zoo" / "checkpoints"
TARGETS = {"repvgg_fm": 92.0, "repvgg_deep_fm": 92.0, "mobileone_fm": 92.0, "deit_fm": 89.0, "swin_fm": 89.0}
CLASSES = {"repvgg_fm": "ByobNet (RepVGG blocks)", "repvgg_deep_fm": "ByobNet (RepVGG blocks, deeper)",
           "mobileone_fm": "ByobNet (MobileOne, 4 kxk branches)", "deit_fm": "VisionTransformer (avg pool)",
           "swin_fm": "SwinTransformer"}
NOT_MEASURED = "(not measured yet)"
ORDER = ("minmax", "percentile", "mse", "mae", "adaround", "brecq", "qdrop", "repapq", "repqvit", "repquant")


def zoo_table() -> str:
    lines = ["| model | timm class | params | FP top-1 | target | train time (CPU, 1 thread) | command |",
             "|---|---|---|---|---|---|---|"]
    for path in sorted(CARDS.glob("*.json")):
        c = json.loads(path.read_text())
        n = c.get("name")
        if n not in TARGETS:  # the LLaMA text model has its own table
            continue
        ok = "met" if c["fp_top1"] >= TARGETS[n] else f"**missed by {TARGETS[n] - c['fp_top1']:.2f}**"
        cpu = c.get("train_cpu_seconds", c["train_seconds"])  # older cards: wall time of an uncontended run
        lines.append(f"| {n} | {CLASSES.get(n, '')} | {c['params']:,} | {c['fp_top1']:.2f} | ≥{TARGETS[n]:g} ({ok}) | "
                     f"{cpu / 60:.0f} min | `{c['command']}` |")
    return "\n".join(lines)


def _cell(values: list[float]) -> str:
    return mean_std(values) if values else "-"


def _rows(name: str) -> list[dict] | None:
    """The rows of ``benchmarks/results/<name>.json``, or None before it is measured."""
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text())["rows"] if path.exists() else None


def drop_table(name: str, bits: tuple[str, ...]) -> str:
    rows = _rows(name)
    if rows is None:
        return NOT_MEASURED
    recipes = [m for m in ORDER if any(r["method"] == m for r in rows)]
    lines = ["| model | W/A | FP | " + " | ".join(recipes) + " |", "|---|---|---|" + "---|" * len(recipes)]
    for model in sorted({r["model"] for r in rows}):
        fp = next(r["fp"] for r in rows if r["model"] == model)
        for b in bits:
            w, a = (int(v) for v in b[1:].split("A"))
            cells = []
            for m in recipes:
                sel = [r for r in rows if r["model"] == model and r["method"] == m and r["w_bits"] == w and r["a_bits"] == a]
                cells.append(_cell([r["delta"] for r in sel]))
            lines.append(f"| {model} | {b} | {fp:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def variant_table(name: str, column, label, order) -> str:
    """One row per variant (method), one column per ``column(row)`` value in ``order``: the Δ cells.
    Only the columns every variant was measured in (a single variant's extra widths stay in the
    results file)."""
    rows = _rows(name)
    if rows is None:
        return NOT_MEASURED
    variants = list(dict.fromkeys(r["method"] for r in rows))
    cols = sorted({column(r) for r in rows}, key=order)
    cols = [c for c in cols if all(any(r["method"] == v and column(r) == c for r in rows) for v in variants)]
    lines = ["| variant | " + " | ".join(f"{label(c)} Δ" for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for v in variants:
        cells = [_cell([r["delta"] for r in rows if r["method"] == v and column(r) == c]) for c in cols]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def real_table() -> str:
    """One line per model, metric and width, one column per recipe (the mean over the seeds
    measured, their number in the ``seeds`` column); the best cell in bold (highest cosine, lowest
    perplexity), so that "the best recipe in every cell" can be read off."""
    rows = _rows("transformers_real")
    if rows is None:
        return NOT_MEASURED
    rows = [r for r in rows if r["metric"] in ("cosine", "perplexity")]
    recipes = [m for m in ORDER if any(r["method"] == m for r in rows)]
    lines = ["| model | metric | W/A | seeds | FP | target | " + " | ".join(recipes) + " | target met by repquant |",
             "|---|---|---|---|---|---|" + "---|" * len(recipes) + "---|"]
    cells = list(dict.fromkeys((r["model"], r["metric"], r["w_bits"], r["a_bits"]) for r in rows))
    for cell in cells:
        sel = [r for r in rows if (r["model"], r["metric"], r["w_bits"], r["a_bits"]) == cell]
        by_recipe = {m: [r for r in sel if r["method"] == m] for m in recipes}
        means = {m: sum(r["quant"] for r in rs) / len(rs) for m, rs in by_recipe.items() if rs}
        higher = cell[1] == "cosine"
        best = (max if higher else min)(means.values())
        fmt = "{:.4f}" if higher else "{:.3f}"
        shown = [("**" + fmt.format(means[m]) + "**" if means[m] == best else fmt.format(means[m])) if m in means
                 else "-" for m in recipes]
        seeds = sorted({len(rs) for rs in by_recipe.values() if rs})
        oks = [r["ok"] for r in by_recipe.get("repquant", [])]
        ok = "-" if not oks or oks[0] is None else "yes" if all(oks) else "no"
        model, metric, w, a = cell
        lines.append(f"| {model} | {metric} | W{w}A{a} | {'/'.join(map(str, seeds))} | {fmt.format(sel[0]['fp'])} | "
                     f"{sel[0]['target'] or '-'} | " + " | ".join(shown) + f" | {ok} |")
    return "\n".join(lines)


def latency_table() -> str:
    all_rows = _rows("latency")
    if all_rows is None:
        return NOT_MEASURED
    # Both weight storages side by side: which is faster depends on the CPU (VNNI or not), and a
    # model whose "auto" choice is int8 everywhere has one row, shown under both.
    cells: dict[tuple, dict[str, dict]] = {}
    for r in all_rows:
        by = cells.setdefault((r["model"], r["batch"]), {})
        for storage in (("auto", "int8") if r["weights"].startswith("auto (= int8") else (r["weights"],)):
            by[storage] = r

    def cell(by: dict[str, dict], storage: str, field: str, fmt: str = "{}") -> str:
        return fmt.format(by[storage][field]) if storage in by else "-"

    lines = ["| model | batch | int8 / FP32 time, `auto` weights | `int8` weights | agreement with PyTorch (%), "
             "`auto` / `int8` (top-1; MiniLM: cosine x100) | int8 kernels in ORT's graph |", "|---|---|---|---|---|---|"]
    for (model, batch), by in cells.items():
        lines.append(f"| {model} | {batch} | {cell(by, 'auto', 'ratio', '{:.2f}')} | {cell(by, 'int8', 'ratio', '{:.2f}')} "
                     f"| {cell(by, 'auto', 'agreement')} / {cell(by, 'int8', 'agreement')} "
                     f"| {next(iter(by.values()))['int8_kernels']} |")
    return "\n".join(lines)


def _latency_real_kind(row: dict) -> str:
    """Which column of the real-size tables a ``latency_real`` row fills."""
    if row["method"] == "ort-minmax":
        return "ort"
    if row["method"] == "minmax":
        return "portable" if row.get("runtime") == "any" else "w7" if row.get("w_bits") == 7 else "minmax"
    return "norms" if "consumer_fold=norms" in row["variant"] else "recommended"


def _latency_real_cells(name: str) -> dict[tuple, dict[str, dict]] | None:
    """Batch-32 rows of ``results/<name>.json`` by (model, threads), then by column."""
    rows = _rows(name)
    if rows is None:
        return None
    cells: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r["batch"] == 32:
            cells.setdefault((r["model"], r["threads"]), {})[_latency_real_kind(r)] = r
    return cells


def _ratio(row: dict | None, key: str = "ratio", digits: int = 2) -> str:
    return "-" if row is None or row.get(key) is None else f"{row[key]:.{digits}f}"


def _recommended_cell(row: dict | None) -> str:
    """The recommended recipe's int8/FP32, named, since the recipe differs by family."""
    return "-" if row is None else f"{row['ratio']:.2f} (`{row['recipe']}`)"


def latency_real_table(name: str = "latency_real") -> str:
    """Batch 32, both thread counts: reparq's two exports and ORT's own int8 graph against ORT FP32,
    on a CPU with int8 dot products (VNNI or AMX): one results file per such CPU kind."""
    cells = _latency_real_cells(name)
    if cells is None:
        return NOT_MEASURED
    lines = ["| model | threads | reparq `minmax` int8/FP32 | reparq recommended | recommended, `consumer_fold=norms` | "
             "reparq `minmax`, portable QDQ | "
             "ORT `quantize_static` | reparq / ORT int8 time (minmax, recommended) | target | int8 kernels (reparq) | "
             "float ops | CPU int8 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (model, threads), by in cells.items():
        mm, rec, ort, portable = by.get("minmax"), by.get("recommended"), by.get("ort"), by.get("portable")
        vs_ort = " / ".join(_ratio(r, "vs_ort") for r in (mm, rec))
        kernels = (mm or {}).get("int8_kernels", "-")
        if rec is not None and rec.get("int8_kernels") != kernels:  # a recipe that changes the deployed graph
            kernels += f"; `{rec['recipe']}`: {rec.get('int8_kernels', '-')}"
        lines.append(f"| {model} | {threads} | {_ratio(mm)} | {_recommended_cell(rec)} | {_ratio(by.get('norms'))} | "
                     f"{_ratio(portable)} | {_ratio(ort)} | "
                     f"{vs_ort} | {(mm or {}).get('target', '-')} | "
                     f"{kernels} | {(mm or {}).get('float_ops', '-')} | "
                     f"{(mm or {}).get('int8_isa', '-')} |")
    return "\n".join(lines)


def latency_real_avx2_table() -> str:
    """The same on a CPU without VNNI, where the weight storage decides: the 7-bit-weight export
    (ORT's reduce_range trade) and the cheaper post-LN graph beside the default ones, and each
    graph's cosine to FP32, since those variants trade accuracy for speed."""
    cells = _latency_real_cells("latency_real_avx2")
    if cells is None:
        return NOT_MEASURED
    lines = ["| model | threads | reparq `minmax` | recommended | recommended, `consumer_fold=norms` | "
             "`minmax`, `w_bits=7` | portable QDQ | ORT `quantize_static` (reduce_range) | "
             "reparq / ORT int8 time (minmax, recommended, w7) | cos vs FP32 (minmax / recommended / w7 / ORT) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (model, threads), by in cells.items():
        mm, rec, w7, ort = (by.get(k) for k in ("minmax", "recommended", "w7", "ort"))
        vs_ort = " / ".join(_ratio(r, "vs_ort") for r in (mm, rec, w7))
        cosines = " / ".join(_ratio(r, "fp_cosine", 4) for r in (mm, rec, w7, ort))
        lines.append(f"| {model} | {threads} | {_ratio(mm)} | {_recommended_cell(rec)} | {_ratio(by.get('norms'))} | "
                     f"{_ratio(w7)} | "
                     f"{_ratio(by.get('portable'))} | {_ratio(ort)} | {vs_ort} | {cosines} |")
    return "\n".join(lines)


def scale_table() -> str:
    rows = _rows("scale")
    if rows is None:
        return NOT_MEASURED
    lines = ["| part | model | mode | recipe | layers | params | processes | calib s | peak RSS MB | samples/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['part']} | {r['model']} | {r['mode']} | {r['method']} | {r['layers']} | "
                     f"{r['params'] / 1e6:.1f} M | {r['processes']} | {r['calib_seconds']:.0f} | {r['peak_mem_mb']:.0f} | "
                     f"{r.get('samples_per_s', '-')} |")
    return "\n".join(lines)


PEER_ORDER = ("nncf", "nncf-no-smoothquant", "ort-minmax", "ort-percentile", "ort-entropy", "inc-default",
              "nncf-int4", "nncf-int4-awq", "inc-rtn", "inc-gptq")


def _peer_delta(row: dict) -> str:
    return {"cosine": f"{row['delta']:+.4f}", "perplexity": f"{row['delta']:+.3f}"}.get(row["metric"],
                                                                                  f"{row['delta']:+.2f}")


def _peer_cell_table(rows: list[dict], paired: dict, bits: tuple[int, int]) -> list[str]:
    """One bit width: per model reparq's row, each peer's Δ with the paired test's verdict, calib times."""
    peers = [m for m in PEER_ORDER if any(r["method"] == m for r in rows)]
    lines = [f"W{bits[0]}A{bits[1]}:", "", "| model | FP | reparq (recipe) | " + " | ".join(f"`{m}`" for m in peers) +
             " | reparq calib s | peers' calib s |", "|---|---|---|" + "---|" * len(peers) + "---|---|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        by = {r["method"]: r for r in rows if r["model"] == model}
        # one line per reparq row (W4A16: per channel and grouped), each peer paired with that row
        for ours in [r for r in rows if r["model"] == model and r.get("tool") == "reparq"]:
            lines.append(_peer_line(model, ours, peers, by, paired, bits))
    return lines


def _peer_line(model: str, ours: dict, peers: list[str], by: dict, paired: dict, bits: tuple[int, int]) -> str:
    """One reparq row and each peer's Δ, with the paired test against that row."""
    cells = []
    for m in peers:
        r = by.get(m)
        if r is None:
            cells.append("-")
            continue
        test = paired.get((model, m, *bits, ours["method"]))
        mark = ""
        if test is not None:
            mark = (" (reparq ahead, p={:.2g})".format(test["p_sign"]) if test["ref_ahead"] > test["rival_ahead"]
                    and test["p_sign"] < 0.05 else " (**peer ahead**, p={:.2g})".format(test["p_sign"])
                    if test["rival_ahead"] > test["ref_ahead"] and test["p_sign"] < 0.05
                    else " (n.s., p={:.2g})".format(test["p_sign"]))
        cells.append(_peer_delta(r) + mark)
    peer_s = [by[m]["calib_seconds"] for m in peers if m in by]
    return (f"| {model} | {ours['fp']:.2f} | {_peer_delta(ours)} (`{ours['method']}`) | " + " | ".join(cells)
            + f" | {ours['calib_seconds']:.0f} | {min(peer_s):.1f}-{max(peer_s):.1f} |")


def peers_table() -> str:
    """reparq's preset vs each peer tool, one table per bit width: Δ vs FP, the paired test's verdict,
    calibration time, and ORT speed, from results/peers.json (and peers_paired.json where it was run)."""
    path = RESULTS / "peers.json"
    if not path.exists():
        return NOT_MEASURED
    payload = json.loads(path.read_text())
    rows = payload["rows"]
    paired = {(r["model"], r["method"], r["w_bits"], r["a_bits"], r["reference"]): r
              for r in (_rows("peers_paired") or [])}
    lines: list[str] = []
    for bits in sorted({(r["w_bits"], r["a_bits"]) for r in rows}, key=lambda b: (-b[0], -b[1])):
        if lines:
            lines.append("")
        lines += _peer_cell_table([r for r in rows if (r["w_bits"], r["a_bits"]) == bits], paired, bits)
    speed = [r for r in rows if r.get("ratio") is not None]
    ort = [m for m in PEER_ORDER if m.startswith("ort-") and any(r["method"] == m for r in speed)]
    if speed:
        lines += ["", "ONNX Runtime int8/FP32 time of the same deployed graph (one thread, batch 64; minilm batch 32, "
                  "llama_fm batch 16 windows; timed together):", "",
                  "| model | reparq export | " + " | ".join(f"`{m}`" for m in ort) + " |", "|---|---|" + "---|" * len(ort)]
        for model in dict.fromkeys(r["model"] for r in speed):
            by = {("reparq" if r.get("tool") == "reparq" else r["method"]): r for r in speed if r["model"] == model}
            cells = [f"{by[m]['ratio']:.2f}" if m in by else "-" for m in ["reparq", *ort]]
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
    skipped = payload.get("skipped") or {}
    if skipped:
        lines += ["", "No row (skipped or failed, not counted): " + "; ".join(f"{k}: {v}" for k, v in skipped.items())]
    return "\n".join(lines)


TABLES = {
    "zoo": zoo_table,
    "ptq": lambda: drop_table("ptq_baselines", ("W8A8", "W6A6", "W4A8", "W4A4")),
    # RepAPQ: one model, columns by bits (highest first); RepQuant: columns by bits, then model.
    "repapq_ablation": lambda: variant_table("repapq_ablation", lambda r: (r["w_bits"], r["a_bits"]),
                                             lambda c: f"W{c[0]}A{c[1]}", lambda c: (-c[0], -c[1])),
    "repquant_ablation": lambda: variant_table("repquant_ablation", lambda r: (r["model"], r["w_bits"], r["a_bits"]),
                                               lambda c: f"{c[0]} W{c[1]}A{c[2]}", lambda c: (-c[1], c[0])),
    "real": real_table,
    "latency": latency_table,
    "latency_real": latency_real_table,
    "latency_real_vnni": lambda: latency_real_table("latency_real_vnni"),
    "latency_real_avx2": latency_real_avx2_table,
    "scale": scale_table,
    "peers": peers_table,
}


def main() -> int:
    readme = (ROOT / "README.md").read_text()
    for name, make in TABLES.items():
        pattern = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", re.S)
        if pattern.search(readme):
            readme = pattern.sub(lambda m: m.group(1) + make() + "\n" + m.group(2), readme)
    (ROOT / "README.md").write_text(readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
