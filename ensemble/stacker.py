"""The stacking layer: one LightGBM binary model over all (image, candidate concept) pairs.

One model shared by every concept (rather than one per concept) is what scales to ~3,000 CUIs,
most of which have too few positives to fit anything of their own; concept identity enters only
through frequency features, so rare concepts borrow strength from common ones. Saved as
LightGBM text plus a JSON of settings: readable, diffable, and never unpickled.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, NamedTuple

import lightgbm as lgb
import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator

from conceptclef.core.config import EnsembleConfig
from conceptclef.core.runfiles import atomic_write_json, atomic_write_text, read_json
from conceptclef.ensemble.features import PairTable, build_pair_table
from conceptclef.ensemble.folds import fold_splits, image_folds
from conceptclef.ensemble.inputs import StackingInputs
from conceptclef.ensemble.sparse_ops import as_bool_csr, gather

MODEL_FILE = "stacker.txt"


def default_threads() -> int:
    """All cores up to 8: LightGBM gains little beyond that on ~30 features."""
    return max(1, min(os.cpu_count() or 1, 8))


def _paths(path: str | Path) -> tuple[Path, Path]:
    """(model text, settings JSON): a directory gets stacker.txt/stacker.json inside it."""
    path = Path(path)
    model = path if path.suffix == ".txt" else path / MODEL_FILE
    return model, model.with_suffix(".json")


def pair_labels(table: PairTable, truth: sp.spmatrix | np.ndarray) -> np.ndarray:
    """1 where the candidate concept is among the image's true concepts."""
    return gather(as_bool_csr(truth), table.candidates.rows, table.candidates.cols).astype(np.float32)


