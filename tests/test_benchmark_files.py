"""The benchmarks' results files: the header DESIGN.md section 5 asks of every committed file, and
the resumable loop (benchmarks/resumable.py) that five benchmarks fill their files with."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from reparq.report.results import load_per_item, row_key, source_version

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
COMMITTED = sorted((BENCHMARKS / "results").glob("*.json"))


def test_the_results_directory_is_found():
    assert len(COMMITTED) >= 12  # a moved directory must not make the next test pass vacuously


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.stem)
def test_every_committed_results_file_has_the_design_header(path):
    payload = json.loads(path.read_text())
    assert payload["benchmark"] == path.stem
    assert re.match(r"(OMP_NUM_THREADS=\d+ )?python benchmarks/", payload["command"])
    assert len(payload["date"]) == 10 and payload["date"][:2] == "20"  # YYYY-MM-DD
    assert "CPU cores" in payload["machine"] and "torch" in payload["versions"]
    md = path.with_suffix(".md").read_text()
    assert md.startswith(f"# {path.stem}\n") and f"- date: {payload['date']}" in md
    rows = payload.get("rows")
    if rows and "method" in rows[0]:
        # Result rows: the identity DESIGN.md gives them, and the library source that measured each
        # (the paired tests' rows compare measured rows, and say whether one source measured both).
        assert all({"model", "method", "w_bits", "a_bits"} <= set(r) for r in rows)
        assert all(r.get("code") or "same_code" in r for r in rows)
    else:
        assert payload["code"]  # one run's statistics and figures: the source of that run


def _row(model: str, seed: int, fp: float = 90.0) -> dict:
    return {"model": model, "method": "minmax", "w_bits": 8, "a_bits": 8, "metric": "top1", "fp": fp,
            "quant": fp - 1, "delta": -1.0, "calib_seconds": 1.0, "peak_mem_mb": 1.0, "seed": seed}


def test_a_resumable_run_skips_what_is_measured_drops_stale_rows_and_stamps_its_own(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from resumable import ResumableResults

    def key(r):
        return (r["model"], r["seed"])

    def results(command: str, **kwargs) -> ResumableResults:
        return ResumableResults(tmp_path, "bench", command, key, key, "notes", **kwargs)

    # An earlier run measured seed 0 on the current checkpoint (FP 90) and seed 5 on another (FP 80).
    earlier = results("python benchmarks/bench.py")
    earlier.add(_row("m", 0), {"images": 4, "hits": "AA=="})
    earlier.add(_row("m", 5, fp=80.0))
    earlier.save()

    now = results("python benchmarks/bench.py --seeds 1", stale=lambda r: r["fp"] != 90.0)
    assert now.done(("m", 0)) and not now.done(("m", 1))
    assert not now.done(("m", 5))  # a stale row is measured again, not skipped
    assert not results("x", rerun=True).done(("m", 0))
    now.add(_row("m", 1), {"images": 4, "hits": "AQ=="})
    assert now.done(("m", 1))  # its own rows, before any save
    written = now.save()

    assert [key(r) for r in written] == [("m", 0), ("m", 1)]  # merged, sorted, the stale row dropped
    assert all(r["code"] == source_version() for r in written)
    on_disk = json.loads((tmp_path / "bench.json").read_text())
    assert on_disk["rows"] == written
    assert on_disk["command"] == "python benchmarks/bench.py; python benchmarks/bench.py --seeds 1"
    items = load_per_item(tmp_path, "bench")
    assert set(items) == {row_key(_row("m", 0)), row_key(_row("m", 1))}
    assert items[row_key(_row("m", 1))] == {"code": source_version(), "images": 4, "hits": "AQ=="}


def test_gpu_rows_sent_back_are_written_with_their_machine(tmp_path, monkeypatch):
    """``scale.py --parts gpu --rows LOG`` writes what a lent GPU machine sent back: that machine's
    environment in the header (not this one's), the run's code stamp on each row, both commands,
    and a note when the run was cut short."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import scale

    env = {"python": "3.12", "torch": "2.11.0+cu130", "machine": "x86_64, 16 CPU cores, NVIDIA H200"}
    row = {"part": "gpu", "model": "llama-w512-L4", "method": "repquant", "w_bits": 4, "a_bits": 8, "device": "cuda",
           "calib_seconds": 20.0, "peak_mem_mb": 2000.0, "gpu_peak_mb": 500.0}
    log = tmp_path / "scale_gpu.rows.jsonl"
    log.write_text("\n".join(json.dumps(e) for e in (
        {"environment": env, "command": "python benchmarks/scale.py --parts gpu --code abc", "code": "abc"},
        {**row, "device": "cpu"}, row)) + "\n")
    assert scale.main(["--parts", "gpu", "--rows", str(log), "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "scale_gpu.json").read_text())
    assert payload["machine"] == env["machine"] and payload["versions"] == {"python": "3.12", "torch": "2.11.0+cu130"}
    assert payload["command"].startswith("python benchmarks/scale.py --parts gpu --code abc; python benchmarks/")
    assert [r["device"] for r in payload["rows"]] == ["cpu", "cuda"] and {r["code"] for r in payload["rows"]} == {"abc"}
    assert "cut short after 2 of its 4 rows" in (tmp_path / "scale_gpu.md").read_text()


def _latency_real():
    sys.path.insert(0, str(BENCHMARKS))
    import latency_real

    return latency_real


def test_random_convnets_get_batchnorm_statistics_of_the_data():
    """timm's random init keeps running variance 1, so summed Rep branches grow without bound; the
    benchmark measures BN statistics on its batches so every BN output is near unit scale."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[m for _ in range(6) for m in (torch.nn.Conv2d(4, 4, 3, padding=1),
                                                                torch.nn.BatchNorm2d(4))]).eval()
    for conv in net[::2]:
        conv.weight.data *= 4.0  # each conv triples the scale: unnormalized, the output explodes
    images = torch.randn(16, 4, 8, 8)
    with torch.no_grad():
        before = net(images).std()
        _latency_real().set_batchnorm_statistics(net, images)
        after = net(images).std()
    assert before > 100 and 0.5 < after < 2.0
    assert not net.training


def test_minilm_windows_are_packed_without_padding():
    class Tok:
        cls_token_id, sep_token_id = 101, 102

        def encode(self, s, add_special_tokens=False):
            return [len(w) + 1000 for w in s.split()]

    lr = _latency_real()
    ids = lr.packed_windows(Tok(), ["a bb ccc dddd"] * 200, count=3)
    assert ids.shape == (3, lr.SEQ)
    assert (ids[:, 0] == 101).all() and (ids[:, 1:] != 0).all()
    assert (ids[0, 1:6] == torch.tensor([1001, 1002, 1003, 1004, 102])).all()  # sentences end to end
    with pytest.raises(SystemExit, match="packed windows"):
        lr.packed_windows(Tok(), ["a bb"] * 60, count=3)  # one window only
