"""Turning stacked probabilities into label sets: expected-F1 decoding, and choosing the rule.

Per-concept thresholds need many positives per concept to be reliable; expected-F1 decoding
needs only calibrated probabilities and picks, per image, how many of its top concepts to keep.
Which works better depends on the data, so `choose_decision_rule` compares them by
cross-validation over images and the run records the choice in decision.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator

from conceptclef.core.config import EnsembleConfig
from conceptclef.core.runfiles import atomic_write_json, read_json
from conceptclef.ensemble.rule_files import read_rule, save_rule
from conceptclef.ensemble.sparse_ops import as_bool_csr, as_score_csr, row_of_entries
from conceptclef.ensemble.folds import fold_splits, image_folds
from conceptclef.ensemble.thresholds import ConceptThresholdTuner, checked_fit_inputs, multilabel_tags
from conceptclef.scoring.f1 import mean_sample_f1_sparse

if TYPE_CHECKING:  # scikit-learn >= 1.6; older releases never call __sklearn_tags__
    from sklearn.utils import Tags

EXPECTED_F1_FILE = "expected_f1.json"
DECISION_FILE = "decision.json"


class Decider(Protocol):
    """What both decision rules offer, so the pipeline can hold either."""

    def fit(self, probs: Any, truth: Any, truth_outside: np.ndarray | None = None) -> "Decider": ...

    def predict(self, probs: Any) -> sp.csr_matrix: ...

    def save(self, path: str | Path) -> Path: ...


class DeciderClass(Protocol):
    """A decision rule's class: built from the config, or loaded from its file."""

    def from_config(self, config: EnsembleConfig) -> Decider: ...

    def load(self, path: str | Path) -> Decider: ...


