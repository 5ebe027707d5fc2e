"""Run configs: the schema, YAML, one-line errors naming the bad key, presets, and the CLI's
--preset / --config / --dry-run on top of them."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import reparq
from reparq.cli import main
from reparq.errors import ReparqError
from reparq.nn.qmodules import quantized_layers
from reparq.recipes.registry import get_recipe
from reparq.runconfig import (FAMILIES, RunConfig, detect_family, list_presets, load_preset, load_yaml, resolve,
                              validate)
from reparq.zoo.registry import checkpoint_path

needs_zoo = pytest.mark.skipif(not checkpoint_path("repvgg_fm").exists(), reason="zoo checkpoint not trained")


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x):
        return self.head(self.block2(self.block1(x)))


def tiny_model(family: str) -> nn.Module:
    """The smallest model of each family: timm RepVGG blocks, a timm ViT, a plain CNN (8x8 inputs)."""
    torch.manual_seed(0)
    if family == "rep":
        from timm.models.byobnet import ByobNet, ByoBlockCfg, ByoModelCfg

        cfg = ByoModelCfg(blocks=(ByoBlockCfg(type="rep", d=1, c=8, s=1, gs=0), ByoBlockCfg(type="rep", d=2, c=16, s=2,
                                                                                             gs=0)),
                          stem_type="rep", stem_chs=8, stem_pool=None)
        model = ByobNet(cfg, in_chans=1, num_classes=4)
    elif family == "vit":
        from timm.models.vision_transformer import VisionTransformer

        model = VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=4, embed_dim=16, depth=2,
                                  num_heads=2, mlp_ratio=2.0)
    else:
        model = TinyCNN()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # BN statistics that are not the identity, so folding matters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def data(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def rel_error(q: nn.Module, model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        ref = model(x)
        return float((q(x) - ref).norm() / ref.norm())


def fast(recipe: str) -> dict:
    """Shrink a recipe's iteration counts so a preset runs in a second on a tiny model."""
    spec = get_recipe(recipe)
    fields = {f.name for f in __import__("dataclasses").fields(spec.options)} if spec.options else set()
    return {k: 2 for k in ("iters", "clip_iters") if k in fields}


# -- presets -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list_presets(aliases=False))
def test_every_preset_validates_and_runs_a_short_calibration(name):
    run = load_preset(name)
    family, bits = name.split("-")[0], int(name.split("-")[1][1])
    assert run.family == family and run.w_bits == run.a_bits == bits and run.description
    model = tiny_model(family)
    q = reparq.quantize(model, data(32, seed=2), config=name, **fast(run.recipe))
    info = q.reparq_info
    assert info.recipe == run.recipe and info.config["w_bits"] == bits and info.config["a_bits"] == bits
    layers = quantized_layers(q)
    inner = [l for _, l in layers][1:-1]  # first and last stay at 8 bits
    assert inner and all(l.weight_quantizer.bits == bits and l.input_quantizer.bits == bits for l in inner)
    assert all(l.weight_quantizer.initialized and l.input_quantizer.initialized for _, l in layers)
    err = rel_error(q, model, data(32, seed=3))
    assert err < (0.05 if bits == 8 else 1.0), f"{name}: relative output error {err:.3f}"
    assert err > 0  # something really was quantized


@pytest.mark.parametrize("family", FAMILIES)
def test_family_free_preset_picks_the_models_family(family):
    model = tiny_model(family)
    assert detect_family(model) == family
    run = load_preset("w4a4", model)
    assert run == load_preset(f"{family}-w4a4")


def test_family_free_preset_without_a_model_names_the_family_variants():
    with pytest.raises(ReparqError, match="rep-w4a4, vit-w4a4, cnn-w4a4"):
        load_preset("w4a4")


def test_unknown_preset_lists_every_preset():
    with pytest.raises(ReparqError) as exc:
        resolve("w3a3", tiny_model("cnn"))
    assert "unknown preset 'w3a3'" in str(exc.value) and all(p in str(exc.value) for p in list_presets())


def test_explicit_arguments_override_the_config():
    model, calib = tiny_model("cnn"), data(32, seed=2)
    q = reparq.quantize(model, calib, config="cnn-w4a4-fast", w_bits=6, iters=3, keep_first_last_8bit=False)
    info = q.reparq_info
    assert (info.recipe, info.config["w_bits"], info.config["a_bits"]) == ("adaround", 6, 4)
    assert not info.config["keep_first_last_8bit"]
    assert all(len(h) == 3 for h in info.extra["recon_loss"].values())  # iters=3 reached the recipe
    # A different recipe drops the preset's options it does not take (mse has no iters).
    q = reparq.quantize(model, calib, config="cnn-w4a4-fast", recipe="mse")
    assert q.reparq_info.recipe == "mse" and q.reparq_info.config["w_bits"] == 4


