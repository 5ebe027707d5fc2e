"""Block reconstruction: AdaRound rounding, loss reduction, QDrop rate, caches, determinism, discovery errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import reparq
from reparq.config import QuantConfig
from reparq.errors import ReparqError
from reparq.model.blocks import Unit, discover_units, glob_to_regex
from reparq.nn.qmodules import quantized_layers
from reparq.quant.adaround import AdaRound, beta_schedule
from reparq.quant.uniform import UniformQuantizer
from reparq.recipes.baselines import range_baseline
from reparq.recipes.cache import TensorCache
from reparq.recipes.reconstruct import ReconConfig, lp_loss, reconstruct


class ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


class TinyNet(nn.Module):
    """Plain torch: stem, two residual blocks, head. Blocks are named `blocks.0`, `blocks.1`."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.blocks = nn.Sequential(ResBlock(8), ResBlock(8))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.blocks(torch.relu(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


def _tiny(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    return TinyNet().eval(), torch.randn(64, 1, 8, 8)


def _calibrated(w_bits=4, a_bits=4):
    model, x = _tiny()
    q = range_baseline(copy.deepcopy(model), list(x.split(16)), QuantConfig(w_bits=w_bits, a_bits=a_bits,
                                                                          w_estimator="mse", a_estimator="mse"))
    return model, q, x


def test_adaround_starts_at_float_weight_and_ends_on_integer_grid():
    torch.manual_seed(0)
    w = torch.randn(6, 5)
    wq = UniformQuantizer(4, symmetric=True, channel_axis=0)
    wq.set_params(w.abs().amax(1) / 7.5)
    r = AdaRound(wq, w)
    inside = (w / wq.scale[:, None] <= wq.qmax) & (w / wq.scale[:, None] >= wq.qmin)
    assert inside.float().mean() > 0.8
    # h(V) starts at the fractional part, so the soft weight starts at the float weight (inside the grid).
    assert torch.allclose(r(w)[inside], w[inside], atol=1e-3)
    with torch.no_grad():
        for c in r.v_chunks:
            c.add_(torch.randn_like(c) * 3)
    r.hard = True
    h = r.h()
    assert set(h.unique().tolist()) <= {0.0, 1.0}
    ints = r(w) / wq.scale[:, None]
    assert torch.allclose(ints, ints.round(), atol=1e-5)
    assert ints.round().min() >= wq.qmin and ints.round().max() <= wq.qmax
    # Each weight is rounded either down or up from its float value: never further.
    assert ((ints - torch.floor(w / wq.scale[:, None])).round().abs() <= 1).all()


def test_beta_schedule_warmup_then_anneals_20_to_2():
    assert beta_schedule(0, 100) is None and beta_schedule(19, 100) is None
    assert beta_schedule(20, 100) == pytest.approx(20.0)
    assert beta_schedule(99, 100) == pytest.approx(2.0, abs=0.3)


def test_brecq_lowers_block_output_error_and_leaves_weights_on_grid():
    model, q, x = _calibrated()
    ref = model(x)
    with torch.no_grad():
        err_before = float(lp_loss(q(x), ref, 2.0))
    units = discover_units(q, block_globs=("blocks.*",))
    stats = reconstruct(q, units, list(x.split(16)), ReconConfig(iters=150, recon_batch_size=16), seed=0)
    with torch.no_grad():
        err_after = float(lp_loss(q(x), ref, 2.0))
    assert err_after < 0.8 * err_before, (err_before, err_after)
    for s in stats:
        if s["unit"].startswith("blocks"):
            assert s["loss_last"] < s["loss_first"]
    for _, layer in quantized_layers(q):
        wq = layer.weight_quantizer
        ints = layer.weight / wq.shaped_params(layer.weight)[0]
        assert torch.allclose(ints, ints.round(), atol=1e-4)  # hard rounding was written back


def test_qdrop_drops_at_rate_p():
    q = UniformQuantizer(2, symmetric=False)
    q.set_params(torch.tensor([1.0]), torch.tensor([0.0]))
    q.drop_prob, q.drop_generator = 0.5, torch.Generator().manual_seed(0)
    x = torch.full((200_000,), 0.3)  # quantizes to 0.0, so float-kept elements are exactly the 0.3s
    kept = (q(x) == 0.3).float().mean().item()
    assert kept == pytest.approx(0.5, abs=0.005)
    q.drop_prob = 0.0
    assert (q(x) == 0.0).all()


def test_disk_and_memory_caches_give_identical_results(tmp_path):
    batches = [torch.randn(10, 3, 4, 4) for _ in range(3)]
    mem, disk = TensorCache(batches, threshold_mb=1e6), TensorCache(batches, threshold_mb=0.0, cache_dir=tmp_path)
    assert not mem.on_disk and disk.on_disk and any(tmp_path.iterdir())
    idx = torch.tensor([29, 0, 7, 7, 15])
    assert torch.equal(mem.take(idx), disk.take(idx))
    model, x = _tiny()
    kw = dict(recipe="brecq", w_bits=4, a_bits=4, seed=3, iters=20, recon_batch_size=16, block_globs=("blocks.*",))
    a = reparq.quantize(model, x, cache_threshold_mb=1e6, **kw)
    b = reparq.quantize(model, x, cache_threshold_mb=0.0, cache_dir=str(tmp_path), **kw)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    disk.close()
    assert not any(tmp_path.iterdir())  # every cache file written during reconstruction was removed


@pytest.mark.parametrize("recipe", ["adaround", "brecq", "qdrop"])
def test_reconstruction_is_deterministic(recipe):
    model, x = _tiny()
    kw = dict(recipe=recipe, w_bits=4, a_bits=4, seed=1, iters=15, recon_batch_size=16, block_globs=("blocks.*",))
    a, b = reparq.quantize(model, x, **kw), reparq.quantize(model, x, **kw)
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), ka


