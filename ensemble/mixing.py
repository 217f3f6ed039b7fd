"""Combine the per-category models through the router: the routed model and the router-weighted mixture.

A category with no model of its own (it fell back to the global model) contributes the global
probabilities, which is what the pipeline would predict for its images. The mixture is
NaN-aware: categories whose model does not know a concept are left out and the router weights
of the rest renormalised; `coverage` (router mass that could vote) tells the stacker how much
to trust it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from conceptclef.ensemble.inputs import CategoryProbabilities, StackingInputs


def routed_index(router_probs: np.ndarray) -> np.ndarray:
    """Index of the router's most probable category per image.

    Parameters
    ----------
    router_probs : numpy.ndarray of shape (n_images, n_categories), float

    Returns
    -------
    numpy.ndarray of shape (n_images,), int64
    """
    return np.argmax(np.asarray(router_probs, dtype=np.float32), axis=1).astype(np.int64)


def category_source(inputs: StackingInputs, category: str) -> CategoryProbabilities:
    """The (n, V) matrix that stands for a category: its own model or, after fallback, the global one.

    Parameters
    ----------
    inputs : StackingInputs
    category : str
        One of `inputs.categories`.

    Returns
    -------
    numpy.ndarray or ProjectedProbabilities of shape (n_images, n_concepts), float
        Not a copy.
    """
    return inputs.category_probs.get(category, inputs.global_probs)


def category_positions(inputs: StackingInputs, names: Sequence[str]) -> np.ndarray:
    """Each name's position in `inputs.categories`; -1 for a name the router does not know.

    Parameters
    ----------
    inputs : StackingInputs
    names : sequence of str
        Category names, e.g. each image's true category.

    Returns
    -------
    numpy.ndarray of shape (len(names),), int64
    """
    position = {name: index for index, name in enumerate(inputs.categories)}
    return np.array([position.get(name, -1) for name in names], dtype=np.int64)


def assigned_block(inputs: StackingInputs, assigned: np.ndarray, rows: slice) -> np.ndarray:
    """Each image's probabilities from the model of its assigned category, for a block of consecutive images.

    `assigned[i]` is a position in `inputs.categories` (-1: no category, the global model serves
    it); float32, NaN where that category's model does not know the concept. Routing by the
    router (`routed_block`) and by the true categories (the ablation's oracle) both come here.

    Parameters
    ----------
    inputs : StackingInputs
    assigned : numpy.ndarray of shape (n_block,), int
        Category position per image of the block, -1 for the global model.
    rows : slice
        The block's n_block consecutive images.

    Returns
    -------
    numpy.ndarray of shape (n_block, n_concepts), float32
    """
    assigned = np.asarray(assigned)
    block = np.empty((assigned.size, inputs.n_concepts), dtype=np.float32)
    sources = [(assigned == c, category_source(inputs, name)) for c, name in enumerate(inputs.categories)]
    for mask, source in [*sources, (assigned < 0, inputs.global_probs)]:
        if mask.any():
            block[mask] = source[rows][mask]
    return block


def routed_block(inputs: StackingInputs, rows: slice) -> np.ndarray:
    """The routed category model's probabilities for a block of consecutive images, float32.

    Parameters
    ----------
    inputs : StackingInputs
    rows : slice
        The block's n_block consecutive images.

    Returns
    -------
    numpy.ndarray of shape (n_block, n_concepts), float32
        NaN where the routed model does not know the concept.
    """
    return assigned_block(inputs, routed_index(inputs.router_probs[rows]), rows)


def mixture_block(inputs: StackingInputs, rows: slice) -> tuple[np.ndarray, np.ndarray]:
    """(mixture, coverage) for a block of consecutive images: sum_c p(c|x) p_c(y|x) over known c.

    Parameters
    ----------
    inputs : StackingInputs
    rows : slice
        The block's n_block consecutive images.

    Returns
    -------
    mixture : numpy.ndarray of shape (n_block, n_concepts), float32
        Renormalised over the categories that know the concept; NaN where none does.
    coverage : numpy.ndarray of shape (n_block, n_concepts), float32
        Router mass of the categories that know the concept.
    """
    weights = np.asarray(inputs.router_probs[rows], dtype=np.float32)
    total = np.zeros((weights.shape[0], inputs.n_concepts), dtype=np.float32)
    coverage = np.zeros_like(total)
    for c, name in enumerate(inputs.categories):
        probs = np.asarray(category_source(inputs, name)[rows], dtype=np.float32)
        known = ~np.isnan(probs)
        w = weights[:, c : c + 1]
        total += np.where(known, probs, 0.0) * w
        coverage += known * w
    with np.errstate(invalid="ignore", divide="ignore"):
        mixture = np.where(coverage > 0, total / coverage, np.nan).astype(np.float32)
    return mixture, coverage


def routed_at(inputs: StackingInputs, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """The routed category model's probability at each (image, concept) pair.

    Parameters
    ----------
    inputs : StackingInputs
    rows, cols : numpy.ndarray of shape (P,), int
        Image and concept of each pair.

    Returns
    -------
    numpy.ndarray of shape (P,), float32
    """
    routed = routed_index(inputs.router_probs)[rows]
    values = np.empty(rows.shape, dtype=np.float32)
    for c, name in enumerate(inputs.categories):
        mask = routed == c
        if mask.any():
            values[mask] = category_source(inputs, name)[rows[mask], cols[mask]]
    return values


def mixture_at(inputs: StackingInputs, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mixture, coverage) at each (image, concept) pair; same rule as `mixture_block`.

    Parameters
    ----------
    inputs : StackingInputs
    rows, cols : numpy.ndarray of shape (P,), int
        Image and concept of each pair.

    Returns
    -------
    mixture, coverage : numpy.ndarray of shape (P,), float32
    """
    total = np.zeros(rows.shape, dtype=np.float32)
    coverage = np.zeros(rows.shape, dtype=np.float32)
    for c, name in enumerate(inputs.categories):
        probs = np.asarray(category_source(inputs, name)[rows, cols], dtype=np.float32)
        known = ~np.isnan(probs)
        w = np.asarray(inputs.router_probs[rows, c], dtype=np.float32)
        total += np.where(known, probs, 0.0) * w
        coverage += known * w
    with np.errstate(invalid="ignore", divide="ignore"):
        mixture = np.where(coverage > 0, total / coverage, np.nan).astype(np.float32)
    return mixture, coverage
