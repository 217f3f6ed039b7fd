"""Per-concept thresholds tuned directly on the official sample-averaged F1.

The metric averages F1 over images, so a concept's best threshold depends on what the other
concepts already predict for the same images: coordinate ascent over concepts keeps every
image's hit and prediction counts and, for one concept at a time, scores every cut of that
concept's probabilities (sorted once) with a cumulative sum of exact per-image F1 changes.
Concepts with few positives would overfit such a search, so their thresholds are shrunk toward
one tuned global threshold with `prior_strength` pseudo-positives.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from conceptclef.core.config import EnsembleConfig
from conceptclef.ensemble.rule_files import read_rule, save_rule
from conceptclef.ensemble.sparse_ops import as_bool_csr, as_score_csr, gather, limit_labels_per_row, row_of_entries

if TYPE_CHECKING:  # scikit-learn >= 1.6; older releases never call __sklearn_tags__
    from sklearn.utils import Tags

THRESHOLDS_FILE = "thresholds.json"


def _truth_sizes(truth: sp.csr_matrix, truth_outside: np.ndarray | None) -> np.ndarray:
    """|G| per image, counting out-of-vocabulary true concepts (they can only be missed)."""
    sizes = np.diff(truth.indptr).astype(np.float64)
    if truth_outside is not None:
        outside = np.asarray(truth_outside, dtype=np.float64)
        if outside.shape != sizes.shape:
            # A length-1 array would broadcast and silently give every image the same count.
            raise ValueError(f"truth_outside has shape {outside.shape}, expected one count per image {sizes.shape}")
        sizes = sizes + outside
    return sizes


def checked_fit_inputs(
    rule: object, probs: sp.spmatrix | np.ndarray, truth: sp.spmatrix | np.ndarray | None, truth_outside: np.ndarray | None
) -> tuple[sp.csr_matrix, sp.csr_matrix, np.ndarray]:
    """What both decision rules' `fit` refuse, checked once: (scores, truth, |G| per image).

    No truth, probabilities and truth of different shapes, or no image at all would otherwise
    fit a rule silently on the wrong labels (or on nothing).

    Parameters
    ----------
    rule : ConceptThresholdTuner or ExpectedF1Decoder
        The rule being fitted (named in the errors).
    probs : numpy.ndarray or scipy.sparse matrix of shape (n_images, n_concepts), float
    truth : numpy.ndarray or scipy.sparse matrix of shape (n_images, n_concepts), bool
    truth_outside : numpy.ndarray of shape (n_images,), int, optional
        True concepts per image outside the vocabulary.

    Returns
    -------
    scores : scipy.sparse.csr_matrix of shape (n_images, n_concepts), float
    truth : scipy.sparse.csr_matrix of shape (n_images, n_concepts), bool
    sizes : numpy.ndarray of shape (n_images,), float64
        |G| per image, out-of-vocabulary concepts included.
    """
    if truth is None:
        raise ValueError(f"{type(rule).__name__} requires y to be passed, but the target y is None")
    scores = as_score_csr(probs)
    truth_csr = as_bool_csr(truth)
    if scores.shape != truth_csr.shape:
        raise ValueError(f"probs {scores.shape} and truth {truth_csr.shape} differ in shape")
    if scores.shape[0] == 0:
        raise ValueError(f"{type(rule).__name__} cannot be fitted on 0 images (probs of shape {scores.shape})")
    return scores, truth_csr, _truth_sizes(truth_csr, truth_outside)


def multilabel_tags(tags: Tags) -> Tags:
    """scikit-learn tags shared by both decision rules: X is an (n_images, n_concepts) probability
    matrix, dense or sparse, NaN meaning "no score"; y is a label matrix of the same shape.

    Parameters
    ----------
    tags : sklearn.utils.Tags
        `BaseEstimator.__sklearn_tags__()`, changed in place.

    Returns
    -------
    sklearn.utils.Tags
    """
    tags.input_tags.sparse = True
    tags.input_tags.allow_nan = True
    tags.target_tags.required = True
    tags.target_tags.multi_output = True
    tags.target_tags.single_output = False
    return tags


def _entry_labels(scores: sp.csr_matrix, truth: sp.csr_matrix) -> np.ndarray:
    return gather(truth, row_of_entries(scores), scores.indices) > 0


def _between(upper: float, lower: float) -> float:
    """A threshold between two sorted probabilities: robust to small shifts on unseen images."""
    return (float(upper) + float(lower)) / 2.0


def tune_global_threshold(
    probs: sp.spmatrix | np.ndarray,
    truth: sp.spmatrix | np.ndarray,
    truth_outside: np.ndarray | None = None,
    n_grid: int = 256,
) -> tuple[float, float]:
    """(threshold, score): the single threshold for all concepts that maximises the official F1.

    Candidate thresholds are quantiles of the stored probabilities; each image's predicted and hit
    counts at every candidate come from one bincount and a reversed cumulative sum.

    Parameters
    ----------
    probs : numpy.ndarray or scipy.sparse matrix of shape (n_images, n_concepts), float
        Probabilities; absent entries and NaN are never predicted.
    truth : numpy.ndarray or scipy.sparse matrix of shape (n_images, n_concepts), bool or 0/1
        True labels over the same concepts.
    truth_outside : numpy.ndarray of shape (n_images,), int, optional
        True concepts per image outside the columns (out of vocabulary): they count as missed.
    n_grid : int, default=256
        Number of quantiles of the probabilities tried as thresholds.

    Returns
    -------
    threshold : float
        Predict an entry when its probability is >= threshold; 0.5 when nothing can be scored.
    score : float
        Mean per-image F1 at that threshold over images with at least one true concept.
    """
    scores = as_score_csr(probs)
    truth_csr = as_bool_csr(truth)
    sizes = _truth_sizes(truth_csr, truth_outside)
    scored = sizes > 0
    if scores.nnz == 0 or not scored.any():
        return 0.5, 0.0
    grid = np.unique(np.quantile(scores.data.astype(np.float64), np.linspace(0.0, 1.0, n_grid)))
    rows = row_of_entries(scores)
    labels = _entry_labels(scores, truth_csr)
    # An entry is predicted at grid[t] iff grid[t] <= p, i.e. t < bin.
    bins = np.searchsorted(grid, scores.data.astype(np.float64), side="right")
    width = grid.size + 1
    n = scores.shape[0]
    predicted = np.bincount(rows * width + bins, minlength=n * width).reshape(n, width)
    hits = np.bincount(rows * width + bins, weights=labels, minlength=n * width).reshape(n, width)
    predicted = np.cumsum(predicted[:, ::-1], axis=1)[:, ::-1][:, 1:]
    hits = np.cumsum(hits[:, ::-1], axis=1)[:, ::-1][:, 1:]
    f1 = 2.0 * hits[scored] / (predicted[scored] + sizes[scored, None])
    mean = f1.mean(axis=0)
    best = int(np.argmax(mean))
    return float(grid[best]), float(mean[best])


def concept_gain_curve(
    base_hits: np.ndarray, base_predicted: np.ndarray, truth_sizes: np.ndarray, labels: np.ndarray
) -> np.ndarray:
    """Change in the SUM of per-image F1 when a concept is predicted for the first m of its images.

    Inputs are aligned with the concept's entries sorted by descending probability; base_* are
    each image's counts without this concept. Images with empty truth are not scored and add 0.

    Parameters
    ----------
    base_hits : numpy.ndarray of shape (n_entries,), float
        Correct predictions of each entry's image, not counting this concept.
    base_predicted : numpy.ndarray of shape (n_entries,), float
        Predicted concepts of each entry's image, not counting this concept.
    truth_sizes : numpy.ndarray of shape (n_entries,), float
        True concepts of each entry's image (|G|, out-of-vocabulary ones included).
    labels : numpy.ndarray of shape (n_entries,), bool
        Whether the concept is true for each entry's image.

    Returns
    -------
    numpy.ndarray of shape (n_entries,), float64
        Element m-1: the F1 sum's change when the concept is predicted for the first m entries.
    """
    hit = labels.astype(np.float64)
    scored = truth_sizes > 0
    denominator = np.where(scored, base_predicted + truth_sizes, 1.0)
    delta = 2.0 * (base_hits + hit) / (denominator + 1.0) - 2.0 * base_hits / denominator
    return np.cumsum(np.where(scored, delta, 0.0))


class ConceptThresholdTuner(BaseEstimator):
    """Per-concept thresholds maximising the mean per-image F1, then a per-image label-count rule.

    `get_params`, `set_params` and `sklearn.base.clone` come from scikit-learn's `BaseEstimator`;
    `X` is a probability matrix and `y` a label matrix of the same shape (multi-label), so the
    scikit-learn checks that fit on a 1-D class vector cannot apply
    (tests/test_ensemble_estimator_checks.py says which run).

    Parameters
    ----------
    prior_strength : float, default=10.0
        Pseudo-positives pulling a concept's threshold toward the global one: a concept with n
        positives keeps the weight n / (n + prior_strength) on its own tuned threshold. 0 disables.
    min_labels : int, default=1
        Fewest labels per image in `predict` (topped up with its best-scored candidates).
    max_labels : int, default=100
        Most labels per image in `predict` (the best-scored ones are kept).
    sweeps : int, default=3
        Most passes of coordinate ascent over the concepts.
    tolerance : float, default=1e-6
        Stop once a sweep improves the training objective by less than this.

    Attributes
    ----------
    global_threshold_ : float
        The best single threshold for all concepts (`tune_global_threshold`).
    thresholds_ : numpy.ndarray of shape (n_concepts,), float64
        Each concept's threshold; concepts without candidates keep the global one.
    n_positives_ : numpy.ndarray of shape (n_concepts,), int64
        True labels per concept in the fitting data.
    sweep_scores_ : list of float
        Training objective (mean F1, no label-count rule) before the first and after each sweep.
    """

    def __init__(
        self,
        prior_strength: float = 10.0,
        min_labels: int = 1,
        max_labels: int = 100,
        sweeps: int = 3,
        tolerance: float = 1e-6,
    ) -> None:
        self.prior_strength = prior_strength
        self.min_labels = min_labels
        self.max_labels = max_labels
        self.sweeps = sweeps
        self.tolerance = tolerance

    @classmethod
    def from_config(cls, config: EnsembleConfig) -> "ConceptThresholdTuner":
        """A tuner with the run's `threshold_prior_strength`, `min_labels` and `max_labels`."""
        return cls(config.threshold_prior_strength, config.min_labels, config.max_labels)

    def __sklearn_tags__(self) -> Tags:
        return multilabel_tags(super().__sklearn_tags__())

    def fit(
        self,
        probs: sp.spmatrix | np.ndarray,
        truth: sp.spmatrix | np.ndarray,
        truth_outside: np.ndarray | None = None,
    ) -> "ConceptThresholdTuner":
        """Tune every concept's threshold on these images.

        Parameters
        ----------
        probs : numpy.ndarray or scipy.sparse matrix of shape (n_images, n_concepts), float
            Stacked (ideally out-of-fold) probabilities; absent entries and NaN are never predicted.
        truth : numpy.ndarray or scipy.sparse matrix of shape (n_images, n_concepts), bool or 0/1
            True labels.
        truth_outside : numpy.ndarray of shape (n_images,), int, optional
            True concepts per image outside the vocabulary: they lower F1 however we decide.

        Returns
        -------
        self : ConceptThresholdTuner
        """
        scores, truth_csr, sizes = checked_fit_inputs(self, probs, truth, truth_outside)
        n, v = scores.shape
        n_scored = max(int((sizes > 0).sum()), 1)
        self.global_threshold_, _ = tune_global_threshold(scores, truth_csr, truth_outside)
        self.n_positives_ = np.bincount(truth_csr.indices, minlength=v).astype(np.int64)
        thresholds = np.full(v, self.global_threshold_, dtype=np.float64)

        # Entries sorted by concept, then by descending probability: one slice per concept.
        entry_rows = row_of_entries(scores)
        entry_labels = _entry_labels(scores, truth_csr)
        order = np.lexsort((-scores.data.astype(np.float64), scores.indices))
        rows = entry_rows[order]
        p = scores.data[order].astype(np.float64)
        labels = entry_labels[order]
        starts = np.searchsorted(scores.indices[order], np.arange(v + 1))
        # Last position of each run of equal probabilities: cuts can only fall there.
        cut_allowed = np.ones(p.size, dtype=bool)
        cut_allowed[:-1] = p[:-1] != p[1:]
        # A concept's last entry is always a cut, even when the next concept starts with the same value.
        cut_allowed[starts[1:][np.diff(starts) > 0] - 1] = True

        decided = p >= thresholds[scores.indices[order]]
        hits = np.bincount(rows, weights=decided & labels, minlength=n)
        predicted = np.bincount(rows, weights=decided, minlength=n).astype(np.float64)
        weight = self.n_positives_ / (self.n_positives_ + self.prior_strength) if self.prior_strength > 0 else None
        objective = [self._objective(hits, predicted, sizes, n_scored)]
        concepts = np.flatnonzero(np.diff(starts) > 0)
        for _ in range(self.sweeps):
            for j in concepts:
                s, e = starts[j], starts[j + 1]
                ids, pj, yj, dj = rows[s:e], p[s:e], labels[s:e], decided[s:e]
                base_hits = hits[ids] - (dj & yj)
                base_predicted = predicted[ids] - dj
                gains = concept_gain_curve(base_hits, base_predicted, sizes[ids], yj)
                allowed = np.flatnonzero(cut_allowed[s:e])
                best = allowed[np.argmax(gains[allowed])]
                if gains[best] > 0:
                    lower = pj[best + 1] if best + 1 < pj.size else 0.0
                    best_threshold = _between(pj[best], lower)
                else:
                    best_threshold = _between(pj[0], 1.0) if pj[0] < 1.0 else np.nextafter(1.0, 2.0)
                if weight is not None:
                    best_threshold = weight[j] * best_threshold + (1.0 - weight[j]) * self.global_threshold_
                thresholds[j] = best_threshold
                now = pj >= best_threshold
                decided[s:e] = now
                hits[ids] = base_hits + (now & yj)
                predicted[ids] = base_predicted + now
            objective.append(self._objective(hits, predicted, sizes, n_scored))
            if objective[-1] - objective[-2] < self.tolerance:
                break
        self.thresholds_ = thresholds
        self.sweep_scores_ = objective  # training objective (no label-count rule) after each sweep
        return self

    @staticmethod
    def _objective(hits: np.ndarray, predicted: np.ndarray, sizes: np.ndarray, n_scored: int) -> float:
        scored = sizes > 0
        return float((2.0 * hits[scored] / (predicted[scored] + sizes[scored])).sum() / n_scored)

    def decide(self, probs: sp.spmatrix | np.ndarray) -> sp.csr_matrix:
        """Bool CSR of entries at or above their concept's threshold, before the label-count rule.

        Parameters
        ----------
        probs : numpy.ndarray or scipy.sparse matrix of shape (n_images, n_concepts), float

        Returns
        -------
        scipy.sparse.csr_matrix of shape (n_images, n_concepts), bool
        """
        check_is_fitted(self)
        scores = as_score_csr(probs)
        passed = scores.data >= self.thresholds_[scores.indices]
        decided = sp.csr_matrix((passed, scores.indices, scores.indptr), shape=scores.shape, dtype=bool)
        decided.eliminate_zeros()  # stored False entries would count as predictions in row lengths
        return decided

    def predict(self, probs: sp.spmatrix | np.ndarray) -> sp.csr_matrix:
        """Thresholded labels with at least `min_labels` (best scores) and at most `max_labels` per image.

        Parameters
        ----------
        probs : numpy.ndarray or scipy.sparse matrix of shape (n_images, n_concepts), float
            Same concept columns as in `fit`.

        Returns
        -------
        scipy.sparse.csr_matrix of shape (n_images, n_concepts), bool
            The chosen labels; an image with fewer than `min_labels` scored candidates keeps them all.

        Raises
        ------
        sklearn.exceptions.NotFittedError
            Before `fit` (or `load`).
        ValueError
            If `probs` has a different number of concepts than the thresholds.
        """
        check_is_fitted(self)
        scores = as_score_csr(probs)
        if scores.shape[1] != self.thresholds_.size:
            raise ValueError(f"probs have {scores.shape[1]} concepts, thresholds {self.thresholds_.size}")
        passed = scores.data >= self.thresholds_[scores.indices]
        return limit_labels_per_row(scores, passed, self.min_labels, self.max_labels)

    def save(self, path: str | Path) -> Path:
        """JSON (a .json path, or DIR/thresholds.json); floats are written exactly. Returns the file written."""
        check_is_fitted(self)
        learned = {
            "global_threshold": self.global_threshold_,
            "thresholds": self.thresholds_.tolist(),
            "n_positives": self.n_positives_.tolist(),
            "sweep_scores": self.sweep_scores_,
        }
        return save_rule(path, THRESHOLDS_FILE, "concept_thresholds", self.get_params(), learned)

    @classmethod
    def load(cls, path: str | Path) -> "ConceptThresholdTuner":
        """The fitted tuner saved by `save` at `path` (a .json file, or a folder holding thresholds.json)."""
        payload = read_rule(path, THRESHOLDS_FILE)
        tuner = cls(**payload["params"])
        tuner.global_threshold_ = float(payload["global_threshold"])
        tuner.thresholds_ = np.asarray(payload["thresholds"], dtype=np.float64)
        tuner.n_positives_ = np.asarray(payload["n_positives"], dtype=np.int64)
        tuner.sweep_scores_ = list(payload["sweep_scores"])
        return tuner
