"""Per-layer SQNR (exact math), range samples, recorded loss curves, and the HTML/Markdown report."""

from __future__ import annotations

import base64
import json
import math
import re

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import reparq
from reparq.cli import main
from reparq.nn.qmodules import quantized_layers
from reparq.recipes.calibrate import set_quant_enabled
from reparq.report.sqnr import agreement, layer_sqnr, range_samples, sqnr_db
from reparq.zoo.registry import checkpoint_path
from tests.test_runconfig import data, tiny_model

needs_zoo = pytest.mark.skipif(not checkpoint_path("repvgg_fm").exists(), reason="zoo checkpoint not trained")

MLP_FILE = """
import torch
import torch.nn as nn

def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
"""


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()


def direct_sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return 10 * math.log10(float(ref.pow(2).sum()) / float((ref - out).pow(2).sum()))


def test_sqnr_db_values():
    assert sqnr_db(100.0, 1.0) == pytest.approx(20.0)
    assert sqnr_db(1.0, 1.0) == 0.0
    assert sqnr_db(5.0, 0.0) == math.inf


def test_layer_sqnr_matches_direct_computation():
    model = mlp()
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
    q = reparq.quantize(model, x, recipe="minmax", w_bits=4, a_bits=4, keep_first_last_8bit=False)
    rows, out_sqnr = layer_sqnr(model, q, list(x.split(16)))
    assert [r["layer"] for r in rows] == ["0", "2"] and all(r["w_bits"] == 4 for r in rows)
    with torch.no_grad():
        first = direct_sqnr(model[0](x), q[0](x))  # both see the raw input
        last = direct_sqnr(model(x), q(x))
    assert rows[0]["sqnr_db"] == pytest.approx(first, abs=1e-3)
    assert rows[1]["sqnr_db"] == pytest.approx(last, abs=1e-3) and out_sqnr == pytest.approx(last, abs=1e-3)


def test_layer_sqnr_is_infinite_with_quantizers_off_after_merge_and_fold():
    """Names line up between the deployed float reference and the quantized model (merged blocks,
    folded BN): with every quantizer off the two compute the same thing."""
    model = tiny_model("rep")
    q = reparq.quantize(model, data(32, seed=2), recipe="mse", w_bits=4, a_bits=4)
    set_quant_enabled(q, False, False)
    rows, out_sqnr = layer_sqnr(model, q, [data(16, seed=3)])
    assert len(rows) == len(quantized_layers(q)) and all(r["sqnr_db"] == math.inf for r in rows)
    assert out_sqnr == math.inf


def test_range_samples_report_the_kept_range_and_clipped_fraction():
    model = mlp()
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
    q = reparq.quantize(model, x[:8], recipe="minmax", w_bits=4, a_bits=3, keep_first_last_8bit=False)
    (s,) = range_samples(q, ["2"], x)
    aq = q[2].input_quantizer
    lo, hi = (aq.qmin - float(aq.zero_point)) * float(aq.scale), (aq.qmax - float(aq.zero_point)) * float(aq.scale)
    assert s["act_range"] == pytest.approx((lo, hi))
    with torch.no_grad():
        acts = torch.relu(q[0](x)).flatten()
    assert s["act_clipped"] == pytest.approx(float(((acts < lo) | (acts > hi)).float().mean()))
    assert s["act_clipped"] > 0  # ranges from 8 samples clip some of 40
    # Weights over their sign's bound on the signed grid [-8, 7] * scale of each output channel.
    w, ws = q[2].weight.detach(), q[2].weight_quantizer.scale.detach().reshape(-1, 1)
    assert torch.allclose(s["weights"], torch.where(w >= 0, w / (7 * ws), w / (8 * ws)).flatten())
    # minmax's grid covers each channel's range: every weight within its bound, the extreme on it.
    assert float(s["weights"].max()) <= 1 + 1e-5 and float(s["weights"].min()) >= -1 - 1e-5
    per_channel = s["weights"].reshape(w.shape).abs().amax(dim=1)
    torch.testing.assert_close(per_channel, torch.ones_like(per_channel), rtol=1e-5, atol=0)


def test_agreement_kinds():
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    assert agreement(logits, torch.tensor([1, 1])) == 50.0  # labels
    assert agreement(logits, torch.tensor([[0.0, 1.0], [1.0, 0.0]])) == 100.0  # top-1 of reference scores
    emb = torch.randn(3, 4, 5)
    assert agreement(emb, emb) == pytest.approx(100.0)  # cosine for anything else
    assert agreement(emb, -emb) == pytest.approx(-100.0)
    logits = torch.randn(2, 512, 3000, generator=torch.Generator().manual_seed(0)) * 5  # an LM's [N, T, V]
    assert abs(agreement(logits, logits) - 100.0) < 1e-9  # float32 sums gave 100.004


