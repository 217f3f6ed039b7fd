"""Folds over the development images (train + valid) for cross-fitted networks.

`[development] scheme = "cross_fit"` trains every network kind once per fold. The folds are
stratified by category (folder categories, or those derived from the modality CUIs of flat data),
so each fold's router and category models see every category in the same proportion, and they
are seeded, so a run (and its resume) draws the same folds. Early stopping needs images the fold
network does not learn from and that are not its held-out fold (those must stay unseen for the
stacker): a `stopping_fraction` of each category's images in the fold's training part is held
out for it, drawn with a seed of its own per fold.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedKFold

__all__ = ["FoldRows", "development_folds", "fold_rows", "fold_seed"]


def fold_seed(configured: int, run_seed: int) -> int:
    """`development.fold_seed`, or the run's seed when it is -1."""
    return run_seed if configured < 0 else configured


def development_folds(categories: list[str], n_folds: int, seed: int) -> np.ndarray:
    """A fold number in [0, n_folds) per development image, stratified by `categories`.

    A category with fewer images than folds is spread over as many folds as it has images
    (StratifiedKFold's own rule); every fold gets at least one image of the whole set.

    Raises
    ------
    ValueError
        For fewer than 2 folds or fewer images than folds.
    """
    n_images = len(categories)
    if n_folds < 2:
        raise ValueError(f"cross-fitted networks need at least 2 folds, got {n_folds}")
    if n_images < n_folds:
        raise ValueError(f"{n_images} development images cannot be split into {n_folds} folds")
    labels = np.array([str(category) for category in categories])
    folds = np.empty(n_images, dtype=np.int64)
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed % 2**32)
    with warnings.catch_warnings():  # "the least populated class has only N members": handled as documented above
        warnings.simplefilter("ignore", UserWarning)
        for fold, (_, held_out) in enumerate(splitter.split(np.empty((n_images, 0)), labels)):
            folds[held_out] = fold
    return folds


@dataclass(frozen=True)
class FoldRows:
    """Rows of the development set for one fold's networks."""

    fold: int
    fit: np.ndarray  # the networks learn from these
    stopping: np.ndarray  # early stopping and the learning-rate schedule watch these
    held_out: np.ndarray  # never seen by the fold's networks: their out-of-fold predictions

    @property
    def training(self) -> np.ndarray:
        """fit + stopping: the fold's training part (the global model's kNN index)."""
        return np.sort(np.concatenate([self.fit, self.stopping]))


def fold_rows(categories: list[str], fold_of_row: np.ndarray, fold: int, stopping_fraction: float, seed: int) -> FoldRows:
    """Split fold `fold`'s training part into fit and stopping rows, per category.

    Each category with at least 2 training images gives round(fraction x n) of them, at least 1
    and at most n - 1, to the stopping rows; a category of one image only fits.
    """
    labels = np.array([str(category) for category in categories])
    held_out = np.flatnonzero(fold_of_row == fold)
    training = np.flatnonzero(fold_of_row != fold)
    rng = np.random.default_rng([seed % 2**32, fold])
    stopping: list[np.ndarray] = []
    for category in np.unique(labels[training]):
        members = training[labels[training] == category]
        if len(members) < 2:
            continue
        count = min(max(1, int(round(stopping_fraction * len(members)))), len(members) - 1)
        stopping.append(rng.choice(members, size=count, replace=False))
    stop = np.sort(np.concatenate(stopping)) if stopping else np.empty(0, dtype=np.int64)
    fit = np.setdiff1d(training, stop)
    return FoldRows(fold, fit.astype(np.int64), stop.astype(np.int64), held_out.astype(np.int64))
