"""Run a grid of (recipe, bits) on one zoo model and return rows in the benchmark format.

One function serves the CLI, the demo and the benchmarks, so that every number the project
prints is measured the same way (DESIGN.md section 5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from reparq.api import quantize
from reparq.eval.accuracy import correct_predictions, top1
from reparq.progress import SILENT, Reporter


@dataclass(frozen=True)
class Bits:
    w: int
    a: int

    @classmethod
    def parse(cls, text: str) -> "Bits":
        """'W4A8', 'w4a8' or '4/8'."""
        from reparq.errors import ReparqError

        t = text.strip().upper().replace("W", "").replace("A", "/")
        try:
            w, a = (int(v) for v in t.split("/"))
        except ValueError:
            raise ReparqError(f"cannot read bit widths from {text!r}; write them as W4A8 or 4/8") from None
        return cls(w, a)

    def __str__(self) -> str:
        return f"W{self.w}A{self.a}"


def fp_row(model_name: str, fp: float) -> dict:
    return {"model": model_name, "method": "fp", "w_bits": 32, "a_bits": 32, "metric": "top1", "fp": fp,
            "quant": fp, "delta": 0.0, "calib_seconds": 0.0, "peak_mem_mb": 0.0, "seed": None}


def run_grid(model: torch.nn.Module, model_name: str, calib: torch.Tensor, test_x: torch.Tensor,
             test_y: torch.Tensor, recipes: Iterable[str], bits: Iterable[Bits], seeds: Iterable[int] = (0,),
             fp: float | None = None, on_row: Callable[[dict], None] | None = None,
             on_model: Callable[[dict, torch.nn.Module], None] | None = None,
             on_hits: Callable[[dict, torch.Tensor], None] | None = None,
             reporter: Reporter = SILENT, **options) -> list[dict]:
    """Quantize ``model`` with every recipe x bits x seed; one row each (accuracy in percent).

    ``on_hits`` receives each row with its per-image right/wrong from the same evaluation, for
    paired tests between rows (:mod:`reparq.eval.significance`) without evaluating twice."""
    if fp is None:
        fp = top1(model, test_x, test_y)
    rows = []
    for recipe in recipes:
        for b in bits:
            for seed in seeds:
                reporter.label = f"{model_name} {recipe} {b}"
                qmodel = quantize(model, calib, recipe=recipe, w_bits=b.w, a_bits=b.a, seed=seed, reporter=reporter,
                                  **options)
                hits = correct_predictions(qmodel, test_x, test_y, reporter=reporter)
                acc = 100.0 * int(hits.sum()) / test_x.shape[0]
                info = qmodel.reparq_info
                row = {"model": model_name, "method": recipe, "w_bits": b.w, "a_bits": b.a, "metric": "top1",
                       "fp": round(fp, 2), "quant": round(acc, 2), "delta": round(acc - fp, 2),
                       "calib_seconds": info.calib_seconds, "peak_mem_mb": info.peak_mem_mb, "seed": seed}
                rows.append(row)
                if on_row:
                    on_row(row)
                if on_model:
                    on_model(row, qmodel)
                if on_hits:
                    on_hits(row, hits)
    return rows
