"""``reparq report``: one run, explained in a self-contained HTML file and a Markdown file.

What a person deciding whether to ship a quantized model wants on one page: the accuracy
table, where the signal is lost (per-layer SQNR), why (range histograms of the worst layers:
clipped outliers or a wasted grid), whether reconstruction converged (loss curves), and what
it cost (time, memory). The HTML embeds its images (base64) so it can be mailed or attached
to a CI run as one file; the Markdown links the same PNGs, for a repository.

Everything is written at the end, through a temporary folder: a failed run leaves nothing.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from reparq.progress import SILENT, Reporter
from reparq.recipes.calibrate import batch_samples
from reparq.report.sqnr import compare_outputs, layer_sqnr, range_samples
from reparq.report.tables import markdown_table

FIGURES = {"sqnr": "sqnr.png", "ranges": "ranges.png", "loss": "loss.png"}


@dataclass
class ReportData:
    title: str
    command: str
    rows: list[dict]  # the accuracy table, in the benchmark row format (DESIGN.md section 5)
    eval_note: str
    sqnr: list[dict]
    output_sqnr_db: float
    worst: list[dict]  # range samples of the lowest-SQNR layers (tensors; not in the JSON)
    curves: dict[str, list[float]]
    timing: dict
    run: dict
    environment: dict = field(default_factory=dict)
    sqnr_samples: int = 0
    date: str = field(default_factory=lambda: _dt.date.today().isoformat())

    def to_json(self) -> dict:
        d = asdict(self)
        d["worst"] = [{k: v for k, v in w.items() if k not in ("acts", "weights")} for w in self.worst]
        return d


def collect(float_model: nn.Module, qmodel: nn.Module, inputs: Any, labels: torch.Tensor | None, eval_note: str,
            title: str, command: str, run: dict, model_name: str, top: int = 3, sqnr_samples: int = 256,
            reporter: Reporter = SILENT) -> ReportData:
    """Measure everything the report shows (accuracy or agreement, SQNR, ranges, curves, cost)."""
    from reparq.report.results import environment

    info = qmodel.reparq_info
    reporter.stage("evaluate FP and quantized", total=1)
    start = time.perf_counter()
    scores = compare_outputs(float_model, qmodel, inputs, labels)
    reporter.advance(1)
    eval_seconds = time.perf_counter() - start
    metric, fp, quant = ("top1" if labels is not None else "agreement"), scores.fp_score, scores.q_score
    row = {"model": model_name, "method": info.recipe, "w_bits": info.config["w_bits"], "a_bits": info.config["a_bits"],
           "metric": metric, "fp": round(fp, 2), "quant": round(quant, 2), "delta": round(quant - fp, 2),
           "calib_seconds": info.calib_seconds, "peak_mem_mb": info.peak_mem_mb, "seed": info.seed}
    fp_row = {**row, "method": "fp", "w_bits": 32, "a_bits": 32, "quant": row["fp"], "delta": 0.0,
              "calib_seconds": 0.0, "peak_mem_mb": 0.0, "seed": None}
    reporter.stage("per-layer SQNR", total=1)
    held_out = inputs[:sqnr_samples] if isinstance(inputs, torch.Tensor) else inputs[:max(1, sqnr_samples // 32)]
    batches = list(held_out.split(64)) if isinstance(held_out, torch.Tensor) else list(held_out)
    sqnr, out_sqnr = layer_sqnr(float_model, qmodel, batches)
    reporter.advance(1)
    worst_names = [r["layer"] for r in sorted(sqnr, key=lambda r: r["sqnr_db"])[:top]]
    worst = range_samples(qmodel, worst_names, batches[0])
    timing = {"calib_seconds": info.calib_seconds, "peak_mem_mb": info.peak_mem_mb,
              "eval_seconds": round(eval_seconds, 2), "calib_samples": info.calib_samples}
    return ReportData(title=title, command=command, rows=[fp_row, row], eval_note=eval_note, sqnr=sqnr,
                      output_sqnr_db=out_sqnr, worst=worst, curves=dict(info.extra.get("recon_loss", {})),
                      timing=timing, run=run, environment=environment(),
                      sqnr_samples=sum(batch_samples(b) for b in batches))


# -- writing ---------------------------------------------------------------------------------

def _fmt_db(x: float) -> str:
    return "∞" if math.isinf(x) and x > 0 else f"{x:.1f}"


def _bits(r: dict) -> str:
    return "float" if min(r["w_bits"], r["a_bits"]) >= 16 else f"W{r['w_bits']}A{r['a_bits']}"


def _figures(data: ReportData, folder: Path) -> dict[str, Path]:
    from reparq.report import plots

    figs = {"sqnr": plots.sqnr_bars(data.sqnr, folder / FIGURES["sqnr"],
                                    title=f"Per-layer SQNR (output: {_fmt_db(data.output_sqnr_db)} dB)")}
    if data.worst:
        figs["ranges"] = plots.range_histograms(data.worst, folder / FIGURES["ranges"])
    if data.curves:
        figs["loss"] = plots.loss_curves(data.curves, folder / FIGURES["loss"])
    return figs


def _sections(data: ReportData) -> list[tuple[str, str, list[list[str]] | None, str | None]]:
    """(heading, text, table rows with a header row, figure key) for both renderers."""
    t = data.timing
    worst = sorted(data.sqnr, key=lambda r: r["sqnr_db"])[:len(data.worst)]
    sections = [
        ("Per-layer SQNR", f"SQNR of each quantized layer's output against the float model's (same inputs, "
                           f"error accumulated up to that layer), on the first {data.sqnr_samples} of those "
                           f"inputs; output SQNR "
                           f"{_fmt_db(data.output_sqnr_db)} dB. Worst: "
                           + ", ".join(f"{r['layer']} ({_fmt_db(r['sqnr_db'])} dB)" for r in worst) + ".",
         [["layer", "type", "bits", "SQNR dB"]] + [[r["layer"], r["type"], _bits(r), _fmt_db(r["sqnr_db"])]
                                                  for r in data.sqnr], "sqnr"),
        ("Ranges of the worst layers", "Left: the values each input quantizer sees, with the range it keeps "
                                       "(red lines; values outside are clipped). Right: weights divided by their "
                                       "channel's clipping bound (outside ±1 is clipped).", None, "ranges"),
    ]
    if data.curves:
        sections.append(("Reconstruction", f"Loss of each of the {len(data.curves)} reconstruction units over its "
                                           "iterations (thinned to at most 200 points).", None, "loss"))
    cost = [["calibration s", "peak RSS MB", "evaluation s", "calibration samples"],
            [f"{t['calib_seconds']:g}", f"{t['peak_mem_mb']:g}", f"{t['eval_seconds']:g}", str(t["calib_samples"])]]
    sections.append(("Time and memory", "", cost, None))
    return sections


def render_markdown(data: ReportData, figs: dict[str, Path]) -> str:
    env = data.environment
    lines = [f"# {data.title}", "", f"- command: `{data.command}`", f"- date: {data.date}",
             f"- machine: {env.get('machine', '')}",
             f"- versions: {', '.join(f'{k} {v}' for k, v in env.items() if k != 'machine')}", "",
             "## Accuracy", "", f"Measured on {data.eval_note}.", "", markdown_table(data.rows), ""]
    for heading, text, table, fig in _sections(data):
        lines += [f"## {heading}", ""]
        if text:
            lines += [text, ""]
        if fig and fig in figs:
            lines += [f"![{heading}]({figs[fig].name})", ""]
        if table:
            lines += ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
            lines += ["| " + " | ".join(r) + " |" for r in table[1:]] + [""]
    lines += ["## Run configuration", "", "```yaml", _yaml(data.run).rstrip(), "```", ""]
    return "\n".join(lines)


def _yaml(d: dict) -> str:
    import yaml

    return yaml.safe_dump(json.loads(json.dumps(d, default=list)), sort_keys=False)


def _html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = ("body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.2em .6em;"
        "text-align:right;font-size:.9em}td:first-child,th:first-child{text-align:left}"
        "img{max-width:100%}code,pre{background:#f4f4f4;padding:.1em .3em}")


def render_html(data: ReportData, figs: dict[str, Path]) -> str:
    from reparq.report.tables import _columns, _cell

    cols = _columns(())
    acc = [[h for _, h in cols]] + [[_cell(r, k) for k, _ in cols] for r in data.rows]
    env = data.environment
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(data.title)}</title>"
             f"<style>{_CSS}</style></head><body>", f"<h1>{html.escape(data.title)}</h1>",
             f"<p>command: <code>{html.escape(data.command)}</code><br>date: {data.date}<br>"
             f"machine: {html.escape(env.get('machine', ''))}<br>versions: "
             f"{html.escape(', '.join(f'{k} {v}' for k, v in env.items() if k != 'machine'))}</p>",
             "<h2>Accuracy</h2>", f"<p>Measured on {html.escape(data.eval_note)}.</p>", _html_table(acc)]
    for heading, text, table, fig in _sections(data):
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if text:
            parts.append(f"<p>{html.escape(text)}</p>")
        if fig and fig in figs:
            b64 = base64.b64encode(figs[fig].read_bytes()).decode()
            parts.append(f"<img alt='{html.escape(heading)}' src='data:image/png;base64,{b64}'>")
        if table:
            parts.append(_html_table(table))
    parts += ["<h2>Run configuration</h2>", f"<pre>{html.escape(_yaml(data.run))}</pre>", "</body></html>"]
    return "\n".join(parts)


def write_report(data: ReportData, out_dir: str | Path) -> dict[str, Path]:
    """``report.html`` (images embedded), ``report.md`` + PNGs, ``report.json``; all or nothing."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".reparq-report-", dir=out_dir.parent))
    try:
        figs = _figures(data, tmp)
        (tmp / "report.md").write_text(render_markdown(data, figs))
        (tmp / "report.html").write_text(render_html(data, figs))
        (tmp / "report.json").write_text(json.dumps(data.to_json(), indent=1, default=str) + "\n")
        out_dir.mkdir(exist_ok=True)
        written = {}
        for f in sorted(tmp.iterdir()):
            target = out_dir / f.name
            shutil.move(str(f), target)
            written[f.name] = target
        return written
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- the command -----------------------------------------------------------------------------

