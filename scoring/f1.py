"""The official ImageCLEFmed concept-detection metric, as pure functions.

The 2019/2020 `evaluate-f1.py` computes, for every ground-truth image whose concept list is not
empty, the binary F1 of predicted vs true concepts (upper-cased) and averages over those images.
Per image that F1 equals 2|P & G| / (|P| + |G|); an empty prediction scores 0. Ground-truth
concepts that no model can predict stay in G and so count as misses. The 2025 secondary score
filters both sides to a concept subset first and skips images whose filtered truth is empty.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

ConceptSets = Mapping[str, Iterable[str]]


@dataclass(frozen=True)
class F1Report:
    """The official score plus what it was computed over."""

    score: float
    n_images: int
    per_image: dict[str, float] = field(repr=False)
    per_category: dict[str, tuple[float, int]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "score": self.score,
            "n_images": self.n_images,
            "per_category": {
                name: {"score": score, "n_images": count} for name, (score, count) in self.per_category.items()
            },
        }


def image_f1(predicted: Iterable[str], truth: Iterable[str]) -> float:
    """F1 of one image's predicted concept set against its true set (case-insensitive)."""
    predicted_set = {concept.strip().upper() for concept in predicted if concept.strip()}
    truth_set = {concept.strip().upper() for concept in truth if concept.strip()}
    if not predicted_set and not truth_set:
        return 0.0
    return 2.0 * len(predicted_set & truth_set) / (len(predicted_set) + len(truth_set))


def sample_f1(
    predicted: ConceptSets,
    truth: ConceptSets,
    subset: Iterable[str] | None = None,
    categories: Mapping[str, str] | None = None,
) -> F1Report:
    """Mean per-image F1 over ground-truth images with non-empty (filtered) truth.

    Images missing from `predicted` score 0, like an empty prediction. `subset` gives the 2025
    secondary score; `categories` (image id -> category) adds a per-category breakdown.
    """
    keep = None if subset is None else {concept.strip().upper() for concept in subset}
    per_image: dict[str, float] = {}
    for image_id, true_concepts in truth.items():
        true_set = {concept.strip().upper() for concept in true_concepts if concept.strip()}
        predicted_set = {concept.strip().upper() for concept in predicted.get(image_id, ()) if concept.strip()}
        if keep is not None:
            true_set &= keep
            predicted_set &= keep
        if not true_set:
            continue
        per_image[image_id] = image_f1(predicted_set, true_set)
    score = float(np.mean(list(per_image.values()))) if per_image else 0.0
    per_category: dict[str, tuple[float, int]] = {}
    if categories is not None:
        grouped: dict[str, list[float]] = {}
        for image_id, value in per_image.items():
            grouped.setdefault(categories.get(image_id, "unknown"), []).append(value)
        per_category = {name: (float(np.mean(values)), len(values)) for name, values in sorted(grouped.items())}
    return F1Report(score=score, n_images=len(per_image), per_image=per_image, per_category=per_category)


def per_image_f1_sparse(
    predicted: sp.spmatrix | np.ndarray,
    truth: sp.spmatrix | np.ndarray,
    truth_outside: np.ndarray | None = None,
) -> np.ndarray:
    """Per-image F1 of 0/1 matrices over one vocabulary, vectorised for tuning at full scale.

    `truth_outside[i]` counts image i's true concepts that are not columns of the matrices
    (out of vocabulary): they enlarge |G| and so count as misses, as in the official script.
    Images with empty truth get NaN so callers can leave them out of the mean.
    """
    predicted = sp.csr_matrix(predicted, dtype=bool)
    truth = sp.csr_matrix(truth, dtype=bool)
    hits = np.asarray(predicted.multiply(truth).sum(axis=1)).ravel().astype(np.float64)
    n_predicted = np.diff(predicted.indptr).astype(np.float64)
    n_truth = np.diff(truth.indptr).astype(np.float64)
    if truth_outside is not None:
        n_truth = n_truth + np.asarray(truth_outside, dtype=np.float64)
    scores = np.full(n_truth.shape, np.nan)
    has_truth = n_truth > 0
    scores[has_truth] = 2.0 * hits[has_truth] / (n_predicted[has_truth] + n_truth[has_truth])
    return scores


def mean_sample_f1_sparse(
    predicted: sp.spmatrix | np.ndarray,
    truth: sp.spmatrix | np.ndarray,
    truth_outside: np.ndarray | None = None,
) -> float:
    """The official score of 0/1 matrices: mean of per_image_f1_sparse over scored images."""
    scores = per_image_f1_sparse(predicted, truth, truth_outside)
    scored = scores[~np.isnan(scores)]
    return float(scored.mean()) if scored.size else 0.0
