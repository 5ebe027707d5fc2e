"""Which layers can take low bits, and which should stay at 8: sensitivity and a mixed-precision plan.

Each layer (or block) is quantized *alone* at the requested bits, the rest of the model in float,
and ranked by what that costs: the accuracy drop (or agreement with the float model when there
are no labels), or, faster, the SQNR of the model's output on a held-out batch. Then layers are
moved back to 8 bits in order of sensitivity until the whole model is within the accuracy budget.

Why only range recipes (minmax, percentile, mse, mae): their ranges for a layer depend on that
layer's weights and its *float* inputs only, so one calibration at the low bits and one at 8 bits
give every one-at-a-time and every mixed model exactly (switching quantizers on and off, or
swapping a layer's quantizers between the two), instead of one calibration per candidate. The
suggested overrides then carry over to any recipe as a starting point.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from reparq.errors import ReparqError
from reparq.nn.qmodules import quantized_layers
from reparq.progress import SILENT, Reporter
from reparq.report.sqnr import AgreementScorer, predictions, samples_with_output_within, sqnr_db

RANGE_RECIPES = ("minmax", "percentile", "mse", "mae")
METRICS = ("accuracy", "sqnr")
GRANULARITIES = ("layer", "block")


def _units(qmodel: nn.Module, granularity: str, block_globs: tuple[str, ...] | None) -> list[tuple[str, list[str]]]:
    if granularity == "layer":
        return [(n, [n]) for n, _ in quantized_layers(qmodel)]
    from reparq.model.blocks import discover_units

    return [(u.name, list(u.layers)) for u in discover_units(qmodel, block_globs)]


def _enable_only(qmodel: nn.Module, names: set[str] | None) -> None:
    """Quantize only the named layers (all of them for ``None``)."""
    for n, layer in quantized_layers(qmodel):
        on = names is None or n in names
        layer.set_quant_enabled(on, on)


def _swap_quantizers(a: nn.Module, b: nn.Module, names: list[str]) -> None:
    """Exchange the named layers' quantizers between two quantized copies of one model (self-inverse)."""
    for n in names:
        la, lb = a.get_submodule(n), b.get_submodule(n)
        for attr in ("weight_quantizer", "input_quantizer"):
            qa, qb = getattr(la, attr), getattr(lb, attr)
            setattr(la, attr, qb)
            setattr(lb, attr, qa)


def check_arguments(recipe: str, metric: str, granularity: str, budget: float) -> None:
    """Fail on bad arguments before any model or data is loaded."""
    if recipe not in RANGE_RECIPES:
        raise ReparqError(f"sensitivity uses a range recipe ({', '.join(RANGE_RECIPES)}), got {recipe!r}: "
                          "layers are switched one at a time without recalibrating")
    if metric not in METRICS:
        raise ReparqError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if granularity not in GRANULARITIES:
        raise ReparqError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    if not budget >= 0:
        raise ReparqError(f"budget must be a non-negative number of points, got {budget}")


