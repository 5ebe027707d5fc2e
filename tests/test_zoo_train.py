"""The zoo training script's distillation loss, and the committed checkpoints against their cards."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from reparq.data.fashion_mnist import load_fashion_mnist
from reparq.eval.accuracy import top1
from reparq.zoo.registry import checkpoint_path, load_model, model_card
from reparq.zoo.train import TRAIN_RECIPES, teacher_probabilities, training_loss

IMAGE_MODELS = sorted(TRAIN_RECIPES)
TARGET_TOP1 = {"deit_fm": 89.0, "swin_fm": 89.0}  # transformers; every CNN: 92.0 (issue #3), deep RepVGG excepted


def test_training_loss_without_teachers_is_label_smoothed_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(16, 10, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    recipe = TRAIN_RECIPES["repvgg_fm"]
    expected = F.cross_entropy(logits, labels, label_smoothing=recipe.label_smoothing)
    assert torch.equal(training_loss(logits, labels, recipe, None), expected)


def test_training_loss_mixes_the_kl_to_the_soft_targets_by_hand():
    gen = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(8, 10, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    soft = F.softmax(torch.randn(8, 10, generator=gen), dim=1)
    recipe = dataclasses.replace(TRAIN_RECIPES["deit_fm"], distill_weight=0.25, distill_temperature=3.0)
    log_p = F.log_softmax(logits / 3.0, dim=1)
    kl = (soft * (soft.log() - log_p)).sum(1).mean() * 9.0
    hard = F.cross_entropy(logits, labels, label_smoothing=recipe.label_smoothing)
    assert training_loss(logits, labels, recipe, soft).item() == pytest.approx((0.75 * hard + 0.25 * kl).item(), rel=1e-6)


def test_training_loss_kl_term_vanishes_when_the_student_matches_the_teachers():
    gen = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 10, (8,), generator=gen)
    recipe = TRAIN_RECIPES["deit_fm"]
    soft = F.softmax(torch.randn(8, 10, generator=gen), dim=1)
    logits = soft.log() * recipe.distill_temperature  # the student's tempered softmax equals the targets
    hard = F.cross_entropy(logits, labels, label_smoothing=recipe.label_smoothing)
    assert training_loss(logits, labels, recipe, soft).item() == pytest.approx(
        ((1 - recipe.distill_weight) * hard).item(), abs=1e-6)


@pytest.mark.skipif(not checkpoint_path("repvgg_fm").exists(), reason="zoo checkpoint not trained")
def test_teacher_probabilities_are_the_mean_tempered_softmax_of_the_unmerged_teachers():
    images = load_fashion_mnist("test")[0][:32]
    teachers = ("repvgg_fm", "mobileone_fm")
    soft = teacher_probabilities(teachers, images, temperature=2.0)
    with torch.no_grad():
        expected = sum(F.softmax(load_model(n).eval()(images) / 2.0, dim=1) for n in teachers) / 2
    assert torch.allclose(soft.sum(1), torch.ones(32), atol=1e-6)
    assert torch.allclose(soft, expected, atol=1e-5)


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_committed_checkpoint_reproduces_its_card_and_meets_the_target(name):
    if not checkpoint_path(name).exists():
        pytest.skip("zoo checkpoint not trained")
    card = model_card(name)
    images, labels = load_fashion_mnist("test")
    assert top1(load_model(name), images, labels) == pytest.approx(card["fp_top1"], abs=0.011)
    if name != "repvgg_deep_fm":  # the deep variant exists to stress quantization, not for accuracy
        assert card["fp_top1"] >= TARGET_TOP1.get(name, 92.0)
    if TRAIN_RECIPES[name].teachers:
        assert card["recipe"]["teachers"] == list(TRAIN_RECIPES[name].teachers)
