"""The stacking layer: one LightGBM binary model over all (image, candidate concept) pairs.

One model shared by every concept (rather than one per concept) is what scales to ~3,000 CUIs,
most of which have too few positives to fit anything of their own; concept identity enters only
through frequency features, so rare concepts borrow strength from common ones. Saved as
LightGBM text plus a JSON of settings: readable, diffable, and never unpickled.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import lightgbm as lgb
import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from conceptclef.core.config import EnsembleConfig
from conceptclef.core.runfiles import atomic_write_json, atomic_write_text, read_json
from conceptclef.ensemble.features import PairTable, build_pair_table
from conceptclef.ensemble.folds import fold_count, fold_splits, image_folds
from conceptclef.ensemble.inputs import StackingInputs
from conceptclef.ensemble.sparse_ops import as_bool_csr, gather

log = logging.getLogger("conceptclef")

if TYPE_CHECKING:  # scikit-learn >= 1.6; older releases never call __sklearn_tags__
    from sklearn.utils import Tags

MODEL_FILE = "stacker.txt"


SMALL_TABLE_PAIRS = 50_000  # below this, one LightGBM thread is faster than several


def default_threads(n_pairs: int | None = None) -> int:
    """All cores up to 8 (LightGBM gains little beyond that on ~30 features); one for a small table.

    On a small table (a few thousand pairs, the demo's validation split) a boosting round takes
    about a millisecond, so OpenMP's per-round thread synchronisation dominates: on a loaded
    2-core machine two threads made each round 16x slower than one (27 ms against 1.7 ms on
    1,895 pairs), which turned a seconds-long cross-fit into minutes.

    Parameters
    ----------
    n_pairs : int, optional
        Rows of the pair table to fit or score; None for a large table.

    Returns
    -------
    int
    """
    if n_pairs is not None and n_pairs < SMALL_TABLE_PAIRS:
        return 1
    return max(1, min(os.cpu_count() or 1, 8))


def _paths(path: str | Path) -> tuple[Path, Path]:
    """(model text, settings JSON): a directory gets stacker.txt/stacker.json inside it."""
    path = Path(path)
    model = path if path.suffix == ".txt" else path / MODEL_FILE
    return model, model.with_suffix(".json")


def pair_labels(table: PairTable, truth: sp.spmatrix | np.ndarray) -> np.ndarray:
    """1 where the candidate concept is among the image's true concepts.

    Parameters
    ----------
    table : PairTable
        Candidate pairs of an (n_images, n_concepts) set, P pairs.
    truth : numpy.ndarray or scipy.sparse matrix of shape (n_images, n_concepts), bool or 0/1

    Returns
    -------
    numpy.ndarray of shape (P,), float32
        0.0 or 1.0 per pair, in the table's pair order.
    """
    if tuple(np.shape(truth)) != tuple(table.candidates.shape):
        # Pairs are looked up by flat (row, column) keys: another shape would read the wrong labels.
        raise ValueError(f"truth has shape {np.shape(truth)}, the inputs are {tuple(table.candidates.shape)} (images, concepts)")
    return gather(as_bool_csr(truth), table.candidates.rows, table.candidates.cols).astype(np.float32)


class ConceptStacker(BaseEstimator):
    """LightGBM over candidate pairs; `predict_proba` gives a CSR of stacked probabilities.

    A scikit-learn estimator: `get_params`, `set_params` and `sklearn.base.clone` come from
    `BaseEstimator`, read off `__init__`. Its X is a `StackingInputs` (several aligned matrices),
    not an array, so its scikit-learn tags say so (`two_d_array=False`) and the array-based
    estimator checks do not apply; tests/test_ensemble_estimator_checks.py checks the same
    properties by hand.

    Parameters
    ----------
    candidates_per_model : int, default=30
        Top-k concepts per image taken from each source (global, routed, kNN, extra globals).
    num_leaves : int, default=31
        LightGBM `num_leaves`.
    n_estimators : int, default=300
        Boosting rounds.
    learning_rate : float, default=0.05
        LightGBM `learning_rate`.
    min_child_samples : int, default=20
        LightGBM `min_data_in_leaf`.
    seed : int, default=0
        LightGBM `seed`; with `deterministic` and row-wise histograms, equal seeds give equal models.
        Also seeds the choice of negative pairs on a large table.
    negative_fraction : float, default=0.25
        On a table of at least `subsample_from_pairs` pairs, the share of negative pairs fitted on
        (`negative_subsample`); every positive pair is kept.
    subsample_from_pairs : int, default=250_000
        Smaller tables (the demo's, a few thousand pairs) are fitted on every pair.
    num_threads : int, optional
        LightGBM threads; None means `default_threads()`. Does not change the fitted model.

    Attributes
    ----------
    booster_ : lightgbm.Booster
        The fitted model (prediction only).
    feature_names_ : list of str
        Feature columns fitted on (`features.feature_names_for`); prediction refuses others.
    categories_ : list of str
        The router's categories fitted on.
    n_train_pairs_ : int
        Candidate pairs fitted on (before `negative_subsample`).
    n_train_positive_pairs_ : int
        Of which true.
    eval_loss_ : numpy.ndarray of shape (n_rounds_run,), float64
        Held-out log-loss after each round; only set by `fit_table` with `eval_table`.
    eval_probs_ : numpy.ndarray of shape (P_eval,), float64
        Held-out probabilities after the last round run, kept from training (same condition).
    """

    def __init__(
        self,
        candidates_per_model: int = 30,
        num_leaves: int = 31,
        n_estimators: int = 300,
        learning_rate: float = 0.05,
        min_child_samples: int = 20,
        seed: int = 0,
        negative_fraction: float = 0.25,
        subsample_from_pairs: int = 250_000,
        num_threads: int | None = None,
    ) -> None:
        self.candidates_per_model = candidates_per_model
        self.num_leaves = num_leaves
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.min_child_samples = min_child_samples
        self.seed = seed
        self.negative_fraction = negative_fraction
        self.subsample_from_pairs = subsample_from_pairs
        self.num_threads = num_threads

    @classmethod
    def from_config(cls, config: EnsembleConfig, seed: int = 0, num_threads: int | None = None) -> "ConceptStacker":
        """A stacker with the run's `[ensemble]` settings."""
        return cls(
            candidates_per_model=config.candidates_per_model,
            num_leaves=config.num_leaves,
            n_estimators=config.n_estimators,
            learning_rate=config.learning_rate,
            min_child_samples=config.min_child_samples,
            seed=seed,
            negative_fraction=config.negative_fraction,
            subsample_from_pairs=config.subsample_from_pairs,
            num_threads=num_threads,
        )

    def __sklearn_tags__(self) -> Tags:
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False  # X is a StackingInputs, not an array
        tags.input_tags.allow_nan = True  # NaN in a category model's columns: "cannot say"
        tags.target_tags.required = True
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = False
        return tags

    def _lightgbm_params(self, n_pairs: int | None = None) -> dict[str, Any]:
        return {
            "objective": "binary",
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "min_data_in_leaf": self.min_child_samples,
            "seed": self.seed,
            "deterministic": True,
            "force_row_wise": True,  # with deterministic=True, gives identical models run to run
            "num_threads": self.num_threads or default_threads(n_pairs),
            "verbosity": -1,
        }

    # -- on a prebuilt pair table (cross-fitting builds the table once and splits it) --

    def fit_table(
        self,
        table: PairTable,
        labels: np.ndarray,
        categories: list[str],
        eval_table: PairTable | None = None,
        eval_labels: np.ndarray | None = None,
        patience: int | None = None,
    ) -> "ConceptStacker":
        """Fit on a pair table; with `eval_table`, also record its log-loss after every round (`eval_loss_`),
        and with `patience`, stop once that many rounds have passed without a lower loss.

        Parameters
        ----------
        table : PairTable
            P candidate pairs and their (P, n_features) float32 features.
        labels : numpy.ndarray of shape (P,), float32
            1.0 for a true pair (`pair_labels`).
        categories : list of str
            The router's categories the table was built with.
        eval_table : PairTable, optional
            Held-out pairs to score after every round.
        eval_labels : numpy.ndarray of shape (P_eval,), float32, optional
            Their labels; required with `eval_table`.
        patience : int, optional
            Early-stopping rounds on the held-out loss; None or 0 runs every round.

        Returns
        -------
        self : ConceptStacker
        """
        rows, weights = negative_subsample(labels, self.negative_fraction, self.subsample_from_pairs, self.seed)
        dataset = lgb.Dataset(
            table.features if rows is None else table.features[rows],
            label=labels if rows is None else labels[rows],
            weight=weights,
            feature_name=_lightgbm_names(table.feature_names),
            categorical_feature=[table.feature_names.index("concept_id")],
            free_raw_data=True,
        )
        params = self._lightgbm_params(int(labels.size))
        evaluation: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        kept: list[np.ndarray] = []
        if eval_table is not None:
            held_out = dataset.create_valid(eval_table.features, label=eval_labels)
            params = {**params, "metric": "binary_logloss"}
            callbacks = [lgb.record_evaluation(evaluation)]
            if patience:
                callbacks.append(lgb.early_stopping(patience, first_metric_only=True, verbose=False))
            extra = {
                "valid_sets": [held_out], "valid_names": ["held_out"], "callbacks": callbacks,
                "keep_training_booster": True, "feval": _keeper(kept),
            }
        self.booster_ = lgb.train(params, dataset, num_boost_round=self.n_estimators, **extra)
        if eval_table is not None:
            self.eval_loss_ = np.asarray(evaluation["held_out"]["binary_logloss"], dtype=np.float64)
            self.eval_probs_ = np.array(kept[-1], dtype=np.float64)  # a copy: LightGBM reuses the buffer
            # Every tree, not just those up to this fold's own best round (the rounds chosen over all
            # folds may be more), in a prediction-only booster that lets the training data go.
            self.booster_ = lgb.Booster(model_str=self.booster_.model_to_string(num_iteration=-1))
        self.feature_names_ = list(table.feature_names)
        self.categories_ = list(categories)
        self.n_train_pairs_ = int(labels.size)
        self.n_train_positive_pairs_ = int(labels.sum())
        return self

    def held_out_probabilities(self, eval_table: PairTable, rounds: int) -> np.ndarray:
        """`predict_table(eval_table, rounds)` for the table held out in `fit_table`, from the kept scores.

        Cross-fitting needs every fold's held-out probabilities at the rounds chosen over all
        folds; re-running every tree over the held-out pairs cost as much as a tenth of the
        cross-fit at 2026 scale. The scores after the last round are kept from training, so only
        the trees after `rounds` are run and taken off in log-odds; a probability too close to 1
        for its log-odds to be exact is predicted whole.

        Parameters
        ----------
        eval_table : PairTable
            The `eval_table` this stacker was fitted with.
        rounds : int
            At most the rounds run.

        Returns
        -------
        numpy.ndarray of shape (P_eval,), float32
        """
        check_is_fitted(self, "eval_probs_")
        ran = self.booster_.current_iteration()
        if not 1 <= rounds <= ran or len(eval_table.features) != self.eval_probs_.size:
            raise ValueError(f"held-out probabilities exist for {self.eval_probs_.size} pairs after {ran} rounds, "
                             f"asked for {len(eval_table.features)} pairs after {rounds}")
        if rounds == ran:
            return self.eval_probs_.astype(np.float32)
        threads = self.num_threads or default_threads(len(eval_table.features))
        tail = self.booster_.predict(
            eval_table.features, start_iteration=rounds, num_iteration=ran - rounds, raw_score=True, num_threads=threads
        )
        kept = self.eval_probs_
        with np.errstate(divide="ignore"):
            log_odds = np.log(kept) - np.log1p(-kept) - tail
        probs = 1.0 / (1.0 + np.exp(-log_odds))
        inexact = np.flatnonzero(kept > 1.0 - 1e-9)
        if inexact.size:
            probs[inexact] = self.booster_.predict(eval_table.features[inexact], num_iteration=rounds, num_threads=threads)
        return probs.astype(np.float32)

    def predict_table(self, table: PairTable, rounds: int | None = None) -> np.ndarray:
        """Probability of every pair, from the first `rounds` trees (all of them by default).

        Parameters
        ----------
        table : PairTable
            P candidate pairs with the feature columns fitted on.
        rounds : int, optional
            Trees to use; None uses all.

        Returns
        -------
        numpy.ndarray of shape (P,), float32
        """
        check_is_fitted(self)
        if table.feature_names != self.feature_names_:
            raise ValueError("the inputs' feature columns differ from the ones the stacker was fitted on")
        if table.features.shape[0] == 0:
            return np.zeros(0, dtype=np.float32)
        threads = self.num_threads or default_threads(len(table.features))
        probs = self.booster_.predict(table.features, num_iteration=rounds, num_threads=threads)
        return np.asarray(probs, dtype=np.float32)  # an ndarray: the stub's list is for sparse pred_contrib

    # -- on StackingInputs --

    def fit(self, inputs: StackingInputs, truth: sp.spmatrix | np.ndarray) -> "ConceptStacker":
        """Fit on every candidate pair of these images.

        Parameters
        ----------
        inputs : StackingInputs
            Signals for n_images images over n_concepts global concepts.
        truth : numpy.ndarray or scipy.sparse matrix of shape (n_images, n_concepts), bool or 0/1
            True labels over the global vocabulary.

        Returns
        -------
        self : ConceptStacker
        """
        if truth is None:
            raise ValueError(f"{type(self).__name__} requires y to be passed, but the target y is None")
        table = build_pair_table(inputs, self.candidates_per_model)
        return self.fit_table(table, pair_labels(table, truth), inputs.categories)

    def predict_proba(self, inputs: StackingInputs) -> sp.csr_matrix:
        """(n, V) CSR: stacked probability on each candidate pair, nothing elsewhere.

        Parameters
        ----------
        inputs : StackingInputs
            Signals for n_images images, with the categories and extra models fitted on.

        Returns
        -------
        scipy.sparse.csr_matrix of shape (n_images, n_concepts), float32
            Sorted indices; a non-candidate pair is absent (read as 0).

        Raises
        ------
        sklearn.exceptions.NotFittedError
            Before `fit` (or `load`).
        ValueError
            If the inputs' categories or feature columns differ from those fitted on.
        """
        check_is_fitted(self)
        if list(inputs.categories) != self.categories_:
            raise ValueError(f"inputs have categories {inputs.categories}, the stacker was fitted on {self.categories_}")
        table = build_pair_table(inputs, self.candidates_per_model)
        return table_to_csr(table, self.predict_table(table))

    # -- persistence: text model + JSON settings, no pickle --

    def save(self, path: str | Path) -> Path:
        """Write the model text (a .txt path, or DIR/stacker.txt) and its settings JSON beside it.
        Returns the model text's path."""
        check_is_fitted(self)
        model_path, settings_path = _paths(path)
        atomic_write_text(model_path, self.booster_.model_to_string())
        atomic_write_json(
            settings_path,
            {
                "params": self.get_params(),
                "feature_names": self.feature_names_,
                "categories": self.categories_,
                "n_train_pairs": self.n_train_pairs_,
                "n_train_positive_pairs": self.n_train_positive_pairs_,
            },
        )
        return model_path

    @classmethod
    def load(cls, path: str | Path) -> "ConceptStacker":
        """The fitted stacker saved by `save` at `path` (the .txt file, or its folder)."""
        model_path, settings_path = _paths(path)
        settings = read_json(settings_path)
        stacker = cls(**settings["params"])
        stacker.booster_ = lgb.Booster(model_str=model_path.read_text(encoding="utf-8"))
        stacker.feature_names_ = list(settings["feature_names"])
        stacker.categories_ = list(settings["categories"])
        stacker.n_train_pairs_ = int(settings["n_train_pairs"])
        stacker.n_train_positive_pairs_ = int(settings["n_train_positive_pairs"])
        return stacker


def _keeper(kept: list[np.ndarray]) -> Any:
    """A LightGBM `feval` that keeps the held-out predictions it is shown (its metric is a constant 0)."""

    def keep(predictions: np.ndarray, _data: lgb.Dataset) -> tuple[str, float, bool]:
        kept[:] = [predictions]
        return "kept", 0.0, False

    return keep


def negative_subsample(
    labels: np.ndarray, fraction: float, from_pairs: int, seed: int
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(rows to fit on, their weights): every positive pair and a seeded `fraction` of the negative
    ones, each negative weighted 1 / `fraction`, or (None, None) to fit on every pair unweighted.

    Boosting time grows with the pairs, and at 2026 scale (~1.2 million pairs, 3% positive) most
    negatives are easy; weighting the kept ones keeps the loss, and so the probabilities the
    thresholds read, unbiased in expectation. On the synthetic 2026-size benchmark a quarter of
    the negatives cut the cross-fit's time about 2.5x for a held-out official F1 within 0.001.

    Parameters
    ----------
    labels : numpy.ndarray of shape (P,), float32
        1.0 for a true pair.
    fraction : float
        Share of negative pairs kept, in (0, 1]; 1 keeps every pair.
    from_pairs : int
        Tables with fewer pairs are kept whole.
    seed : int

    Returns
    -------
    rows : numpy.ndarray of shape (P_kept,), int64, or None
    weights : numpy.ndarray of shape (P_kept,), float32, or None
    """
    if fraction >= 1.0 or labels.size < from_pairs:
        return None, None
    positive = labels > 0
    rows = np.flatnonzero(positive | (np.random.default_rng(seed).random(labels.size) < fraction))
    weights = np.where(positive[rows], 1.0, 1.0 / fraction).astype(np.float32)
    return rows, weights


def _lightgbm_names(names: list[str]) -> list[str]:
    """LightGBM refuses some characters in feature names; keep ours readable but legal."""
    return [name.replace(":", "__").replace(" ", "_") for name in names]


def table_to_csr(table: PairTable, probabilities: np.ndarray) -> sp.csr_matrix:
    """Scatter per-pair probabilities back to an (n, V) CSR (pairs are sorted by image, concept).

    Parameters
    ----------
    table : PairTable
        P candidate pairs of an (n_images, n_concepts) set.
    probabilities : numpy.ndarray of shape (P,), float

    Returns
    -------
    scipy.sparse.csr_matrix of shape (n_images, n_concepts), float32
    """
    matrix = sp.csr_matrix(
        (probabilities.astype(np.float32), (table.candidates.rows, table.candidates.cols)),
        shape=table.candidates.shape,
    )
    matrix.sort_indices()
    return matrix


class CrossFit(NamedTuple):
    """Out-of-fold stacked probabilities for every image, and the stacker fitted on all images.

    Parameters
    ----------
    oof_probs : scipy.sparse.csr_matrix of shape (n_images, n_concepts), float32
    stacker : ConceptStacker
        Fitted on every image with `rounds` rounds.
    rounds : int
        Boosting rounds of every model (chosen on the held-out folds with `choose_rounds`).
    """

    oof_probs: sp.csr_matrix
    stacker: ConceptStacker
    rounds: int


def cross_fit_out_of_fold(
    inputs: StackingInputs,
    truth: sp.spmatrix | np.ndarray,
    config: EnsembleConfig,
    seed: int = 0,
    num_threads: int | None = None,
) -> CrossFit:
    """K-fold over images: each image's stacked probabilities come from a model that never saw its
    labels, so thresholds tuned on them are tuned on honest numbers. The pair table is built once.

    Parameters
    ----------
    inputs : StackingInputs
        Signals for n_images images over n_concepts concepts.
    truth : numpy.ndarray or scipy.sparse matrix of shape (n_images, n_concepts), bool or 0/1
    config : EnsembleConfig
        Stacker settings, `folds`, `choose_rounds` and `rounds_patience`.
    seed : int, default=0
        Seeds the folds and LightGBM.
    num_threads : int, optional
        LightGBM threads.

    Returns
    -------
    CrossFit
        `oof_probs` (scipy.sparse.csr_matrix of shape (n_images, n_concepts), float32), the
        stacker fitted on all images, and the boosting rounds used.
    """
    table = build_pair_table(inputs, config.candidates_per_model)
    labels = pair_labels(table, truth)
    folds = image_folds(inputs.n_images, config.folds, seed)
    oof, final, rounds = cross_fit_table(table, labels, folds, inputs.categories, config, seed, num_threads)
    return CrossFit(table_to_csr(table, oof), final, rounds)


def cross_fit_table(
    table: PairTable,
    labels: np.ndarray,
    image_fold: np.ndarray,
    categories: list[str],
    config: EnsembleConfig,
    seed: int = 0,
    num_threads: int | None = None,
) -> tuple[np.ndarray, ConceptStacker, int]:
    """(out-of-fold probability per pair, stacker fitted on every pair, boosting rounds) on a built table.

    `image_fold[i]` is image i's fold (`ensemble.folds.image_folds`); every pair follows its image.
    With `config.choose_rounds`, the folds also pick how many boosting rounds to keep: the count
    with the lowest held-out log-loss summed over folds (at most `n_estimators`). The stacker
    learns from the validation split only, so the right amount of boosting depends on its size:
    a few hundred images want far fewer trees than 16,000.
    A fold stops `rounds_patience` rounds after its own best, so a generous `n_estimators` costs
    little; the sum is taken over the rounds every fold ran.

    Parameters
    ----------
    table : PairTable
        P candidate pairs with their features.
    labels : numpy.ndarray of shape (P,), float32
    image_fold : numpy.ndarray of shape (n_images,), int
        Fold number per image.
    categories : list of str
    config : EnsembleConfig
    seed : int, default=0
    num_threads : int, optional

    Returns
    -------
    oof : numpy.ndarray of shape (P,), float32
        Each pair's probability from the model that did not see its image.
    stacker : ConceptStacker
        Fitted on every pair with `rounds` rounds.
    rounds : int
    """
    fold_models, held_out_rows, weighted_losses = [], [], []
    fold_of_pair = np.asarray(image_fold)[table.candidates.rows]
    n_folds = fold_count(fold_of_pair)  # for the log: the folds' index arrays are made one at a time
    for fold, (fit_on, held_out) in enumerate(fold_splits(fold_of_pair), start=1):
        started = time.perf_counter()
        stacker = ConceptStacker.from_config(config, seed, num_threads)
        if config.choose_rounds:
            held_table, held_labels = table.take(held_out), labels[held_out]
            stacker.fit_table(
                table.take(fit_on), labels[fit_on], categories, held_table, held_labels, patience=config.rounds_patience
            )
            weighted_losses.append(stacker.eval_loss_ * held_labels.size)
        else:
            stacker.fit_table(table.take(fit_on), labels[fit_on], categories)
        fold_models.append(stacker)
        held_out_rows.append(held_out)
        log.info(
            "ensemble: fold %d/%d: %d boosting rounds on %d pairs, %.1fs",
            fold, n_folds, stacker.booster_.current_iteration(), fit_on.size, time.perf_counter() - started,
        )
    if config.choose_rounds:
        common = min(loss.size for loss in weighted_losses)
        rounds = int(np.argmin(np.sum([loss[:common] for loss in weighted_losses], axis=0))) + 1
    else:
        rounds = config.n_estimators
    oof = np.zeros(labels.size, dtype=np.float32)
    for stacker, held_out in zip(fold_models, held_out_rows):
        held_table = table.take(held_out)
        oof[held_out] = stacker.held_out_probabilities(held_table, rounds) if config.choose_rounds else stacker.predict_table(held_table, rounds)
    final = ConceptStacker.from_config(dataclasses.replace(config, n_estimators=rounds), seed, num_threads)
    log.info("ensemble: fitting the stacker on all %d pairs with %d rounds", labels.size, rounds)
    return oof, final.fit_table(table, labels, categories), rounds