def test_recipes_beat_their_mse_start_at_w4a4():
    model, x = _tiny()
    with torch.no_grad():
        ref = model(x)
        base = float(lp_loss(reparq.quantize(model, x, recipe="mse", w_bits=4, a_bits=4)(x), ref, 2.0))
    for recipe in ("brecq", "qdrop"):
        q = reparq.quantize(model, x, recipe=recipe, w_bits=4, a_bits=4, iters=150, block_globs=("blocks.*",))
        with torch.no_grad():
            assert float(lp_loss(q(x), ref, 2.0)) < base, recipe


def test_unknown_model_without_blocks_suggests_globs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), ResBlock(8), nn.Flatten(), nn.Linear(8 * 36, 10)).eval()
    x = torch.randn(16, 1, 8, 8)  # one block, nothing repeats: nothing to infer blocks from
    with pytest.raises(ReparqError, match="no repeated blocks found.*block_globs"):
        reparq.quantize(model, x, recipe="brecq", iters=1)
    with pytest.raises(ReparqError, match="pass block_globs"):
        reparq.quantize(model, x, recipe="brecq", iters=1, block_globs=("nothing.*",))


def _partition(units) -> tuple[list, list]:
    """(quantized layers per unit, blocks per stage): what reconstruction and ABC act on."""
    stages: dict = {}
    for u in units:
        if u.stage:
            stages.setdefault(u.stage, []).append(u.name)
    return sorted(sorted(u.layers) for u in units), sorted(stages.values())


