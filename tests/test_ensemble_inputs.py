"""StackingInputs, projection onto the global columns, router mixing and the sparse row helpers."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from conceptclef.ensemble.inputs import StackingInputs, project_to_columns
from conceptclef.ensemble.mixing import (
    assigned_block,
    category_positions,
    mixture_at,
    mixture_block,
    routed_at,
    routed_block,
)
from conceptclef.ensemble.sparse_ops import (
    descending_rank_within_rows,
    gather,
    limit_labels_per_row,
    top_k_dense_rows,
    top_k_sparse_rows,
)


def small_inputs(seed: int = 0, n: int = 12, v: int = 9) -> StackingInputs:
    rng = np.random.default_rng(seed)
    categories = ["CT", "MRI", "XR"]
    ct = rng.random((n, v)).astype(np.float32)
    ct[:, :3] = np.nan  # CT model does not know concepts 0-2
    mri = rng.random((n, v)).astype(np.float16)
    mri[:, 5] = np.nan
    router = rng.dirichlet(np.ones(3), n).astype(np.float32)
    return StackingInputs(
        image_ids=[f"img{i}" for i in range(n)],
        global_probs=rng.random((n, v)).astype(np.float32),
        category_probs={"CT": ct, "MRI": mri},  # XR fell back to the global model
        router_probs=router,
        categories=categories,
        concept_frequency=rng.random(v).astype(np.float32),
        category_concept_frequency=rng.random((3, v)).astype(np.float32),
        knn_scores=sp.random(n, v, density=0.3, random_state=seed, format="csr", dtype=np.float32),
    )


def test_project_to_columns_places_known_and_nan_elsewhere():
    probs = np.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]], dtype=np.float32)
    projected = project_to_columns(probs, ["C3", "C1", "C9"], ["C1", "C2", "C3"], dtype=np.float16)
    assert projected.dtype == np.float16
    np.testing.assert_allclose(projected[:, 0], [0.2, 0.5], rtol=1e-3)
    np.testing.assert_allclose(projected[:, 2], [0.1, 0.4], rtol=1e-3)
    assert np.isnan(projected[:, 1]).all()  # C2 unknown to the model; C9 dropped


def test_inputs_refuse_misaligned_arrays():
    good = small_inputs()
    with pytest.raises(ValueError, match="router_probs"):
        StackingInputs(
            good.image_ids, good.global_probs, {}, good.router_probs[:, :2], good.categories,
            good.concept_frequency, good.category_concept_frequency,
        )
    with pytest.raises(ValueError, match="not one of the router's categories"):
        StackingInputs(
            good.image_ids, good.global_probs, {"PET": good.global_probs}, good.router_probs, good.categories,
            good.concept_frequency, good.category_concept_frequency,
        )


def test_subset_takes_rows_of_every_image_level_array():
    inputs = small_inputs()
    rows = np.array([5, 1, 7])
    part = inputs.subset(rows)
    assert part.image_ids == ["img5", "img1", "img7"]
    np.testing.assert_array_equal(part.global_probs, inputs.global_probs[rows])
    np.testing.assert_array_equal(part.category_probs["MRI"], inputs.category_probs["MRI"][rows])
    np.testing.assert_array_equal(part.knn_scores.toarray(), inputs.knn_scores.toarray()[rows])
    assert part.concept_frequency is inputs.concept_frequency


def test_mixture_is_nan_aware_and_uses_global_for_fallback_category():
    inputs = small_inputs()
    n, v = inputs.n_images, inputs.n_concepts
    mixture, coverage = mixture_block(inputs, slice(0, n))
    sources = [inputs.category_probs["CT"], inputs.category_probs["MRI"].astype(np.float32), inputs.global_probs]
    for i in range(n):
        for j in range(v):
            weights = [inputs.router_probs[i, c] for c in range(3) if not np.isnan(sources[c][i, j])]
            values = [sources[c][i, j] for c in range(3) if not np.isnan(sources[c][i, j])]
            assert coverage[i, j] == pytest.approx(sum(weights), rel=1e-5)
            assert mixture[i, j] == pytest.approx(np.dot(weights, values) / sum(weights), rel=1e-5)
    rows, cols = np.repeat(np.arange(n), v), np.tile(np.arange(v), n)
    at_mix, at_cov = mixture_at(inputs, rows, cols)
    np.testing.assert_allclose(at_mix, mixture.ravel(), rtol=1e-6)
    np.testing.assert_allclose(at_cov, coverage.ravel(), rtol=1e-6)


def test_routed_model_follows_router_argmax():
    inputs = small_inputs()
    n, v = inputs.n_images, inputs.n_concepts
    block = routed_block(inputs, slice(0, n))
    sources = [inputs.category_probs["CT"], inputs.category_probs["MRI"].astype(np.float32), inputs.global_probs]
    expected = np.stack([sources[np.argmax(inputs.router_probs[i])][i] for i in range(n)])
    np.testing.assert_array_equal(block, expected)
    rows, cols = np.repeat(np.arange(n), v), np.tile(np.arange(v), n)
    np.testing.assert_array_equal(routed_at(inputs, rows, cols), expected.ravel())


def test_assigned_categories_pick_their_model_and_the_global_one_stands_in():
    """One routing rule for the router's choice and for given (e.g. true) categories."""
    inputs = small_inputs()
    names = ["XR", "CT", "unknown", "MRI", "CT", "XR", "MRI", "unknown", "CT", "MRI", "XR", "CT"]
    assigned = category_positions(inputs, names)
    np.testing.assert_array_equal(assigned[:4], [2, 0, -1, 1])
    block = assigned_block(inputs, assigned, slice(0, inputs.n_images))
    source = {"CT": inputs.category_probs["CT"], "MRI": inputs.category_probs["MRI"].astype(np.float32)}
    expected = np.stack([source.get(name, inputs.global_probs)[i] for i, name in enumerate(names)])
    np.testing.assert_array_equal(block, expected)  # XR (fell back) and unknown: the global model
    assert block.dtype == np.float32 and np.isnan(block[1, :3]).all()  # CT does not know 0-2
    routed_names = [inputs.categories[c] for c in np.argmax(inputs.router_probs, axis=1)]
    routed_rows = slice(3, 9)
    np.testing.assert_array_equal(
        routed_block(inputs, routed_rows),
        assigned_block(inputs, category_positions(inputs, routed_names)[routed_rows], routed_rows),
    )


