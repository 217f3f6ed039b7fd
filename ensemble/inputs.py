"""What the stacker sees for one image set, all over the global vocabulary's columns.

Extra global models (other backbones or resolutions) share the global vocabulary; each is a
stacker input of its own. Per-category models know only the concepts of their category, so their probabilities are
projected onto the global columns with NaN for "this model cannot say": LightGBM treats NaN as
missing, which is different from a confident 0. Arrays may be float16 to keep eight full-size
(80,000 x 3,000) probability matrices within memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from conceptclef.ensemble.projection import ProjectedProbabilities

# A category model's (n, V) probabilities: a dense array, or its own columns read on the global ones.
CategoryProbabilities = np.ndarray | ProjectedProbabilities


@dataclass
class StackingInputs:
    """Every signal the stacker combines, for `n` images over `V` global concepts and `C` categories.

    `category_probs[name]` holds that category model's probabilities on ALL images of the set
    (NaN outside its vocabulary); a category that fell back to the global model is absent and
    the global probabilities stand in for it.

    Parameters
    ----------
    image_ids : list of str, length n_images
    global_probs : numpy.ndarray of shape (n_images, n_concepts), float16 or float32
        The global model's probabilities.
    category_probs : dict of str to numpy.ndarray or ProjectedProbabilities of shape (n_images, n_concepts), float
        Per category model, on every image; NaN where it does not know the concept. A
        `ProjectedProbabilities` reads the model's own columns on the global ones without a
        dense copy (what the pipeline passes).
    router_probs : numpy.ndarray of shape (n_images, n_categories), float
        Router probabilities, columns in `categories` order.
    categories : list of str, length n_categories
    concept_frequency : numpy.ndarray of shape (n_concepts,), float
        Training frequency of each concept.
    category_concept_frequency : numpy.ndarray of shape (n_categories, n_concepts), float
        Training frequency of each concept within each category.
    knn_scores : numpy.ndarray or scipy.sparse matrix of shape (n_images, n_concepts), optional
        Nearest-neighbour vote (`knn.NearestNeighbourScorer`).
    extra_global_probs : dict of str to numpy.ndarray of shape (n_images, n_concepts), optional
        Other global models (backbones or resolutions) by name.
    modality_category : numpy.ndarray of shape (n_concepts,), int, optional
        For each concept that is a modality CUI, the position in `categories` of its category;
        -1 for the others. Given, the stacker gets the modality features (`ensemble.modality`).
    several_position : int, default=-1
        Position in `categories` of the combined category (images naming several modalities), -1: none.

    Raises
    ------
    ValueError
        On construction, if any shape disagrees with the others (`validate`).
    """

    image_ids: list[str]
    global_probs: np.ndarray  # (n, V)
    category_probs: dict[str, CategoryProbabilities]  # name -> (n, V), NaN where the concept is unknown to it
    router_probs: np.ndarray  # (n, C), columns in `categories` order
    categories: list[str]
    concept_frequency: np.ndarray  # (V,) training frequency overall
    category_concept_frequency: np.ndarray  # (C, V) training frequency within each category
    knn_scores: np.ndarray | sp.spmatrix | None = None  # (n, V)
    extra_global_probs: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (n, V), other global backbones
    modality_category: np.ndarray | None = None  # (V,) category position of a modality CUI, -1 otherwise
    several_position: int = -1  # the combined category's position in `categories`, -1: none

    def __post_init__(self) -> None:
        self.image_ids = list(self.image_ids)
        self.categories = list(self.categories)
        self.validate()

    @property
    def n_images(self) -> int:
        return int(self.global_probs.shape[0])

    @property
    def n_concepts(self) -> int:
        return int(self.global_probs.shape[1])

    def validate(self) -> None:
        """Refuse misaligned arrays now rather than as a wrong feature column later."""
        n, v = self.global_probs.shape
        c = len(self.categories)
        if len(self.image_ids) != n:
            raise ValueError(f"{len(self.image_ids)} image ids for {n} rows of global_probs")
        for name, probs in self.category_probs.items():
            if name not in self.categories:
                raise ValueError(f"category model {name!r} is not one of the router's categories {self.categories}")
            if probs.shape != (n, v):
                raise ValueError(f"category_probs[{name!r}] has shape {probs.shape}, expected {(n, v)}")
        for name, probs in self.extra_global_probs.items():
            if probs.shape != (n, v):
                raise ValueError(f"extra_global_probs[{name!r}] has shape {probs.shape}, expected {(n, v)}")
        if self.router_probs.shape != (n, c):
            raise ValueError(f"router_probs has shape {self.router_probs.shape}, expected {(n, c)}")
        if np.shape(self.concept_frequency) != (v,):
            raise ValueError(f"concept_frequency has shape {np.shape(self.concept_frequency)}, expected {(v,)}")
        if np.shape(self.category_concept_frequency) != (c, v):
            raise ValueError(
                f"category_concept_frequency has shape {np.shape(self.category_concept_frequency)}, expected {(c, v)}"
            )
        if self.knn_scores is not None and self.knn_scores.shape != (n, v):
            raise ValueError(f"knn_scores has shape {self.knn_scores.shape}, expected {(n, v)}")
        if self.modality_category is not None and (
            np.shape(self.modality_category) != (v,) or np.max(self.modality_category, initial=-1) >= c
        ):
            raise ValueError(f"modality_category has shape {np.shape(self.modality_category)} or a position beyond {c} categories")

    def subset(self, rows: Sequence[int] | np.ndarray | slice) -> "StackingInputs":
        """The same inputs for a subset of images (folds); concept-level arrays are shared.

        Parameters
        ----------
        rows : slice, or sequence / numpy.ndarray of int
            Image rows to keep, in the order given.

        Returns
        -------
        StackingInputs
        """
        if isinstance(rows, slice):
            index: np.ndarray | slice = rows
            ids = self.image_ids[rows]
        else:
            index = np.asarray(rows, dtype=np.int64)
            ids = [self.image_ids[i] for i in index]
        knn = None
        if self.knn_scores is not None:
            knn = sp.csr_matrix(self.knn_scores)[index] if sp.issparse(self.knn_scores) else self.knn_scores[index]
        return StackingInputs(
            image_ids=ids,
            global_probs=self.global_probs[index],
            category_probs={name: probs[index] for name, probs in self.category_probs.items()},
            router_probs=self.router_probs[index],
            categories=self.categories,
            concept_frequency=self.concept_frequency,
            category_concept_frequency=self.category_concept_frequency,
            knn_scores=knn,
            extra_global_probs={name: probs[index] for name, probs in self.extra_global_probs.items()},
            modality_category=self.modality_category,
            several_position=self.several_position,
        )


def project_to_columns(
    probs: np.ndarray, model_cuis: Sequence[str], global_cuis: Sequence[str], dtype: np.dtype | type = np.float32
) -> np.ndarray:
    """Place a model's (n, V_model) probabilities on the global columns, NaN where it has no output.

    Concepts the model knows but the global vocabulary lacks are dropped: nothing downstream can
    predict them.

    Parameters
    ----------
    probs : numpy.ndarray of shape (n_images, len(model_cuis)), float
    model_cuis : sequence of str
        The model's concept per column.
    global_cuis : sequence of str, length n_concepts
        The global vocabulary.
    dtype : numpy dtype, default=numpy.float32

    Returns
    -------
    numpy.ndarray of shape (n_images, n_concepts), `dtype`
        NaN in the columns the model does not know.
    """
    probs = np.asarray(probs)
    if probs.ndim != 2 or probs.shape[1] != len(model_cuis):
        raise ValueError(f"probs has shape {probs.shape} but the model has {len(model_cuis)} concepts")
    global_index = {cui: column for column, cui in enumerate(global_cuis)}
    source, target = [], []
    for column, cui in enumerate(model_cuis):
        if cui in global_index:
            source.append(column)
            target.append(global_index[cui])
    projected = np.full((probs.shape[0], len(global_cuis)), np.nan, dtype=dtype)
    projected[:, target] = probs[:, source]
    return projected
