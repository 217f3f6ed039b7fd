"""Multi-label concept models: one global model and one per modality category.

Each gives a sigmoid probability per CUI of its vocabulary and is selected on the validation
sample-averaged F1 at a 0.5 threshold (the stacker and per-concept thresholds refine the
decision later). Its pooled backbone features are the embeddings used for kNN retrieval.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from conceptclef.scoring.f1 import mean_sample_f1_sparse
from conceptclef.training.estimator import NetworkEstimator
from conceptclef.training.feature_store import FeatureStore
from conceptclef.training.loop import EpochCallback, Objective
from conceptclef.training.losses import build_loss, positive_class_weights

DECISION_THRESHOLD = 0.5


def sample_f1_at_threshold(probabilities: np.ndarray, labels: sp.spmatrix, threshold: float = DECISION_THRESHOLD) -> float:
    """Official sample-averaged F1 of the concepts whose probability reaches `threshold`."""
    return mean_sample_f1_sparse(sp.csr_matrix(probabilities >= threshold), labels)


def _multi_hot(labels: Any, cuis: Sequence[str], what: str) -> sp.csr_matrix:
    matrix = sp.csr_matrix(labels, dtype=np.float32)
    if matrix.shape[1] != len(cuis):
        raise ValueError(f"concept model: {what} labels have {matrix.shape[1]} columns but the vocabulary has {len(cuis)} CUIs")
    return matrix


class ConceptModel(NetworkEstimator):
    """CUI probabilities for an image (sklearn-style: fit / predict_proba / embed / load)."""

    kind = "concepts"
    activation = "sigmoid"

    def fit(
        self,
        images: Any,
        labels: Any,
        cuis: Sequence[str],
        valid_images: Any,
        valid_labels: Any,
        work_dir: Path,
        on_epoch_end: EpochCallback | None = None,
    ) -> "ConceptModel":
        """Train (or resume, or load when `work_dir` already holds this finished job).

        `labels` are multi-hot (N, V) rows (scipy.sparse or dense) whose columns are `cuis`.
        """
        cuis = [str(cui) for cui in cuis]
        if not cuis:
            raise ValueError("concept model: the vocabulary is empty")
        targets = _multi_hot(labels, cuis, "training")
        valid_targets = _multi_hot(valid_labels, cuis, "validation")
        if targets.shape[0] != len(images) or valid_targets.shape[0] != len(valid_images):
            raise ValueError("concept model: need exactly one label row per image (train and valid)")
        self._fit(images, targets, cuis, valid_images, valid_targets, work_dir, on_epoch_end)
        return self

    def _objective(self, targets: sp.csr_matrix, num_classes: int) -> Objective:
        weights = positive_class_weights(targets) if self.training.class_weights else None
        return Objective(build_loss(self.training.loss, weights), "sigmoid", "sample_f1", sample_f1_at_threshold)

    def _initial_bias(self, targets: sp.csr_matrix, num_classes: int) -> torch.Tensor:
        frequency = np.asarray((targets > 0).sum(axis=0)).ravel() / max(targets.shape[0], 1)
        frequency = np.clip(frequency, 1e-4, 0.5)
        return torch.tensor(np.log(frequency / (1 - frequency)), dtype=torch.float32)

    def _summarize(self, outputs: np.ndarray, targets: sp.csr_matrix) -> dict[str, Any]:
        return {"valid_f1": sample_f1_at_threshold(outputs, targets)}

    def _adopt(self, classes: list[str], history: list[dict[str, Any]], best_metric: float, summary: dict[str, Any]) -> None:
        self.cuis_ = list(classes)
        self.history_ = list(history)
        self.best_valid_f1_ = float(summary.get("valid_f1", best_metric))

    @classmethod
    def load(cls, work_dir: Path, device: str = "auto", feature_store: FeatureStore | None = None) -> "ConceptModel":
        return super().load(work_dir, device, feature_store)  # type: ignore[return-value]
