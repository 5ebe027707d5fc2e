"""Write a benchmark's rows as benchmarks/results/<name>.{md,json} (DESIGN.md section 5)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path

from reparq.report.tables import markdown_table


def environment() -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}"}
    for mod in ("timm", "onnxruntime", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return env


def source_version(root: str | Path | None = None) -> str | None:
    """Which library source measured a row: the git tree hash of ``src/reparq`` (12 hex digits),
    with ``+dirty`` when that tree has uncommitted changes; None outside a git checkout.

    The tree, not the commit, so that commits touching only benchmarks, tests or docs leave the
    rows measured before them current; a row whose version differs from the checkout's was
    measured by other code and may not reproduce bit for bit.
    """
    root = Path(root) if root is not None else checkout_of(Path(__file__).resolve().parents[1])
    if root is None:
        return None

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root.resolve():
            return None  # inside some checkout, but not at its root: not that checkout's library
        tree = git("rev-parse", "HEAD:src/reparq")[:12]
        dirty = git("status", "--porcelain", "--", "src/reparq")
    except (OSError, subprocess.CalledProcessError):
        return None
    return tree + ("+dirty" if dirty else "")


def checkout_of(package: Path) -> Path | None:
    """The checkout whose ``src/reparq`` is ``package`` (the imported library's directory), or None
    for an installed copy: a wheel installed into a venv inside a checkout would otherwise report
    the checkout's tree, not the code that ran."""
    return package.parents[1] if package.name == "reparq" and package.parent.name == "src" else None


def row_key(row: dict) -> str:
    """A result row's identity for its per-item scores: model, recipe, bits and seed."""
    return f"{row['model']}|{row['method']}|W{row['w_bits']}A{row['a_bits']}|seed{row['seed']}"


def per_item_path(out_dir: str | Path, name: str) -> Path:
    return Path(out_dir) / "per_item" / f"{name}.json"


def load_per_item(out_dir: str | Path, name: str) -> dict[str, dict]:
    """A benchmark's per-item scores (per-image hits, per-window NLL) by :func:`row_key`; {} if none."""
    path = per_item_path(out_dir, name)
    return json.loads(path.read_text())["rows"] if path.exists() else {}


def update_per_item(out_dir: str | Path, name: str, entries: dict[str, dict]) -> Path:
    """Merge ``entries`` into the file on disk now: several benchmark processes may share it."""
    path = per_item_path(out_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = {**load_per_item(out_dir, name), **entries}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"benchmark": name, "rows": dict(sorted(rows.items()))}, indent=0) + "\n")
    tmp.replace(path)
    return path


def results_on_disk(path: str | Path) -> dict:
    """A benchmark's results file as it is on disk now (no rows and no command before its first save)."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else {"rows": [], "command": ""}


def merge_rows(disk_rows: list[dict], mine: list[dict], key, stale=lambda row: False) -> list[dict]:
    """The rows of a results file after a run's save: its own rows (``mine``) replace those with the
    same ``key`` in the rows on disk now, and rows ``stale`` says were measured on another checkpoint
    or data are dropped. Merging into what is on disk at each save, not into what was read at start,
    lets several runs (other models, recipes, seeds) write one file at the same time."""
    keys = {key(r) for r in mine}
    return [r for r in disk_rows if key(r) not in keys and not stale(r)] + list(mine)


def measured_keys(disk_rows: list[dict], mine: list[dict], key, stale=lambda row: False,
                  rerun: bool = False) -> set:
    """The keys a resumable run skips: the rows it measured itself and, unless ``rerun``, the rows
    on disk that are not ``stale``."""
    done = {key(r) for r in mine}
    if not rerun:
        done |= {key(r) for r in disk_rows if not stale(r)}
    return done


def command_history(previous: str, command: str) -> str:
    """A results file's ``command`` after one more run: every invocation that contributed rows, in
    order and once each, so that a table measured in pieces is reproduced by running them all."""
    runs = [c for c in previous.split("; ") if c] + [command.strip()]
    return "; ".join(dict.fromkeys(runs))


def results_header(name: str, command: str, *, code: bool = False, measured_on: dict | None = None,
                   **versions: str) -> dict:
    """The header every ``results/<name>.json`` opens with (DESIGN.md section 5): benchmark,
    command, date, machine and versions (``versions`` adds some, e.g. onnxruntime). With ``code``
    also the library source of this run (:func:`source_version`), for files that are one run's
    statistics and figures rather than rows that each carry their own. ``measured_on``: another
    machine's environment, in place of this process's (:func:`write_results`)."""
    env = {**(environment() if measured_on is None else measured_on), **versions}
    header = {"benchmark": name, "command": command.strip(), "date": _dt.date.today().isoformat(),
              "machine": env["machine"], "versions": {k: v for k, v in env.items() if k != "machine"}}
    if code:
        header["code"] = source_version()
    return header


def header_lines(header: dict) -> list[str]:
    """The same header as the opening lines of ``results/<name>.md``."""
    versions = ", ".join(f"{k} {v}" for k, v in header["versions"].items())
    lines = [f"# {header['benchmark']}", "", f"- command: `{header['command']}`", f"- date: {header['date']}",
             f"- machine: {header['machine']}", f"- versions: {versions}"]
    return lines + ([f"- code: {header['code']}"] if "code" in header else [])


def write_results(out_dir: str | Path, name: str, command: str, rows: list[dict], notes: str = "",
                  extra_sections: str = "", extra_columns: tuple[str, ...] = (),
                  measured_on: dict | None = None) -> tuple[Path, Path]:
    """``measured_on``: the machine and versions (:func:`environment`'s keys) of a run whose rows
    were measured elsewhere (a lent GPU machine) and are written here; default: this process's."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {**results_header(name, command, measured_on=measured_on), "rows": rows}
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(payload, indent=1) + "\n")
    md = [*header_lines(payload), ""]
    if notes:
        md += [notes.strip(), ""]
    md += [markdown_table(rows, extra_columns), ""]
    if extra_sections:
        md += [extra_sections.strip(), ""]
    md_path = out_dir / f"{name}.md"
    md_path.write_text("\n".join(md))
    return md_path, json_path
