"""Export to the Hugging Face compressed-tensors format (reparq.export_hf): transformers'
``from_pretrained`` loads the export and computes reparq's logits; what the format cannot hold
is refused before anything is written.

Tolerance: both models run eager attention in float32 on the same dequantized weights (equal bit
for bit, checked) and, for W8A8, the same activation integers; the logits agree to 1e-5 (in
practice exactly)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import reparq
from reparq.errors import ReparqError
from reparq.nn.qmodules import quantized_layers

pytest.importorskip("compressed_tensors")
transformers = pytest.importorskip("transformers")

ATOL = 1e-5
SCHEMES = {"W4A16": (4, 16), "W8A8": (8, 8)}
NO_ATTENTION_QUANT = ("*self_attn",)  # the format has no place for quantized attention matmuls


def _model(family: str, tied: bool, layers: int = 2):
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                  max_position_embeddings=64, tie_word_embeddings=tied, use_cache=False)
    if family == "opt":
        cfg = transformers.OPTConfig(ffn_dim=64, word_embed_proj_dim=32, **common)
        model = transformers.OPTForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(intermediate_size=64, num_key_value_heads=2, **common)
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # biases and norm affines away from their init, so a lost one shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _ids(n: int = 16, t: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (n, t), generator=torch.Generator().manual_seed(seed))


def _quantize(model, scheme: str, recipe: str = "minmax", **options):
    w, a = SCHEMES[scheme]
    if a < 16:
        options.setdefault("ignore", NO_ATTENTION_QUANT)
    return reparq.quantize(model, _ids(), recipe=recipe, w_bits=w, a_bits=a, batch_size=8, **options)


def _load(out: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_transformers_loads_reparq_model(tmp_path, family, tied, scheme):
    q = _quantize(_model(family, tied), scheme)
    out = reparq.export_hf(q, tmp_path / "hf")
    hf = _load(out)
    ids = _ids(4, 12, seed=7)
    ref, got = _logits(q, ids), _logits(hf, ids)
    assert torch.allclose(got, ref, atol=ATOL, rtol=0), float((got - ref).abs().max())
    # Weight-only or not, the dequantized weights are reparq's, bit for bit.
    modules = dict(hf.named_modules())
    for name, layer in quantized_layers(q):
        assert torch.equal(modules[name].weight, layer.quantized_weight().detach()), name
    if scheme == "W8A8":  # the loaded model quantizes its inputs: without that the logits would differ
        for _, layer in quantized_layers(q):
            layer.input_quantizer.enabled = False
        assert (_logits(q, ids) - got).abs().max() > 100 * ATOL
    config = json.loads((out / "config.json").read_text())
    # reparq's 8-bit last layer is quantized, so a tied embedding is untied (it keeps the quantized matrix in float)
    assert config["tie_word_embeddings"] is False


def test_config_names_scheme_and_ignore_list(tmp_path):
    q = _quantize(_model("llama", tied=True), "W4A16", ignore=("lm_head",))
    out = reparq.export_hf(q, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed"
    assert qc["ignore"] == ["lm_head"]
    assert config["tie_word_embeddings"] is True  # lm_head stays float: still tied to the embedding
    groups = list(qc["config_groups"].values())
    main = next(g for g in groups if g["targets"] == ["Linear"])
    assert (main["weights"]["num_bits"], main["weights"]["strategy"], main["weights"]["symmetric"]) == (4, "channel",
                                                                                                        True)
    assert main["input_activations"] is None
    # the first and last quantized layers keep 8 bits (reparq's keep_first_last_8bit): a group by name
    edges = next(g for g in groups if g is not main)
    assert edges["targets"] == ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    assert edges["weights"]["num_bits"] == 8
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        packed = f.get_tensor("model.layers.1.mlp.up_proj.weight_packed")
    assert packed.dtype == torch.int32 and tuple(packed.shape) == (64, 32 * 4 // 32)  # 8 int4 per int32
    assert "lm_head.weight" not in keys and "model.layers.1.mlp.up_proj.weight" not in keys
    hf = _load(out)
    assert torch.allclose(_logits(hf, _ids(2)), _logits(q, _ids(2)), atol=ATOL, rtol=0)


def test_w8a8_config_static_and_dynamic(tmp_path):
    q = _quantize(_model("opt", tied=False), "W8A8")
    static = reparq.export_hf(q, tmp_path / "static")
    group = next(g for g in json.loads((static / "config.json").read_text())["quantization_config"]
                 ["config_groups"].values() if g["targets"] == ["Linear"])
    assert group["format"] == "int-quantized"
    assert group["input_activations"]["strategy"] == "tensor" and group["input_activations"]["dynamic"] is False
    assert group["input_activations"]["symmetric"] is False  # reparq's activations carry a zero point
    dynamic = reparq.export_hf(q, tmp_path / "dynamic", activations="dynamic")
    qc = json.loads((dynamic / "config.json").read_text())["quantization_config"]
    inputs = next(g for g in qc["config_groups"].values() if g["targets"] == ["Linear"])["input_activations"]
    assert inputs["strategy"] == "token" and inputs["dynamic"] is True
    from safetensors import safe_open

    with safe_open(str(dynamic / "model.safetensors"), framework="pt") as f:
        assert not any(k.endswith("input_scale") for k in f.keys())
    ref, got = _logits(q, _ids(2)), _logits(_load(dynamic), _ids(2))
    assert not torch.allclose(got, ref, atol=ATOL, rtol=0)  # other activation ranges: not reparq's model
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()  # but close


def _refused(tmp_path: Path, model_or_dir, match: str, **kwargs) -> None:
    out = tmp_path / "refused"
    with pytest.raises(ReparqError, match=match):
        reparq.export_hf(model_or_dir, out, **kwargs)
    assert not out.exists()


def test_quantized_attention_matmuls_refused_before_writing(tmp_path):
    model = _model("llama", tied=False)
    q = reparq.quantize(model, _ids(), recipe="repqvit", w_bits=8, a_bits=8, batch_size=8)
    _refused(tmp_path, q, r"attention matmuls.*log2.*ignore=\('\*self_attn',\)")


def test_low_bit_activations_refused(tmp_path):
    q = reparq.quantize(_model("opt", tied=False), _ids(), recipe="minmax", w_bits=8, a_bits=6, batch_size=8,
                        ignore=NO_ATTENTION_QUANT, keep_first_last_8bit=False)
    _refused(tmp_path, q, "inputs to 6 bits.*a_bits=8")
    q = reparq.quantize(_model("opt", tied=False), _ids(), recipe="minmax", w_bits=4, a_bits=8, batch_size=8,
                        ignore=NO_ATTENTION_QUANT, keep_first_last_8bit=False)
    _refused(tmp_path, q, "W4A8.*W4A16")


def test_consumer_side_fold_refused(tmp_path):
    q = reparq.quantize(_model("llama", tied=False), _ids(), recipe="repqvit", w_bits=8, a_bits=8, batch_size=8,
                        ignore=NO_ATTENTION_QUANT, consumer_fold=True)
    assert any(n.endswith("input_affine") for n, _ in q.named_modules())
    _refused(tmp_path, q, "consumer-side input affine.*without consumer_fold")


def test_non_empty_out_dir_refused(tmp_path):
    q = _quantize(_model("llama", tied=False), "W4A16")
    out = tmp_path / "busy"
    out.mkdir()
    (out / "x").write_text("")
    with pytest.raises(ReparqError, match="not empty"):
        reparq.export_hf(q, out)
    assert [p.name for p in out.iterdir()] == ["x"]


@pytest.mark.parametrize("family,scheme", [("llama", "W4A16"), ("opt", "W8A8")])
def test_export_from_streamed_directory(tmp_path, family, scheme):
    """A ``reparq stream`` output converts shard by shard (one decoder layer each) and loads."""
    from reparq.stream import quantize_streamed

    model = _model(family, tied=True, layers=3)
    model.save_pretrained(tmp_path / "fp", max_shard_size="20KB")
    w, a = SCHEMES[scheme]
    quantize_streamed(tmp_path / "fp", _ids(), tmp_path / "q", recipe="repqvit", w_bits=w, a_bits=a, batch_size=8,
                      **({"ignore": NO_ATTENTION_QUANT} if a < 16 else {}))
    out = reparq.export_hf(tmp_path / "q", tmp_path / "hf")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    # one file per streamed shard: the layers, the head (and OPT's learned positions, carried over)
    shards = json.loads((tmp_path / "q" / "reparq.json").read_text())["shards"]
    assert len(set(index["weight_map"].values())) == len(shards) >= 3 + 1
    assert (out / "generation_config.json").exists()
    ref = reparq.load(tmp_path / "q")
    ids = _ids(3, 12, seed=5)
    assert torch.allclose(_logits(_load(out), ids), _logits(ref, ids), atol=ATOL, rtol=0)


def test_zoo_source_brings_tokenizer(tmp_path):
    """From a saved model whose source is a zoo model: config and tokenizer come from the zoo."""
    from reparq.zoo import load_model

    float_model = load_model("llama_fm")
    q = reparq.quantize(float_model, _ids(8, 16), recipe="minmax", w_bits=4, a_bits=16, batch_size=8)
    reparq.save(q, tmp_path / "q", source="zoo:llama_fm")
    out = reparq.export_hf(tmp_path / "q", tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok("git commit").input_ids  # the zoo's BPE
    hf = _load(out)
    assert torch.allclose(_logits(hf, _ids(2, 16)), _logits(q, _ids(2, 16)), atol=1e-4, rtol=0)
    shutil.rmtree(tmp_path / "q")


def test_quantized_embedding_is_smaller_and_exact(tmp_path):
    """A tied embedding that reparq quantized (through its output layer) can keep the integers."""
    q = _quantize(_model("llama", tied=True), "W4A16")
    plain = reparq.export_hf(q, tmp_path / "plain")
    small = reparq.export_hf(q, tmp_path / "small", quantize_embedding=True)
    from safetensors import safe_open

    with safe_open(str(small / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.int8
    with safe_open(str(plain / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32  # q * s is not float16-exact
    assert (small / "model.safetensors").stat().st_size < (plain / "model.safetensors").stat().st_size
    groups = json.loads((small / "config.json").read_text())["quantization_config"]["config_groups"]
    assert groups["embedding"]["targets"] == ["model.embed_tokens"]
    hf = _load(small)
    assert torch.allclose(_logits(hf, _ids(3)), _logits(q, _ids(3)), atol=ATOL, rtol=0)
    # (decompressed on the first forward)
    assert torch.equal(hf.model.embed_tokens.weight, dict(q.named_modules())["lm_head"].quantized_weight().detach())


def test_cli_export_hf_check(tmp_path, capsys):
    """``reparq export --format hf --check`` writes the export and prints the comparison table."""
    from reparq.cli import main

    q = reparq.quantize(_model("opt", tied=False), _ids(), recipe="minmax", w_bits=4, a_bits=16, batch_size=8)
    reparq.save(q, tmp_path / "q")
    ids = tmp_path / "ids.safetensors"
    from safetensors.torch import save_file

    save_file({"input_ids": _ids(6, 12, seed=3)}, str(ids))
    code = main(["export", "--format", "hf", str(tmp_path / "q"), str(tmp_path / "hf"), "--source",
                 str(_saved_float(tmp_path, q)), "--check", "--check-data", f"tensor:{ids}", "--check-size", "6"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert (tmp_path / "hf" / "config.json").exists()
    line = next(x for x in out.splitlines() if x.startswith("perplexity"))
    ppl_reparq, ppl_hf = (float(v) for v in line.split()[1:3])
    assert ppl_reparq == ppl_hf  # weight-only: the same model
    assert "0.0000 %" in out
    code = main(["export", "--format", "hf", str(tmp_path / "q"), str(tmp_path / "hf2")])  # no config source
    assert code == 2 and not (tmp_path / "hf2").exists()


def _saved_float(tmp_path: Path, q) -> Path:
    """A float model directory of q's architecture (config; no tokenizer)."""
    directory = tmp_path / "fp"
    q.config.save_pretrained(str(directory))
    return directory


