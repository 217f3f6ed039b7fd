"""One feature row per candidate (image, concept) pair, built with array gathers only.

The stacker is one LightGBM model for all concepts, so features must be comparable across
concepts: probabilities, ranks within the image, how sure the router is, how common the concept
is (overall and in the routed category), and how many sources agree. Every category model is
also its own column (NaN where it does not know the concept) so trees can learn which model to
trust for which modality. Extra global models (other backbones or resolutions) add their
probability, their rank and the mean over all global models at the end, so a run without them
keeps exactly the columns it always had.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from conceptclef.ensemble.candidates import EXTRA_GLOBAL_SOURCE, SOURCES, CandidateSet, build_candidates
from conceptclef.ensemble.inputs import StackingInputs
from conceptclef.ensemble.mixing import mixture_at, routed_at, routed_index
from conceptclef.ensemble.modality import MODALITY_FEATURES, modality_features
from conceptclef.ensemble.sparse_ops import DENSE_CHUNK_ROWS, gather


@dataclass(frozen=True)
class PairTable:
    """Candidate pairs with their feature matrix (float32, NaN = missing) and column names.

    Parameters
    ----------
    candidates : CandidateSet
        P pairs sorted by (image, concept).
    features : numpy.ndarray of shape (P, n_features), float32
    feature_names : list of str, length n_features
    """

    candidates: CandidateSet
    features: np.ndarray  # (P, F)
    feature_names: list[str]

    def take(self, mask: np.ndarray) -> "PairTable":
        """The pairs selected by a boolean mask of shape (P,) or an index array (image rows keep their numbering)."""
        return PairTable(self.candidates.take(mask), self.features[mask], self.feature_names)


def feature_names_for(
    categories: list[str], extra_global_models: list[str] | tuple[str, ...] = (), modality: bool = False
) -> list[str]:
    """Column names, fixed by the router's categories and the extra global models' names, so a
    saved stacker can check its inputs.

    Parameters
    ----------
    categories : list of str
        The router's categories, in order.
    extra_global_models : sequence of str, default=()
        Names of the extra global models, in order.
    modality : bool, default=False
        Whether the modality features (`ensemble.modality.MODALITY_FEATURES`) end the row.

    Returns
    -------
    list of str
        One name per column of `build_features`' matrix.
    """
    names = [
        "global_prob",
        "global_prob_image_sum",
        "routed_prob",
        "mixture_prob",
        "mixture_coverage",
        "global_routed_mean",
    ]
    names += [f"category_prob:{name}" for name in categories]
    names += [f"router_prob:{name}" for name in categories]
    names += ["router_max", "router_entropy", "knn_score"]
    names += [f"rank:{source}" for source in SOURCES]
    names += ["n_sources", "concept_frequency", "routed_concept_frequency", "concept_id"]
    for name in extra_global_models:
        names += [f"global_prob:{name}", f"rank:{EXTRA_GLOBAL_SOURCE.format(name=name)}"]
    if extra_global_models:
        names.append("global_models_mean")
    if modality:
        names += MODALITY_FEATURES
    return names


def _row_sums(matrix: np.ndarray) -> np.ndarray:
    """Per-image sum of probabilities (the expected label count), NaN-safe and in blocks."""
    sums = np.empty(matrix.shape[0], dtype=np.float32)
    for start in range(0, matrix.shape[0], DENSE_CHUNK_ROWS):
        block = np.asarray(matrix[start : start + DENSE_CHUNK_ROWS], dtype=np.float32)
        sums[start : start + block.shape[0]] = np.nansum(block, axis=1)
    return sums


def router_summary(router_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(max prob, entropy in nats) per image: how much the routed model's view should count.

    Parameters
    ----------
    router_probs : numpy.ndarray of shape (n_images, n_categories), float

    Returns
    -------
    max_prob, entropy : numpy.ndarray of shape (n_images,), float32
    """
    probs = np.asarray(router_probs, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(probs > 0, probs * np.log(probs), 0.0).sum(axis=1)
    return probs.max(axis=1).astype(np.float32), entropy.astype(np.float32)


def build_features(inputs: StackingInputs, candidates: CandidateSet) -> PairTable:
    """The feature matrix of `candidates` (which must come from these inputs).

    Parameters
    ----------
    inputs : StackingInputs
        n_images images over n_concepts concepts.
    candidates : CandidateSet
        P pairs from `build_candidates(inputs, k)`.

    Returns
    -------
    PairTable
        Features of shape (P, len(feature_names_for(...))), float32, NaN where a source has no value.
    """
    rows, cols = candidates.rows, candidates.cols
    names = feature_names_for(inputs.categories, list(inputs.extra_global_probs), inputs.modality_category is not None)
    features = np.empty((rows.size, len(names)), dtype=np.float32)
    column = iter(range(len(names)))

    def put(values: np.ndarray) -> None:
        features[:, next(column)] = values

    global_at = gather(inputs.global_probs, rows, cols)
    routed = routed_at(inputs, rows, cols)
    put(global_at)
    put(_row_sums(inputs.global_probs)[rows])
    put(routed)
    mixture, coverage = mixture_at(inputs, rows, cols)
    put(mixture)
    put(coverage)
    # Averaging the global and routed models is a strong rule on its own; trees need many
    # splits to rebuild a sum, so the average is given to them directly.
    put(0.5 * (global_at + routed))
    for name in inputs.categories:
        put(gather(inputs.category_probs.get(name), rows, cols))
    for c in range(len(inputs.categories)):
        put(np.asarray(inputs.router_probs[rows, c], dtype=np.float32))
    router_max, router_entropy = router_summary(inputs.router_probs)
    put(router_max[rows])
    put(router_entropy[rows])
    put(gather(inputs.knn_scores, rows, cols))
    for source in SOURCES:
        put(candidates.ranks[source])
    put(candidates.n_sources)
    put(np.asarray(inputs.concept_frequency, dtype=np.float32)[cols])
    category_frequency = np.asarray(inputs.category_concept_frequency, dtype=np.float32)
    put(category_frequency[routed_index(inputs.router_probs)[rows], cols])
    put(cols.astype(np.float32))  # categorical: lets the stacker learn each concept's own calibration
    global_sum = global_at.astype(np.float64)
    for name, probs in inputs.extra_global_probs.items():
        extra_at = gather(probs, rows, cols)
        global_sum += extra_at
        put(extra_at)
        put(candidates.ranks[EXTRA_GLOBAL_SOURCE.format(name=name)])
    if inputs.extra_global_probs:
        # Averaging backbones is the published winners' rule; given directly, as global_routed_mean is.
        put((global_sum / (1 + len(inputs.extra_global_probs))).astype(np.float32))
    if inputs.modality_category is not None:
        for values in modality_features(inputs.router_probs, inputs.modality_category, inputs.several_position, rows, cols):
            put(values)
    if next(column, None) is not None:
        raise RuntimeError("feature_names_for and build_features disagree on the columns")
    return PairTable(candidates, features, names)


def build_pair_table(inputs: StackingInputs, candidates_per_model: int) -> PairTable:
    """Candidates and their features in one call: what both fitting and prediction need.

    Parameters
    ----------
    inputs : StackingInputs
    candidates_per_model : int
        Top-k per image taken from each source.

    Returns
    -------
    PairTable
    """
    return build_features(inputs, build_candidates(inputs, candidates_per_model))
