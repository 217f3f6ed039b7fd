"""Cross-validation folds over images: scikit-learn's KFold, shared by every cross-fitted step.

The stacker's cross-fit, the comparison of decision rules and the ablation's cross-fitted rows
all split the same validation images; drawing the folds in one place from the config seed gives
them the same split and makes a run repeatable. When the rows are (image, concept) pairs, each
pair follows its image (a group k-fold with the images as groups): a pair held out while another
pair of its image is fitted on would leak that image's labels into its own prediction. The pairs
take their image's fold number, rather than a GroupKFold of their own, so the stacker and the
decision rule see the same split of the images.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from sklearn.model_selection import KFold, PredefinedSplit


def image_folds(n_images: int, n_folds: int, seed: int) -> np.ndarray:
    """A fold number per image from a shuffled `KFold` seeded with `seed`: folds differ in size by at most 1.

    Parameters
    ----------
    n_images : int
    n_folds : int
        At least 2 and at most `n_images`.
    seed : int
        Any integer (taken modulo 2**32 for KFold).

    Returns
    -------
    numpy.ndarray of shape (n_images,), int64
        Values in [0, n_folds).

    Raises
    ------
    ValueError
        For fewer than 2 folds or more folds than images.
    """
    if n_folds < 2:
        raise ValueError(f"cross-fitting needs at least 2 folds, got {n_folds}")
    if n_images < n_folds:
        raise ValueError(f"{n_images} images cannot be split into {n_folds} folds")
    folds = np.empty(n_images, dtype=np.int64)
    splitter = KFold(n_splits=n_folds, shuffle=True, random_state=seed % 2**32)
    for fold, (_, held_out) in enumerate(splitter.split(np.empty((n_images, 0)))):
        folds[held_out] = fold
    return folds


def fold_splits(fold_of_row: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(rows to fit on, held-out rows) per fold, in fold order, each sorted; rows of one fold number stay together.

    For pairs, pass `image_folds(...)[pair_image_rows]`.

    Parameters
    ----------
    fold_of_row : numpy.ndarray of shape (n_rows,), int
        Fold number per row.

    Returns
    -------
    iterator of (numpy.ndarray, numpy.ndarray)
        Row indices (int) to fit on and to hold out, one pair per fold.
    """
    return PredefinedSplit(np.asarray(fold_of_row)).split()


def fold_count(fold_of_row: np.ndarray) -> int:
    """How many folds `fold_splits(fold_of_row)` yields, without making their index arrays.

    Parameters
    ----------
    fold_of_row : numpy.ndarray of shape (n_rows,), int
        Fold number per row.

    Returns
    -------
    int
    """
    return int(PredefinedSplit(np.asarray(fold_of_row)).get_n_splits())
