"""The modality signal where the score is decided: stacker features and a consistency rule.

The secondary score (2025/2026) is decided on the modality CUIs and the X-ray regions, and an
image has one modality (unless it is a combined one). The router knows each image's modality
better than any concept model's per-CUI sigmoid, so for a candidate that is a modality CUI the
stacker gets the router's probability that the image is of that modality alone, that it names
it (alone, or within the combined category) and its rank among the modalities.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import scipy.sparse as sp

MODALITY_FEATURES = ["modality_alone_prob", "modality_named_prob", "modality_rank"]


def modality_columns(cuis: Sequence[str], category_of_cui: Mapping[str, str], categories: Sequence[str]) -> np.ndarray:
    """For each of `cuis` that is a modality CUI of one of `categories`, that category's position.

    Parameters
    ----------
    cuis : sequence of str, length n_concepts
        The global vocabulary's concepts, in column order.
    category_of_cui : mapping of str to str
        Modality CUI -> its category (`data.modalities.ModalityMapping.category_of_cui`).
    categories : sequence of str
        The router's categories, in column order.

    Returns
    -------
    numpy.ndarray of shape (n_concepts,), int32
        The category position, -1 for a concept that is no modality CUI of these categories.
    """
    position = {category: index for index, category in enumerate(categories)}
    return np.array([position.get(category_of_cui.get(cui, ""), -1) for cui in cuis], dtype=np.int32)


def modality_features(router_probs: np.ndarray, modality_category: np.ndarray, several_position: int,
                      rows: np.ndarray, cols: np.ndarray) -> list[np.ndarray]:
    """The three `MODALITY_FEATURES` columns for pairs (rows[i], cols[i]); NaN where the concept is no modality CUI.

    Parameters
    ----------
    router_probs : numpy.ndarray of shape (n_images, n_categories), float
    modality_category : numpy.ndarray of shape (n_concepts,), int
    several_position : int
        The combined category's column of `router_probs`, -1: none.
    rows, cols : numpy.ndarray of shape (P,), int

    Returns
    -------
    list of numpy.ndarray of shape (P,), float32
        Probability of the concept's modality alone, of its being named (alone + combined), and
        its rank (1 = most probable) among the single-modality categories.
    """
    probs = np.asarray(router_probs, dtype=np.float32)
    category = np.asarray(modality_category)[cols]
    is_modality = category >= 0
    safe = np.where(is_modality, category, 0)
    alone = np.where(is_modality, probs[rows, safe], np.nan).astype(np.float32)
    combined = probs[rows, several_position] if several_position >= 0 else np.zeros(len(rows), dtype=np.float32)
    named = np.where(is_modality, np.minimum(alone + combined, 1.0), np.nan).astype(np.float32)
    singles = np.array([index for index in range(probs.shape[1]) if index != several_position], dtype=np.int64)
    higher = (probs[rows][:, singles] > alone[:, None]).sum(axis=1) if len(rows) else np.zeros(0)
    rank = np.where(is_modality, 1.0 + higher, np.nan).astype(np.float32)
    return [alone, named, rank]


def modality_count_errors(decisions: sp.spmatrix, truth: sp.spmatrix, modality_category: np.ndarray) -> dict[str, int]:
    """How often a label set names no modality, or two, where the truth names exactly one.

    Parameters
    ----------
    decisions, truth : scipy.sparse matrix of shape (n_images, n_concepts)
        0/1 label sets over the same columns.
    modality_category : numpy.ndarray of shape (n_concepts,), int
        `modality_columns`: the category of each modality CUI, -1 for the others.

    Returns
    -------
    dict of str to int
        ``truth_one`` images whose truth names one modality; of those, ``predicted_none`` with no
        modality decided, ``predicted_several`` with two or more, ``predicted_other`` with one but another.
    """
    predicted, true = _modalities_named(decisions, modality_category), _modalities_named(truth, modality_category)
    one = [index for index, named in enumerate(true) if len(named) == 1]
    return {
        "truth_one": len(one),
        "predicted_none": sum(not predicted[index] for index in one),
        "predicted_several": sum(len(predicted[index]) > 1 for index in one),
        "predicted_other": sum(len(predicted[index]) == 1 and predicted[index] != true[index] for index in one),
    }


def _modalities_named(matrix: sp.spmatrix, modality_category: np.ndarray) -> list[set[int]]:
    matrix = sp.csr_matrix(matrix)
    named = []
    for row in range(matrix.shape[0]):
        columns = matrix.indices[matrix.indptr[row] : matrix.indptr[row + 1]][matrix.data[matrix.indptr[row] : matrix.indptr[row + 1]] != 0]
        named.append({int(category) for category in modality_category[columns] if category >= 0})
    return named


def one_modality(
    decisions: sp.spmatrix, probs: sp.spmatrix, router_probs: np.ndarray, modality_category: np.ndarray, several_position: int = -1
) -> sp.csr_matrix:
    """The consistency rule: an image has one modality, unless the router calls it combined.

    Where the router's most probable category is not the combined one, a label set naming several
    modalities keeps only its most probable modality CUI (by `probs`), and one naming none gets
    the router's category's most probable CUI when the router gives that category at least 0.5.

    Parameters
    ----------
    decisions : scipy.sparse matrix of shape (n_images, n_concepts), bool
    probs : scipy.sparse matrix of shape (n_images, n_concepts), float
        The stacked probabilities the decisions came from (absent = 0).
    router_probs : numpy.ndarray of shape (n_images, n_categories), float
    modality_category : numpy.ndarray of shape (n_concepts,), int
    several_position : int, default=-1
        The combined category's column of `router_probs`, -1: none.

    Returns
    -------
    scipy.sparse.csr_matrix of shape (n_images, n_concepts), bool
    """
    result = sp.lil_matrix(sp.csr_matrix(decisions, dtype=bool))
    probs = sp.csr_matrix(probs)
    router = np.asarray(router_probs, dtype=np.float32)
    top = np.argmax(router, axis=1) if router.shape[1] else np.zeros(len(router), dtype=np.int64)
    columns_of = {int(category): np.flatnonzero(modality_category == category) for category in np.unique(modality_category) if category >= 0}
    decided = sp.csr_matrix(decisions, dtype=bool)
    for row in range(decided.shape[0]):
        if router.shape[1] == 0 or top[row] == several_position:
            continue
        chosen = decided.indices[decided.indptr[row] : decided.indptr[row + 1]]
        modality = [int(column) for column in chosen if modality_category[column] >= 0]
        row_probs = probs[row].toarray().ravel()
        if len(modality) > 1:
            keep = max(modality, key=lambda column: row_probs[column])
            for column in modality:
                if column != keep:
                    result[row, column] = False
        elif not modality and router[row, top[row]] >= 0.5 and int(top[row]) in columns_of:
            candidates = columns_of[int(top[row])]
            result[row, int(candidates[np.argmax(row_probs[candidates])])] = True
    consistent = sp.csr_matrix(result.tocsr(), dtype=bool)
    consistent.eliminate_zeros()
    return consistent


def modality_rule_gain(
    without: sp.spmatrix, with_rule: sp.spmatrix, truth: sp.spmatrix, truth_outside: np.ndarray
) -> tuple[float, float]:
    """Paired mean gain in per-image F1 of the rule's label sets over the plain ones, and its standard error.

    Parameters
    ----------
    without, with_rule : scipy.sparse matrix of shape (n_images, n_concepts), bool
        Out-of-fold label sets without and with `one_modality`.
    truth : scipy.sparse matrix of shape (n_images, n_concepts)
    truth_outside : numpy.ndarray of shape (n_images,), int

    Returns
    -------
    gain, standard_error : float
    """
    from conceptclef.scoring.f1 import per_image_f1_sparse

    difference = per_image_f1_sparse(with_rule, truth, truth_outside) - per_image_f1_sparse(without, truth, truth_outside)
    difference = difference[np.isfinite(difference)]
    if len(difference) < 2:
        return 0.0, 0.0
    return float(difference.mean()), float(difference.std(ddof=1) / np.sqrt(len(difference)))
