"""The 2025/2026 secondary score: the official F1 restricted to 15 manually checked concepts.

The organisers score it over image modality (the six DR* modalities and OCT) and the X-ray body
regions, because those concepts are curated by hand and so measure the part of the labels that
is reliable. Both the prediction and the truth are filtered to the list; images whose filtered
truth is empty are left out (`scoring.f1.sample_f1` with a subset).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import scipy.sparse as sp

from conceptclef.scoring.f1 import ConceptSets, F1Report, per_image_f1_sparse, sample_f1

MODALITY_CUIS = (
    "C0002978",  # angiogram
    "C0040405",  # X-ray computed tomography
    "C0024485",  # magnetic resonance imaging
    "C0032743",  # positron-emission tomography
    "C0041618",  # ultrasonography
    "C1306645",  # plain x-ray
    "C0920367",  # optical coherence tomography (2025/2026)
)
XRAY_REGION_CUIS = ("C1140618", "C0037949", "C0030797", "C0023216", "C0037303", "C0817096", "C0006141", "C0000726")
SECONDARY_CUIS: tuple[str, ...] = MODALITY_CUIS + XRAY_REGION_CUIS


def secondary_f1(
    predicted: ConceptSets,
    truth: ConceptSets,
    concepts: Iterable[str] = SECONDARY_CUIS,
    categories: Mapping[str, str] | None = None,
) -> F1Report:
    """The secondary score of dict predictions (image id -> CUIs); `concepts` overrides the list."""
    return sample_f1(predicted, truth, subset=list(concepts), categories=categories)


def per_image_subset_f1_sparse(
    predicted: sp.spmatrix | np.ndarray,
    truth: sp.spmatrix | np.ndarray,
    cuis: Sequence[str],
    concepts: Iterable[str] = SECONDARY_CUIS,
    truth_outside: np.ndarray | None = None,
) -> np.ndarray:
    """Per-image F1 of 0/1 matrices (columns `cuis`) over the columns in `concepts`; NaN = skipped.

    `truth_outside[i]` counts image i's true concepts of the list that are not columns: no model
    can predict them, so they count as misses, as in `per_image_f1_sparse`.
    """
    keep = {concept.upper() for concept in concepts}
    columns = [index for index, cui in enumerate(cuis) if cui.upper() in keep]
    predicted = sp.csr_matrix(predicted)[:, columns]
    truth = sp.csr_matrix(truth)[:, columns]
    return per_image_f1_sparse(predicted, truth, truth_outside)


def outside_counts(concept_lists: Iterable[Iterable[str]], cuis: Iterable[str], concepts: Iterable[str] = SECONDARY_CUIS) -> np.ndarray:
    """Per image, how many of its true concepts of the list are not among `cuis` (the columns)."""
    keep = {concept.upper() for concept in concepts} - {cui.upper() for cui in cuis}
    return np.array([sum(1 for cui in set(map(str.upper, lists)) if cui in keep) for lists in concept_lists], dtype=np.int64)
