"""The paired tests behind benchmarks/paired_significance.py: exact binomial tails, items counted
once, the sign-flip test of the mean, and the per-image hits the benchmarks keep for them."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from reparq.eval.significance import (decode_hits, encode_hits, mean_difference_interval, paired_sign_test, sign_flip_p,
                                     sign_test_p)


def test_sign_test_p_is_the_exact_two_sided_binomial_tail():
    assert sign_test_p(0, 5) == pytest.approx(2 / 32)  # all five discordant images one way
    assert sign_test_p(5, 0) == sign_test_p(0, 5)  # symmetric
    assert sign_test_p(3, 3) == 1.0 and sign_test_p(0, 0) == 1.0
    assert sign_test_p(2, 8) == pytest.approx(2 * sum(math.comb(10, k) for k in range(3)) / 1024)  # 0.1094
    assert sign_test_p(20, 40) < 0.05 < sign_test_p(25, 35)  # 60 discordant images: 20/40 is significant, 25/35 not
    assert sign_test_p(1000, 1100) == pytest.approx(0.0309, abs=1e-3)  # 2100 items: past a float's 2 ** 1023
    assert sign_test_p(100, 3000) == 0.0  # underflows to zero, does not overflow


def test_paired_sign_test_counts_each_image_once_for_the_side_ahead_on_it():
    # Per-image seeds right (of 3): image 0 A ahead by 2, image 1 B ahead by 1, image 2 tie, image 3 A by 1.
    a, b = torch.tensor([3, 1, 2, 2]), torch.tensor([1, 2, 2, 1])
    result = paired_sign_test(a, b)
    assert (result.a_ahead, result.b_ahead) == (2, 1)  # not the seed totals (3 and 1)
    assert result.p_value == sign_test_p(2, 1) == 1.0
    with pytest.raises(ValueError, match="same items"):
        paired_sign_test(a, b[:3])


def test_paired_sign_test_takes_float_scores_and_refuses_mismatched_items():
    nll_a, nll_b = torch.tensor([4.10, 4.20, 4.30]), torch.tensor([4.15, 4.20, 4.25])
    result = paired_sign_test(-nll_a, -nll_b)  # lower NLL is better: window 0 for A, window 2 for B
    assert (result.a_ahead, result.b_ahead) == (1, 1)
    with pytest.raises(ValueError, match="same items"):
        paired_sign_test(torch.zeros(2, 3), torch.zeros(2, 3))


def test_sign_flip_p_estimates_the_exact_randomization_tail():
    # Differences 1, 2, 3, 4: of the 16 sign patterns only all-plus and all-minus reach |sum| = 10.
    a, b = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.zeros(4)
    assert sign_flip_p(a, b, rounds=20000) == pytest.approx(2 / 16, abs=0.01)
    assert sign_flip_p(a, b, rounds=500, seed=3) == sign_flip_p(a, b, rounds=500, seed=3)  # seeded
    assert sign_flip_p(b, b) == 1.0  # no difference at all
    shifted = torch.randn(300, generator=torch.Generator().manual_seed(0))
    assert sign_flip_p(shifted + 1.0, shifted, rounds=1000) == pytest.approx(1 / 1001)  # never as extreme
    # Ties change no sum, so they do not enter the draws: padding with them leaves p as it was.
    padded = torch.cat([a, torch.ones(5000)]), torch.cat([b, torch.ones(5000)])
    assert sign_flip_p(*padded, rounds=500, seed=3) == sign_flip_p(a, b, rounds=500, seed=3)


def test_mean_difference_interval_is_the_normal_interval_over_items():
    a, b = torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0]), torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])
    # Differences 2, 0, 3, 0, 4: mean 1.8, sample sd sqrt(12.8 / 4), z(0.975) = 1.959964.
    half = 1.959964 * math.sqrt(12.8 / 4) / math.sqrt(5)
    mean, low, high = mean_difference_interval(a, b)
    assert mean == pytest.approx(1.8) and low == pytest.approx(1.8 - half, rel=1e-6)
    assert high == pytest.approx(1.8 + half, rel=1e-6)
    assert mean_difference_interval(a, b, level=0.5)[2] < high  # a lower level, a narrower interval
    with pytest.raises(ValueError, match="level"):
        mean_difference_interval(a, b, level=1.0)
    with pytest.raises(ValueError, match="two items"):
        mean_difference_interval(a[:1], b[:1])


def test_hits_survive_encoding_and_a_wrong_count_is_refused():
    hits = torch.rand(10001, generator=torch.Generator().manual_seed(0)) > 0.3
    text = encode_hits(hits)
    assert len(text) < 10001 / 8 * 4 / 3 + 4  # packed bits, base64
    assert torch.equal(decode_hits(text, 10001), hits)
    with pytest.raises(ValueError, match="not 10009 images"):
        decode_hits(text, 10009)


def _paired_benchmark():
    path = Path(__file__).parents[1] / "benchmarks" / "paired_significance.py"
    spec = importlib.util.spec_from_file_location("paired_significance", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_pools_the_committed_rows_hits_over_common_seeds():
    from reparq.report.results import row_key

    bench = _paired_benchmark()
    hits = {("repquant", 0): [1, 1, 0, 0], ("repquant", 1): [1, 0, 1, 0],
            ("qdrop", 0): [1, 0, 0, 1], ("qdrop", 1): [0, 0, 0, 1], ("qdrop", 2): [1, 1, 1, 1]}
    rows, items = [], {}
    for (method, seed), h in hits.items():
        row = {"model": "m", "method": method, "w_bits": 8, "a_bits": 8, "metric": "top1", "fp": 90.0,
               "quant": 25.0 * sum(h), "delta": 25.0 * sum(h) - 90.0, "calib_seconds": 1.0, "peak_mem_mb": 1.0,
               "seed": seed}
        rows.append(row)
        items[row_key(row)] = {"code": "abc", "images": 4, "hits": encode_hits(torch.tensor(h, dtype=torch.bool))}
    score = bench.SOURCES["ptq_baselines"][1]
    out = bench.compare(rows, items, score, "m", (8, 8), "qdrop", "top1")
    # Seeds 0 and 1 only (qdrop's seed 2 has no repquant twin): per image repquant 2,1,1,0 vs qdrop 1,0,0,2.
    assert out["seeds"] == [0, 1] and (out["ref_ahead"], out["rival_ahead"]) == (3, 1)
    assert out["p_sign"] == pytest.approx(sign_test_p(3, 1), abs=1e-4) and out["same_code"] is True
    assert out["delta"] == pytest.approx((25.0 * 2 - 90.0 + 25.0 - 90.0) / 2)
    # Per image and seed, qdrop minus repquant: -0.5, -0.5, -0.5, +1: a lead of -12.5 points, the means' gap.
    assert out["rival_lead"] == pytest.approx(-12.5)
    assert out["rival_lead"] == pytest.approx(out["delta"] - out["ref_delta"])
    half = 100 * 1.959964 * torch.tensor([-0.5, -0.5, -0.5, 1.0]).std().item() / 2
    assert out["lead_high"] == pytest.approx(-12.5 + half, rel=1e-5)
    assert bench.compare(rows, items, score, "m", (8, 8), "minmax", "top1") is None
    assert out["flips"] is None  # without the float model's hits
    # The float model gets images 0 and 1 right: repquant flips 0 + 2, qdrop 2 + 3 over seeds 0, 1.
    fp = torch.tensor([1.0, 1.0, 0.0, 0.0])
    with_fp = bench.compare(rows, items, score, "m", (8, 8), "qdrop", "top1", fp_score=fp)
    assert (with_fp["ref_flips"], with_fp["flips"]) == (1.0, 2.5)
    # Per image, flips pooled over seeds: repquant 0, 1, 1, 0; qdrop 1, 2, 0, 2, differences 1, 1, -1, 2:
    # 8 of the 16 sign patterns reach |sum| >= 3.
    assert with_fp["p_flips"] == pytest.approx(0.5, abs=0.01)
    # The same rows under another reference name pair with it the same way.
    renamed = [{**r, "method": "repapq"} if r["method"] == "repquant" else r for r in rows]
    renamed_items = {row_key(n): items[row_key(r)] for n, r in zip(renamed, rows)}
    as_repapq = bench.compare(renamed, renamed_items, score, "m", (8, 8), "qdrop", "top1", reference="repapq")
    assert as_repapq["reference"] == "repapq" and out["reference"] == "repquant"
    def without_reference(row: dict) -> dict:
        return {k: v for k, v in row.items() if k != "reference"}

    assert without_reference(as_repapq) == without_reference(out)


def test_each_model_is_paired_with_the_projects_own_recipe_for_it():
    bench = _paired_benchmark()
    rows = [{"model": "cnn", "method": "repapq"}, {"model": "cnn", "method": "mse"},
            {"model": "vit", "method": "repquant"}, {"model": "vit", "method": "repqvit"},
            {"model": "both", "method": "repapq"}, {"model": "both", "method": "repquant"},
            {"model": "none", "method": "mse"}]
    assert [bench.reference_for(rows, m) for m in ("cnn", "vit", "both", "none")] == ["repapq", "repquant",
                                                                                       "repquant", None]


def test_a_perplexity_lead_is_the_rivals_perplexity_below_repquants():
    bench = _paired_benchmark()
    # The rival's windows average 0.01 nats less: its perplexity is 118 * exp(-0.01).
    assert bench.lead_in_metric(0.01, "perplexity", 118.0) == pytest.approx(118.0 - 118.0 * math.exp(-0.01))
    assert bench.lead_in_metric(0.002, "top1", 90.0) == pytest.approx(0.2)
    assert bench.lead_in_metric(-0.003, "cosine", 0.99) == pytest.approx(-0.003)


def test_an_ablation_pairs_every_variant_with_the_recipe_at_its_defaults():
    bench = _paired_benchmark()
    rows = [{"model": "vit", "method": m} for m in ("repquant", "repquant-no_reparam", "repqvit", "repquant-gptq",
                                                     "repquant-no_reparam")]
    rows.append({"model": "cnn", "method": "repapq-no_qprep"})
    assert bench.rivals_in(rows, "vit", "repquant_ablation") == ["repquant-no_reparam", "repqvit", "repquant-gptq"]
    # The baseline benchmarks keep their fixed list of baselines, whatever else their rows hold.
    assert bench.rivals_in(rows, "vit", "ptq_baselines") == list(bench.RIVALS)
    # Without the reference's rows there is nothing to pair with (compare finds no common seeds).
    assert bench.reference_for(rows, "cnn") is None
