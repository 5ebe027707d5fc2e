"""The peer-tool harness (reparq.eval.peers, benchmarks/peers.py): every tool is fed the same
calibration tensors, a tool that is not installed is skipped and never counted, and the ORT
evaluation of a peer's graph and of reparq's export agree on a known tiny model."""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from reparq.eval import peers

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


class Tiny(nn.Module):
    """Not an nn.Sequential: NNCF's torch backend stores its hooks as a child module, which a
    Sequential would then call as a layer."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return Tiny().eval()


def _feed(n: int = 32, seed: int = 1) -> peers.CalibrationFeed:
    gen = torch.Generator().manual_seed(seed)
    return peers.CalibrationFeed.from_tensor(torch.randn(n, 1, 8, 8, generator=gen), batch_size=8)


def _installed(tool: str) -> bool:
    try:
        peers.require(tool)
    except peers.PeerUnavailable:
        return False
    return True


def test_fingerprint_tells_batches_apart():
    a = torch.zeros(2, 3)
    assert peers.fingerprint((a,)) == peers.fingerprint((a.clone(),))
    assert peers.fingerprint((a,)) != peers.fingerprint((a + 1e-6,))
    assert peers.fingerprint((a,)) != peers.fingerprint((a.reshape(3, 2),))


TOOL_METHODS = [("ort-minmax", "onnxruntime"), ("ort-entropy", "onnxruntime"), ("nncf", "nncf"),
                ("inc-default", "inc")]


def test_every_tool_consumes_exactly_the_same_calibration_tensors(tmp_path):
    model = _tiny()
    expected = _feed().fingerprints()
    assert len(set(expected)) == 4  # four distinct batches, so a tool pulling one only would show
    seen = {}
    for method, tool in TOOL_METHODS:
        if not _installed(tool):
            continue
        feed = _feed()  # a fresh feed with the same tensors: what benchmarks/peers.py gives each tool
        work = tmp_path / method
        work.mkdir()
        made = peers.run_peer(method, model, feed, work)
        assert made.method == method
        assert made.calib_seconds > 0
        seen[method] = feed.consumed_set()
        assert feed.consumed and set(feed.consumed) == set(expected), method
        out = made.predict(feed.batches[0][0])
        assert out.shape == (8, 4)
    feed = _feed()
    ours = peers.quantize_reparq(model, feed, recipe="minmax")
    seen["reparq"] = feed.consumed_set()
    assert ours.method == "minmax"
    assert len(seen) >= 2  # reparq and at least ONNX Runtime (a dependency) were compared
    assert all(s == set(expected) for s in seen.values())


def test_a_different_feed_is_seen_as_different():
    feed, other = _feed(seed=1), _feed(seed=2)
    list(other)
    assert other.consumed_set().isdisjoint(feed.fingerprints())


def _hide_nncf(monkeypatch) -> None:
    """Make the peers module see NNCF as not installed (its import raises ImportError)."""
    real = importlib.import_module

    def fake(name, *args, **kwargs):
        if name.split(".")[0] == "nncf":
            raise ImportError("No module named 'nncf'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(peers.importlib, "import_module", fake)


def test_a_tool_that_is_not_installed_raises_peer_unavailable(monkeypatch):
    _hide_nncf(monkeypatch)
    with pytest.raises(peers.PeerUnavailable, match="nncf is not installed"):
        peers.run_peer("nncf", _tiny(), _feed(), Path("."))


def test_the_benchmark_skips_a_missing_tool_says_so_and_counts_only_the_others(tmp_path, monkeypatch):
    """End to end on a zoo model with 32 calibration images: nncf 'missing', ort-minmax measured."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    bench = importlib.import_module("peers")
    assert bench.__file__.startswith(str(BENCHMARKS))
    _hide_nncf(monkeypatch)
    bench.main(["--models", "repvgg_fm", "--methods", "nncf", "ort-minmax", "--calib-size", "32",
                "--repeats", "1", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "peers.json").read_text())
    methods = {r["method"] for r in payload["rows"]}
    assert methods == {"ort-minmax"}
    assert "nncf is not installed" in payload["skipped"]["repvgg_fm nncf"]
    md = (tmp_path / "peers.md").read_text()
    assert "repvgg_fm nncf: not installed" in md
    row = payload["rows"][0]
    assert row["calib_samples"] == 32 and row["runtime"] == "onnxruntime" and row["fp_ms"] > 0
    items = json.loads((tmp_path / "per_item" / "peers.json").read_text())["rows"]
    assert list(items) == ["repvgg_fm|ort-minmax|W8A8|seed0"] and items[list(items)[0]]["images"] == 10000


