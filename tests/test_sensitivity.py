"""Sensitivity: one layer at a time equals a run that leaves every other layer in float, and the
suggested mixed-precision model equals a real run with those overrides."""

from __future__ import annotations

import json

import pytest

import reparq
from reparq.cli import main
from reparq.errors import ReparqError
from reparq.report.sqnr import agreement, predictions
from reparq.runconfig import load_yaml
from reparq.sensitivity import analyze
from reparq.zoo.registry import checkpoint_path
from tests.test_runconfig import data, tiny_model

needs_zoo = pytest.mark.skipif(not checkpoint_path("repvgg_fm").exists(), reason="zoo checkpoint not trained")
LAYERS = ["block1.0", "block2.0", "head.2"]


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("cnn")
    calib, x = data(64, seed=2), data(200, seed=3)
    labels = predictions(model, x).argmax(1)  # the float model is right by construction: FP = 100%
    return model, calib, x, labels


@pytest.fixture(scope="module")
def result(setup):
    model, calib, x, labels = setup
    return analyze(model, calib, x, labels, w_bits=2, a_bits=3, budget=1.0, recipe="mse")


def _score(q, x, labels) -> float:
    return agreement(predictions(q, x), labels)


def test_rows_are_one_layer_at_a_time_ranked_by_drop(setup, result):
    model, calib, x, labels = setup
    assert result["fp"] == 100.0 and result["score_kind"] == "top1"
    assert sorted(r["unit"] for r in result["rows"]) == sorted(LAYERS)
    drops = [r["drop"] for r in result["rows"]]
    assert drops == sorted(drops, reverse=True) and [r["rank"] for r in result["rows"]] == [1, 2, 3]
    for r in result["rows"]:  # the same as quantizing that layer alone, every other layer ignored (float)
        others = tuple(n for n in LAYERS if n != r["unit"])
        alone = reparq.quantize(model, calib, recipe="mse", w_bits=2, a_bits=3, keep_first_last_8bit=False,
                                ignore=others)
        assert r["score"] == pytest.approx(_score(alone, x, labels), abs=0.01)


def test_suggestion_equals_a_real_run_with_the_overrides(setup, result):
    model, calib, x, labels = setup
    s = result["suggestion"]
    keep = s["keep_8bit"]
    assert keep == [n for r in result["rows"][:len(keep)] for n in r["layers"]]  # most sensitive first
    q = reparq.quantize(model, calib, recipe="mse", w_bits=2, a_bits=3, keep_first_last_8bit=False,
                        overrides={n: (8, 8) for n in keep})
    assert s["score"] == pytest.approx(_score(q, x, labels), abs=0.01)
    assert s["within_budget"] == (100.0 - s["score"] <= 1.0)
    # The path starts from everything at low bits and stops at the first model within budget.
    path = result["path"]
    assert path[0]["kept_8bit"] == 0 and path[0]["score"] == result["all_low"]
    assert all(p["drop"] > 1.0 for p in path[:-1])
    low = reparq.quantize(model, calib, recipe="mse", w_bits=2, a_bits=3, keep_first_last_8bit=False)
    assert result["all_low"] == pytest.approx(_score(low, x, labels), abs=0.01)


def test_generous_budget_keeps_nothing_and_sqnr_metric_ranks_by_output_sqnr(setup):
    model, calib, x, labels = setup
    res = analyze(model, calib, x, None, w_bits=4, a_bits=4, budget=100.0, metric="sqnr")
    assert res["suggestion"]["keep_8bit"] == [] and res["score_kind"] == "agreement" and res["fp"] == 100.0
    sqnrs = [r["sqnr_db"] for r in res["rows"]]
    assert sqnrs == sorted(sqnrs) and all("drop" not in r for r in res["rows"])


def test_block_granularity_uses_blocks(setup):
    model, calib, x, labels = setup
    res = analyze(model, calib, x, labels, w_bits=2, a_bits=3, granularity="block", block_globs=("block*",),
                  metric="sqnr")
    assert sorted(r["unit"] for r in res["rows"]) == ["block1", "block2", "head.2"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(recipe="brecq"), "sensitivity uses a range recipe"),
    (dict(metric="loss"), "metric must be one of accuracy, sqnr"),
    (dict(granularity="stage"), "granularity must be one of layer, block"),
    (dict(budget=-1.0), "budget must be a non-negative number"),
])
def test_bad_arguments(setup, kwargs, message):
    model, calib, x, labels = setup
    with pytest.raises(ReparqError, match=message):
        analyze(model, calib, x, labels, w_bits=4, a_bits=4, **kwargs)


@needs_zoo
def test_cli_sensitivity_on_the_zoo_repvgg(tmp_path, capsys):
    out, cfg = tmp_path / "s.json", tmp_path / "suggested.yaml"
    rc = main(["sensitivity", "--model", "zoo:repvgg_fm", "--w-bits", "4", "--a-bits", "4", "--calib-size", "64",
               "--eval-size", "300", "--budget", "3", "--metric", "sqnr", "--out", str(out), "--save-config", str(cfg),
               "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert len(res["rows"]) == 11 and res["score_kind"] == "top1"
    assert res["rows"][0]["unit"] in printed and "keep" in printed
    run = load_yaml(cfg)
    assert run.overrides == {n: (8, 8) for n in res["suggestion"]["keep_8bit"]}
    assert (run.recipe, run.w_bits, run.a_bits, run.options["keep_first_last_8bit"]) == ("mse", 4, 4, False)


def test_cli_sensitivity_bad_input_exit_2(tmp_path, capsys):
    out = tmp_path / "s.json"
    assert main(["sensitivity", "--recipe", "qdrop", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "sensitivity uses a range recipe" in err and len(err.splitlines()) == 1
    assert not out.exists()
