"""Channel equalization across ReLU: exact in float, finds only pairs it may rescale, and removes
the in-channel outliers that merged Rep blocks carry."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from reparq.model.equalize import (apply_channel_scale, choose_scale, equalize_channels, find_equalizable_pairs,
                                   input_channel_range)
from reparq.zoo.registry import checkpoint_path


class Chain(nn.Module):
    """conv -> ReLU -> depthwise conv -> ReLU -> conv -> ReLU -> max pool -> global avg pool -> linear,
    plus a GELU link that must not be rescaled (GELU is not positively homogeneous)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 6, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = torch.relu(self.dw(x))
        x = nn.functional.gelu(self.c2(x))
        x = F.max_pool2d(F.relu(self.c3(x)), 2)
        return self.fc(torch.flatten(self.pool(x), 1))


class Branching(nn.Module):
    """c1's output feeds two consumers: no single pair may rescale it."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 1)
        self.a = nn.Conv2d(4, 4, 1)
        self.b = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = F.relu(self.c1(x))
        return self.a(y) + self.b(y)


def _chain() -> Chain:
    torch.manual_seed(0)
    model = Chain().eval()
    with torch.no_grad():  # an in-channel outlier like a merged identity branch's centre tap
        model.c2.weight[3, 3, 1, 1] = 40.0
        model.dw.weight[3] *= 0.02
        model.dw.bias[3] = 0.0
    return model


def test_pairs_follow_homogeneous_ops_only():
    pairs = {(p.producer, p.consumer): p.consumer_rectified for p in find_equalizable_pairs(_chain())}
    # c2 -> c3 crosses a GELU and is refused; c3 -> fc crosses max pool, avg pool and flatten
    assert pairs == {("c1", "dw"): True, ("dw", "c2"): False, ("c3", "fc"): False}
    assert find_equalizable_pairs(Branching()) == []


@pytest.mark.parametrize("producer,consumer", [("c1", "dw"), ("dw", "c2"), ("c3", "fc")])
def test_rescaling_is_exact(producer, consumer):
    model = _chain()
    x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    before = model(x)
    channels = getattr(model, producer).weight.shape[0]
    s = torch.rand(channels, generator=torch.Generator().manual_seed(2)) * 10 + 0.01
    apply_channel_scale(getattr(model, producer), getattr(model, consumer), s)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_fixed_alpha_one_levels_activation_ranges():
    """alpha=1 moves all of the range to the weights: every consumer input channel then spans 1."""
    model = _chain()
    x = torch.randn(64, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    feats = F.relu(model.c1(x))
    _, s, _ = choose_scale(model.dw, feats, (4, 4), True, [1.0])
    ranges = (feats / s.view(1, -1, 1, 1)).abs().amax(dim=(0, 2, 3))
    torch.testing.assert_close(ranges, torch.ones_like(ranges))


def test_equalization_keeps_output_and_shrinks_the_in_channel_outlier():
    model = _chain()
    batches = [torch.randn(32, 3, 12, 12, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    before = model(batches[1])
    outlier_before = model.c2.weight[3].abs().max() / model.c2.weight[3].abs().median()
    bits = {"dw": (4, 4), "c2": (4, 4), "c3": (4, 4), "fc": (8, 8)}
    chosen = equalize_channels(model, batches, bits)
    assert set(chosen) == {"dw", "c2", "fc"}
    torch.testing.assert_close(model(batches[1]), before, rtol=1e-4, atol=1e-5)
    outlier_after = model.c2.weight[3].abs().max() / model.c2.weight[3].abs().median()
    assert outlier_after < outlier_before / 5, (outlier_before, outlier_after)


def test_search_beats_no_rescaling_on_an_outlier_channel():
    """At W4A4 the searched scales quantize the consumer with less output error than leaving the
    channels as they are (the diagonal outlier eats the weight grid of its output channel)."""
    from reparq.model.equalize import _consumer_forward, _fake

    model = _chain()
    x = F.relu(model.c1(torch.randn(64, 3, 12, 12, generator=torch.Generator().manual_seed(3))))
    x = F.relu(model.dw(x))
    _, _, searched = choose_scale(model.c2, x, (4, 4), False, (0.0, 0.25, 0.5, 0.75, 1.0))
    plain = _consumer_forward(model.c2, _fake(x, "mae", 4, False, None), _fake(model.c2.weight, "mse", 4, True, 0))
    unscaled = (plain - model.c2(x)).abs().mean().item()
    assert searched < 0.8 * unscaled, (searched, unscaled)


def test_misread_pair_is_undone(monkeypatch):
    """If a rescaling changes the output (a pair read wrongly), every weight is put back."""
    import reparq.model.equalize as eq

    model = _chain()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(eq, "_HOMOGENEOUS_FUNCTIONS", eq._HOMOGENEOUS_FUNCTIONS | {F.gelu})
    batches = [torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(0))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chosen = equalize_channels(model, batches, {"dw": (4, 4), "c2": (4, 4), "c3": (4, 4), "fc": (8, 8)},
                                   alpha=0.0)
    assert chosen == {}
    assert any("undone" in str(w.message) for w in caught)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)


@pytest.mark.skipif(not checkpoint_path("repvgg_fm").exists(), reason="zoo checkpoint not trained")
def test_zoo_repvgg_chain_is_found_exact_and_rescues_range_only_w4a4():
    """On the merged zoo RepVGG the whole conv chain is equalized without changing the float
    output, and plain MSE ranges at W4A4 go from near chance to usable (measured on the full test
    split: -70.2 -> -12.4 points)."""
    import reparq
    from reparq.data import calibration_subset, load_fashion_mnist
    from reparq.recipes.prepare import prepare_for_deployment
    from reparq.zoo import load_model

    model = load_model("repvgg_fm")
    prepare_for_deployment(model)
    pairs = find_equalizable_pairs(model)
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert [(p.producer, p.consumer) for p in pairs] == list(zip(convs[:-1], convs[1:]))  # the whole chain
    calib = calibration_subset(256, seed=0)
    test_x, test_y = load_fashion_mnist("test")
    test_x, test_y = test_x[:1000], test_y[:1000]
    plain = reparq.evaluate(reparq.quantize(model, calib, recipe="mse", w_bits=4, a_bits=4), test_x, test_y)
    before = model(test_x[:64])
    bits = {p.consumer: (8, 8) if p.consumer == convs[-1] else (4, 4) for p in pairs}
    assert equalize_channels(model, [calib], bits)
    torch.testing.assert_close(model(test_x[:64]), before, rtol=1e-4, atol=1e-4)
    equalized = reparq.evaluate(reparq.quantize(model, calib, recipe="mse", w_bits=4, a_bits=4), test_x, test_y)
    assert equalized > plain + 30.0, (plain, equalized)
