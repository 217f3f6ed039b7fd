"""Trivial predictors every trained model must beat, scored like the models themselves.

A concept model that cannot beat "give every image the k most frequent training concepts" has
learned nothing from the pixels (on ImageCLEF the modality and "patients" concepts alone give a
non-trivial F1); a router that cannot beat "always the most frequent category" routes nothing.
Both are pure functions of label arrays, so train-all records them beside each model's score.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from conceptclef.scoring.f1 import mean_sample_f1_sparse


def most_frequent_predictions(frequency: np.ndarray, n_images: int, k: int) -> sp.csr_matrix:
    """(n_images, V) boolean CSR giving every image the k most frequent concepts.

    Ties in frequency are broken by column order, so the result is deterministic.
    """
    frequency = np.asarray(frequency).ravel()
    k = max(0, min(int(k), frequency.size))
    top = np.lexsort((np.arange(frequency.size), -frequency))[:k]
    return sp.csr_matrix(
        (np.ones(n_images * k, dtype=bool), np.tile(np.sort(top), n_images), np.arange(n_images + 1) * k),
        shape=(n_images, frequency.size),
    )


def best_most_frequent_k(
    frequency: np.ndarray,
    truth: sp.spmatrix | np.ndarray,
    truth_outside: np.ndarray | None = None,
    max_k: int = 20,
) -> tuple[float, int]:
    """(best official F1 on `truth`, its k) of giving every image the k most frequent concepts."""
    truth = sp.csr_matrix(truth, dtype=bool)
    frequency = np.asarray(frequency).ravel()
    if frequency.size != truth.shape[1]:
        raise ValueError(f"{frequency.size} concept frequencies, but the labels have {truth.shape[1]} columns")
    best_score, best_k = 0.0, 1
    for k in range(1, min(max_k, frequency.size) + 1):
        score = mean_sample_f1_sparse(most_frequent_predictions(frequency, truth.shape[0], k), truth, truth_outside)
        if score > best_score:
            best_score, best_k = score, k
    return best_score, best_k


def most_frequent_concepts_f1(
    train_labels: sp.spmatrix | np.ndarray,
    valid_labels: sp.spmatrix | np.ndarray,
    max_k: int = 20,
) -> tuple[float, int]:
    """(best official F1, its k) of predicting the k most frequent training concepts for every image.

    k is chosen on the scored labels themselves, so the baseline is as strong as it can be.
    """
    train = sp.csr_matrix(train_labels, dtype=bool)
    valid = sp.csr_matrix(valid_labels, dtype=bool)
    if train.shape[1] != valid.shape[1]:
        raise ValueError(f"train labels have {train.shape[1]} columns, validation labels {valid.shape[1]}")
    return best_most_frequent_k(np.asarray(train.sum(axis=0)).ravel(), valid, max_k=max_k)


def majority_class_accuracy(train_classes: np.ndarray, valid_classes: np.ndarray) -> float:
    """Validation accuracy of always answering the most frequent training class (chance for a router)."""
    train_classes, valid_classes = np.asarray(train_classes), np.asarray(valid_classes)
    if valid_classes.size == 0:
        return 0.0
    values, counts = np.unique(train_classes, return_counts=True)
    return float(np.mean(valid_classes == values[np.argmax(counts)]))