class ExpectedF1Decoder(BaseEstimator):
    """Per image, keep the top-k concepts maximising E[F1(k)] ≈ 2 Σ_{i≤k} p_i / (k + Σ_i p_i + m).

    `m` (`expected_missing_`) is the mean number of true concepts per image that the probabilities
    do not account for (out of vocabulary, or not among the candidates), learned in `fit`; it is 0
    when the decoder is used unfitted. Decoding needs nothing else, so the scikit-learn tag
    `requires_fit` is False: `predict` before `fit` is the m = 0 rule, not an error.

    Parameters
    ----------
    min_labels : int, default=1
        Fewest labels per image (an image with fewer scored candidates keeps them all).
    max_labels : int, default=100
        Most labels per image.

    Attributes
    ----------
    expected_missing_ : float
        m above, >= 0: mean over images with true concepts of (true concepts - probability mass).
    """

    def __init__(self, min_labels: int = 1, max_labels: int = 100) -> None:
        self.min_labels = min_labels
        self.max_labels = max_labels

    @classmethod
    def from_config(cls, config: EnsembleConfig) -> "ExpectedF1Decoder":
        """A decoder with the run's `min_labels` and `max_labels`."""
        return cls(config.min_labels, config.max_labels)

    def __sklearn_tags__(self) -> Tags:
        tags = multilabel_tags(super().__sklearn_tags__())
        tags.requires_fit = False
        return tags

    def fit(
        self,
        probs: sp.spmatrix | np.ndarray,
        truth: sp.spmatrix | np.ndarray,
        truth_outside: np.ndarray | None = None,
    ) -> "ExpectedF1Decoder":
        """Learn `expected_missing_` from these images.

        Parameters
        ----------
        probs : numpy.ndarray or scipy.sparse matrix of shape (n_images, n_concepts), float
            Stacked probabilities; absent entries and NaN count as 0.
        truth : numpy.ndarray or scipy.sparse matrix of shape (n_images, n_concepts), bool or 0/1
            True labels.
        truth_outside : numpy.ndarray of shape (n_images,), int, optional
            True concepts per image outside the vocabulary.

        Returns
        -------
        self : ExpectedF1Decoder
        """
        scores, _, sizes = checked_fit_inputs(self, probs, truth, truth_outside)
        mass = np.asarray(scores.sum(axis=1)).ravel()
        scored = sizes > 0
        missing = float(np.mean(sizes[scored] - mass[scored])) if scored.any() else 0.0
        self.expected_missing_ = max(missing, 0.0)
        return self

    def expected_f1(self, probs: sp.spmatrix | np.ndarray) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
        """(scores, k per entry, E[F1] of cutting after that entry), entries sorted per row descending.

        Parameters
        ----------
        probs : numpy.ndarray or scipy.sparse matrix of shape (n_images, n_concepts), float

        Returns
        -------
        ordered : scipy.sparse.csr_matrix of shape (n_images, n_concepts), float64
            The probabilities, each row's entries stored by descending probability.
        k : numpy.ndarray of shape (ordered.nnz,), int64
            1-based position of each stored entry in its row.
        gain : numpy.ndarray of shape (ordered.nnz,), float64
            E[F1] of keeping the row's top k entries.
        """
        scores = as_score_csr(probs)
        rows = row_of_entries(scores)
        order = np.lexsort((-scores.data.astype(np.float64), rows))
        sorted_rows = rows[order]
        p = scores.data[order].astype(np.float64)
        starts = scores.indptr[:-1]
        k = np.arange(p.size) - starts[sorted_rows] + 1
        running = np.cumsum(p)
        before_row = np.concatenate(([0.0], running))[starts][sorted_rows]
        top_mass = running - before_row
        total = np.asarray(scores.sum(axis=1), dtype=np.float64).ravel()[sorted_rows]
        missing = getattr(self, "expected_missing_", 0.0)
        gain = 2.0 * top_mass / (k + total + missing)
        ordered = sp.csr_matrix((p, scores.indices[order], scores.indptr), shape=scores.shape)
        return ordered, k, gain

    def predict(self, probs: sp.spmatrix | np.ndarray) -> sp.csr_matrix:
        """Each image's top-k concepts, k maximising E[F1] within [min_labels, max_labels].

        Parameters
        ----------
        probs : numpy.ndarray or scipy.sparse matrix of shape (n_images, n_concepts), float

        Returns
        -------
        scipy.sparse.csr_matrix of shape (n_images, n_concepts), bool
            Sorted indices; on equal E[F1] the smaller k wins.
        """
        ordered, k, gain = self.expected_f1(probs)
        rows = row_of_entries(ordered)
        allowed = (k >= self.min_labels) & (k <= self.max_labels)
        gain = np.where(allowed, gain, -np.inf)
        # First entry per row after sorting by (row, -gain, k) is the best cut, smallest k on ties.
        best = np.lexsort((k, -gain, rows))
        first = best[np.r_[True, rows[best][1:] != rows[best][:-1]]] if best.size else best
        best_k = np.zeros(ordered.shape[0], dtype=np.int64)
        best_k[rows[first]] = k[first]
        # Rows with fewer entries than min_labels keep everything they have.
        n_entries = np.diff(ordered.indptr)
        best_k = np.where(n_entries < self.min_labels, n_entries, best_k)
        chosen = k <= best_k[rows]
        result = sp.csr_matrix((chosen, ordered.indices, ordered.indptr), shape=ordered.shape, dtype=bool)
        result.eliminate_zeros()
        result.sort_indices()
        return result

    def save(self, path: str | Path) -> Path:
        """JSON (a .json path, or DIR/expected_f1.json); an unfitted decoder saves m = 0. Returns the file written."""
        learned = {"expected_missing": getattr(self, "expected_missing_", 0.0)}
        return save_rule(path, EXPECTED_F1_FILE, "expected_f1", self.get_params(), learned)

    @classmethod
    def load(cls, path: str | Path) -> "ExpectedF1Decoder":
        """The decoder saved by `save` at `path` (a .json file, or a folder holding expected_f1.json)."""
        payload = read_rule(path, EXPECTED_F1_FILE)
        decoder = cls(**payload["params"])
        decoder.expected_missing_ = float(payload["expected_missing"])
        return decoder


DECISION_RULES: dict[str, DeciderClass] = {"thresholds": ConceptThresholdTuner, "expected_f1": ExpectedF1Decoder}
_RULE_FILES = {"thresholds": "thresholds.json", "expected_f1": EXPECTED_F1_FILE}


def make_decider(name: str, config: EnsembleConfig) -> Decider:
    """A fresh decision rule by name, with its settings from the config.

    Parameters
    ----------
    name : str
        A key of `DECISION_RULES`: "thresholds" or "expected_f1".
    config : EnsembleConfig

    Returns
    -------
    ConceptThresholdTuner or ExpectedF1Decoder
        Unfitted.

    Raises
    ------
    ValueError
        For an unknown name (the message lists the known ones).
    """
    if name not in DECISION_RULES:
        raise ValueError(f"unknown decision rule {name!r}; known: {', '.join(DECISION_RULES)}")
    return DECISION_RULES[name].from_config(config)