def analyze(model: nn.Module, calib: Any, inputs: Any, labels: torch.Tensor | None, w_bits: int, a_bits: int,
            budget: float = 1.0, recipe: str = "mse", metric: str = "accuracy", granularity: str = "layer",
            block_globs: tuple[str, ...] | None = None, seed: int = 0, sqnr_samples: int = 256,
            budget_mb: float = 256.0, reporter: Reporter = SILENT) -> dict:
    """Rank layers (or blocks) by sensitivity and suggest which to keep at W8A8 within ``budget``.

    ``inputs``/``labels`` are the held-out evaluation data; without labels the score is agreement
    with the float model (:func:`reparq.report.sqnr.agreement`). Scores are in percent, so the
    budget is in points of accuracy (or agreement). ``budget_mb`` bounds the float outputs held
    for scoring and for the SQNR batch (a causal LM's logits over the evaluation set would not fit;
    see :class:`reparq.report.sqnr.AgreementScorer`).
    """
    from reparq.api import quantize

    check_arguments(recipe, metric, granularity, budget)
    kw = dict(recipe=recipe, seed=seed, keep_first_last_8bit=False)
    q_low = quantize(model, calib, w_bits=w_bits, a_bits=a_bits, reporter=reporter, **kw)
    q_8 = quantize(model, calib, w_bits=8, a_bits=8, reporter=reporter, **kw)
    score = AgreementScorer(model, inputs, labels, budget_mb=budget_mb)
    fp_score = score.fp_score
    # The SQNR's float output is held whole: fewer samples where it would pass the budget.
    held = (inputs[:samples_with_output_within(model, inputs, budget_mb, sqnr_samples)]
            if isinstance(inputs, torch.Tensor) else inputs[:1])
    fp_held = predictions(model, held)

    def out_sqnr(m: nn.Module) -> float:
        out = predictions(m, held)
        return sqnr_db(float(fp_held.double().pow(2).sum()), float((fp_held.double() - out.double()).pow(2).sum()))

    units = _units(q_low, granularity, block_globs)
    reporter.stage(f"sensitivity ({metric})", total=len(units))
    rows = []
    try:
        for name, layers in units:
            _enable_only(q_low, set(layers))
            row = {"unit": name, "layers": layers, "sqnr_db": round(out_sqnr(q_low), 3)}
            if metric == "accuracy":
                row["score"] = round(score(q_low), 2)
                row["drop"] = round(fp_score - row["score"], 2)
            rows.append(row)
            reporter.advance(1, info=name)
    finally:
        _enable_only(q_low, None)
    key = (lambda r: (-r["drop"], r["sqnr_db"])) if metric == "accuracy" else (lambda r: r["sqnr_db"])
    rows.sort(key=key)
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    # Greedy: move the most sensitive units back to 8 bits until the whole model is within budget.
    reporter.stage("mixed precision", total=len(rows) + 1)
    path, keep = [], []
    for k in range(len(rows) + 1):
        keep = [n for r in rows[:k] for n in r["layers"]]
        _swap_quantizers(q_low, q_8, keep)
        try:
            s = score(q_low)
        finally:
            _swap_quantizers(q_low, q_8, keep)
        path.append({"kept_8bit": k, "score": round(s, 2), "drop": round(fp_score - s, 2)})
        reporter.advance(1)
        if fp_score - s <= budget:
            break
    within = path[-1]["drop"] <= budget
    return {"recipe": recipe, "w_bits": w_bits, "a_bits": a_bits, "metric": metric, "granularity": granularity,
            "budget": budget, "fp": round(fp_score, 2), "score_kind": "top1" if labels is not None else "agreement",
            "all_low": path[0]["score"], "all_8bit": round(score(q_8), 2), "rows": rows, "path": path,
            "suggestion": {"keep_8bit": keep, "score": path[-1]["score"], "drop": path[-1]["drop"],
                           "within_budget": within, "overrides": {n: "W8A8" for n in keep}}}


def suggested_config(result: dict, run) -> Any:
    """The run with the suggestion applied: overrides for the kept layers, every other layer at the
    requested bits (``keep_first_last_8bit`` off: the analysis decides about the edges too)."""
    return run.updated(w_bits=result["w_bits"], a_bits=result["a_bits"],
                       overrides=dict(result["suggestion"]["overrides"]),
                       options={"keep_first_last_8bit": False})


def run_sensitivity(run, budget: float, metric: str = "accuracy", granularity: str = "layer",
                    eval_size: int = 2000, reporter: Reporter = SILENT) -> dict:
    """Body of ``reparq sensitivity``: build the model and data the run names, then :func:`analyze`."""
    from reparq.sources import evaluation_set, load_calibration, load_model_source, short_name

    check_arguments(run.recipe, metric, granularity, budget)
    model = load_model_source(run.model, run.weights)
    calib = load_calibration(run.calib, model, run.model, seed=run.seed)
    inputs, labels, note = evaluation_set(run, calib, eval_size)
    reporter.label = f"{short_name(run.model)} W{run.w_bits}A{run.a_bits}"
    globs = run.options.get("block_globs")
    result = analyze(model, calib, inputs, labels, run.w_bits, run.a_bits, budget=budget, recipe=run.recipe,
                     metric=metric, granularity=granularity, block_globs=tuple(globs) if globs else None,
                     seed=run.seed, reporter=reporter)
    return {"model": run.model, "evaluated_on": note, **result}
