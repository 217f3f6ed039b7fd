"""Synthetic stacking inputs with known truth, for the full-scale benchmark and the ensemble tests.

The structure mirrors ImageCLEF concept detection: Zipf-like concept frequencies, each concept
most common in one modality category, ~11 true concepts per image, a few out-of-vocabulary ones,
per-category models that are sharp on their own category and blurred elsewhere, a router that
is usually right and a kNN vote that recovers part of the truth. Generation runs in row blocks
and stores probabilities as float16, so 80,000 x 3,000 x 8 models fits in a few GB.

Not part of the installed package: benchmarks/postprocess_scale.py imports it from its own
folder, and pytest finds it through `pythonpath = ["benchmarks"]` in pyproject.toml.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from conceptclef.ensemble.inputs import CategoryProbabilities, StackingInputs
from conceptclef.ensemble.projection import ProjectedProbabilities

BLOCK_ROWS = 8192


@dataclass(frozen=True)
class SyntheticSet:
    inputs: StackingInputs
    truth: sp.csr_matrix  # (n, V) bool
    truth_outside: np.ndarray  # (n,) true concepts outside the vocabulary
    true_category: np.ndarray  # (n,) index into inputs.categories


@dataclass(frozen=True)
class SyntheticSignals:
    """How informative each source is: logit shift of a true concept over a false one."""

    global_signal: float = 1.0
    category_signal: float = 1.75  # category model on images of its own category
    off_category_signal: float = 0.25  # category model on images of other categories
    router_accuracy: float = 0.9
    knn_recall: float = 0.4
    knn_noise_per_image: int = 10
    category_vocabulary_share: float = 0.5  # share of concepts each category model knows
    shared_noise: float = 0.5  # share of logit noise common to all models (they err on the same images)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def make_synthetic_set(
    n_images: int,
    n_concepts: int,
    n_categories: int = 7,
    labels_per_image: float = 11.0,
    signals: SyntheticSignals = SyntheticSignals(),
    seed: int = 0,
    dtype: type = np.float16,
    with_knn: bool = True,
    fallback_categories: tuple[int, ...] = (),
    out_dir: Path | None = None,
) -> SyntheticSet:
    """Build one image set; `fallback_categories` get no category model (they use the global one).

    With `out_dir`, each model's probabilities are written there block by block as .npy files
    and returned as read-only memory maps, as a run's saved model outputs are read: the global
    model's (n, V), each category model's over the concepts it knows only (as a run saves a
    category model's outputs over its own vocabulary), read on the global columns through
    `ProjectedProbabilities`; the values are those of the in-memory (n, V) matrices with NaN.
    At 2026 scale (116,604 x 2,646) eight dense float16 models would be 4.9 GB.
    """
    rng = np.random.default_rng(seed)
    categories = [f"category{c}" for c in range(n_categories)]
    popularity = 1.0 / np.arange(1, n_concepts + 1) ** 0.8
    popularity = rng.permutation(popularity)
    home = rng.integers(0, n_categories, n_concepts)
    category_weight = popularity[None, :] * np.where(home[None, :] == np.arange(n_categories)[:, None], 8.0, 1.0)
    log_weight = np.log(category_weight / category_weight.sum(axis=1, keepdims=True)).astype(np.float32)
    true_category = rng.integers(0, n_categories, n_images)
    counts = np.clip(rng.poisson(labels_per_image, n_images), 1, n_concepts)

    # Labels: Gumbel top-k per image samples without replacement from its category's weights.
    max_count = int(counts.max())
    rows_list, cols_list = [], []
    for start in range(0, n_images, BLOCK_ROWS):
        stop = min(start + BLOCK_ROWS, n_images)
        keys = log_weight[true_category[start:stop]] + rng.gumbel(size=(stop - start, n_concepts)).astype(np.float32)
        top = np.argpartition(-keys, max_count - 1, axis=1)[:, :max_count]
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(keys, top, axis=1), axis=1), axis=1)
        keep = np.arange(max_count)[None, :] < counts[start:stop, None]
        rows_list.append(np.broadcast_to(np.arange(start, stop)[:, None], top.shape)[keep])
        cols_list.append(top[keep])
    rows, cols = np.concatenate(rows_list), np.concatenate(cols_list)
    truth = sp.csr_matrix((np.ones(rows.size, dtype=bool), (rows, cols)), shape=(n_images, n_concepts))
    truth.sort_indices()
    truth_outside = rng.poisson(0.3, n_images).astype(np.int64)

    frequency = np.bincount(cols, minlength=n_concepts) / n_images
    category_frequency = np.stack(
        [np.bincount(cols[true_category[rows] == c], minlength=n_concepts) for c in range(n_categories)]
    ) / np.maximum(np.bincount(true_category, minlength=n_categories), 1)[:, None]
    prior_logit = (np.log(np.maximum(frequency, 1e-5)) * 0.5).astype(np.float32)

    # Correlated errors: every model's noise is partly this shared draw, regenerated per block.
    shared_seed = int(rng.integers(2**31))

    def model_probs(signal_per_row: np.ndarray, known: np.ndarray | None, name: str) -> np.ndarray:
        path = None if out_dir is None else Path(out_dir) / f"{name}.npy"
        stored = np.arange(n_concepts) if known is None or path is None else np.flatnonzero(known)  # columns kept
        out: np.ndarray = (
            np.empty((n_images, n_concepts), dtype=dtype)
            if path is None
            else np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n_images, stored.size))
        )
        shared_rng = np.random.default_rng(shared_seed)
        own, common = np.sqrt(1.0 - signals.shared_noise), np.sqrt(signals.shared_noise)
        for start in range(0, n_images, BLOCK_ROWS):
            stop = min(start + BLOCK_ROWS, n_images)
            y = truth[start:stop].toarray()
            logit = rng.standard_normal((stop - start, n_concepts), dtype=np.float32) * np.float32(own)
            logit += shared_rng.standard_normal((stop - start, n_concepts), dtype=np.float32) * np.float32(common)
            logit += prior_logit - 2.0
            logit += y * (2.0 * signal_per_row[start:stop, None]).astype(np.float32)
            block = _sigmoid(logit)
            if known is not None:
                block[:, ~known] = np.nan
            out[start:stop] = block if stored.size == n_concepts else block[:, stored]
        if path is None:
            return out
        del out  # flushed and unmapped: read back as a run's saved outputs are
        mapped: np.ndarray = np.load(path, mmap_mode="r")
        return mapped

    global_probs = model_probs(np.full(n_images, signals.global_signal), None, "global")
    cuis = np.array([f"C{index:07d}" for index in range(n_concepts)])  # column names, for the on-disk category outputs
    category_probs: dict[str, CategoryProbabilities] = {}
    for c, name in enumerate(categories):
        if c in fallback_categories:
            continue
        known = (home == c) | (rng.random(n_concepts) < signals.category_vocabulary_share)
        signal = np.where(true_category == c, signals.category_signal, signals.off_category_signal)
        probs = model_probs(signal, known, name)
        if out_dir is None:
            category_probs[name] = probs
        else:  # saved over its own concepts: read on the global columns as the pipeline reads it
            category_probs[name] = ProjectedProbabilities(probs, cuis[known].tolist(), cuis.tolist())

    router_logits = rng.standard_normal((n_images, n_categories)).astype(np.float32)
    right = rng.random(n_images) < signals.router_accuracy
    routed = np.where(right, true_category, rng.integers(0, n_categories, n_images))
    router_logits[np.arange(n_images), routed] += 3.0
    router = np.exp(router_logits)
    router /= router.sum(axis=1, keepdims=True)

    knn = None
    if with_knn:
        kept = rng.random(rows.size) < signals.knn_recall
        noise_rows = np.repeat(np.arange(n_images), signals.knn_noise_per_image)
        noise_cols = rng.choice(n_concepts, noise_rows.size, p=popularity / popularity.sum())
        knn_rows = np.concatenate([rows[kept], noise_rows])
        knn_cols = np.concatenate([cols[kept], noise_cols])
        values = np.concatenate([rng.uniform(0.3, 1.0, kept.sum()), rng.uniform(0.0, 0.5, noise_rows.size)])
        knn = sp.csr_matrix((values.astype(np.float32), (knn_rows, knn_cols)), shape=(n_images, n_concepts))
        knn.data = np.minimum(knn.data, 1.0)
        knn.sort_indices()

    inputs = StackingInputs(
        image_ids=[f"synthetic_{i:06d}" for i in range(n_images)],
        global_probs=global_probs,
        category_probs=category_probs,
        router_probs=router.astype(dtype),
        categories=categories,
        concept_frequency=frequency.astype(np.float32),
        category_concept_frequency=category_frequency.astype(np.float32),
        knn_scores=knn,
    )
    return SyntheticSet(inputs, truth, truth_outside, true_category)