def test_gather_reads_dense_sparse_and_missing():
    dense = np.arange(12, dtype=np.float32).reshape(3, 4)
    rows, cols = np.array([0, 2, 1]), np.array([3, 0, 2])
    np.testing.assert_array_equal(gather(dense, rows, cols), [3, 8, 6])
    matrix = sp.csr_matrix(np.where(dense % 3 == 0, dense, 0))
    np.testing.assert_array_equal(gather(matrix, rows, cols), [3, 0, 6])
    assert np.isnan(gather(None, rows, cols)).all()


def test_top_k_dense_and_sparse_agree_with_sorting():
    rng = np.random.default_rng(3)
    block = rng.random((6, 10)).astype(np.float32)
    block[0, :8] = np.nan  # only two usable values in row 0
    rows, cols, ranks = top_k_dense_rows(block, 3)
    for i in range(6):
        usable = np.where(np.isnan(block[i]), -1, block[i])
        expected = [c for c in np.argsort(-usable)[:3] if usable[c] > 0]
        assert list(cols[rows == i]) == expected
        assert list(ranks[rows == i]) == list(range(len(expected)))
    s_rows, s_cols, s_ranks = top_k_sparse_rows(sp.csr_matrix(np.nan_to_num(block)), 3)
    key = lambda r, c, k: sorted(zip(r.tolist(), c.tolist(), k.tolist()))  # noqa: E731
    assert key(s_rows, s_cols, s_ranks) == key(rows, cols, ranks)


def test_descending_rank_within_rows():
    rows = np.array([0, 0, 0, 2, 2])
    values = np.array([0.2, 0.9, 0.5, 0.1, 0.3])
    np.testing.assert_array_equal(descending_rank_within_rows(rows, values, 3), [2, 0, 1, 1, 0])


def test_limit_labels_per_row_tops_up_and_cuts():
    scores = sp.csr_matrix(np.array([[0.9, 0.8, 0.7, 0.0], [0.3, 0.2, 0.0, 0.1], [0.0, 0.0, 0.0, 0.0]], np.float32))
    passed = np.array([True, True, True, False, False, False])  # row 0 all pass, row 1 none
    chosen = limit_labels_per_row(scores, passed, min_labels=1, max_labels=2).toarray()
    np.testing.assert_array_equal(chosen[0], [True, True, False, False])  # cut to the best 2
    np.testing.assert_array_equal(chosen[1], [True, False, False, False])  # topped up with the best
    assert not chosen[2].any()  # nothing to choose from
