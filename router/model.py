"""The modality router: a softmax CNN that says which category model should label an image.

Its probabilities are also stacker features, so it is trained with plain cross-entropy and
selected on validation accuracy. (`TrainingConfig.loss` names multi-label losses and is not used.)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from conceptclef.training.checkpoints import CheckpointError
from conceptclef.training.estimator import NetworkEstimator
from conceptclef.training.feature_store import FeatureStore
from conceptclef.training.inference import Activation
from conceptclef.training.loop import EpochCallback, Objective
from conceptclef.training.losses import balanced_class_weights


def accuracy(probabilities: np.ndarray, class_indices: np.ndarray) -> float:
    """Share of rows whose most probable class is the true one."""
    if len(class_indices) == 0:
        return 0.0
    return float(np.mean(np.argmax(probabilities, axis=1) == np.asarray(class_indices)))


def confusion_matrix(probabilities: np.ndarray, class_indices: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts: rows are true classes, columns predicted ones."""
    predicted = np.argmax(probabilities, axis=1)
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(class_indices, dtype=np.int64), predicted), 1)
    return matrix


class ModalityRouter(NetworkEstimator[np.ndarray]):
    """Predicts an image's modality category (sklearn-style: fit / predict_proba / load)."""

    kind = "router"
    activation: ClassVar[Activation] = "softmax"

    def fit(
        self,
        images: Any,
        categories: Sequence[str],
        valid_images: Any,
        valid_categories: Sequence[str],
        work_dir: Path,
        on_epoch_end: EpochCallback | None = None,
    ) -> "ModalityRouter":
        """Train (or resume, or load when `work_dir` already holds this finished job)."""
        names = sorted({str(category) for category in categories})
        index = {name: position for position, name in enumerate(names)}
        unknown = sorted({str(category) for category in valid_categories} - set(index))
        if unknown:
            raise ValueError(f"router: validation categories never seen in training: {', '.join(unknown)}")
        if len(categories) != len(images) or len(valid_categories) != len(valid_images):
            raise ValueError("router: need exactly one category per image (train and valid)")
        targets = np.array([index[str(category)] for category in categories], dtype=np.int64)
        valid_targets = np.array([index[str(category)] for category in valid_categories], dtype=np.int64)
        self._fit(images, targets, names, valid_images, valid_targets, work_dir, on_epoch_end)
        return self

    def predict(self, images: Any) -> list[str]:
        """The most probable category of every image."""
        return [self.categories_[position] for position in np.argmax(self.predict_proba(images), axis=1)]

    def _objective(self, targets: np.ndarray, num_classes: int) -> Objective[np.ndarray]:
        weights = balanced_class_weights(targets, num_classes) if self.training.class_weights else None
        return Objective(nn.CrossEntropyLoss(weight=weights), "softmax", "accuracy", accuracy)

    def _initial_bias(self, targets: np.ndarray, num_classes: int) -> torch.Tensor:
        counts = np.bincount(targets, minlength=num_classes).astype(np.float64) + 1.0
        return torch.tensor(np.log(counts / counts.sum()), dtype=torch.float32)

    def _summarize(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
        return {
            "valid_accuracy": accuracy(outputs, targets),
            "confusion": confusion_matrix(outputs, targets, outputs.shape[1]).tolist(),
        }

    def _adopt(self, classes: list[str], history: list[dict[str, Any]], best_metric: float, summary: dict[str, Any]) -> None:
        self.categories_ = list(classes)
        self.history_ = list(history)
        self.valid_accuracy_ = float(summary.get("valid_accuracy", best_metric))
        confusion = summary.get("confusion")
        self.confusion_ = np.array(confusion, dtype=np.int64) if confusion is not None else None

    @classmethod
    def load(cls, work_dir: Path, device: str = "auto", feature_store: FeatureStore | None = None) -> "ModalityRouter":
        """The router in `work_dir`: a ModalityCuiRouter when its checkpoint says so (flat data,
        `categories.modality_model = "cuis"`), so the run's table needs no second router class."""
        return super().load(work_dir, device, feature_store)

    @classmethod
    def _class_for(cls, payload: dict[str, Any]) -> type["ModalityRouter"]:
        from conceptclef.router.modality_cuis import HEAD, ModalityCuiRouter

        if payload.get("router_head") == HEAD:
            return ModalityCuiRouter
        if cls is not ModalityRouter:
            raise CheckpointError(f"checkpoint holds a softmax router, not a {cls.__name__}")
        return cls
