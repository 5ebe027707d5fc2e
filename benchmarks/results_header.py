"""The header every results file opens with (DESIGN.md section 5), for the benchmarks whose files are
not one table of rows (figures with statistics, timings) and so do not go through
:func:`reparq.report.results.write_results`: benchmark, command, date, machine, versions, and
``code``, the library source that measured it (:func:`reparq.report.results.source_version`)."""

from __future__ import annotations

import datetime as _dt

from reparq.report.results import environment, source_version


def results_header(name: str, command: str, **env_extra: str) -> dict:
    """The JSON header of ``results/<name>.json``; ``env_extra`` adds versions (e.g. onnxruntime)."""
    env = {**environment(), **env_extra}
    return {"benchmark": name, "command": command.strip(), "date": _dt.date.today().isoformat(),
            "machine": env["machine"], "versions": {k: v for k, v in env.items() if k != "machine"},
            "code": source_version()}


def header_lines(header: dict) -> list[str]:
    """The same header as the opening lines of ``results/<name>.md``."""
    versions = ", ".join(f"{k} {v}" for k, v in header["versions"].items())
    return [f"# {header['benchmark']}", "", f"- command: `{header['command']}`", f"- date: {header['date']}",
            f"- machine: {header['machine']}", f"- versions: {versions}", f"- code: {header['code']}"]


__all__ = ["header_lines", "results_header"]