def test_config_equals_the_same_explicit_arguments():
    model, calib = tiny_model("cnn"), data(32, seed=2)
    a = reparq.quantize(model, calib, config="cnn-w6a6-fast", seed=3).state_dict()
    b = reparq.quantize(model, calib, recipe="mse", w_bits=6, a_bits=6, seed=3).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- YAML and validation -------------------------------------------------------------------------

def test_yaml_round_trip_and_values(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("recipe: brecq\nw_bits: 4\na_bits: 6\nignore: ['head.*']\n"
                    "overrides: {'block1.*': W8A8, 'block2.0': [6, 8]}\n"
                    "calib: {size: 128, batch_size: 16}\noptions: {iters: '50', block_globs: ['block*']}\n")
    run = load_yaml(path)
    assert (run.recipe, run.w_bits, run.a_bits) == ("brecq", 4, 6)
    assert run.overrides == {"block1.*": (8, 8), "block2.0": (6, 8)}
    assert run.options == {"iters": 50, "block_globs": ("block*",)}  # YAML strings and lists become typed
    assert run.calib.size == 128
    kw = run.quantize_kwargs()
    assert kw["batch_size"] == 16 and kw["ignore"] == ("head.*",) and kw["iters"] == 50
    again = tmp_path / "again.yaml"
    again.write_text(run.to_yaml())
    assert load_yaml(again) == run


@pytest.mark.parametrize("data, message", [
    ({"recpe": "mse"}, "config key 'recpe' does not exist; allowed keys: version, description, family, model"),
    ({"calib": {"sise": 3}}, "config key 'calib.sise' does not exist; allowed keys: source, size, batch_size"),
    ({"recipe": "nope"}, "config key 'recipe': unknown recipe 'nope'; choose one of: minmax, percentile, mse"),
    ({"w_bits": 9}, "config key 'w_bits': w_bits must be an integer in 2..8"),
    ({"a_bits": "x"}, "config key 'a_bits': a_bits must be an integer in 2..8"),
    ({"options": {"iters": 5}}, "options.iters does not exist for recipe 'mse'; allowed: w_estimator, a_estimator"),
    ({"recipe": "brecq", "options": {"iters": "many"}}, "config key 'options.iters': Input should be a valid integer"),
    ({"options": {"w_estimator": "l3"}}, "options: w_estimator must be one of minmax, percentile, mse, mae"),
    ({"overrides": {"head.*": "W9A8"}}, "config key 'overrides': 'head.*': w_bits must be an integer in 2..8"),
    ({"family": "mlp"}, "config key 'family': must be one of any, rep, vit, cnn"),
    ({"calib": {"size": 0}}, "config key 'calib.size': Input should be greater than or equal to 1"),
    ({"version": 2}, "config key 'version': this reparq reads config version 1"),
])
def test_bad_config_names_the_key_and_the_allowed_values(data, message):
    with pytest.raises(ReparqError) as exc:
        validate(data, "run.yaml")
    text = str(exc.value)
    assert text.startswith("run.yaml: ") and message in text and "\n" not in text


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("recipe: [mse\n")
    with pytest.raises(ReparqError, match=r"bad.yaml: not valid YAML \(line \d+\)"):
        load_yaml(bad)
    with pytest.raises(ReparqError, match="config file .*missing.yaml not found"):
        load_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ReparqError, match="a config must be a mapping"):
        validate(["mse"])


def test_quantize_config_argument_accepts_a_runconfig_and_a_yaml_path(tmp_path):
    model, calib = tiny_model("cnn"), data(32, seed=2)
    path = tmp_path / "r.yaml"
    path.write_text("recipe: minmax\nw_bits: 5\na_bits: 7\n")
    for config in (path, str(path), RunConfig(recipe="minmax", w_bits=5, a_bits=7)):
        info = reparq.quantize(model, calib, config=config).reparq_info
        assert (info.recipe, info.config["w_bits"], info.config["a_bits"]) == ("minmax", 5, 7)


# -- command line ----------------------------------------------------------------------------------

