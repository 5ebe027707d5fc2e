"""The other HF decoder families: OPT (pre-LN LayerNorm with biases, and the post-LN layout of
OPT-350m) and the LLaMA-architecture Mistral (sliding-window masks) and Qwen2 (biased q/k/v).
Exact with quantizers off, every point found and counted, the norm pairs each layout allows, and
the RepQ-ViT reparameterization exact on all of them."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import reparq  # noqa: E402
from reparq.config import QuantConfig  # noqa: E402
from reparq.model.blocks import discover_units  # noqa: E402
from reparq.model.hf_adapters import (  # noqa: E402
    adapt_hf_attention,
    attention_modules,
    count_points,
    hf_family,
    norm_consumers,
)
from reparq.model.postnorm import ShiftedNorm, find_consumer_side_groups, find_postnorm_pairs  # noqa: E402
from reparq.nn.attention import matmul_quantizers  # noqa: E402
from reparq.nn.qmodules import quantized_layers  # noqa: E402
from reparq.progress import SILENT  # noqa: E402
from reparq.recipes.reparam import fold_postnorm_pairs, is_post_ln  # noqa: E402
from reparq.recipes.repqvit import RepQViTOptions, prepare_transformer  # noqa: E402
from tests.test_hf_adapters import LAYERS, token_batch  # noqa: E402

SIZES = dict(vocab_size=64, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
             max_position_embeddings=32)


def tiny_opt(impl: str = "eager", seed: int = 0, pre_ln: bool = True) -> OPTForCausalLM:
    torch.manual_seed(seed)
    cfg = OPTConfig(**SIZES, ffn_dim=64, word_embed_proj_dim=32, do_layer_norm_before=pre_ln,
                    attn_implementation=impl)
    return OPTForCausalLM(cfg).eval()


def tiny_opt_post_ln(impl: str = "eager", seed: int = 0) -> OPTForCausalLM:
    return tiny_opt(impl, seed, pre_ln=False)


def tiny_mistral(impl: str = "eager", seed: int = 0) -> MistralForCausalLM:
    torch.manual_seed(seed)  # a window shorter than the test sequences, so that the mask differs from causal
    cfg = MistralConfig(**SIZES, intermediate_size=64, num_key_value_heads=2, sliding_window=4,
                        attn_implementation=impl)
    return MistralForCausalLM(cfg).eval()


def tiny_qwen2(impl: str = "eager", seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(**SIZES, intermediate_size=64, num_key_value_heads=2, attn_implementation=impl)
    return Qwen2ForCausalLM(cfg).eval()


BUILDS = [tiny_opt, tiny_opt_post_ln, tiny_mistral, tiny_qwen2]
FAMILY = {tiny_opt: "opt", tiny_opt_post_ln: "opt", tiny_mistral: "mistral", tiny_qwen2: "qwen2"}


def _unpadded(n: int = 4, t: int = 10, seed: int = 1) -> torch.Tensor:
    return token_batch(n, t, seed=seed, pad=False)["input_ids"]


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("build", BUILDS)
def test_adapted_equals_the_original_with_quantizers_off(build, impl):
    model = build(impl)
    ids, padded = _unpadded(), token_batch()
    adapted = copy.deepcopy(model)
    assert len(adapt_hf_attention(adapted, a_bits=8)) == LAYERS
    assert hf_family(adapted) == FAMILY[build]
    for _, mq in matmul_quantizers(adapted):
        mq.set_enabled(False)
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        # Padded positions are compared too, except where a query sees no key at all (right
        # padding past Mistral's 4-token window): there eager and SDPA differ from each other.
        keep = padded["attention_mask"].bool()
        if build is tiny_mistral:
            keep &= torch.arange(keep.shape[1]) < keep.sum(1, keepdim=True) + 3
        torch.testing.assert_close(adapted(**padded).logits[keep], model(**padded).logits[keep], rtol=1e-5, atol=1e-5)


def test_mistral_sliding_window_reaches_the_quantized_attention():
    # The window (4) arrives in the mask the model builds: no probability beyond it.
    model = copy.deepcopy(tiny_mistral())
    adapt_hf_attention(model, a_bits=8)
    for _, each in matmul_quantizers(model):
        each.set_enabled(False)
    mq = attention_modules(model)[0][1].matmul_quant
    seen = {}
    mq.probs.register_forward_pre_hook(lambda m, args: seen.setdefault("probs", args[0]))
    with torch.no_grad():
        model(input_ids=_unpadded(n=1))
    probs = seen["probs"][0]
    assert float(probs.triu(1).abs().max()) == 0.0 and float(probs.tril(-4).abs().max()) == 0.0
    assert float(probs.tril(-3).abs().max()) > 0.0


def _expected_counts(build) -> dict[str, int]:
    if build in (tiny_opt, tiny_opt_post_ln):  # q, k, v, out, fc1, fc2 per layer + lm_head
        return {"weight": 6 * LAYERS + 1, "post_norm": 4 * LAYERS, "post_act": LAYERS, "other_input": LAYERS + 1,
                "matmul": 4 * LAYERS}
    return {"weight": 7 * LAYERS + 1, "post_norm": 5 * LAYERS, "post_act": LAYERS, "other_input": LAYERS + 1,
            "matmul": 4 * LAYERS}  # q, k, v, o, gate, up, down + lm_head


@pytest.mark.parametrize("build", BUILDS)
def test_quantize_finds_every_point_and_every_block(build):
    model = build()
    q = reparq.quantize(model, _unpadded(8, 12), recipe="minmax", w_bits=4, a_bits=8, batch_size=4)
    assert count_points(q) == _expected_counts(build)
    assert len(quantized_layers(q)) == _expected_counts(build)["weight"]
    for _, mq in matmul_quantizers(q):
        assert all(x.enabled and x.initialized for x in (mq.q, mq.k, mq.v, mq.probs))
    blocks = [u for u in discover_units(q) if u.kind == "block"]
    assert len(blocks) == LAYERS and all(len(u.layers) == _expected_counts(build)["weight"] // LAYERS for u in blocks)
    ids = _unpadded(seed=7)
    with torch.no_grad():
        ref, out = model(input_ids=ids).logits, q(input_ids=ids).logits
    assert out.shape == ref.shape and bool(torch.isfinite(out).all())
    assert 1e-4 < ((out - ref).norm() / ref.norm()).item() < 0.3


def test_norm_pairs_follow_each_layout():
    pre = norm_consumers(tiny_opt())
    qkv = [f"model.decoder.layers.0.self_attn.{c}_proj" for c in "qkv"]
    assert pre[:2] == [("model.decoder.layers.0.self_attn_layer_norm", qkv, True),
                       ("model.decoder.layers.0.final_layer_norm", ["model.decoder.layers.0.fc1"], True)]
    assert len(pre) == 2 * LAYERS and not is_post_ln(tiny_opt())
    # Post-LN: each norm is also the residual; the first layer's q/k/v read the embeddings (no norm).
    post = norm_consumers(tiny_opt_post_ln())
    assert post == [("model.decoder.layers.0.self_attn_layer_norm", ["model.decoder.layers.0.fc1"], False),
                    ("model.decoder.layers.0.final_layer_norm", [f"model.decoder.layers.1.self_attn.{c}_proj"
                                                                 for c in "qkv"], False),
                    ("model.decoder.layers.1.self_attn_layer_norm", ["model.decoder.layers.1.fc1"], False)]
    assert is_post_ln(tiny_opt_post_ln()) and not find_postnorm_pairs(tiny_opt_post_ln())
    for build in (tiny_mistral, tiny_qwen2):
        assert [p.norm.rsplit(".", 1)[-1] for p in find_postnorm_pairs(build())] == \
            ["input_layernorm", "post_attention_layernorm"] * LAYERS


@pytest.mark.parametrize("build", BUILDS)
def test_repqvit_reparameterization_is_exact(build):
    """float64, weights in float: per-channel post-norm inputs before, layer-wise after, the same
    logits. Norm folds on the pre-LN models (OPT's LayerNorm carries the shift in its bias, the
    RMSNorms share one zero point, Qwen2's q/k/v biases stay), consumer-side folds on post-LN OPT."""
    model = build().double()
    post_ln = build is tiny_opt_post_ln
    batches = [{"input_ids": b} for b in _unpadded(12, 12).split(4)]
    cfg = QuantConfig(w_bits=4, a_bits=4, keep_first_last_8bit=False)
    pairs = prepare_transformer(model, batches, cfg, RepQViTOptions(consumer_fold=post_ln), seed=0, reporter=SILENT)
    expected = len(find_consumer_side_groups(build())) if post_ln else 2 * LAYERS
    assert len(pairs) == expected > 0
    for _, layer in quantized_layers(model):
        layer.weight_quantizer.enabled = False
    ids = _unpadded(seed=9)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        fold_postnorm_pairs(model, pairs)
        after = model(input_ids=ids).logits
    assert not any(isinstance(m, ShiftedNorm) for m in model.modules())  # no extra op
    consumers = {c for p in pairs for c in p.consumers}
    assert all(model.get_submodule(c).input_quantizer.scale.numel() == 1 for c in consumers)
    torch.testing.assert_close(after, before, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("build", [tiny_opt, tiny_opt_post_ln, tiny_qwen2])
def test_repquant_runs_its_phases_and_beats_minmax_at_w4a4(build):
    model = build()
    model.config.use_cache = False
    calib = _unpadded(16, 12, seed=2)
    kw = dict(w_bits=4, a_bits=4, batch_size=8, keep_first_last_8bit=False, seed=0)
    q = reparq.quantize(model, calib, recipe="repquant", iters=20, clip_iters=10, **kw)
    base = reparq.quantize(model, calib, recipe="minmax", **kw)
    assert len(q.reparq_postnorm_pairs) > 0
    ids = _unpadded(8, 12, seed=11)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        err = {name: ((m(input_ids=ids).logits - ref).norm() / ref.norm()).item() for name, m in
               (("repquant", q), ("minmax", base))}
    assert err["repquant"] < err["minmax"], err


@pytest.mark.parametrize("name", ["llama_fm", "opt_fm"])
def test_repqvit_reparameterization_is_exact_on_the_trained_zoo_decoders(name):
    """Trained weights (RMSNorm and LayerNorm scales far from one, real outlier channels), float64,
    weights in float: the per-channel norm outputs before and the layer-wise ones folded into the
    norms after give the same logits on held-out text, every norm of every layer folded."""
    from reparq.zoo import load_model
    from reparq.zoo.registry import checkpoint_path
    from reparq.zoo.train_lm import heldout_windows

    if not checkpoint_path(name).exists():
        pytest.skip(f"{name} is not trained (python -m reparq.zoo.train_lm --arch {name[:-3]})")
    model = load_model(name).double()
    windows = heldout_windows(name)
    batches = [{"input_ids": b} for b in windows[:16, :64].split(8)]
    pairs = prepare_transformer(model, batches, QuantConfig(w_bits=4, a_bits=4, keep_first_last_8bit=False),
                                RepQViTOptions(), seed=0, reporter=SILENT)
    assert len(pairs) == 2 * model.config.num_hidden_layers
    for _, layer in quantized_layers(model):
        layer.weight_quantizer.enabled = False
    ids = windows[-4:, :64]
    with torch.no_grad():
        before = model(input_ids=ids).logits
        fold_postnorm_pairs(model, pairs)
        after = model(input_ids=ids).logits
    assert all(model.get_submodule(c).input_quantizer.scale.numel() == 1 for p in pairs for c in p.consumers)
    torch.testing.assert_close(after, before, rtol=1e-9, atol=1e-9)
