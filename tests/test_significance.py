"""The paired test behind benchmarks/paired_significance.py: exact binomial tails, images counted once."""

import math

import pytest
import torch

from reparq.eval.significance import paired_sign_test, sign_test_p


def test_sign_test_p_is_the_exact_two_sided_binomial_tail():
    assert sign_test_p(0, 5) == pytest.approx(2 / 32)  # all five discordant images one way
    assert sign_test_p(5, 0) == sign_test_p(0, 5)  # symmetric
    assert sign_test_p(3, 3) == 1.0 and sign_test_p(0, 0) == 1.0
    assert sign_test_p(2, 8) == pytest.approx(2 * sum(math.comb(10, k) for k in range(3)) / 1024)  # 0.1094
    assert sign_test_p(20, 40) < 0.05 < sign_test_p(25, 35)  # 60 discordant images: 20/40 is significant, 25/35 not


def test_paired_sign_test_counts_each_image_once_for_the_side_ahead_on_it():
    # Per-image seeds right (of 3): image 0 A ahead by 2, image 1 B ahead by 1, image 2 tie, image 3 A by 1.
    a, b = torch.tensor([3, 1, 2, 2]), torch.tensor([1, 2, 2, 1])
    result = paired_sign_test(a, b)
    assert (result.a_ahead, result.b_ahead) == (2, 1)  # not the seed totals (3 and 1)
    assert result.p_value == sign_test_p(2, 1) == 1.0
    with pytest.raises(ValueError, match="same images"):
        paired_sign_test(a, b[:3])
