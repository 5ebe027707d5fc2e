"""Resumable streamed calibration: after every finished step (a decoder layer, or the head) the
hidden-state streams that the next step needs are written next to a small progress file.

Files are written to a temporary name and renamed, so a run killed at any moment leaves either
the previous step's state or the new one, never half of one. A rerun with the same fingerprint
(model, calibration data, recipe, bits, seed, options) continues from the recorded step; any
other fingerprint is an error rather than a silent mix of two runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from reparq.errors import ReparqError

PROGRESS = "progress.json"


def fingerprint(**parts) -> str:
    """A stable hash of the run's inputs (tensors by their bytes)."""
    h = hashlib.sha256()
    for key in sorted(parts):
        value = parts[key]
        h.update(key.encode())
        if isinstance(value, torch.Tensor):
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(json.dumps(value, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


class StreamState:
    def __init__(self, directory: str | Path, fingerprint: str) -> None:
        self.directory = Path(directory)
        self.fingerprint = fingerprint

    def next_step(self) -> int:
        """The first step still to do (0 for a fresh run)."""
        path = self.directory / PROGRESS
        if not path.exists():
            return 0
        try:
            progress = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ReparqError(f"{path} is corrupt ({exc}); delete {self.directory} to start over") from exc
        if progress.get("fingerprint") != self.fingerprint:
            raise ReparqError(f"{self.directory} holds the state of another run (other model, data, recipe or "
                              f"options); pass restart=True (CLI: --restart) or use another work directory")
        return int(progress["next_step"])

    def save(self, next_step: int, streams: dict[str, list[torch.Tensor]], extra: dict | None = None) -> None:
        """Streams go to a file named by the step; the progress file, renamed into place last,
        names it: a kill between the two writes leaves the previous, consistent pair."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"{name}.{i}": t.contiguous() for name, batches in streams.items() for i, t in enumerate(batches)}
        stream_file = f"streams-{next_step:05d}.safetensors"
        save_file(tensors, str(self.directory / (stream_file + ".tmp")))
        os.replace(self.directory / (stream_file + ".tmp"), self.directory / stream_file)
        progress = {"fingerprint": self.fingerprint, "next_step": next_step, "stream_file": stream_file,
                    "streams": {k: len(v) for k, v in streams.items()}, **(extra or {})}
        tmp = self.directory / (PROGRESS + ".tmp")
        tmp.write_text(json.dumps(progress, indent=1) + "\n")
        os.replace(tmp, self.directory / PROGRESS)
        for old in self.directory.glob("streams-*.safetensors"):
            if old.name != stream_file:
                old.unlink(missing_ok=True)

    def load_streams(self) -> dict[str, list[torch.Tensor]]:
        progress = json.loads((self.directory / PROGRESS).read_text())
        tensors = load_file(str(self.directory / progress["stream_file"]))
        return {name: [tensors[f"{name}.{i}"] for i in range(n)] for name, n in progress["streams"].items()}

    def extra(self) -> dict:
        return json.loads((self.directory / PROGRESS).read_text())

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


__all__ = ["StreamState", "fingerprint"]