def test_reconstruction_loss_curves_are_recorded_thinned_and_saved(tmp_path):
    model = tiny_model("cnn")
    q = reparq.quantize(model, data(32, seed=2), recipe="adaround", w_bits=4, a_bits=4, iters=450)
    curves = q.reparq_info.extra["recon_loss"]
    assert set(curves) == {n for n, _ in quantized_layers(q)}
    assert all(150 <= len(c) <= 200 for c in curves.values())  # 450 points thinned (every 3rd)
    reparq.save(q, tmp_path / "q")
    assert reparq.load(tmp_path / "q", model=tiny_model("cnn")).reparq_info.extra["recon_loss"] == curves
    assert "recon_loss" not in reparq.quantize(model, data(32, seed=2), recipe="mse").reparq_info.extra


def _images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)]


def test_report_contains_table_images_and_curves(tmp_path, capsys):
    model_file = tmp_path / "mlp.py"
    model_file.write_text(MLP_FILE)
    calib = tmp_path / "calib.safetensors"
    save_file({"x": torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))}, str(calib))
    out = tmp_path / "report"
    rc = main(["report", "--model", f"{model_file}:build", "--calib", f"tensor:{calib}", "--recipe", "adaround",
               "--iters", "20", "--w-bits", "4", "--a-bits", "4", "--out", str(out), "--top", "2", "--json"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert sorted(p.rsplit("/", 1)[1] for p in printed["files"]) == [
        "loss.png", "ranges.png", "report.html", "report.json", "report.md", "sqnr.png"]
    html = (out / "report.html").read_text()
    assert "<table>" in html and "adaround" in html and "W4A4" in html
    images = _images(html)
    assert len(images) == 3 and all(img.startswith(b"\x89PNG") for img in images)  # SQNR, ranges, loss
    assert images[0] == (out / "sqnr.png").read_bytes()  # the HTML embeds the very same figures
    md = (out / "report.md").read_text()
    assert "| model | method | W/A |" in md and "![Per-layer SQNR](sqnr.png)" in md and "(loss.png)" in md
    report = json.loads((out / "report.json").read_text())
    fp, q = report["rows"]
    assert fp["method"] == "fp" and q["method"] == "adaround" and q["metric"] == "agreement"
    assert q["quant"] == printed["rows"][1]["quant"] and 0 <= q["quant"] <= 100
    assert [r["layer"] for r in report["sqnr"]] == ["1", "3", "5"]
    assert len(report["worst"]) == 2 and set(report["curves"]) == {"1", "3", "5"}
    assert report["timing"]["calib_seconds"] > 0 and report["timing"]["calib_samples"] == 64
    assert "--iters 20" in report["command"] and report["run"]["options"] == {"iters": 20}
    assert not list(tmp_path.glob(".reparq-report-*"))  # the temporary folder is gone


@needs_zoo
def test_report_on_a_zoo_model_has_top1_rows(tmp_path, capsys):
    out = tmp_path / "r"
    rc = main(["report", "--model", "zoo:repvgg_fm", "--recipe", "mse", "--calib-size", "64", "--eval-size", "300",
               "--out", str(out), "--quiet"])
    assert rc == 0
    assert "repvgg_fm" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["rows"][1]["metric"] == "top1" and len(report["sqnr"]) == 11
    assert "Fashion-MNIST test split, first 300 images" in (out / "report.md").read_text()
    assert not (out / "loss.png").exists()  # a range recipe reconstructs nothing


def test_report_bad_input_writes_nothing(tmp_path, capsys):
    out = tmp_path / "r"
    model_file = tmp_path / "mlp.py"
    model_file.write_text(MLP_FILE)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"x": torch.randn(8, 3, 4, 4)}, str(wrong))
    assert main(["report", "--model", f"{model_file}:build", "--calib", f"tensor:{wrong}", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "the model rejects calibration inputs of shape (8, 3, 4, 4)" in err and len(err.splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".reparq-report-*"))


def test_command_history_keeps_every_contributing_run_once_in_order():
    from reparq.report.results import command_history

    assert command_history("", "python b.py --seeds 1 ") == "python b.py --seeds 1"  # no empty first entry
    history = command_history("python b.py; python b.py --seeds 1", "python b.py")
    assert history == "python b.py; python b.py --seeds 1"  # a repeated run is not listed twice
    assert command_history(history, "python b.py --seeds 2") == \
        "python b.py; python b.py --seeds 1; python b.py --seeds 2"


def test_a_save_merges_this_runs_rows_into_the_file_as_it_is_on_disk(tmp_path):
    from reparq.report.results import measured_keys, merge_rows, results_on_disk

    assert results_on_disk(tmp_path / "none.json") == {"rows": [], "command": ""}
    (tmp_path / "r.json").write_text(json.dumps({"rows": [{"k": 1, "v": "old"}], "command": "c"}))
    assert results_on_disk(tmp_path / "r.json")["rows"] == [{"k": 1, "v": "old"}]

    def key(r):
        return r["k"]

    # On disk: another run's row 2 and an old row 1; this run measured row 1 again and row 3.
    disk = [{"k": 1, "v": "old"}, {"k": 2, "v": "theirs"}, {"k": 4, "v": "stale"}]
    mine = [{"k": 1, "v": "new"}, {"k": 3, "v": "new"}]
    stale = lambda r: r["v"] == "stale"  # noqa: E731
    merged = merge_rows(disk, mine, key, stale)
    assert sorted(map(key, merged)) == [1, 2, 3] and {r["k"]: r["v"] for r in merged}[1] == "new"
    assert merge_rows(disk, [], key) == disk  # nothing measured, nothing stale: the file as it was
    # Resuming skips this run's rows and the current rows on disk; --rerun only this run's.
    assert measured_keys(disk, mine, key, stale) == {1, 2, 3}
    assert measured_keys(disk, mine, key, stale, rerun=True) == {1, 3}


def test_top1_counts_the_per_image_hits():
    from reparq.eval.accuracy import correct_predictions, top1

    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(7, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    hits = correct_predictions(model, x, y, batch_size=3)  # batches of 3, 3 and 1
    assert hits.dtype == torch.bool and hits.tolist() == (model(x).argmax(dim=1) == y).tolist()
    assert top1(model, x, y, batch_size=3) == pytest.approx(100.0 * hits.sum().item() / 7)


def test_source_version_is_the_library_trees_hash_and_marks_uncommitted_changes(tmp_path):
    import subprocess

    from reparq.report.results import checkout_of, source_version

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), *args], capture_output=True, text=True,
                              check=True).stdout.strip()

    assert source_version(tmp_path) is None  # not a checkout
    git("init", "-q")
    (tmp_path / "src" / "reparq").mkdir(parents=True)
    (tmp_path / "src" / "reparq" / "a.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    tree = git("rev-parse", "HEAD:src/reparq")[:12]
    assert source_version(tmp_path) == tree
    (tmp_path / "notes.md").write_text("outside the library\n")  # other files do not matter
    assert source_version(tmp_path) == tree
    (tmp_path / "src" / "reparq" / "a.py").write_text("x = 2\n")
    assert source_version(tmp_path) == tree + "+dirty"
    # A copy installed into a venv inside the checkout is not the checkout's source.
    installed = tmp_path / ".venv" / "lib" / "python3.11" / "site-packages" / "reparq"
    installed.mkdir(parents=True)
    assert checkout_of(installed) is None and checkout_of(tmp_path / "src" / "reparq") == tmp_path
    assert source_version(installed.parents[1]) is None  # inside the checkout, not at its root


def test_per_item_scores_merge_with_what_another_run_wrote(tmp_path):
    from reparq.report.results import load_per_item, row_key, update_per_item

    row = {"model": "m", "method": "minmax", "w_bits": 4, "a_bits": 8, "seed": 1}
    assert row_key(row) == "m|minmax|W4A8|seed1" and load_per_item(tmp_path, "b") == {}
    update_per_item(tmp_path, "b", {"k1": {"nll": [1.0]}})
    update_per_item(tmp_path, "b", {"k2": {"nll": [2.0]}})  # a second process: k1 kept
    update_per_item(tmp_path, "b", {"k1": {"nll": [3.0]}})  # re-measured: replaced
    assert load_per_item(tmp_path, "b") == {"k1": {"nll": [3.0]}, "k2": {"nll": [2.0]}}


def test_run_grid_hands_on_the_hits_its_row_counts():
    from reparq.eval.grid import Bits, run_grid

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    seen = []
    rows = run_grid(model, "mlp", x[:16], x, y, ["minmax"], [Bits(4, 4)], on_hits=lambda r, h: seen.append((r, h)))
    (row, hits), = seen
    assert row is rows[0] and hits.shape == (40,) and hits.dtype == torch.bool
    assert row["quant"] == round(100.0 * hits.sum().item() / 40, 2)
