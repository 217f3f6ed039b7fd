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