def cross_validated_score(
    name: str,
    probs: sp.csr_matrix,
    truth: sp.csr_matrix,
    truth_outside: np.ndarray | None,
    config: EnsembleConfig,
    folds: np.ndarray,
) -> float:
    """Mean over folds of the official F1 on the held-out images of a rule fitted on the others.

    Parameters
    ----------
    name : str
        The decision rule (`make_decider`).
    probs : scipy.sparse.csr_matrix of shape (n_images, n_concepts), float32
        Out-of-fold stacked probabilities.
    truth : scipy.sparse.csr_matrix of shape (n_images, n_concepts), bool
    truth_outside : numpy.ndarray of shape (n_images,), int, or None
        True concepts per image outside the vocabulary.
    config : EnsembleConfig
    folds : numpy.ndarray of shape (n_images,), int
        Fold number per image (`folds.image_folds`).

    Returns
    -------
    float
        Mean over folds of `mean_sample_f1_sparse` on the held-out images.
    """
    scores = []
    for train, held in fold_splits(folds):
        outside_train = None if truth_outside is None else np.asarray(truth_outside)[train]
        outside_held = None if truth_outside is None else np.asarray(truth_outside)[held]
        decider = make_decider(name, config).fit(probs[train], truth[train], outside_train)
        scores.append(mean_sample_f1_sparse(decider.predict(probs[held]), truth[held], outside_held))
    return float(np.mean(scores))


def choose_decision_rule(
    probs: sp.spmatrix | np.ndarray,
    truth: sp.spmatrix | np.ndarray,
    truth_outside: np.ndarray | None,
    config: EnsembleConfig,
    seed: int = 0,
) -> tuple[str, Decider, dict[str, float]]:
    """(rule name, rule fitted on all images, cross-validated score per rule compared).

    With `config.decision_rule` set to a rule, that rule is fitted without comparison and the
    scores dict is empty. On a tie the thresholds win.

    Parameters
    ----------
    probs : numpy.ndarray or scipy.sparse matrix of shape (n_images, n_concepts), float
        Out-of-fold stacked probabilities.
    truth : numpy.ndarray or scipy.sparse matrix of shape (n_images, n_concepts), bool or 0/1
    truth_outside : numpy.ndarray of shape (n_images,), int, or None
    config : EnsembleConfig
        `decision_rule` ("auto" compares), `folds` and the rules' settings.
    seed : int, default=0
        Seeds the folds.

    Returns
    -------
    name : str
    decider : ConceptThresholdTuner or ExpectedF1Decoder
        Fitted on all images.
    scores : dict of str to float
        Cross-validated F1 per rule compared; empty when the rule was forced.
    """
    scores_csr = as_score_csr(probs)
    truth_csr = as_bool_csr(truth)
    if config.decision_rule != "auto":
        name: str = config.decision_rule
        return name, make_decider(name, config).fit(scores_csr, truth_csr, truth_outside), {}
    folds = image_folds(scores_csr.shape[0], config.folds, seed)
    scores = {
        name: cross_validated_score(name, scores_csr, truth_csr, truth_outside, config, folds)
        for name in DECISION_RULES
    }
    name = max(scores, key=lambda rule: (scores[rule], rule == "thresholds"))
    return name, make_decider(name, config).fit(scores_csr, truth_csr, truth_outside), scores


def save_decision(directory: str | Path, name: str, decider: Decider, scores: dict[str, float]) -> Path:
    """Write the fitted rule's own file and decision.json naming it, so `load_decision` needs only the folder.

    Parameters
    ----------
    directory : str or pathlib.Path
        The run's ensemble folder.
    name : str
        The rule's name in `DECISION_RULES`.
    decider : ConceptThresholdTuner or ExpectedF1Decoder
        The fitted rule.
    scores : dict of str to float
        Cross-validated scores recorded beside the choice.

    Returns
    -------
    pathlib.Path
        DIR/decision.json.
    """
    directory = Path(directory)
    rule_path = decider.save(directory / _RULE_FILES[name])
    atomic_write_json(
        directory / DECISION_FILE, {"rule": name, "file": rule_path.name, "cross_validated_scores": scores}
    )
    return directory / DECISION_FILE


def load_decision(directory: str | Path) -> tuple[str, Decider]:
    """The rule recorded in DIR/decision.json, loaded from its file.

    Parameters
    ----------
    directory : str or pathlib.Path
        A folder written by `save_decision`.

    Returns
    -------
    name : str
    decider : ConceptThresholdTuner or ExpectedF1Decoder
        Fitted, as saved.

    Raises
    ------
    ValueError
        If decision.json names an unknown rule.
    """
    directory = Path(directory)
    record = read_json(directory / DECISION_FILE)
    name = record["rule"]
    if name not in DECISION_RULES:
        raise ValueError(f"{directory / DECISION_FILE}: unknown decision rule {name!r}")
    return name, DECISION_RULES[name].load(directory / record["file"])
