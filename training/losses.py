"""Multi-label losses for concept models (and class weighting for the router's cross-entropy).

Every loss takes raw logits (B, V) and multi-hot float targets (B, V) and returns a scalar.

Soft F1 replaces the 0/1 predictions of F1 by probabilities so it can be differentiated. It is
computed at BATCH level by default (true positives, predicted and true counts summed over every
image and concept of the batch, one F1 per batch), as in the published ImageCLEF systems: it is
stable when an image has few concepts. `level="sample"` computes one soft F1 per image and
averages them, which mirrors the official sample-averaged F1 more closely.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

SoftF1Level = Literal["batch", "sample"]
LOSS_NAMES = ("bce", "soft_f1", "sf1_x_bce", "sf1_plus_bce", "asymmetric")
_EPSILON = 1e-7


class WeightedBCE(nn.Module):
    """Binary cross-entropy on logits, averaged over all entries; optional per-class positive weights."""

    positive_weights: torch.Tensor | None  # a buffer (nn.Module's typing sees buffers as Tensor | Module)

    def __init__(self, positive_weights: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("positive_weights", positive_weights, persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=self.positive_weights)


class SoftF1Loss(nn.Module):
    """1 - soft F1, at batch level (default) or averaged over samples (see the module docstring)."""

    def __init__(self, level: SoftF1Level = "batch") -> None:
        super().__init__()
        if level not in ("batch", "sample"):
            raise ValueError(f"soft F1 level must be 'batch' or 'sample', got {level!r}")
        self.level = level

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return 1.0 - soft_f1(torch.sigmoid(logits), targets, self.level)


def soft_f1(probabilities: torch.Tensor, targets: torch.Tensor, level: SoftF1Level = "batch") -> torch.Tensor:
    """2 sum(p y) / (sum(p) + sum(y)); empty rows and batches score 0 with zero gradient."""
    overlap = probabilities * targets
    size = probabilities + targets
    if level == "sample":
        overlap, size = overlap.sum(dim=1), size.sum(dim=1)
    else:
        overlap, size = overlap.sum(), size.sum()
    return (2.0 * overlap / (size + _EPSILON)).mean()


class CombinedSoftF1BCE(nn.Module):
    """(1 - soft F1) combined with BCE by product ("sf1_x_bce") or sum ("sf1_plus_bce")."""

    def __init__(self, mode: Literal["product", "sum"], positive_weights: torch.Tensor | None = None, level: SoftF1Level = "batch") -> None:
        super().__init__()
        self.mode = mode
        self.soft_f1 = SoftF1Loss(level)
        self.bce = WeightedBCE(positive_weights)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        f1_loss = self.soft_f1(logits, targets)
        bce = self.bce(logits, targets)
        return f1_loss * bce if self.mode == "product" else f1_loss + bce


class AsymmetricLoss(nn.Module):
    """Asymmetric loss (Ridnik et al., ICCV 2021) for the many easy negatives of multi-label data.

    Negatives are down-weighted by p^gamma_neg after shifting their probability down by `clip`
    (very easy negatives contribute nothing); positives by (1-p)^gamma_pos. Summed over classes as
    in the paper and averaged over the batch, so its scale grows with the vocabulary (Adam-type
    optimizers are insensitive to that).
    """

    positive_weights: torch.Tensor | None  # a buffer (nn.Module's typing sees buffers as Tensor | Module)

    def __init__(
        self,
        gamma_neg: float = 4.0,
        gamma_pos: float = 0.0,
        clip: float = 0.05,
        positive_weights: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.gamma_neg, self.gamma_pos, self.clip = gamma_neg, gamma_pos, clip
        self.register_buffer("positive_weights", positive_weights, persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        probabilities = torch.sigmoid(logits)
        negative_probabilities = probabilities
        if self.clip > 0:
            negative_probabilities = (probabilities - self.clip).clamp(min=0)
        positive_term = targets * torch.log(probabilities.clamp(min=_EPSILON))
        negative_term = (1 - targets) * torch.log((1 - negative_probabilities).clamp(min=_EPSILON))
        if self.gamma_pos > 0:
            positive_term = positive_term * (1 - probabilities).pow(self.gamma_pos)
        if self.gamma_neg > 0:
            negative_term = negative_term * negative_probabilities.pow(self.gamma_neg)
        if self.positive_weights is not None:
            positive_term = positive_term * self.positive_weights
        return -(positive_term + negative_term).sum(dim=1).mean()


def build_loss(
    name: str,
    class_weights: torch.Tensor | None = None,
    soft_f1_level: SoftF1Level = "batch",
) -> nn.Module:
    """A multi-label loss by config name; `class_weights` are per-class positive weights (V,)."""
    builders: dict[str, Callable[[], nn.Module]] = {
        "bce": lambda: WeightedBCE(class_weights),
        "soft_f1": lambda: SoftF1Loss(soft_f1_level),
        "sf1_x_bce": lambda: CombinedSoftF1BCE("product", class_weights, soft_f1_level),
        "sf1_plus_bce": lambda: CombinedSoftF1BCE("sum", class_weights, soft_f1_level),
        "asymmetric": lambda: AsymmetricLoss(positive_weights=class_weights),
    }
    if name not in builders:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(LOSS_NAMES)}")
    return builders[name]()


def positive_class_weights(labels: sp.spmatrix | np.ndarray, max_weight: float = 10.0) -> torch.Tensor:
    """sqrt(negatives / positives) per concept, clipped to [1, max_weight].

    The square root and the cap keep concepts seen a handful of times in 80,000 images from
    dominating the loss (a raw ratio would weight them by ~10^4).
    """
    labels = sp.csr_matrix(labels)
    count = labels.shape[0]
    positives = np.asarray((labels > 0).sum(axis=0)).ravel().astype(np.float64)
    ratio = np.sqrt((count - positives) / np.maximum(positives, 1.0))
    return torch.tensor(np.clip(ratio, 1.0, max_weight), dtype=torch.float32)


def balanced_class_weights(class_indices: np.ndarray, num_classes: int) -> torch.Tensor:
    """n / (C * count_c) for the router's cross-entropy; unseen classes get weight 1."""
    counts = np.bincount(np.asarray(class_indices, dtype=np.int64), minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1.0)), 1.0)
    return torch.tensor(weights, dtype=torch.float32)
