"""save -> load reproduces the quantized model exactly; corrupt or foreign directories fail clearly."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import reparq
from reparq.errors import ReparqError
from reparq.zoo.registry import checkpoint_path


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def _fresh(seed: int) -> Net:
    torch.manual_seed(seed)
    return Net().eval()


@pytest.mark.parametrize("recipe, opts", [("mse", {}), ("brecq", {"iters": 10, "block_globs": ("features",)})])
def test_save_load_gives_identical_outputs(tmp_path, recipe, opts):
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    qmodel = reparq.quantize(_fresh(0), x, recipe=recipe, w_bits=4, a_bits=4, **opts)
    reparq.save(qmodel, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert tensors["features.3.weight_int"].dtype == torch.int8  # integer weights on disk
    assert tensors["features.3.weight_int"].abs().max() <= 8
    # The architecture comes from the caller; its own (different) weights are replaced.
    loaded = reparq.load(tmp_path, model=_fresh(123))
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))
    assert loaded.reparq_info.recipe == recipe and loaded.reparq_info.config["w_bits"] == 4


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("recipe", ["minmax", "repqvit"])
def test_tied_embedding_loads_as_measured(tmp_path, family, recipe):
    """A decoder whose output layer is tied to its input embedding: the saved file holds the matrix
    once, as the output layer's integers, and the in-memory model already reads that matrix in its
    embedding, so the loaded model gives the outputs that were measured (before, a recipe without
    reconstruction left the in-memory embedding float and the two disagreed)."""
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, tie_word_embeddings=True,
                  attn_implementation="eager", use_cache=False)
    if family == "llama":
        build = lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(intermediate_size=64, **common)).eval()
    else:
        build = lambda: transformers.OPTForCausalLM(transformers.OPTConfig(ffn_dim=64, **common)).eval()
    model = build()
    embed = model.get_input_embeddings()
    float_embedding = embed.weight.detach().clone()
    ids = torch.randint(0, 64, (16, 16), generator=torch.Generator().manual_seed(1))
    qmodel = reparq.quantize(model, {"input_ids": ids}, recipe=recipe, w_bits=4, a_bits=8, batch_size=8)
    head = qmodel.lm_head
    assert qmodel.get_input_embeddings().weight is head.weight  # still one matrix
    assert torch.equal(head.weight, head.quantized_weight()) and not torch.equal(head.weight, float_embedding)
    assert torch.equal(embed.weight, float_embedding)  # the caller's model is untouched
    reparq.save(qmodel, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    embed_name = next(n for n, m in qmodel.named_modules() if m is qmodel.get_input_embeddings())
    assert "lm_head.weight_int" in tensors and f"{embed_name}.weight" not in tensors
    loaded = reparq.load(tmp_path, model=build())
    assert loaded.get_input_embeddings().weight is loaded.lm_head.weight
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, qmodel(input_ids=ids).logits)


@pytest.mark.skipif(not checkpoint_path("repvgg_fm").exists(), reason="zoo checkpoint not trained")
def test_zoo_source_loads_without_a_model(tmp_path):
    from reparq.data import calibration_subset
    from reparq.zoo import load_model

    calib = calibration_subset(64)
    qmodel = reparq.quantize(load_model("repvgg_fm"), calib, recipe="minmax", w_bits=6, a_bits=6)
    reparq.save(qmodel, tmp_path, source="zoo:repvgg_fm")
    loaded = reparq.load(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(calib[:16]), qmodel(calib[:16]))


def _saved(tmp_path):
    x = torch.randn(16, 1, 8, 8)
    reparq.save(reparq.quantize(_fresh(0), x, recipe="minmax"), tmp_path)
    return tmp_path


def test_missing_files(tmp_path):
    with pytest.raises(ReparqError, match="not a saved reparq model"):
        reparq.load(tmp_path, model=_fresh(0))


def test_corrupt_json(tmp_path):
    d = _saved(tmp_path)
    (d / "reparq.json").write_text("{not json")
    with pytest.raises(ReparqError, match="corrupt"):
        reparq.load(d, model=_fresh(0))


def test_truncated_tensors(tmp_path):
    d = _saved(tmp_path)
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ReparqError, match="corrupt"):
        reparq.load(d, model=_fresh(0))


def test_incompatible_version(tmp_path):
    d = _saved(tmp_path)
    meta = json.loads((d / "reparq.json").read_text())
    meta["format_version"] = 99
    (d / "reparq.json").write_text(json.dumps(meta))
    with pytest.raises(ReparqError, match="version 99"):
        reparq.load(d, model=_fresh(0))


def test_wrong_model_and_no_source(tmp_path):
    d = _saved(tmp_path)
    with pytest.raises(ReparqError, match="pass it"):
        reparq.load(d)

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(8, 10)

    with pytest.raises(ReparqError, match="does not exist"):
        reparq.load(d, model=Other())


def test_only_quantized_models_can_be_saved(tmp_path):
    with pytest.raises(ReparqError, match="reparq.quantize"):
        reparq.save(_fresh(0), tmp_path)
