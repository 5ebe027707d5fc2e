"""Model and calibration sources (zoo, timm + local weights, HF directory, module:function; zoo data,
image folder, text file, tensor file), the API's forward_loop, and their bad inputs on the CLI."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import reparq
from reparq.cli import main
from reparq.errors import ReparqError
from reparq.runconfig import CalibSpec
from reparq.sources import (load_calibration, load_image_folder, load_model_source, model_kind, read_state_dict,
                            record_forward_loop)

MODEL_FILE = textwrap.dedent("""
    import torch
    import torch.nn as nn

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))

    def broken():
        raise RuntimeError("out of coffee")

    def not_a_model():
        return 42
""")


@pytest.fixture()
def model_file(tmp_path):
    path = tmp_path / "user_model.py"
    path.write_text(MODEL_FILE)
    return path


def test_model_kinds():
    assert model_kind("zoo:repvgg_fm") == ("zoo", "repvgg_fm")
    assert model_kind("repvgg_fm") == ("zoo", "repvgg_fm")
    assert model_kind("timm:test_vit") == ("timm", "test_vit")
    assert model_kind("hf:/models/bert") == ("hf", "/models/bert")
    assert model_kind("my.pkg:build") == ("callable", "my.pkg:build")


def test_module_function_from_a_file_and_from_an_import_path(model_file, monkeypatch):
    a = load_model_source(f"{model_file}:build")
    monkeypatch.syspath_prepend(str(model_file.parent))
    b = load_model_source("user_model:build")
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(a(x), b(x)) and a(x).shape == (2, 5)
    assert not a.training


@pytest.mark.parametrize("suffix, message", [
    (":broken", "failed to build the model: out of coffee"),
    (":not_a_model", "returned int, not a torch.nn.Module"),
    (":nope", "has no function 'nope'"),
])
def test_module_function_errors(model_file, suffix, message):
    with pytest.raises(ReparqError, match=message):
        load_model_source(f"{model_file}{suffix}")


def test_missing_model_file_and_module():
    with pytest.raises(ReparqError, match="model file nowhere.py not found"):
        load_model_source("nowhere.py:build")
    with pytest.raises(ReparqError, match="cannot import module 'no_such_module_xyz'"):
        load_model_source("no_such_module_xyz:build")


def test_timm_model_from_local_weights_infers_classes_and_channels(tmp_path):
    import timm

    torch.manual_seed(0)
    net = timm.create_model("test_byobnet", num_classes=3, in_chans=1).eval()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    loaded = load_model_source("timm:test_byobnet", weights=str(path))
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    # A torch file read with weights_only (nesting under "state_dict" is unwrapped).
    pt = tmp_path / "w.pt"
    torch.save({"state_dict": net.state_dict()}, pt)
    assert set(read_state_dict(pt)) == set(net.state_dict())


def test_timm_errors(tmp_path):
    with pytest.raises(ReparqError, match="unknown timm model 'resnet9000'"):
        load_model_source("timm:resnet9000", weights="x.safetensors")
    with pytest.raises(ReparqError, match="needs a local weights file .*never downloads"):
        load_model_source("timm:test_byobnet")
    with pytest.raises(ReparqError, match="weights file .*missing.safetensors not found"):
        load_model_source("timm:test_byobnet", weights=str(tmp_path / "missing.safetensors"))
    wrong = tmp_path / "wrong.safetensors"
    save_file({"head.fc.weight": torch.zeros(3, 7)}, str(wrong))
    with pytest.raises(ReparqError, match="does not fit timm model 'test_byobnet'"):
        load_model_source("timm:test_byobnet", weights=str(wrong))
    with pytest.raises(ReparqError, match="--weights applies to timm:NAME models only"):
        load_model_source("zoo:repvgg_fm", weights=str(wrong))


def _tiny_bert_dir(tmp_path):
    """A 1-layer BERT saved as an HF directory, with MiniLM's tokenizer files next to it."""
    import shutil

    from transformers import BertConfig, BertModel

    from reparq.zoo.minilm import minilm_path

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    directory = tmp_path / "bert"
    BertModel(cfg).eval().save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_path() / name, directory / name)
    return directory


def test_hf_directory_and_text_calibration(tmp_path):
    directory = _tiny_bert_dir(tmp_path)
    model = load_model_source(f"hf:{directory}")
    assert type(model).__name__ == "BertModel" and not model.training
    text = tmp_path / "corpus.txt"
    text.write_text("Quantization maps real numbers to a small grid.\n\n" * 40)
    ids = load_calibration(CalibSpec(source=f"text:{text}", size=5, seq_len=16), model, f"hf:{directory}")
    assert ids.shape == (5, 16) and ids.dtype == torch.long
    assert bool((ids[:, 0] == 101).all()) and bool((ids[:, -1] == 102).all())  # [CLS] ... [SEP], no padding
    q = reparq.quantize(model, ids, recipe="minmax")
    with torch.no_grad():
        ref, out = model(ids).last_hidden_state, q(ids).last_hidden_state
    assert 0 < float((out - ref).norm() / ref.norm()) < 0.1
    with pytest.raises(ReparqError, match="text: calibration data needs an hf:DIR model"):
        load_calibration(CalibSpec(source=f"text:{text}"), model, "zoo:repvgg_fm")
    with pytest.raises(ReparqError, match="no Hugging Face model directory there"):
        load_model_source(f"hf:{tmp_path / 'nothing'}")