def test_ort_evaluation_of_a_peer_graph_and_of_reparq_export_agree(tmp_path):
    """The same tiny model quantized W8A8 by ORT's quantize_static (MinMax) and by reparq (minmax),
    both scored through the same ORT path: near-identical outputs, and the ORT float graph scored
    that way reproduces PyTorch's float outputs."""
    import reparq

    model = _tiny()
    feed = _feed(64)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(256, 1, 8, 8, generator=gen)
    fp_onnx = peers.export_float_onnx(model, tmp_path / "fp.onnx", (x[:1],), peers.OnnxSpec())
    _, fp_predict = peers.ort_session_predict(fp_onnx, ["input"])
    with torch.no_grad():
        ref = model(x)
    assert torch.allclose(fp_predict(x), ref, atol=1e-5)
    theirs = peers.run_peer("ort-minmax", model, feed, tmp_path, fp_onnx=fp_onnx)
    ours = peers.quantize_reparq(model, _feed(64), recipe="minmax", keep_first_last_8bit=True)
    path = reparq.export_onnx(ours.qmodel, tmp_path / "reparq.onnx", x[:1])
    _, ours_predict = peers.ort_session_predict(path, ["input"])
    a, b = theirs.predict(x), ours_predict(x)
    span = float(ref.abs().max())
    assert float((a - ref).abs().max()) < 0.1 * span  # both are W8A8 of the float model...
    assert float((b - ref).abs().max()) < 0.1 * span
    assert float((a - b).abs().max()) < 0.1 * span  # ...and of each other
    agree = float((a.argmax(1) == b.argmax(1)).float().mean())
    assert agree >= 0.9
    # reparq's ORT export and its PyTorch fake-quant model: the evaluator sees the same predictions
    assert float((b - ours.predict(x)).abs().max()) < 0.05 * span
    assert not np.allclose(a.numpy(), ref.numpy(), atol=1e-6)  # really quantized, not the float graph


def test_paired_significance_takes_the_peers_rows_as_rivals_of_reparq(tmp_path):
    """``paired_significance.py --sources peers``: each peer's row against reparq's preset row, item by item."""
    from reparq.eval.significance import encode_hits
    from reparq.report.results import row_key

    spec = importlib.util.spec_from_file_location("paired_significance", BENCHMARKS / "paired_significance.py")
    paired = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paired)
    assert "peers" in paired.SOURCES
    cos = paired.SOURCES["peers"][1]({"cosine": [0.5, 1.0]})
    assert cos.tolist() == [0.5, 1.0]  # MiniLM rows: per-sentence cosine
    rows, items = [], {}
    hits = {"repapq": [1, 1, 1, 0, 1, 1], "ort-minmax": [1, 0, 0, 0, 1, 1], "nncf": [1, 1, 1, 1, 1, 1]}
    for method, h in hits.items():
        row = {"model": "m", "method": method, "w_bits": 8, "a_bits": 8, "metric": "top1", "fp": 90.0,
               "quant": 100 * sum(h) / 6, "delta": 100 * sum(h) / 6 - 90.0, "calib_seconds": 1.0,
               "peak_mem_mb": 1.0, "seed": 0}
        rows.append(row)
        items[row_key(row)] = {"code": "abc", "images": 6, "hits": encode_hits(torch.tensor(h, dtype=torch.bool))}
    assert paired.reference_for(rows, "m") == "repapq"
    assert paired.rivals_in(rows, "m", "peers") == ["ort-minmax", "nncf"]
    score = paired.SOURCES["peers"][1]
    ort = paired.compare(rows, items, score, "m", (8, 8), "ort-minmax", "top1", reference="repapq")
    assert (ort["rival_ahead"], ort["ref_ahead"]) == (0, 2)
    nncf = paired.compare(rows, items, score, "m", (8, 8), "nncf", "top1", reference="repapq")
    assert (nncf["rival_ahead"], nncf["ref_ahead"]) == (1, 0) and nncf["rival_lead"] > 0


def test_ort_quantization_leaves_no_files_in_the_working_directory(tmp_path, monkeypatch):
    """ORT's shape inference writes temporary files into the current directory; the adapter runs it in ``work``."""
    if not _installed("onnxruntime"):
        pytest.skip("onnxruntime is not installed")
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    work = tmp_path / "work"
    work.mkdir()
    from onnxruntime.quantization import shape_inference

    real = shape_inference.quant_pre_process

    def littering(*args, **kwargs):  # what ORT does on large or symbolic-shape models (MiniLM, Swin)
        Path("sym_shape_infer_temp.onnx").write_bytes(b"")
        return real(*args, **kwargs)

    monkeypatch.setattr(shape_inference, "quant_pre_process", littering)
    made = peers.run_peer("ort-percentile", _tiny(), _feed(), work)
    assert made.onnx_path.is_file() and made.onnx_path.parent == work.resolve()
    assert list(here.iterdir()) == []
    assert (work / "sym_shape_infer_temp.onnx").exists()