@needs_zoo
def test_cli_config_file_with_flag_override(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("model: zoo:repvgg_fm\nrecipe: minmax\nw_bits: 4\na_bits: 8\ncalib: {size: 64}\n")
    assert main(["quantize", "--config", str(path), "--w-bits", "8", "--quiet", "--json"]) == 0
    fp, q = json.loads(capsys.readouterr().out)["rows"]
    assert (q["method"], q["w_bits"], q["a_bits"]) == ("minmax", 8, 8)
    assert q["delta"] > -4  # W8A8 minmax on the zoo RepVGG loses under 2 points


@needs_zoo
def test_cli_dry_run_lists_every_quantization_point_of_a_preset(capsys):
    assert main(["quantize", "--model", "zoo:repvgg_fm", "--preset", "w4a4", "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    points = plan["points"]
    assert len(plan["layers"]) == 11 and len(points) == 22  # a weight and an input per layer
    assert plan["transforms"] == ["equalize", "qprep"]  # the family-free preset picked repapq for a Rep model
    w = {p["point"]: p for p in points if p["kind"] == "weight"}
    assert w["stages.1.1.reparam_conv.weight"] == {
        "point": "stages.1.1.reparam_conv.weight", "layer": "stages.1.1.reparam_conv", "kind": "weight", "bits": 4,
        "granularity": "per-channel", "estimator": "mse",
        "reparam": "merge, equalize (out ÷ s), equalize (in · s), QPRep"}
    assert w["head.fc.weight"]["bits"] == 8 and w["head.fc.weight"]["reparam"] == "equalize (in · s)"  # plain Linear
    inputs = [p for p in points if p["kind"] == "input"]
    assert all(p["granularity"] == "per-tensor" and p["estimator"] == "mae" for p in inputs)
    reparam = {p["layer"]: p["reparam"] for p in inputs}
    assert reparam.pop("stem.reparam_conv") == ""  # raw pixels: nothing before it to take the scale
    assert set(reparam.values()) == {"equalize (÷ s)"}


def test_dry_run_of_a_transformer_recipe_lists_matmul_and_post_norm_points():
    from reparq.recipes.plan import plan_for

    model = tiny_model("vit")
    result = plan_for(model, load_preset("vit-w4a4-fast"))
    points = {p["point"]: p for p in result["points"]}
    layers = len(result["layers"])
    assert len(points) == 2 * layers + 4 * 2  # plus q, k, v, probs in each of the 2 attention modules
    assert points["blocks.0.attn.qkv.input"]["reparam"] == "post-norm"
    assert points["blocks.0.attn.qkv.input"]["granularity"] == "per-channel→per-tensor"
    assert points["blocks.1.mlp.fc1.input"]["reparam"] == "post-norm"
    assert points["blocks.1.mlp.fc2.input"]["reparam"] == ""
    assert points["blocks.0.attn.probs"]["reparam"] == "log√2 → log2 + parity"
    assert points["blocks.0.attn.q"]["bits"] == 4
    # The same model under a baseline: no matmul points, no reparameterization.
    base = plan_for(model, validate({"recipe": "mse", "w_bits": 4, "a_bits": 4}))
    assert len(base["points"]) == 2 * layers and not any(p["reparam"] for p in base["points"])


def test_dry_run_marks_bn_folding_and_float_overrides():
    from reparq.recipes.plan import plan_for

    run = validate({"recipe": "mse", "w_bits": 4, "a_bits": 4, "overrides": {"block2.0": [16, 16]}})
    points = {p["point"]: p for p in plan_for(tiny_model("cnn"), run)["points"]}
    assert points["block1.0.weight"]["reparam"] == "BN fold"
    assert points["head.2.weight"]["reparam"] == ""
    assert points["block2.0.weight"]["bits"] == "float" and points["block2.0.input"]["estimator"] == "-"


@pytest.mark.parametrize("argv, message", [
    (["quantize", "--config", "nope.yaml"], "config file nope.yaml not found"),
    (["quantize", "--preset", "w3a3"], "unknown preset 'w3a3'; allowed: cnn-w4a4"),
    (["quantize", "--preset", "w4a4", "--config", "x.yaml"], "give --config or --preset, not both"),
    (["quantize", "--recipe", "mse", "--iters", "5"], "apply to reconstruction recipes only"),
])
def test_cli_config_errors_are_one_line_with_exit_code_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_cli_unknown_config_key_exit_code_2(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("recipe: mse\nbits: 4\n")
    out = tmp_path / "saved"
    assert main(["quantize", "--config", str(path), "--save", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "config key 'bits' does not exist; allowed keys:" in err and len(err.splitlines()) == 1
    assert not out.exists()


@needs_zoo
def test_cli_override_glob_that_matches_nothing_stops_before_writing(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("recipe: mse\noverrides: {'stages.9.*': W8A8}\ncalib: {size: 32}\n")
    out = tmp_path / "saved"
    assert main(["quantize", "--config", str(path), "--save", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "override pattern 'stages.9.*' matches no quantizable layer" in err and len(err.splitlines()) == 1
    assert not out.exists()
