"""The images each network of a run sees: its category's members, and what it fits, stops on, predicts and indexes.

Shared by train-all (which trains the networks) and the final fit (which trains them again on
train + valid), so neither imports the other's private helpers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from conceptclef.core.config import Config
from conceptclef.data.modalities import ModalityMapping
from conceptclef.pipeline.image_sets import ImageSet, concatenated
from conceptclef.pipeline.run.category_record import categories_from_labels
from conceptclef.pipeline.run.layout import RunLayout

__all__ = ["TrainingImages", "category_members", "final_fit_images", "specialist_mapping", "split_images"]


@dataclass(frozen=True)
class TrainingImages:
    """The images one network sees: it learns from `fit`, early-stops on `stopping`, saves its
    predictions on `predicted` (the stacker's inputs) and, the global model, embeds `index` (the
    kNN index). Split scheme: train, valid, valid, train; a fold network: its fold's fit and
    stopping rows, its held-out fold, and fit + stopping; a final-fit network: train + valid,
    nothing, nothing, train + valid."""

    fit: ImageSet
    stopping: ImageSet
    predicted: ImageSet | None
    index: ImageSet


def split_images(train: ImageSet, valid: ImageSet) -> TrainingImages:
    """The split scheme's images: learn from train, stop on and predict valid, index train."""
    return TrainingImages(train, valid, valid, train)


def final_fit_images(train: ImageSet, valid: ImageSet) -> TrainingImages:
    """The final fit's images: train + valid to learn from and to index, nothing held out.

    The two splits stay two cached arrays (`image_sets.concatenated`), so head-mode networks read
    the backbone features their split-run networks computed."""
    development = concatenated(train, valid)
    return TrainingImages(development, development.subset(np.array([], dtype=np.int64)), None, development)


def category_members(image_set: ImageSet, category: str, by_modality: ModalityMapping | None = None) -> np.ndarray:
    """The images a category model learns from: its category's, and with `by_modality` (flat data,
    `categories.specialist_images = "modality"`) every image naming its modality too (a PET/CT image
    trains the PET and the CT model; the combined category keeps its own images)."""
    own = np.array([str(c) for c in image_set.categories]) == category
    if by_modality is not None and category != by_modality.several and image_set.concept_lists is not None:
        own |= np.array([by_modality.names_category(cuis, category) for cuis in image_set.concept_lists], dtype=bool)
    return np.flatnonzero(own)


def specialist_mapping(config: Config, layout: RunLayout) -> ModalityMapping | None:
    """The modality mapping when category models train on every image naming their modality (else None)."""
    if config.categories.specialist_images != "modality" or not categories_from_labels(layout):
        return None
    return ModalityMapping.from_config(config.categories)
