"""Write a benchmark's rows as benchmarks/results/<name>.{md,json} (DESIGN.md section 5)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
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


def command_history(previous: str, command: str) -> str:
    """A results file's ``command`` after one more run: every invocation that contributed rows, in
    order and once each, so that a table measured in pieces is reproduced by running them all."""
    runs = [c for c in previous.split("; ") if c] + [command.strip()]
    return "; ".join(dict.fromkeys(runs))


def write_results(out_dir: str | Path, name: str, command: str, rows: list[dict], notes: str = "",
                  extra_sections: str = "", extra_columns: tuple[str, ...] = ()) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    date = _dt.date.today().isoformat()
    payload = {"benchmark": name, "command": command, "date": date, "machine": env["machine"],
               "versions": {k: v for k, v in env.items() if k != "machine"}, "rows": rows}
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(payload, indent=1) + "\n")
    versions = ", ".join(f"{k} {v}" for k, v in payload["versions"].items())
    md = [f"# {name}", "", f"- command: `{command}`", f"- date: {date}", f"- machine: {env['machine']}",
          f"- versions: {versions}", ""]
    if notes:
        md += [notes.strip(), ""]
    md += [markdown_table(rows, extra_columns), ""]
    if extra_sections:
        md += [extra_sections.strip(), ""]
    md_path = out_dir / f"{name}.md"
    md_path.write_text("\n".join(md))
    return md_path, json_path
