"""The `reparq` command on a zoo model: the table it prints, JSON rows, and bad input."""

from __future__ import annotations

import json

import pytest

from reparq.cli import main
from reparq.zoo.registry import checkpoint_path, model_card

needs_zoo = pytest.mark.skipif(not checkpoint_path("repvgg_fm").exists(), reason="zoo checkpoint not trained")


@needs_zoo
def test_quantize_prints_table_with_fp_and_quant_rows(capsys):
    rc = main(["quantize", "--model", "zoo:repvgg_fm", "--recipe", "minmax", "--w-bits", "8", "--a-bits", "8",
               "--calib-size", "128", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "repvgg_fm" in out and "minmax" in out and "W8A8" in out and "fp" in out
    # The FP row reports the accuracy recorded in the model card.
    assert f"{model_card('repvgg_fm')['fp_top1']:.2f}" in out


@needs_zoo
def test_quantize_save_writes_a_loadable_model(tmp_path, capsys):
    import reparq

    out = tmp_path / "q"
    rc = main(["quantize", "--model", "zoo:repvgg_fm", "--recipe", "minmax", "--w-bits", "6", "--a-bits", "6",
               "--calib-size", "64", "--quiet", "--json", "--save", str(out)])
    row = json.loads(capsys.readouterr().out)["rows"][1]
    assert rc == 0
    from reparq.data import load_fashion_mnist

    test_x, test_y = load_fashion_mnist("test")
    assert reparq.evaluate(reparq.load(out), test_x, test_y) == pytest.approx(row["quant"], abs=0.01)


def test_failed_quantize_writes_nothing(tmp_path):
    out = tmp_path / "q"
    assert main(["quantize", "--recipe", "nope", "--save", str(out)]) == 2
    assert not out.exists()


@needs_zoo
def test_quantize_json_rows_are_consistent(capsys):
    rc = main(["quantize", "--model", "repvgg_fm", "--recipe", "mse", "--w-bits", "8", "--a-bits", "8",
               "--calib-size", "128", "--json"])
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert rc == 0
    fp, q = rows
    assert fp["method"] == "fp" and q["method"] == "mse"
    assert fp["quant"] == pytest.approx(model_card("repvgg_fm")["fp_top1"], abs=0.01)
    assert q["delta"] == pytest.approx(q["quant"] - q["fp"], abs=0.011)
    # W8A8 with MSE ranges: a few points at most. (Merged RepVGG weights carry channel outliers that
    # cost ~1.5 points even at 8 bits; a broken pipeline would lose tens of points.)
    assert -3.0 < q["delta"] <= 0.5
    assert q["calib_seconds"] > 0 and q["peak_mem_mb"] > 0


@needs_zoo
def test_progress_display_runs_with_reconstruction_recipe(capsys):
    """Without --quiet the rich progress bars render (a broken column would raise here)."""
    rc = main(["quantize", "--model", "zoo:repvgg_fm", "--recipe", "brecq", "--iters", "2", "--w-bits", "8",
               "--a-bits", "8", "--calib-size", "64"])
    assert rc == 0
    assert "brecq" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["quantize", "--recipe", "mse", "--iters", "5"], "apply to reconstruction recipes only"),
    (["quantize", "--recipe", "nope"], "unknown recipe 'nope'; choose one of"),
    (["quantize", "--w-bits", "9"], "w_bits must be an integer in 2..8"),
    (["quantize", "--a-bits", "1"], "a_bits must be an integer in 2..8"),
    (["quantize", "--model", "zoo:resnet9000"], "unknown zoo model 'resnet9000'"),
    (["quantize", "--model", "hf:bert"], "no Hugging Face model directory there"),
    (["eval", "--recipe", "mse", "--bits", "W4"], "cannot read bit widths"),
    (["zoo", "train"], "name at least one model"),
])
def test_bad_input_gives_one_line_and_exit_code_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1


def test_usage_error_exit_code_2(capsys):
    assert main(["quantize", "--no-such-flag"]) == 2


@needs_zoo
def test_dry_run_lists_every_layer_with_unit_and_stage(capsys):
    rc = main(["quantize", "--model", "zoo:repvgg_fm", "--dry-run", "--json", "--w-bits", "4", "--a-bits", "4"])
    plan = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert plan["merged_blocks"] == 10 and len(plan["layers"]) == 11 and len(plan["units"]) == 11
    first, last = plan["layers"][0], plan["layers"][-1]
    assert (first["layer"], first["w_bits"], first["a_bits"]) == ("stem.reparam_conv", 8, 8)
    assert (last["layer"], last["w_bits"]) == ("head.fc", 8)
    middle = plan["layers"][1:-1]
    assert all(r["w_bits"] == 4 and r["a_bits"] == 4 and r["stage"].startswith("stages.") for r in middle)
