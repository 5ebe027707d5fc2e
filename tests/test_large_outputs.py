"""Units and models with large outputs (a language model's logits): caches filled batch by batch,
training steps cut into slices, evaluation accumulated over batches. Same numbers, bounded memory."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import reparq
from reparq.recipes.cache import TensorCache
from reparq.report.sqnr import agreement, compare_outputs, predictions, sqnr_db
from tests.test_reconstruct import _tiny


def test_cache_filled_from_an_iterator_equals_one_filled_from_a_list(tmp_path):
    batches = [torch.randn(7, 3, 5) for _ in range(3)]
    idx = torch.tensor([20, 0, 7, 7, 13])
    for threshold in (1e6, 0.0):
        from_list = TensorCache(list(batches), threshold_mb=threshold, cache_dir=tmp_path, name="a")
        from_iter = TensorCache(iter(batches), threshold_mb=threshold, cache_dir=tmp_path, name="b", total=21)
        assert from_list.on_disk == from_iter.on_disk == (threshold == 0.0)
        assert torch.equal(from_list.take(idx), torch.cat(batches)[idx])
        assert torch.equal(from_iter.take(idx), torch.cat(batches)[idx])
        assert torch.equal(torch.cat(from_iter.views(5)), torch.cat(batches))
        from_list.close()
        from_iter.close()
    consumed = list(batches)
    cache = TensorCache(consumed, consume=True)
    assert consumed == [] and cache.shape == (21, 3, 5)
    with pytest.raises(ValueError, match="21 samples was given 14"):
        TensorCache(iter(batches[:2]), total=21)
    with pytest.raises(ValueError, match="total sample count"):
        TensorCache(iter(batches))


@pytest.mark.parametrize("recipe", ["brecq", "repapq"])
def test_a_step_in_one_sample_slices_equals_the_whole_step(recipe):
    """Gradients summed over slices are the minibatch's gradient (repapq: with the across-block
    stage term, which the slices weight as well): one-sample slices give the same model."""
    model, x = _tiny()
    kw = dict(recipe=recipe, w_bits=4, a_bits=4, seed=1, iters=8, recon_batch_size=16,
              block_globs=("blocks.*",), stage_globs=("blocks",))
    whole = reparq.quantize(model, x, **kw)
    sliced = reparq.quantize(model, x, micro_batch_mb=1e-9, **kw)
    # Summation order differs between the slices and the whole batch; Adam's normalized steps carry
    # that float noise (about 1e-5 on weights of ~0.05 after 8 steps); a lost term would not be this small.
    for (name, a), (_, b) in zip(whole.state_dict().items(), sliced.state_dict().items()):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4), name
    curves_whole, curves_sliced = whole.reparq_info.extra["recon_loss"], sliced.reparq_info.extra["recon_loss"]
    assert curves_whole.keys() == curves_sliced.keys() and len(curves_whole) >= 3
    for unit, curve in curves_whole.items():
        assert curve == pytest.approx(curves_sliced[unit], rel=1e-3), unit


class _TinyLM(nn.Module):
    """Embedding, two residual MLP blocks, a head over a large vocabulary."""

    def __init__(self, vocab: int, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))
                                    for _ in range(2))
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = h + layer(h)
        return self.head(h)


def test_evaluation_accumulated_in_batches_equals_the_whole():
    torch.manual_seed(0)
    model = _TinyLM(300).eval()
    ids = torch.randint(0, 300, (12, 10))
    qmodel = reparq.quantize(model, ids, recipe="minmax", w_bits=4, a_bits=4)
    fp, q = predictions(model, ids), predictions(qmodel, ids)
    whole_sqnr = sqnr_db(float(fp.double().pow(2).sum()), float((fp.double() - q.double()).pow(2).sum()))
    for budget in (1e-9, 1e6):  # one sample per batch, and everything at once
        scores = compare_outputs(model, qmodel, ids, budget_mb=budget)
        assert scores.fp_score == 100.0
        assert scores.q_score == pytest.approx(agreement(q, fp), abs=1e-9)
        assert scores.sqnr_db == pytest.approx(whole_sqnr, abs=1e-9)
    classifier, other = nn.Linear(10, 5).eval(), nn.Linear(10, 5).eval()  # any second model will do here
    x, labels = torch.randn(40, 10), torch.randint(0, 5, (40,))
    scores = compare_outputs(classifier, other, x, labels, batch_size=7)  # labels cut with the batches
    assert scores.fp_score == pytest.approx(agreement(predictions(classifier, x), labels))
    assert scores.q_score == pytest.approx(agreement(predictions(other, x), labels))
    assert scores.q_score != scores.fp_score


_PEAK_PROBE = """
import resource, torch, torch.nn as nn, reparq
{model_source}
torch.set_num_threads(1)
torch.manual_seed(0)
model = _TinyLM({vocab}).eval()
ids = torch.randint(0, {vocab}, (32, 64))
reparq.quantize(model, ids[:2], recipe="brecq", iters=1, recon_batch_size=2)  # kernels and workspaces loaded
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
reparq.quantize(model, ids, recipe="brecq", iters=3, recon_batch_size=32, micro_batch_mb=16)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024 / (32 * 64 * {vocab} * 4))
"""


def test_reconstruction_of_a_large_head_peaks_near_one_copy_of_its_logits():
    # Once a whole minibatch of logits went through the head at once, with its target, difference
    # and gradient, next to the traced output of every unit, the outputs as a list and as a cache,
    # and the unused quantized outputs of the last unit: a 30k-vocabulary OPT calibrated on 32
    # windows of 128 tokens peaked at 5.3 GB in calibration (2.3 GB now; 6.9 GB in all with the
    # evaluation, 2.6 GB now). Measured in a fresh process on 128 MB of logits with 16 MB slices:
    # 2.0-2.2x here; 6.8x in one slice per step (the default budget); the code before 8.8-8.9x.
    probe = _PEAK_PROBE.format(vocab=16000, model_source=inspect.getsource(_TinyLM))
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=True)
    ratio = float(done.stdout.split()[-1])
    assert ratio < 3.0, f"brecq peaked at {ratio:.2f}x the bytes of the calibration set's logits"