def test_scheme_refusals_name_the_fix():
    """Each kind of layer the format cannot hold gets its own message (before anything is written)."""
    from reparq.deploy.hf_scheme import attention_refusals, layer_scheme

    def meta(w_bits=4, w_sym=True, a_bits=16, a_axis=None):
        return {"type": "QLinear", "weight": {"bits": w_bits, "symmetric": w_sym, "channel_axis": 0, "initialized": True},
                "input": {"bits": a_bits, "symmetric": False, "channel_axis": a_axis, "initialized": True}}

    def problems(m, scales=8):
        out: list[str] = []
        scheme = layer_scheme("l", m, scales, 8, problems=out)
        return scheme, out

    scheme, out = problems(meta())
    assert not out and (scheme.format, scheme.w_strategy) == ("pack-quantized", "channel")
    scheme, out = problems(meta(w_bits=8, a_bits=8), scales=1)
    assert not out and (scheme.format, scheme.w_strategy, scheme.name) == ("int-quantized", "tensor", "W8A8")
    assert "asymmetric weights" in problems(meta(w_sym=False))[1][0]
    assert "per channel" in problems(meta(w_bits=8, a_bits=8, a_axis=-1))[1][0]
    assert "only per output channel or per tensor" in problems(meta(), scales=4)[1][0]
    assert "float weights but quantizes its inputs" in problems(meta(w_bits=16, a_bits=8))[1][0]
    assert problems(meta(w_bits=16, a_bits=16)) == (None, [])  # a float layer: the ignore list
    assert attention_refusals({"a": {"bits": 16, "probs": "log2"}}) == []
    assert "log2parity grid" in attention_refusals({"a": {"bits": 8, "probs": "log2parity"}})[0]
