"""Multi-label losses: values on known cases, finite gradients, empty targets, class weights."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from conceptclef.training.losses import (
    LOSS_NAMES,
    AsymmetricLoss,
    SoftF1Loss,
    balanced_class_weights,
    build_loss,
    positive_class_weights,
    soft_f1,
)

TARGETS = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]])


def test_bce_matches_torch_and_positive_weights_raise_the_positive_term():
    logits = torch.tensor([[0.3, -1.0, 2.0, 0.1], [-0.5, 0.7, 0.0, -2.0]])
    assert torch.isclose(build_loss("bce")(logits, TARGETS), F.binary_cross_entropy_with_logits(logits, TARGETS))
    weighted = build_loss("bce", class_weights=torch.tensor([3.0, 3.0, 3.0, 3.0]))(logits, TARGETS)
    assert weighted > build_loss("bce")(logits, TARGETS)


def test_soft_f1_is_zero_for_confident_correct_and_one_for_confident_wrong():
    correct = (TARGETS * 2 - 1) * 30
    assert build_loss("soft_f1")(correct, TARGETS).item() == pytest.approx(0.0, abs=1e-6)
    assert build_loss("soft_f1")(-correct, TARGETS).item() == pytest.approx(1.0, abs=1e-6)


def test_soft_f1_batch_level_pools_counts_while_sample_level_averages_images():
    probabilities = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
    # image 1: 2*1/(1+2) = 2/3; image 2: 2*1/(3+1) = 1/2; batch: 2*2/(4+3) = 4/7
    assert soft_f1(probabilities, TARGETS, "sample").item() == pytest.approx((2 / 3 + 1 / 2) / 2, abs=1e-5)
    assert soft_f1(probabilities, TARGETS, "batch").item() == pytest.approx(4 / 7, abs=1e-5)
    with pytest.raises(ValueError, match="level"):
        SoftF1Loss("image")  # type: ignore[arg-type]


def test_combined_losses_are_the_product_and_the_sum_of_their_parts():
    logits = torch.tensor([[0.3, -1.0, 2.0, 0.1], [-0.5, 0.7, 0.0, -2.0]])
    f1_part = build_loss("soft_f1")(logits, TARGETS)
    bce_part = build_loss("bce")(logits, TARGETS)
    assert torch.isclose(build_loss("sf1_x_bce")(logits, TARGETS), f1_part * bce_part)
    assert torch.isclose(build_loss("sf1_plus_bce")(logits, TARGETS), f1_part + bce_part)


def test_asymmetric_without_focusing_or_clip_is_bce_summed_over_classes():
    logits = torch.tensor([[0.3, -1.0, 2.0, 0.1], [-0.5, 0.7, 0.0, -2.0]])
    plain = AsymmetricLoss(gamma_neg=0.0, gamma_pos=0.0, clip=0.0)(logits, TARGETS)
    expected = F.binary_cross_entropy_with_logits(logits, TARGETS, reduction="none").sum(dim=1).mean()
    assert torch.isclose(plain, expected, atol=1e-5)


def test_asymmetric_ignores_easy_negatives_below_the_clip():
    logits = torch.tensor([[-6.0, 5.0]], requires_grad=True)  # p(neg) = 0.0025 < clip 0.05
    targets = torch.tensor([[0.0, 1.0]])
    AsymmetricLoss()(logits, targets).backward()
    assert logits.grad[0, 0].item() == 0.0
    assert logits.grad[0, 1].item() < 0.0  # the positive is still pushed up


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_every_loss_is_a_finite_scalar_with_finite_gradients_even_for_empty_targets(name):
    torch.manual_seed(0)
    for targets in (TARGETS, torch.zeros_like(TARGETS)):
        for scale in (1.0, 100.0):  # saturated sigmoids must not give NaN or inf
            logits = (torch.randn(2, 4) * scale).requires_grad_(True)
            loss = build_loss(name, class_weights=torch.full((4,), 2.0))(logits, targets)
            loss.backward()
            assert loss.ndim == 0 and torch.isfinite(loss)
            assert torch.isfinite(logits.grad).all()


def test_every_loss_decreases_when_logits_move_toward_the_targets():
    better = (TARGETS * 2 - 1) * 3
    for name in LOSS_NAMES:
        loss = build_loss(name)
        assert loss(better, TARGETS) < loss(-better, TARGETS), name


def test_sample_level_soft_f1_gives_no_gradient_to_images_without_concepts():
    logits = torch.zeros(2, 4, requires_grad=True)
    targets = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    SoftF1Loss("sample")(logits, targets).backward()
    assert torch.count_nonzero(logits.grad[1]) == 0
    assert torch.count_nonzero(logits.grad[0]) > 0


def test_unknown_loss_name_is_refused():
    with pytest.raises(ValueError, match="unknown loss 'focal'"):
        build_loss("focal")


def test_positive_weights_grow_with_rarity_and_are_capped():
    labels = sp.csr_matrix(np.array([[1, 1, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0]] * 100, dtype=np.float32))
    weights = positive_class_weights(labels, max_weight=5.0)
    assert weights[0].item() == pytest.approx(1.0)  # present everywhere: no up-weighting
    assert weights[1].item() == pytest.approx(np.sqrt(3.0), rel=1e-5)
    assert weights[2].item() == pytest.approx(5.0)  # never seen: capped


def test_balanced_class_weights_are_inverse_frequency():
    weights = balanced_class_weights(np.array([0, 0, 0, 1]), 3)
    assert weights.tolist() == pytest.approx([4 / 9, 4 / 3, 1.0])


# -- the loss follows the network to its device (class_weights = true on CUDA) ---------------------
META = torch.device("meta")


@pytest.mark.parametrize("name", ["bce", "sf1_x_bce", "sf1_plus_bce", "asymmetric"])
def test_a_class_weighted_loss_moves_with_the_objective_to_the_training_device(name):
    from conceptclef.training.loop import Objective

    loss = build_loss(name, class_weights=torch.tensor([2.0, 1.0, 3.0, 1.5]))
    logits, targets = torch.zeros(2, 4, device=META), TARGETS.to(META)
    with pytest.raises((RuntimeError, NotImplementedError)):  # CPU weights against device logits: the CUDA crash
        loss(logits, targets)
    moved = Objective(loss, "sigmoid", "f1", lambda outputs, truth: 0.0).on(META)
    value = moved.loss(logits, targets)
    assert value.device == META and value.shape == ()


def test_the_routers_and_concept_models_weighted_objectives_run_on_the_training_device():
    from conceptclef.category_models import ConceptModel
    from conceptclef.core.config import TrainingConfig
    from conceptclef.router import ModalityRouter

    training = TrainingConfig(class_weights=True, loss="asymmetric")
    router = ModalityRouter(training, 32, "cpu")._objective(np.array([0, 0, 1, 2]), 3).on(META)
    assert router.loss(torch.zeros(4, 3, device=META), torch.tensor([0, 0, 1, 2], device=META)).device == META
    labels = sp.csr_matrix(np.array([[1, 0, 1, 0], [0, 1, 0, 0]], dtype=np.float32))
    concepts = ConceptModel(training, 32, "cpu")._objective(labels, 4).on(META)
    assert concepts.loss(torch.zeros(2, 4, device=META), TARGETS.to(META)).device == META
