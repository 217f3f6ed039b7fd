"""Which (image, concept) pairs the stacker scores: the union of every source's top-k per image.

Scoring all ~3,000 concepts of every image would be 240 million rows; an image has ~11 true
concepts and the sources rank almost all of them highly, so the union of each source's top-k
(~50-70 per image) keeps the recall and cuts the work by two orders of magnitude. Each source's
rank of a pair (k when outside its top-k) and how many sources chose it are features too.

The category models enter as the routed one (the router's argmax), not as the router-weighted
mixture: the mixture needs every category matrix converted and combined for every image
(about half of a full-scale build, measured), while the routed model is one row gather; the
mixture is still a feature, computed only at the candidate pairs.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from conceptclef.ensemble.inputs import StackingInputs
from conceptclef.ensemble.mixing import routed_block
from conceptclef.ensemble.sparse_ops import DENSE_CHUNK_ROWS, pair_keys, top_k_dense_rows, top_k_sparse_rows

SOURCES = ("global", "routed", "knn")
EXTRA_GLOBAL_SOURCE = "global:{name}"  # an extra global model's source name


def sources_of(inputs: StackingInputs) -> tuple[str, ...]:
    """Every candidate source of these inputs: SOURCES, then one per extra global model.

    Parameters
    ----------
    inputs : StackingInputs

    Returns
    -------
    tuple of str
        Source names; each is a key of `CandidateSet.ranks`.
    """
    return SOURCES + tuple(EXTRA_GLOBAL_SOURCE.format(name=name) for name in inputs.extra_global_probs)


@dataclass(frozen=True)
class CandidateSet:
    """Candidate pairs sorted by (image, concept), with each source's rank of them.

    Parameters
    ----------
    rows : numpy.ndarray of shape (P,), int64
    cols : numpy.ndarray of shape (P,), int64
    ranks : dict of str to numpy.ndarray of shape (P,), int32
    n_sources : numpy.ndarray of shape (P,), int32
    shape : tuple of int
        (n_images, n_concepts).
    """

    rows: np.ndarray  # (P,) image index
    cols: np.ndarray  # (P,) global concept index
    ranks: dict[str, np.ndarray]  # source -> (P,) 0-based rank in that source's top-k, k when outside
    n_sources: np.ndarray  # (P,) how many sources put the pair in their top-k
    shape: tuple[int, int]  # (n images, V concepts)

    @property
    def n_pairs(self) -> int:
        return int(self.rows.size)

    def take(self, mask: np.ndarray) -> "CandidateSet":
        """The pairs selected by a boolean mask over pairs (image rows keep their numbering)."""
        return CandidateSet(
            rows=self.rows[mask],
            cols=self.cols[mask],
            ranks={name: rank[mask] for name, rank in self.ranks.items()},
            n_sources=self.n_sources[mask],
            shape=self.shape,
        )


def _block_top_k(inputs: StackingInputs, start: int, k: int) -> dict[str, tuple[np.ndarray, ...]]:
    rows = slice(start, min(start + DENSE_CHUNK_ROWS, inputs.n_images))
    blocks = {"global": np.asarray(inputs.global_probs[rows], dtype=np.float32), "routed": routed_block(inputs, rows)}
    if inputs.knn_scores is not None and not sp.issparse(inputs.knn_scores):
        blocks["knn"] = np.asarray(inputs.knn_scores[rows], dtype=np.float32)
    for name, probs in inputs.extra_global_probs.items():
        blocks[EXTRA_GLOBAL_SOURCE.format(name=name)] = np.asarray(probs[rows], dtype=np.float32)
    found: dict[str, tuple[np.ndarray, ...]] = {}
    for name, block in blocks.items():
        r, c, rank = top_k_dense_rows(block, k)
        found[name] = (r + start, c, rank)
    return found


def _dense_source_top_k(inputs: StackingInputs, k: int) -> dict[str, list[tuple[np.ndarray, ...]]]:
    """Top-k of each dense source, blocks of images in parallel threads (argpartition releases the GIL)."""
    starts = range(0, inputs.n_images, DENSE_CHUNK_ROWS)
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda start: _block_top_k(inputs, start, k), starts))
    found: dict[str, list[tuple[np.ndarray, ...]]] = {}
    for result in results:
        for name, part in result.items():
            found.setdefault(name, []).append(part)
    return found


def _concatenate(parts: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    if not parts:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    return tuple(np.concatenate(column) for column in zip(*parts))


def build_candidates(inputs: StackingInputs, k: int) -> CandidateSet:
    """Union of the top-k of the global model, the routed category model, kNN and any extra global models.

    Parameters
    ----------
    inputs : StackingInputs
        n_images images over n_concepts concepts.
    k : int
        Top-k per image taken from each source; only positive scores are taken.

    Returns
    -------
    CandidateSet
        P pairs (at most n_images * k * number of sources), sorted by (image, concept).
    """
    n, v = inputs.n_images, inputs.n_concepts
    per_source = {name: _concatenate(parts) for name, parts in _dense_source_top_k(inputs, k).items()}
    if sp.issparse(inputs.knn_scores):
        per_source["knn"] = top_k_sparse_rows(inputs.knn_scores, k)
    source_keys = {name: pair_keys(rows, cols, v) for name, (rows, cols, _) in per_source.items()}
    keys, n_sources = np.unique(np.concatenate(list(source_keys.values())), return_counts=True)
    ranks: dict[str, np.ndarray] = {}
    for name in sources_of(inputs):
        rank = np.full(keys.size, k, dtype=np.int32)
        if name in per_source:
            rank[np.searchsorted(keys, source_keys[name])] = per_source[name][2]
        ranks[name] = rank
    return CandidateSet(
        rows=(keys // v).astype(np.int64),
        cols=(keys % v).astype(np.int64),
        ranks=ranks,
        n_sources=n_sources.astype(np.int32),
        shape=(n, v),
    )