class ConceptStacker(BaseEstimator):
    """LightGBM over candidate pairs; `predict_proba` gives a CSR of stacked probabilities.

    A scikit-learn estimator: `get_params`, `set_params` and `sklearn.base.clone` come from
    `BaseEstimator`, read off `__init__`.
    """

    def __init__(
        self,
        candidates_per_model: int = 30,
        num_leaves: int = 31,
        n_estimators: int = 300,
        learning_rate: float = 0.05,
        min_child_samples: int = 20,
        seed: int = 0,
        num_threads: int | None = None,
    ) -> None:
        self.candidates_per_model = candidates_per_model
        self.num_leaves = num_leaves
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.min_child_samples = min_child_samples
        self.seed = seed
        self.num_threads = num_threads

    @classmethod
    def from_config(cls, config: EnsembleConfig, seed: int = 0, num_threads: int | None = None) -> "ConceptStacker":
        return cls(
            candidates_per_model=config.candidates_per_model,
            num_leaves=config.num_leaves,
            n_estimators=config.n_estimators,
            learning_rate=config.learning_rate,
            min_child_samples=config.min_child_samples,
            seed=seed,
            num_threads=num_threads,
        )

    def _lightgbm_params(self) -> dict[str, Any]:
        return {
            "objective": "binary",
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "min_data_in_leaf": self.min_child_samples,
            "seed": self.seed,
            "deterministic": True,
            "force_row_wise": True,  # with deterministic=True, gives identical models run to run
            "num_threads": self.num_threads or default_threads(),
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
        and with `patience`, stop once that many rounds have passed without a lower loss."""
        dataset = lgb.Dataset(
            table.features,
            label=labels,
            feature_name=_lightgbm_names(table.feature_names),
            categorical_feature=[table.feature_names.index("concept_id")],
            free_raw_data=True,
        )
        params = self._lightgbm_params()
        evaluation: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        if eval_table is not None:
            held_out = dataset.create_valid(eval_table.features, label=eval_labels)
            params = {**params, "metric": "binary_logloss"}
            callbacks = [lgb.record_evaluation(evaluation)]
            if patience:
                callbacks.append(lgb.early_stopping(patience, first_metric_only=True, verbose=False))
            extra = {"valid_sets": [held_out], "valid_names": ["held_out"], "callbacks": callbacks, "keep_training_booster": True}
        self.booster_ = lgb.train(params, dataset, num_boost_round=self.n_estimators, **extra)
        if eval_table is not None:
            self.eval_loss_ = np.asarray(evaluation["held_out"]["binary_logloss"], dtype=np.float64)
            # Every tree, not just those up to this fold's own best round (the rounds chosen over all
            # folds may be more), in a prediction-only booster that lets the training data go.
            self.booster_ = lgb.Booster(model_str=self.booster_.model_to_string(num_iteration=-1))
        self.feature_names_ = list(table.feature_names)
        self.categories_ = list(categories)
        self.n_train_pairs_ = int(labels.size)
        self.n_train_positive_pairs_ = int(labels.sum())
        return self

    def predict_table(self, table: PairTable, rounds: int | None = None) -> np.ndarray:
        """Probability of every pair, from the first `rounds` trees (all of them by default)."""
        if table.feature_names != self.feature_names_:
            raise ValueError("the inputs' feature columns differ from the ones the stacker was fitted on")
        if table.features.shape[0] == 0:
            return np.zeros(0, dtype=np.float32)
        threads = self.num_threads or default_threads()
        probs = self.booster_.predict(table.features, num_iteration=rounds, num_threads=threads)
        return np.asarray(probs, dtype=np.float32)  # an ndarray: the stub's list is for sparse pred_contrib

    # -- on StackingInputs --

    def fit(self, inputs: StackingInputs, truth: sp.spmatrix | np.ndarray) -> "ConceptStacker":
        table = build_pair_table(inputs, self.candidates_per_model)
        return self.fit_table(table, pair_labels(table, truth), inputs.categories)

    def predict_proba(self, inputs: StackingInputs) -> sp.csr_matrix:
        """(n, V) CSR: stacked probability on each candidate pair, nothing elsewhere."""
        if list(inputs.categories) != self.categories_:
            raise ValueError(f"inputs have categories {inputs.categories}, the stacker was fitted on {self.categories_}")
        table = build_pair_table(inputs, self.candidates_per_model)
        return table_to_csr(table, self.predict_table(table))

    # -- persistence: text model + JSON settings, no pickle --

    def save(self, path: str | Path) -> Path:
        """Write the model text (a .txt path, or DIR/stacker.txt) and its settings JSON beside it."""
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
        model_path, settings_path = _paths(path)
        settings = read_json(settings_path)
        stacker = cls(**settings["params"])
        stacker.booster_ = lgb.Booster(model_str=model_path.read_text(encoding="utf-8"))
        stacker.feature_names_ = list(settings["feature_names"])
        stacker.categories_ = list(settings["categories"])
        stacker.n_train_pairs_ = int(settings["n_train_pairs"])
        stacker.n_train_positive_pairs_ = int(settings["n_train_positive_pairs"])
        return stacker


def _lightgbm_names(names: list[str]) -> list[str]:
    """LightGBM refuses some characters in feature names; keep ours readable but legal."""
    return [name.replace(":", "__").replace(" ", "_") for name in names]


def table_to_csr(table: PairTable, probabilities: np.ndarray) -> sp.csr_matrix:
    """Scatter per-pair probabilities back to an (n, V) CSR (pairs are sorted by image, concept)."""
    matrix = sp.csr_matrix(
        (probabilities.astype(np.float32), (table.candidates.rows, table.candidates.cols)),
        shape=table.candidates.shape,
    )
    matrix.sort_indices()
    return matrix


class CrossFit(NamedTuple):
    """Out-of-fold stacked probabilities for every image, and the stacker fitted on all images."""

    oof_probs: sp.csr_matrix
    stacker: ConceptStacker
    rounds: int  # boosting rounds of every model (chosen on the held-out folds with choose_rounds)


def cross_fit_out_of_fold(
    inputs: StackingInputs,
    truth: sp.spmatrix | np.ndarray,
    config: EnsembleConfig,
    seed: int = 0,
    num_threads: int | None = None,
) -> CrossFit:
    """K-fold over images: each image's stacked probabilities come from a model that never saw its
    labels, so thresholds tuned on them are tuned on honest numbers. The pair table is built once."""
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
    """
    fold_models, held_out_rows, weighted_losses = [], [], []
    for fit_on, held_out in fold_splits(np.asarray(image_fold)[table.candidates.rows]):
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
    if config.choose_rounds:
        common = min(loss.size for loss in weighted_losses)
        rounds = int(np.argmin(np.sum([loss[:common] for loss in weighted_losses], axis=0))) + 1
    else:
        rounds = config.n_estimators
    oof = np.zeros(labels.size, dtype=np.float32)
    for stacker, held_out in zip(fold_models, held_out_rows):
        oof[held_out] = stacker.predict_table(table.take(held_out), rounds)
    final = ConceptStacker.from_config(dataclasses.replace(config, n_estimators=rounds), seed, num_threads)
    return oof, final.fit_table(table, labels, categories), rounds
