"""Candidate pairs (union of each source's top-k) and their feature rows, against direct loops."""

from __future__ import annotations

import time

import numpy as np
import pytest

from conceptclef.ensemble.candidates import SOURCES, build_candidates
from conceptclef.ensemble.features import build_features, build_pair_table, feature_names_for
from conceptclef.ensemble.mixing import routed_block
from synthetic_stacking import make_synthetic_set


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic_set(150, 60, n_categories=4, labels_per_image=5, seed=2, fallback_categories=(3,))


def source_values(block: np.ndarray) -> np.ndarray:
    return np.nan_to_num(np.asarray(block, dtype=np.float32), nan=-1.0)


def test_candidates_are_the_union_of_each_source_top_k(synthetic):
    """Each source contributes each image's k best positive values (float16 ties broken any way)."""
    inputs, k = synthetic.inputs, 5
    candidates = build_candidates(inputs, k)
    n = inputs.n_images
    blocks = {
        "global": source_values(inputs.global_probs),
        "routed": source_values(routed_block(inputs, slice(0, n))),
        "knn": source_values(inputs.knn_scores.toarray()),
    }
    pairs = list(zip(candidates.rows.tolist(), candidates.cols.tolist()))
    assert pairs == sorted(pairs) and len(set(pairs)) == len(pairs)  # sorted by (image, concept), unique
    in_top = np.stack([candidates.ranks[name] < k for name in SOURCES])
    assert in_top.any(axis=0).all()  # every pair comes from some source
    np.testing.assert_array_equal(candidates.n_sources, in_top.sum(axis=0))
    for s, name in enumerate(SOURCES):
        values = blocks[name]
        for i in range(n):
            mine = (candidates.rows == i) & in_top[s]
            cols, ranks = candidates.cols[mine], candidates.ranks[name][mine]
            row = values[i]
            assert mine.sum() == min(k, int((row > 0).sum()))
            assert sorted(ranks.tolist()) == list(range(mine.sum()))
            for c, rank in zip(cols, ranks):
                higher, tied = int((row > row[c]).sum()), int((row == row[c]).sum())
                assert higher <= rank < higher + tied  # its rank, up to the order among equal values


def test_feature_values_match_their_definitions(synthetic):
    inputs = synthetic.inputs
    table = build_pair_table(inputs, 5)
    names = table.feature_names
    assert names == feature_names_for(inputs.categories)
    assert table.features.dtype == np.float32 and table.features.shape == (table.candidates.n_pairs, len(names))
    rows, cols = table.candidates.rows, table.candidates.cols
    column = {name: table.features[:, index] for index, name in enumerate(names)}
    np.testing.assert_allclose(column["global_prob"], inputs.global_probs[rows, cols].astype(np.float32))
    routed = np.argmax(inputs.router_probs.astype(np.float32), axis=1)
    np.testing.assert_allclose(column["routed_concept_frequency"], inputs.category_concept_frequency[routed[rows], cols])
    np.testing.assert_allclose(column["router_max"], inputs.router_probs.astype(np.float32).max(axis=1)[rows])
    assert np.isnan(column["category_prob:category3"]).all()  # fell back: no model of its own
    known = inputs.category_probs["category0"][rows, cols]
    np.testing.assert_array_equal(np.isnan(column["category_prob:category0"]), np.isnan(known))
    np.testing.assert_allclose(column["knn_score"], inputs.knn_scores.toarray()[rows, cols])
    p = inputs.router_probs.astype(np.float64)
    entropy = -(p * np.log(p)).sum(axis=1)
    np.testing.assert_allclose(column["router_entropy"], entropy[rows], rtol=1e-4)
    assert np.all(column["n_sources"] >= 1) and np.all(column["n_sources"] <= len(SOURCES))


def test_features_without_knn_have_missing_knn_columns(synthetic):
    inputs = synthetic.inputs.subset(np.arange(40))
    inputs.knn_scores = None
    table = build_features(inputs, build_candidates(inputs, 4))
    knn = table.features[:, table.feature_names.index("knn_score")]
    assert np.isnan(knn).all()
    assert np.all(table.features[:, table.feature_names.index("rank:knn")] == 4)


def test_pair_table_builds_fast_at_moderate_scale():
    big = make_synthetic_set(6000, 800, seed=4, with_knn=True)
    start = time.perf_counter()
    table = build_pair_table(big.inputs, 30)
    elapsed = time.perf_counter() - start
    assert table.candidates.n_pairs > 6000 * 30
    assert elapsed < 10.0, f"{table.candidates.n_pairs} pairs took {elapsed:.1f}s"


def test_dense_and_sparse_knn_scores_give_the_same_candidates(synthetic):
    sparse_inputs = synthetic.inputs.subset(np.arange(60))
    dense_inputs = synthetic.inputs.subset(np.arange(60))
    dense_inputs.knn_scores = sparse_inputs.knn_scores.toarray()
    from_sparse, from_dense = build_candidates(sparse_inputs, 6), build_candidates(dense_inputs, 6)
    np.testing.assert_array_equal(from_sparse.rows, from_dense.rows)
    np.testing.assert_array_equal(from_sparse.cols, from_dense.cols)
    np.testing.assert_array_equal(from_sparse.n_sources, from_dense.n_sources)
