"""The resumable run every grid benchmark makes: measure only what its results file lacks, save
after every cell, and let other runs write the same file meanwhile.

:class:`ResumableResults` is that run's state for one ``results/<name>.json``: which rows it
measured (``mine``), which rows to skip (on disk, not ``stale``, unless ``rerun``), and a
``save`` that merges its rows into the file *as it is on disk then*
(:func:`reparq.report.results.merge_rows`), so runs over other models, recipes or seeds may share
the file. :class:`ZooGrid` adds what the Fashion-MNIST zoo benchmarks (``ptq_baselines``,
``recon_tradeoff``, the ablations) share: the test split, each model and its FP top-1 (a row
measured with another FP top-1 is from another checkpoint: stale), the seeded calibration subsets,
one cell through :func:`reparq.eval.grid.run_grid` with a ``code`` stamp, and per-image right/wrong
under :func:`reparq.report.results.row_key` for ``paired_significance.py``.

Kept under benchmarks/ rather than in the library: it is how our benchmarks keep their files, not
something a user quantizing a model needs, and a change here must not change the ``code`` stamp
(the tree of ``src/reparq``) of every row already measured.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from reparq.data import calibration_subset, load_fashion_mnist
from reparq.eval.accuracy import top1
from reparq.eval.grid import Bits, run_grid
from reparq.eval.significance import encode_hits
from reparq.report.results import (command_history, measured_keys, merge_rows, results_on_disk, row_key,
                                   source_version, update_per_item, write_results)
from reparq.zoo import load_model


class ResumableResults:
    """One run's rows for ``out/<name>.json``, merged into the file at every :meth:`save`.

    ``key`` is a row's identity (a row with the same key replaces it), ``order`` sorts the file,
    ``stale(row)`` says a row on disk was measured on other data or another checkpoint than this
    run's (dropped at save, and never a reason to skip). ``sections(rows)`` gives text after the
    table, ``after_save(rows)`` writes anything derived from the rows (a plot)."""

    def __init__(self, out: Path, name: str, command: str, key: Callable[[dict], tuple],
                 order: Callable[[dict], tuple], notes: str, *, stale: Callable[[dict], bool] = lambda row: False,
                 rerun: bool = False, extra_columns: tuple[str, ...] = (),
                 sections: Callable[[list[dict]], str] = lambda rows: "",
                 after_save: Callable[[list[dict]], None] | None = None) -> None:
        self.out, self.name, self.command = Path(out), name, command
        self.path = self.out / f"{name}.json"
        self.key, self.order, self.notes, self.stale, self.rerun = key, order, notes, stale, rerun
        self.extra_columns, self.sections, self.after_save = extra_columns, sections, after_save
        self.code = source_version()
        self.mine: dict[tuple, dict] = {}  # rows measured by this run, by key
        self.items: dict[str, dict] = {}  # their per-item scores, not yet on disk

    def done(self, *identities: tuple) -> bool:
        """Whether the rows with these keys are all measured already (by this run, or on disk unless
        ``rerun``); one read of the file for a cell that writes several rows (one per metric)."""
        measured = measured_keys(results_on_disk(self.path)["rows"], list(self.mine.values()), self.key, self.stale,
                                 self.rerun)
        return all(identity in measured for identity in identities)

    def add(self, row: dict, items: dict | None = None, item_key: str | None = None) -> None:
        """Record a measured row (stamped with this run's ``code``) and, optionally, its per-item scores."""
        row["code"] = self.code
        self.mine[self.key(row)] = row
        if items is not None:
            self.items[item_key or row_key(row)] = {"code": self.code, **items}
        print(row, flush=True)

    def save(self) -> list[dict]:
        """Merge this run's rows into the file on disk now and rewrite its tables; the rows written."""
        old = results_on_disk(self.path)
        rows = sorted(merge_rows(old["rows"], list(self.mine.values()), self.key, self.stale), key=self.order)
        write_results(self.out, self.name, command_history(old["command"], self.command), rows, self.notes,
                      self.sections(rows), extra_columns=self.extra_columns)
        if self.items:
            update_per_item(self.out, self.name, self.items)
            self.items.clear()
        if self.after_save:
            self.after_save(rows)
        return rows


CALIB_SIZE = 1024  # calibration images per seed, the zoo benchmarks' default


class ZooGrid(ResumableResults):
    """A :class:`ResumableResults` of zoo models measured by top-1 on the 10k test split."""

    def __init__(self, *args, calib_size: int = CALIB_SIZE, per_item: bool = True, **kwargs) -> None:
        super().__init__(*args, stale=self._other_checkpoint, **kwargs)
        self.calib_size, self.per_item = calib_size, per_item
        self.test_x, self.test_y = load_fashion_mnist("test")
        self.models: dict[str, torch.nn.Module] = {}
        self.fps: dict[str, float] = {}  # FP top-1 of the models this run loaded
        self._calib: dict[int, torch.Tensor] = {}

    def _other_checkpoint(self, row: dict) -> bool:
        return self.fps.get(row["model"], row["fp"]) != row["fp"]

    def model(self, name: str) -> torch.nn.Module:
        """The zoo model, loaded once, with its FP top-1 in ``fps`` (which makes its other-checkpoint rows stale)."""
        if name not in self.models:
            self.models[name] = load_model(name)
            self.fps[name] = round(top1(self.models[name], self.test_x, self.test_y), 2)
        return self.models[name]

    def calibration(self, seed: int) -> torch.Tensor:
        """The seed's calibration images (the seed picks the subset and seeds the recipe)."""
        if seed not in self._calib:
            self._calib = {seed: calibration_subset(self.calib_size, seed=seed)}  # one seed's images at a time
        return self._calib[seed]

    def measure(self, name: str, recipe: str, bits: Bits, seed: int, method: str | None = None,
                recorded: dict | None = None, item_suffix: str = "", **options) -> list[dict]:
        """One cell: ``recipe`` with ``options`` on the model at ``bits`` and ``seed``, recorded as ``method``
        (default: the recipe) with the ``recorded`` settings; saved at once."""
        model = self.model(name)
        method, recorded = method or recipe, recorded or {}
        rows = []

        def keep(row: dict, correct: torch.Tensor) -> None:
            row.update(method=method, **recorded)
            items = {"images": int(correct.numel()), "hits": encode_hits(correct)} if self.per_item else None
            self.add(row, items, row_key(row) + item_suffix)
            rows.append(row)

        run_grid(model, name, self.calibration(seed), self.test_x, self.test_y, [recipe], [bits], seeds=(seed,),
                 fp=self.fps[name], on_hits=keep, **options)
        self.save()
        return rows


__all__ = ["CALIB_SIZE", "ResumableResults", "ZooGrid"]
