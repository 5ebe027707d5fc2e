"""insert_quantizers: which layers get quantized, at which bits, and what is left in float."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from reparq.config import QuantConfig
from reparq.errors import ReparqError
from reparq.nn.qmodules import QConv2d, QLinear, QuantizedLayer
from reparq.recipes.insert import insert_quantizers


def tiny_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    # names: "0" conv, "2" conv, "5" linear
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 10))


def layer_bits_of(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {n: (m.weight_quantizer.bits, m.input_quantizer.bits) for n, m in model.named_modules()
            if isinstance(m, QuantizedLayer)}


def test_all_conv_and_linear_replaced():
    model = tiny_cnn()
    w0 = model[0].weight
    bits = insert_quantizers(model, QuantConfig(w_bits=4, a_bits=4))
    assert type(model[0]) is QConv2d and type(model[2]) is QConv2d and type(model[5]) is QLinear
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in model.modules())
    assert set(bits) == {"0", "2", "5"}
    # The quantized layer shares the float layer's parameters and keeps its hyper-parameters.
    assert model[0].weight is w0
    assert model[2].kernel_size == (3, 3) and model[5].in_features == 64
    # Weights: symmetric per output channel; inputs: asymmetric per tensor.
    wq, aq = model[2].weight_quantizer, model[2].input_quantizer
    assert wq.symmetric and wq.channel_axis == 0
    assert not aq.symmetric and aq.channel_axis is None


@pytest.mark.parametrize("keep, expected", [
    (True, {"0": (8, 8), "2": (4, 3), "5": (8, 8)}),
    (False, {"0": (4, 3), "2": (4, 3), "5": (4, 3)}),
])
def test_keep_first_last_8bit(keep, expected):
    model = tiny_cnn()
    bits = insert_quantizers(model, QuantConfig(w_bits=4, a_bits=3, keep_first_last_8bit=keep))
    assert bits == expected
    assert layer_bits_of(model) == expected


def test_ignore_glob_leaves_layer_float():
    model = tiny_cnn()
    bits = insert_quantizers(model, QuantConfig(w_bits=4, a_bits=4, keep_first_last_8bit=False, ignore=("2",)))
    assert type(model[2]) is nn.Conv2d
    assert type(model[0]) is QConv2d and type(model[5]) is QLinear
    assert set(bits) == {"0", "5"}


def test_ignore_glob_with_wildcard():
    model = nn.Sequential()
    model.add_module("features", nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3)))
    model.add_module("head", nn.Linear(2, 3))
    insert_quantizers(model, QuantConfig(ignore=("features.*",)))
    assert type(model.features[0]) is nn.Conv2d and type(model.features[1]) is nn.Conv2d
    assert type(model.head) is QLinear


def test_overrides_set_bits_for_matching_names():
    model = tiny_cnn()
    bits = insert_quantizers(model, QuantConfig(w_bits=4, a_bits=4, overrides={"2": (6, 5), "5": (2, 3)}))
    assert bits == {"0": (8, 8), "2": (6, 5), "5": (2, 3)}  # overrides win over keep_first_last_8bit
    assert layer_bits_of(model) == bits


def test_override_matching_nothing_warns():
    model = tiny_cnn()
    with pytest.warns(UserWarning, match="override pattern 'blocks.*' matches no quantizable layer"):
        insert_quantizers(model, QuantConfig(overrides={"blocks.*": (4, 4)}))


def test_ignore_matching_nothing_warns():
    model = tiny_cnn()
    with pytest.warns(UserWarning, match="ignore pattern 'nothing' matches no module"):
        insert_quantizers(model, QuantConfig(ignore=("nothing",)))


def test_no_warning_when_patterns_match():
    model = tiny_cnn()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        insert_quantizers(model, QuantConfig(ignore=("0",), overrides={"2": (4, 4)}))


def conv1d_model() -> nn.Module:
    model = nn.Module()
    model.audio_front = nn.Conv1d(1, 2, 3)
    model.conv = nn.Conv2d(1, 2, 3)
    model.fc = nn.Linear(2, 2)
    return model


def test_strict_with_conv1d_raises_naming_the_layer():
    with pytest.raises(ReparqError, match="audio_front") as exc:
        insert_quantizers(conv1d_model(), QuantConfig(strict=True))
    assert "Conv1d" in str(exc.value)


def test_strict_conv1d_ignored_is_fine():
    model = conv1d_model()
    insert_quantizers(model, QuantConfig(strict=True, ignore=("audio_front",)))
    assert type(model.audio_front) is nn.Conv1d and type(model.conv) is QConv2d


def test_non_strict_leaves_conv1d_float():
    model = conv1d_model()
    bits = insert_quantizers(model, QuantConfig(strict=False))
    assert type(model.audio_front) is nn.Conv1d
    assert type(model.conv) is QConv2d and type(model.fc) is QLinear
    assert set(bits) == {"conv", "fc"}


def test_nothing_to_quantize_raises():
    with pytest.raises(ReparqError, match="no Conv2d or Linear"):
        insert_quantizers(tiny_cnn(), QuantConfig(ignore=("*",)))
