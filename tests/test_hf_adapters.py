"""HF attention adapters (BERT, LLaMA): exact with quantizers off (padding masks, causal mask,
rotary, grouped-query heads), quantizers on the matmul path, every point found and counted, and
reparq.quantize on dict / token-id calibration batches."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

import reparq  # noqa: E402
from reparq.errors import ReparqError  # noqa: E402
from reparq.model.hf_adapters import (  # noqa: E402
    adapt_hf_attention,
    attention_modules,
    count_points,
    hf_family,
    norm_consumers,
    register_hf_attention,
)
from reparq.nn.attention import MatmulQuantizers, matmul_quantizers  # noqa: E402
from reparq.nn.qmodules import QLinear, quantized_layers  # noqa: E402

LAYERS = 2


@pytest.fixture(scope="module", autouse=True)
def _registered():
    # reparq's zoo loaders register the HF classes with the attention adapters; a model built by
    # hand needs this one call (or any adapt_hf_attention call) before reparq.quantize.
    register_hf_attention()


def tiny_bert(impl: str = "eager", seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32, attn_implementation=impl)
    return BertModel(cfg, add_pooling_layer=False).eval()


def tiny_llama(impl: str = "eager", seed: int = 0, kv_heads: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=32,
                      attn_implementation=impl)
    return LlamaForCausalLM(cfg).eval()


def token_batch(n: int = 4, t: int = 10, seed: int = 1, pad: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    if pad:  # sequences of different lengths, right-padded
        for i in range(n):
            mask[i, t - 2 * i:] = 0 if i else 1
    return {"input_ids": ids, "attention_mask": mask}


def _quant_off(model) -> None:
    for _, mq in matmul_quantizers(model):
        mq.set_enabled(False)


def _out(model, batch):
    out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("build", [tiny_bert, tiny_llama])
@pytest.mark.parametrize("pad", [True, False])
def test_adapted_equals_eager_with_quantizers_off(build, pad):
    model = build()
    batch = token_batch(pad=pad)
    ref = _out(model, batch)
    adapted = copy.deepcopy(model)
    names = adapt_hf_attention(adapted, a_bits=4)
    assert len(names) == LAYERS
    assert all(m.config._attn_implementation == "reparq" for _, m in attention_modules(adapted))
    assert adapted.config._attn_implementation == "eager"  # masks are still built for eager
    _quant_off(adapted)
    torch.testing.assert_close(_out(adapted, batch), ref, rtol=1e-5, atol=1e-6)
    # The original model is untouched: no quantizers, own class, own implementation.
    assert not matmul_quantizers(model)
    assert all(type(m).__name__ in ("BertSelfAttention", "LlamaAttention") for _, m in attention_modules(model))


@pytest.mark.parametrize("build", [tiny_bert, tiny_llama])
def test_adapter_accepts_sdpa_masks(build):
    # A model loaded with SDPA builds boolean masks (or none, relying on is_causal); the adapter's
    # attention converts them, so the adapted model still equals the SDPA original.
    model = build("sdpa")
    batch = token_batch()
    ref = _out(model, batch)
    adapted = copy.deepcopy(model)
    adapt_hf_attention(adapted, a_bits=8)
    _quant_off(adapted)
    torch.testing.assert_close(_out(adapted, batch), ref, rtol=1e-5, atol=1e-5)
    if isinstance(model, LlamaForCausalLM):  # no padding: SDPA skips the mask and relies on is_causal
        ids = batch["input_ids"]
        torch.testing.assert_close(adapted(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_llama_causality_survives_adaptation():
    # Changing a later token must not change earlier positions' logits (causal mask applied).
    model = copy.deepcopy(tiny_llama())
    adapt_hf_attention(model, a_bits=8)
    _quant_off(model)
    ids = token_batch(n=1, pad=False)["input_ids"]
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 64
    a, b = model(input_ids=ids).logits, model(input_ids=changed).logits
    torch.testing.assert_close(a[0, :-1], b[0, :-1])
    assert not torch.allclose(a[0, -1], b[0, -1])


@pytest.mark.parametrize("build", [tiny_bert, tiny_llama])
def test_matmul_quantizers_see_q_k_probs_v(build):
    model = tiny_llama(kv_heads=2) if build is tiny_llama else build()
    adapt_hf_attention(model, a_bits=8)
    _quant_off(model)
    seen: dict[str, torch.Tensor] = {}
    mq = attention_modules(model)[0][1].matmul_quant
    for name in ("q", "k", "v", "probs"):
        getattr(mq, name).register_forward_pre_hook(lambda m, args, name=name: seen.setdefault(name, args[0]))
    batch = token_batch()
    with torch.no_grad():
        model(**batch)
    b, t = batch["input_ids"].shape
    kv_heads = model.config.num_key_value_heads if build is tiny_llama else 4
    assert seen["q"].shape == (b, 4, t, 8) and seen["k"].shape == (b, kv_heads, t, 8)
    assert seen["probs"].shape == (b, 4, t, t)
    torch.testing.assert_close(seen["probs"].sum(-1), torch.ones(b, 4, t))  # post-Softmax rows
    # Padded keys get zero probability (the padding mask reached the attention function).
    assert float(seen["probs"][1, :, :, t - 2:].abs().max()) == 0.0
    if build is tiny_llama:  # causal: nothing attends to the future
        assert float(seen["probs"][0].triu(1).abs().max()) == 0.0
        # q arrives after the rotary embedding: it differs from the plain projection.
        layer = model.model.layers[0]
        x = layer.input_layernorm(model.model.embed_tokens(batch["input_ids"]))
        plain_q = layer.self_attn.q_proj(x).view(b, t, 4, 8).transpose(1, 2)
        assert torch.allclose(seen["q"][:, :, 0], plain_q[:, :, 0], atol=1e-6)  # position 0: no rotation
        assert not torch.allclose(seen["q"][:, :, 1:], plain_q[:, :, 1:], atol=1e-4)


def test_enabled_quantizer_changes_attention_output():
    model = tiny_bert()
    batch = token_batch()
    adapt_hf_attention(model, a_bits=2)
    _quant_off(model)
    ref = _out(model, batch)
    mq = attention_modules(model)[0][1].matmul_quant
    mq.v.set_params(torch.tensor([0.5]), torch.tensor([2.0]))
    mq.v.enabled = True
    assert not torch.allclose(_out(model, batch), ref, atol=1e-3)


def _counts_expected(family: str) -> dict[str, int]:
    if family == "bert":  # q, k, v, o, fc1, fc2 per layer
        return {"weight": 6 * LAYERS, "post_norm": 4 * LAYERS, "post_act": LAYERS, "other_input": LAYERS,
                "matmul": 4 * LAYERS}
    # q, k, v, o, gate, up, down per layer + lm_head
    return {"weight": 7 * LAYERS + 1, "post_norm": 5 * LAYERS, "post_act": LAYERS, "other_input": LAYERS + 1,
            "matmul": 4 * LAYERS}


@pytest.mark.parametrize("build, family", [(tiny_bert, "bert"), (tiny_llama, "llama")])
def test_quantize_finds_and_calibrates_every_point(build, family):
    model = build()
    calib = [token_batch(seed=s) for s in range(2)]
    q = reparq.quantize(model, calib, recipe="minmax", w_bits=4, a_bits=8)
    assert hf_family(q) == family
    assert count_points(q) == _counts_expected(family)
    linears = [m for m in q.modules() if isinstance(m, torch.nn.Linear)]
    assert len(quantized_layers(q)) == len(linears) and all(isinstance(m, QLinear) for m in linears)
    mqs = matmul_quantizers(q)
    assert len(mqs) == LAYERS and all(isinstance(m, MatmulQuantizers) for _, m in mqs)
    for _, mq in mqs:  # baselines: every matmul input on a data-calibrated uniform grid
        for quantizer in (mq.q, mq.k, mq.v, mq.probs):
            assert quantizer.enabled and quantizer.initialized and quantizer.bits == 8
    # Outputs: finite, same shape, close to float at W4A8 but not identical.
    test = token_batch(seed=5)
    ref, out = _out(model, test), _out(q, test)
    assert out.shape == ref.shape and bool(torch.isfinite(out).all())
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 1e-4 < rel < 0.3, rel
    assert model.config._attn_implementation == "eager" and not matmul_quantizers(model)


def test_quantize_llama_on_token_id_tensor_and_mse():
    model = tiny_llama()
    ids = torch.randint(1, 64, (8, 12), generator=torch.Generator().manual_seed(3))
    q = reparq.quantize(model, ids, recipe="mse", w_bits=8, a_bits=8, batch_size=4)
    assert q.reparq_info.calib_samples == 8
    with torch.no_grad():
        ref, out = model(input_ids=ids).logits, q(input_ids=ids).logits
    assert ((out - ref).norm() / ref.norm()).item() < 0.05


def test_dict_batches_split_and_validated():
    model = tiny_bert()
    data = token_batch(n=6)
    q = reparq.quantize(model, data, recipe="minmax", batch_size=4)  # one dict of N samples, split by 4
    assert q.reparq_info.calib_samples == 6
    bad = dict(data, attention_mask=data["attention_mask"][:3])
    with pytest.raises(ReparqError, match="disagree on the number of samples"):
        reparq.quantize(model, [bad], recipe="minmax")
    with pytest.raises(ReparqError, match="rejects calibration inputs"):
        reparq.quantize(model, [{"pixel_values": torch.randn(2, 3)}], recipe="minmax")


def test_norm_consumers_per_family():
    bert_pairs = norm_consumers(tiny_bert())
    assert len(bert_pairs) == 2 * LAYERS
    assert bert_pairs[0] == ("embeddings.LayerNorm", [f"encoder.layer.0.attention.self.{p}" for p in
                                                      ("query", "key", "value")], False)
    assert ("encoder.layer.0.attention.output.LayerNorm", ["encoder.layer.0.intermediate.dense"], False) in bert_pairs
    llama_pairs = norm_consumers(tiny_llama())
    assert len(llama_pairs) == 2 * LAYERS and all(exclusive for _, _, exclusive in llama_pairs)
    assert llama_pairs[1] == ("model.layers.0.post_attention_layernorm",
                              ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"], True)


def test_block_reconstruction_on_llama_windows():
    # Unpadded fixed-length windows: the causal mask is shared by all samples, so the engine's replay
    # of the first batch's mask on other batch sizes is valid (the KV cache is off, as in the zoo model).
    model = tiny_llama()
    model.config.use_cache = False
    ids = torch.randint(1, 64, (20, 12), generator=torch.Generator().manual_seed(4))
    q = reparq.quantize(model, ids, recipe="brecq", w_bits=4, a_bits=8, batch_size=8, iters=3)
    with torch.no_grad():
        ref, out = model(input_ids=ids).logits, q(input_ids=ids).logits
    assert out.shape == ref.shape and bool(torch.isfinite(out).all())
    assert ((out - ref).norm() / ref.norm()).item() < 0.3


@pytest.mark.parametrize("recipe", ["brecq", "repquant"])
def test_reconstruction_refuses_padded_or_ragged_text_batches_before_calibrating(recipe):
    """Units are replayed with one batch's mask: padded or ragged batches would train on wrong
    attention, so they are refused up front with the way out, and the model is left untouched."""
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ReparqError, match="pack_sentences"):
        reparq.quantize(model, [token_batch(pad=True)], recipe=recipe, w_bits=4, a_bits=8, iters=2)
    ragged = [token_batch(t=10, pad=False), token_batch(t=12, seed=2, pad=False)]
    with pytest.raises(ReparqError, match="one shape"):
        reparq.quantize(model, ragged, recipe=recipe, w_bits=4, a_bits=8, iters=2)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_reconstruction_on_unpadded_fixed_length_text_lowers_block_error():
    model = tiny_bert()
    batches = [token_batch(n=8, t=12, seed=s, pad=False) for s in range(3)]
    q = reparq.quantize(model, batches, recipe="brecq", w_bits=4, a_bits=8, iters=40, recon_batch_size=8)
    stats = [s for s in q.reparq_recon_stats if s["loss_first"] is not None]
    assert len(stats) >= LAYERS
    assert all(s["loss_last"] < s["loss_first"] for s in stats)
