"""ActivationObserver: exact running min/max, bounded seeded subsample, params."""

from __future__ import annotations

import pytest
import torch

from reparq.quant.observer import ActivationObserver
from reparq.quant.ranges import minmax_params


def batches(seed: int = 0):
    """Batches of distinct values (a permutation of a range), so every sample can be traced to its source."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randperm(2000, generator=g).float() - 700.0
    sizes = [30, 50, 200, 7, 600]
    out, start = [], 0
    for n in sizes:
        out.append(values[start:start + n].reshape(n, 1))
        start += n
    return out


def test_exact_min_max_across_batches():
    obs = ActivationObserver(max_samples=100, seed=0)
    seen = []
    for b in batches():
        obs.update(b)
        seen.append(b.reshape(-1))
        allv = torch.cat(seen)
        assert obs.min.item() == allv.min().item()
        assert obs.max.item() == allv.max().item()
    assert obs.seen == sum(b.numel() for b in batches())


def test_subsample_is_bounded_and_drawn_from_data():
    obs = ActivationObserver(max_samples=100, seed=0)
    seen = []
    expected_sizes = [30, 80, 100, 100, 100]
    for b, n in zip(batches(), expected_sizes):
        obs.update(b)
        seen.append(b.reshape(-1))
        assert obs.samples.numel() == n <= obs.max_samples
    allv = torch.cat(seen)
    assert torch.isin(obs.samples, allv).all()
    assert obs.samples.unique().numel() == obs.samples.numel()  # sampling without replacement


def test_subsample_weights_batches_by_share_of_data_seen():
    obs = ActivationObserver(max_samples=100, seed=0)
    first, second = torch.arange(100.0), torch.arange(1000.0, 1100.0)
    obs.update(first)
    assert torch.equal(obs.samples, first)  # below the cap, everything is kept
    obs.update(second)
    # Half the data seen came from each batch: keep round(100 * 100 / 200) = 50 old values.
    assert int((obs.samples < 1000).sum()) == 50
    assert int((obs.samples >= 1000).sum()) == 50
    obs.update(torch.arange(5000.0, 5200.0))
    # Now the third batch is half of 400 values seen: 50 of it, 50 of the older pool.
    assert int((obs.samples >= 5000).sum()) == 50


def test_same_seed_same_samples_different_seed_differs():
    def run(seed):
        obs = ActivationObserver(max_samples=100, seed=seed)
        for b in batches():
            obs.update(b)
        return obs.samples

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_raises(bad):
    obs = ActivationObserver(max_samples=1024)
    x = torch.randn(8)
    x[3] = bad
    with pytest.raises(FloatingPointError, match="non-finite"):
        obs.update(x)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_minmax_params_equal_minmax_on_concatenated_data(symmetric, bits):
    obs = ActivationObserver(max_samples=100, seed=0)
    data = batches()
    for b in data:
        obs.update(b)
    s, z = obs.params("minmax", bits, symmetric)
    s_ref, z_ref = minmax_params(torch.cat(data), bits, symmetric)
    assert torch.equal(s, s_ref) and torch.equal(z, z_ref)


def test_search_params_see_the_true_extremes():
    # The subsample misses the single extreme value; the search must still consider it.
    obs = ActivationObserver(max_samples=1024, seed=0)
    torch.manual_seed(0)
    x = torch.rand(50_000)
    x[12345] = 7.0
    obs.update(x)
    assert obs.samples.max().item() < 1.0  # the subsample did not catch the outlier...
    assert obs.max.item() == 7.0  # ...but the running max did
    s, z = obs.params("mse", 8, symmetric=False)
    # alpha >= 0.2 of the range [0, 7]: the search can never collapse to the subsample's [0, 1] range.
    assert s.item() >= 0.2 * 7.0 / 255 - 1e-7


def test_params_without_data_raise():
    with pytest.raises(RuntimeError, match="saw no data"):
        ActivationObserver().params("minmax", 8, False)