def test_decoder_peers_get_logits_of_input_ids_and_ort_scores_the_same_model(tmp_path):
    """llama_fm's peers quantize ``input_ids -> logits``: its float ONNX export (explicit all-ones mask,
    which keeps ``aten::diff`` out of the graph) gives ORT the same logits as PyTorch."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("onnxruntime")
    import sys

    sys.path.insert(0, str(BENCHMARKS))
    bench = importlib.import_module("peers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    lm = bench.Logits(transformers.LlamaForCausalLM(cfg).eval()).eval()
    ids = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(1))
    spec = peers.OnnxSpec(("input_ids",), ("logits",),
                          {"input_ids": {0: "batch", 1: "tokens"}, "logits": {0: "batch", 1: "tokens"}})
    path = peers.export_float_onnx(lm, tmp_path / "lm.onnx", (ids[:1],), spec)
    _, predict = peers.ort_session_predict(path, spec.input_names)
    with torch.no_grad():
        ref = lm(ids)
    assert ref.shape == (3, 16, 64)
    assert torch.allclose(predict(ids), ref, atol=1e-4)


def test_perplexity_rows_rank_lower_as_better():
    """The summary's best method and the paired test's scores: a perplexity Δ is better when lower."""
    import sys

    sys.path.insert(0, str(BENCHMARKS))
    bench = importlib.import_module("peers")
    assert bench.better({"metric": "perplexity", "delta": 0.5}) < bench.better({"metric": "perplexity", "delta": 0.1})
    assert bench.better({"metric": "top1", "delta": -0.5}) < bench.better({"metric": "top1", "delta": -0.1})
    spec = importlib.util.spec_from_file_location("paired_significance", BENCHMARKS / "paired_significance.py")
    paired = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paired)
    assert paired.SOURCES["peers"][1]({"nll": [2.0, 3.0]}).tolist() == [-2.0, -3.0]  # lower NLL scores higher


def _tiny_lm():
    transformers = pytest.importorskip("transformers")
    import sys

    sys.path.insert(0, str(BENCHMARKS))
    bench = importlib.import_module("peers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return bench, bench.Logits(transformers.LlamaForCausalLM(cfg).eval()).eval()


@pytest.mark.parametrize("method", ["nncf-int4", "inc-rtn"])
def test_weight_only_peers_round_the_decoder_weights_to_4_bits(method):
    """The W4A16 peers (llama_fm): the whole feed is consumed, the model is changed but stays close, and the
    benchmark files the row under W4A16."""
    tool = peers.METHOD_TOOL[method]
    if not _installed(tool):
        pytest.skip(f"{tool} is not installed")
    bench, lm = _tiny_lm()
    ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(2))
    feed = peers.CalibrationFeed.from_tensor(ids, batch_size=4)
    got = peers.run_peer(method, lm, feed, Path("."), transformer=True)
    assert got.method == method and feed.consumed_set() == set(feed.fingerprints())
    with torch.no_grad():
        ref, out = lm(ids), got.predict(ids)
    err = float((out - ref).abs().max() / ref.abs().max())
    assert 0 < err < 0.2  # 4-bit weights: visibly rounded, not broken
    assert bench.bits_of(method) == (4, 16) and bench.bits_of("nncf") == (8, 8)


@pytest.mark.parametrize("vnni", [False, True])
def test_ort_peer_reduces_weights_to_7_bits_exactly_on_cpus_without_vnni(tmp_path, monkeypatch, vnni):
    """ORT's documented CPU settings: ``reduce_range`` (weight codes within +-64) without VNNI/AMX, full int8 with."""
    import onnx
    from onnx import numpy_helper

    from reparq.eval import latency

    monkeypatch.setattr(latency, "has_vnni", lambda flags=None: vnni)
    model = _tiny()
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    fp_onnx = peers.export_float_onnx(model, tmp_path / "fp.onnx", (x[:1],), peers.OnnxSpec())
    theirs = peers.run_peer("ort-minmax", model, _feed(16), tmp_path, fp_onnx=fp_onnx)
    assert theirs.settings["reduce_range"] is (not vnni)
    graph = onnx.load(str(theirs.onnx_path)).graph
    codes = [numpy_helper.to_array(t) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and t.dims]
    assert codes
    widest = max(int(np.abs(c.astype(np.int32)).max()) for c in codes)
    assert widest <= 64 if not vnni else widest == 127
