"""AgreementScorer: the batched, memory-bounded score equals agreement() over the concatenated
outputs, with labels or against the float model, whether the float side is kept or recomputed."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from reparq.errors import ReparqError
from reparq.report.sqnr import AgreementScorer, agreement, predictions


def _pair(out_dims: int) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """A float model, a perturbed copy standing for a quantized one, and inputs whose outputs are
    class scores [N, C] (``out_dims`` 2) or hidden states [N, T, D] (3)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 6)).eval()
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(70, 12) if out_dims == 2 else torch.randn(70, 5, 12)
    return model, noisy, x


@pytest.mark.parametrize("budget_mb", [256.0, 0.0])
@pytest.mark.parametrize("out_dims", [2, 3])
def test_without_labels_equals_agreement_with_the_float_outputs(out_dims, budget_mb):
    model, noisy, x = _pair(out_dims)
    scorer = AgreementScorer(model, x, batch_size=16, budget_mb=budget_mb)
    expected = agreement(predictions(noisy, x), predictions(model, x))
    assert 0.0 < expected < 100.0  # the perturbation matters, so equality is not trivial
    assert scorer(noisy) == pytest.approx(expected, abs=1e-9)
    assert scorer.fp_score == 100.0 and scorer.samples == 70
    # Class scores keep only the float argmax (never recomputed); other outputs are recomputed
    # when a budget of zero cannot hold them.
    assert scorer.recomputes == (out_dims == 3 and budget_mb == 0.0)
    if out_dims == 2:
        assert all(not torch.is_floating_point(t) for t in scorer._targets)
        assert sum(t.numel() for t in scorer._targets) == 70


@pytest.mark.parametrize("budget_mb", [256.0, 0.0])
def test_with_labels_equals_top1_and_reports_the_float_accuracy(budget_mb):
    model, noisy, x = _pair(2)
    labels = torch.randint(0, 6, (70,), generator=torch.Generator().manual_seed(1))
    scorer = AgreementScorer(model, x, labels, batch_size=16, budget_mb=budget_mb)
    assert scorer.fp_score == pytest.approx(agreement(predictions(model, x), labels), abs=1e-9)
    assert scorer(noisy) == pytest.approx(agreement(predictions(noisy, x), labels), abs=1e-9)
    assert not scorer.recomputes and all(t.dtype == labels.dtype for t in scorer._targets)


def test_batches_are_sized_to_the_budget_and_labels_must_match():
    model, _, x = _pair(3)
    one_sample_mb = 5 * 6 * 4 / 2**20
    scorer = AgreementScorer(model, x, batch_size=250, budget_mb=7 * one_sample_mb)
    assert [len(b) for b in scorer._batches] == [7] * 10
    with pytest.raises(ReparqError, match="69 labels for 70"):
        AgreementScorer(model, x, torch.zeros(69, dtype=torch.long))