def run_report(run, out_dir: str | Path, command: str, eval_size: int = 2000, top: int = 3,
               reporter: Reporter = SILENT) -> tuple[ReportData, dict[str, Path]]:
    """Quantize as ``run`` says, measure, and write the report (the body of ``reparq report``)."""
    from reparq.api import quantize
    from reparq.report.plots import _pyplot
    from reparq.runconfig import check_globs
    from reparq.sources import evaluation_set, load_calibration, load_model_source, short_name

    _pyplot()  # fail before an expensive run if the figures cannot be drawn
    model = load_model_source(run.model, run.weights)
    check_globs(run, model)
    calib = load_calibration(run.calib, model, run.model, seed=run.seed)
    inputs, labels, note = evaluation_set(run, calib, eval_size)
    reporter.label = f"{short_name(run.model)} {run.recipe} W{run.w_bits}A{run.a_bits}"
    qmodel = quantize(model, calib, config=run, reporter=reporter)
    name = short_name(run.model)
    title = f"reparq report: {name}, {run.recipe} W{run.w_bits}A{run.a_bits}"
    data = collect(model, qmodel, inputs, labels, note, title, command,
                   run.model_dump(mode="json", exclude_none=True), name, top=top,
                   reporter=reporter)
    return data, write_report(data, out_dir)