def _hf(family: str, cls: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    extra = {"ffn_dim": 64} if family == "OPT" else {"pad_token_id": 0} if cls.endswith("Classification") else {}
    cfg = getattr(transformers, f"{family}Config")(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                     num_attention_heads=2, vocab_size=64, **extra)
    torch.manual_seed(0)
    return getattr(transformers, cls)(cfg).eval()


def test_inferred_layout_equals_the_family_table():
    """Without the table, the repeated structure gives the same units and stage grouping: ByobNet
    split from stages into blocks, Swin's patch merging its own unit, each HF layer one block."""
    from reparq.model.blocks import FAMILY_LAYOUTS, infer_layout
    from reparq.model.merge import merge_branches
    from reparq.recipes.insert import insert_quantizers
    from reparq.zoo.architectures import ARCHITECTURES

    models = {n: ARCHITECTURES[n]() for n in ("repvgg_fm", "mobileone_fm", "deit_fm", "swin_fm")}
    models.update({cls: _hf(fam, cls) for fam, cls in (("Llama", "LlamaForCausalLM"), ("Bert", "BertModel"),
                                                        ("OPT", "OPTForCausalLM"), ("Qwen2", "Qwen2ForCausalLM"))})
    for name, model in models.items():
        merge_branches(model)
        insert_quantizers(model, QuantConfig())
        table, inferred = FAMILY_LAYOUTS[type(model).__name__], infer_layout(model)
        by_table = discover_units(model, table.blocks, table.stages)
        assert _partition(discover_units(model, inferred.blocks, inferred.stages)) == _partition(by_table), name
        assert len([u for u in by_table if u.stage]) >= 2, name  # the comparison has blocks to compare


def test_model_outside_the_table_gets_blocks_from_its_structure():
    from reparq.model.blocks import FAMILY_LAYOUTS

    model = _hf("Llama", "LlamaForSequenceClassification")  # a head class the table does not name
    assert type(model).__name__ not in FAMILY_LAYOUTS
    q = reparq.quantize(model, torch.randint(1, 64, (8, 12)), recipe="brecq", w_bits=4, a_bits=8, iters=2,
                        recon_batch_size=4)
    units = discover_units(q)
    assert [u.name for u in units if u.kind == "block"] == [f"model.layers.{i}" for i in range(3)]
    assert {u.stage for u in units if u.kind == "block"} == {"model.layers"}
    assert [u.name for u in units if u.kind == "layer"] == ["score"]
    tiny, _ = _tiny()
    assert _partition(discover_units(quantized(tiny))) == _partition(discover_units(quantized(tiny), ("blocks.*",),
                                                                                  ("blocks",)))


def quantized(model: nn.Module) -> nn.Module:
    from reparq.recipes.insert import insert_quantizers

    model = copy.deepcopy(model)
    insert_quantizers(model, QuantConfig())
    return model


class _Expert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class _MoELayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(8, 8)
        self.mlp = nn.Module()
        self.mlp.experts = nn.ModuleList([_Expert(), _Expert()])

    def forward(self, x):
        x = x + self.attn(x)
        return x + sum(e(x) for e in self.mlp.experts)


def test_stack_inside_a_block_does_not_split_it():
    """A decoder layer's MoE experts repeat too, but splitting there would leave attention in no
    block: the layers stay the units."""
    from reparq.model.blocks import infer_layout

    model = nn.Sequential(nn.Linear(4, 8), nn.Sequential(_MoELayer(), _MoELayer(), _MoELayer()), nn.Linear(8, 2))
    layout = infer_layout(quantized(model))
    assert layout.blocks == ("1.0", "1.1", "1.2") and layout.stages == ("1",)


def test_torchvision_models_get_their_blocks_without_globs():
    """Other libraries' models: ResNet's ``layer1``..``layer4``; MobileNetV2's ``features`` (a stem
    and a last conv of other classes in the same list as the inverted residuals); torchvision's
    VisionTransformer, which shares timm's class name (the table's ``blocks.*`` finds nothing there
    and gives way to the structure)."""
    torchvision = pytest.importorskip("torchvision")
    resnet = discover_units(quantized(torchvision.models.resnet18()))
    assert [u.name for u in resnet if u.kind == "block"] == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert [u.stage for u in resnet if u.kind == "block"] == [f"layer{i}" for i in range(1, 5) for _ in range(2)]
    assert [u.name for u in resnet if u.kind == "layer"] == ["conv1", "fc"]
    mobilenet = discover_units(quantized(torchvision.models.mobilenet_v2()))
    assert [u.name for u in mobilenet if u.kind == "block"] == [f"features.{i}" for i in range(19)]
    assert [u.name for u in mobilenet if u.kind == "layer"] == ["classifier.1"]
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=3, num_heads=2,
                                               hidden_dim=32, mlp_dim=64)
    units = discover_units(quantized(vit))
    assert [u.name for u in units if u.kind == "block"] == [f"encoder.layers.encoder_layer_{i}" for i in range(3)]
    assert [u.name for u in units if u.kind == "layer"] == ["conv_proj", "heads.head"]


def test_discovery_on_zoo_families_counts_units():
    from reparq.recipes.plan import plan
    from reparq.zoo.architectures import ARCHITECTURES

    expected = {"repvgg_fm": (11, 9), "mobileone_fm": (16, 14), "deit_fm": (26, 6), "swin_fm": (19, 5)}
    for name, (n_layers, n_blocks) in expected.items():
        result = plan(ARCHITECTURES[name](), QuantConfig())
        assert len(result["layers"]) == n_layers, name
        blocks = [u for u in result["units"] if u["kind"] == "block" and u["stage"]]
        assert len(blocks) == n_blocks, name
        # every quantized layer belongs to exactly one unit
        assert sorted(l for u in result["units"] for l in u["layers"]) == sorted(r["layer"] for r in result["layers"])


def test_glob_matches_one_component_per_star():
    assert glob_to_regex("stages.*.*").match("stages.1.2")
    assert not glob_to_regex("stages.*").match("stages.1.2")
    assert glob_to_regex("layers.**").match("layers.1.blocks.0")
    assert isinstance(Unit("a", "block"), Unit)
