"""reparq.quantize end to end on a tiny CNN: accuracy vs bits, purity, determinism, input validation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

import reparq
from reparq.errors import ReparqError
from reparq.nn.qmodules import QuantizedLayer, quantized_layers
from reparq.recipes.registry import get_recipe

RECON_OPTS = dict(iters=10, block_globs=("block*",))  # keep the reconstruction recipes fast


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU())
        self.block3 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x):
        return self.head(self.block3(self.block2(self.block1(x))))


def make_model(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    model = TinyNet()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(8, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(8, generator=g) + 0.5)
                m.weight.copy_(torch.rand(8, generator=g) + 0.5)
                m.bias.copy_(torch.randn(8, generator=g) * 0.2)
    return model.eval()


def data(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def recipe_options(recipe: str) -> dict:
    """The short-run options (few iterations, the test model's block globs) a recipe accepts."""
    spec = get_recipe(recipe)
    fields = {f.name for f in dataclasses.fields(spec.options)} if spec.options else set()
    return {k: v for k, v in RECON_OPTS.items() if k in fields}


def rel_error(qmodel: nn.Module, model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        ref, out = model(x), qmodel(x)
    return ((out - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def calib():
    return data(64, seed=2)


@pytest.mark.parametrize("recipe", reparq.list_recipes())
def test_every_recipe_w8a8_close_and_w4a4_worse(recipe, model, calib):
    test_x = data(64, seed=3)
    q8 = reparq.quantize(model, calib, recipe=recipe, w_bits=8, a_bits=8, keep_first_last_8bit=False,
                         **recipe_options(recipe))
    q4 = reparq.quantize(model, calib, recipe=recipe, w_bits=4, a_bits=4, keep_first_last_8bit=False,
                         **recipe_options(recipe))
    e8, e4 = rel_error(q8, model, test_x), rel_error(q4, model, test_x)
    assert e8 < 0.05, f"{recipe} W8A8 relative error {e8:.4f}"
    assert e4 > 2 * e8, f"{recipe}: W4A4 error {e4:.4f} should clearly exceed W8A8 error {e8:.4f}"
    # The result really is quantized at the requested bits, with the recipe recorded.
    layers = quantized_layers(q4)
    assert len(layers) == 4
    assert all(l.weight_quantizer.bits == 4 and l.input_quantizer.bits == 4 for _, l in layers)
    assert all(l.weight_quantizer.initialized and l.input_quantizer.initialized for _, l in layers)
    assert q8.reparq_info.recipe == recipe and q8.reparq_info.calib_samples == 64
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q8.modules())  # BN was folded


@pytest.mark.parametrize("recipe", ["mse", "qdrop"])
def test_input_model_not_modified(recipe):
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types_before = [type(m) for m in model.modules()]
    q = reparq.quantize(model, data(32, seed=2), recipe=recipe, w_bits=4, a_bits=4, **recipe_options(recipe))
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [type(m) for m in model.modules()] == types_before
    assert not any(isinstance(m, QuantizedLayer) for m in model.modules())
    assert any(isinstance(m, QuantizedLayer) for m in q.modules())
    assert q is not model


def test_input_model_training_mode_is_preserved():
    # "the caller's model is never modified": that includes its train/eval mode.
    model = make_model().train()
    reparq.quantize(model, data(32, seed=2), recipe="minmax")
    assert model.training, "quantize() switched the caller's model to eval mode"
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("recipe", ["mse", "qdrop"])
def test_same_seed_gives_bit_identical_state_dicts(recipe, model, calib):
    opts = recipe_options(recipe)
    a = reparq.quantize(model, calib, recipe=recipe, w_bits=4, a_bits=4, seed=7, **opts).state_dict()
    b = reparq.quantize(model, calib, recipe=recipe, w_bits=4, a_bits=4, seed=7, **opts).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kwargs, message", [
    (dict(recipe="nope"), "unknown recipe 'nope'; choose one of: minmax, percentile, mse, mae"),
    (dict(w_bits=9), "w_bits must be an integer in 2..8"),
    (dict(a_bits=1), "a_bits must be an integer in 2..8"),
    (dict(w_bits=4.0), "w_bits must be an integer"),
    (dict(foo=1), "unknown option(s) foo for recipe 'mse'; allowed: "),
    (dict(batch_size=0), "batch_size must be a positive integer"),
])
def test_bad_arguments_raise_helpful_errors(kwargs, message, model, calib):
    with pytest.raises(ReparqError) as exc:
        reparq.quantize(model, calib, **kwargs)
    assert message in str(exc.value)


def test_unknown_recipe_lists_every_choice(model, calib):
    with pytest.raises(ReparqError) as exc:
        reparq.quantize(model, calib, recipe="nope")
    assert all(name in str(exc.value) for name in reparq.list_recipes())


def test_unknown_option_lists_allowed_names(model, calib):
    with pytest.raises(ReparqError) as exc:
        reparq.quantize(model, calib, recipe="brecq", itres=5)
    msg = str(exc.value)
    assert "itres" in msg and "iters" in msg and "keep_first_last_8bit" in msg


@pytest.mark.parametrize("calib_data, message", [
    (torch.empty(0, 1, 8, 8), "calibration data is empty"),
    ([], "calibration data is empty"),
    (torch.tensor(1.0), "calibration data is empty"),
    (torch.ones(4, 1, 8, 8).index_put_((torch.tensor([1]),), torch.tensor(float("nan"))), "NaN"),
    (torch.full((4, 1, 8, 8), float("inf")), "NaN or infinite"),
    (torch.randn(4, 3, 8, 8), "the model rejects calibration inputs of shape (4, 3, 8, 8)"),
    (torch.zeros(4, 1, 8, 8, dtype=torch.int64), "floating point"),
    (42, "must be a tensor or an iterable"),
])
def test_bad_calibration_data_raises(calib_data, message, model):
    with pytest.raises(ReparqError) as exc:
        reparq.quantize(model, calib_data, recipe="minmax")
    assert message in str(exc.value)


def test_calibration_data_as_iterable_of_pairs(model, calib):
    pairs = [(calib[:32], torch.zeros(32)), (calib[32:], torch.zeros(32))]
    a = reparq.quantize(model, pairs, recipe="minmax", batch_size=32).state_dict()
    b = reparq.quantize(model, calib, recipe="minmax", batch_size=32).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mse_and_mae_choose_different_weight_scales_on_heavy_tailed_weight():
    model = make_model()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        w = model.block2[0].weight
        u = torch.rand(w.shape, generator=g) - 0.5
        lap = -torch.sign(u) * torch.log1p(-2 * u.abs()) * 0.05  # Laplace weights
        lap.view(8, -1)[:, 0] = 1.0  # one large outlier per output channel
        w.copy_(lap)
    calib = data(32, seed=2)
    q_mse = reparq.quantize(model, calib, recipe="mse", w_bits=4, a_bits=8)
    q_mae = reparq.quantize(model, calib, recipe="mae", w_bits=4, a_bits=8)
    s_mse = q_mse.block2[0].weight_quantizer.scale.detach()
    s_mae = q_mae.block2[0].weight_quantizer.scale.detach()
    assert s_mse.shape == s_mae.shape == (8,)
    assert not torch.equal(s_mse, s_mae)
    assert (s_mae <= s_mse).all() and (s_mae < s_mse).any()  # MAE clips the outliers harder


def test_brecq_learns_activation_step_sizes(model, calib):
    # BRECQ/QDrop make the input quantizers' scales learnable (learn_act_scale=True); after
    # reconstruction at least one of them must differ from the MSE initialization it started from.
    q_init = reparq.quantize(model, calib, recipe="mse", w_bits=4, a_bits=4)
    q_brecq = reparq.quantize(model, calib, recipe="brecq", w_bits=4, a_bits=4, iters=20,
                              block_globs=("block*",), lr_act=1e-2)
    init = {n: l.input_quantizer.scale.detach().clone() for n, l in quantized_layers(q_init)}
    learned = {n: l.input_quantizer.scale.detach() for n, l in quantized_layers(q_brecq)}
    assert init.keys() == learned.keys()
    assert any(not torch.equal(init[n], learned[n]) for n in init), "activation scales were never updated"


def test_brecq_without_weight_rounding_still_learns_activation_scales(model, calib):
    q = reparq.quantize(model, calib, recipe="brecq", w_bits=4, a_bits=4, iters=5, round_weights=False,
                        block_globs=("block*",), lr_act=1e-2)
    stats = q.reparq_recon_stats
    assert len(stats) == 4 and all(len(s["history"]) == 5 for s in stats)