def test_image_folder_is_resized_and_normalized(tmp_path):
    from PIL import Image

    for i, value in enumerate((0, 128, 255)):
        sub = tmp_path / "imgs" / f"class{i}"
        sub.mkdir(parents=True)
        Image.new("RGB", (40, 30), (value, value, value)).save(sub / f"{i}.png")
    x = load_image_folder(str(tmp_path / "imgs"), size=10, seed=0, channels=1, image_size=28, mean=[0.5], std=[0.25])
    assert x.shape == (3, 1, 28, 28)
    values = sorted(float(v) for v in x.flatten(1).mean(1))
    expected = sorted((v / 255 - 0.5) / 0.25 for v in (0, 128, 255))
    assert values == pytest.approx(expected, abs=1e-5)
    # Zoo models get Fashion-MNIST's shape and statistics without being told.
    spec = CalibSpec(source=f"images:{tmp_path / 'imgs'}", size=2)
    assert load_calibration(spec, None, "zoo:repvgg_fm").shape == (2, 1, 28, 28)
    with pytest.raises(ReparqError, match="image folder .*nope not found"):
        load_image_folder(str(tmp_path / "nope"), 1, 0, 1, 28)


def test_tensor_file_calibration(tmp_path):
    path = tmp_path / "calib.safetensors"
    save_file({"x": torch.arange(20.0).reshape(10, 2)}, str(path))
    x = load_calibration(CalibSpec(source=f"tensor:{path}", size=4), seed=1)
    assert x.shape == (4, 2) and len({float(r[0]) for r in x}) == 4
    assert torch.equal(load_calibration(CalibSpec(source=f"tensor:{path}", size=4), seed=1), x)  # seeded
    with pytest.raises(ReparqError, match="unknown calibration source 'ftp:x'"):
        load_calibration(CalibSpec(source="ftp:x"))


def test_forward_loop_equals_the_same_batches_passed_directly():
    from tests.test_runconfig import data, tiny_model

    model = tiny_model("cnn")
    batches = [data(16, seed=s) for s in range(3)]
    a = reparq.quantize(model, forward_loop=lambda m: [m(b) for b in batches], recipe="mse", w_bits=4, a_bits=4)
    b = reparq.quantize(model, batches, recipe="mse", w_bits=4, a_bits=4)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.reparq_info.calib_samples == 48


def test_forward_loop_records_keyword_batches_and_restores_the_model():
    model = nn.Linear(3, 2).train()
    seen = record_forward_loop(model, lambda m: m(input=torch.ones(4, 3)))
    assert isinstance(seen[0], dict) and torch.equal(seen[0]["input"], torch.ones(4, 3))
    assert model.training and not model._forward_pre_hooks


@pytest.mark.parametrize("kwargs, message", [
    (dict(forward_loop=lambda m: None), "forward_loop never called the model"),
    (dict(forward_loop=lambda m: m(torch.randn(2, 1, 8, 8), torch.randn(2))), "must call the model with one tensor"),
    (dict(forward_loop=lambda m: 1 / 0), "forward_loop failed: division by zero"),
    (dict(forward_loop=3), "forward_loop must be a callable"),
    (dict(forward_loop=lambda m: m(torch.randn(2, 1, 8, 8)), calib_data=torch.randn(2, 1, 8, 8)),
     "pass calibration data or a forward_loop, not both"),
    (dict(), "no calibration data"),
])
def test_forward_loop_errors(kwargs, message):
    from tests.test_runconfig import tiny_model

    with pytest.raises(ReparqError, match=message):
        reparq.quantize(tiny_model("cnn"), **kwargs)


# -- command line: any model, any data, and the bad inputs ------------------------------------------

def test_cli_quantizes_a_user_model_on_a_tensor_file(model_file, tmp_path, capsys):
    calib = tmp_path / "calib.safetensors"
    save_file({"x": torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))}, str(calib))
    out = tmp_path / "saved"
    rc = main(["quantize", "--model", f"{model_file}:build", "--calib", f"tensor:{calib}", "--calib-size", "64",
               "--w-bits", "8", "--a-bits", "8", "--quiet", "--json", "--save", str(out)])
    assert rc == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    assert row["metric"] == "agreement" and row["fp"] == 100.0 and row["quant"] >= 90.0
    assert row["output_sqnr_db"] > 25  # W8A8 on a 2-layer model
    loaded = reparq.load(out, model=load_model_source(f"{model_file}:build"))
    assert loaded.reparq_info.recipe == "mse"


@pytest.mark.parametrize("case, message", [
    ("missing_weights", "weights file .*missing.safetensors not found"),
    ("broken_model", "failed to build the model: out of coffee"),
    ("wrong_shape", r"the model rejects calibration inputs of shape \(8, 3, 5, 5\)"),
    ("missing_calib", "tensor file .*nope.safetensors not found"),
])
def test_cli_bad_inputs_one_line_exit_2_nothing_written(case, message, model_file, tmp_path, capsys):
    wrong = tmp_path / "wrong.safetensors"
    save_file({"x": torch.randn(8, 3, 5, 5)}, str(wrong))
    argv = {"missing_weights": ["--model", "timm:test_byobnet", "--weights", str(tmp_path / "missing.safetensors")],
            "broken_model": ["--model", f"{model_file}:broken"],
            "wrong_shape": ["--model", f"{model_file}:build", "--calib", f"tensor:{wrong}"],
            "missing_calib": ["--model", f"{model_file}:build", "--calib", f"tensor:{tmp_path / 'nope.safetensors'}"],
            }[case]
    out = tmp_path / "saved"
    assert main(["quantize", *argv, "--save", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    import re

    assert re.search(message, err), err
    assert not out.exists()
