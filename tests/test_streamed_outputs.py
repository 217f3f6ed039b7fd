"""Model outputs read by memory map and dense score matrices reduced block by block (issue 18: memory at 2026 size)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from conceptclef.core.runfiles import atomic_save_arrays, load_arrays, map_arrays
from conceptclef.ensemble import sparse_ops
from conceptclef.ensemble.sparse_ops import as_score_csr, at_least_csr, top_k_csr
from conceptclef.pipeline.stages.reports import threshold_curve
from conceptclef.pipeline.stages.train_networks import ModelPredictions


def test_saved_outputs_are_memory_mapped_and_equal(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "image_ids": np.array(["a", "bb", "ccc"]),
        "probs": rng.random((3, 50), dtype=np.float32),
        "half": rng.random((3, 50)).astype(np.float16),  # a float16 output reads as float16
        "fortran": np.asfortranarray(rng.random((3, 4))),
        "empty": np.zeros((3, 0), np.float32),
    }
    path = tmp_path / "outputs.npz"
    atomic_save_arrays(path, **arrays)
    mapped, loaded = map_arrays(path), load_arrays(path)
    assert set(mapped) == set(arrays)
    for name, array in arrays.items():
        np.testing.assert_array_equal(mapped[name], array)
        assert mapped[name].dtype == array.dtype
    assert isinstance(mapped["probs"], np.memmap) and isinstance(mapped["half"], np.memmap)
    assert not mapped["probs"].flags.writeable  # a run file is never changed through its map
    assert isinstance(loaded["probs"], np.ndarray) and not isinstance(loaded["probs"], np.memmap)


def test_compressed_archives_still_load(tmp_path: Path) -> None:
    path = tmp_path / "compressed.npz"
    probs = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.savez_compressed(path, image_ids=np.array(["a", "b", "c"]), probs=probs)
    with zipfile.ZipFile(path) as archive:
        assert archive.getinfo("probs.npy").compress_type == zipfile.ZIP_DEFLATED
    np.testing.assert_array_equal(map_arrays(path)["probs"], probs)


def test_model_predictions_round_trip_through_the_map(tmp_path: Path) -> None:
    probs = np.random.default_rng(1).random((4, 6), dtype=np.float32)
    ModelPredictions(["w", "x", "y", "z"], probs, probs[:, :2].copy()).save(tmp_path / "valid_predictions.npz")
    saved = ModelPredictions.load(tmp_path / "valid_predictions.npz")
    assert saved.image_ids == ["w", "x", "y", "z"]
    np.testing.assert_array_equal(saved.probs, probs)
    assert saved.embeddings is not None
    np.testing.assert_array_equal(saved.embeddings, probs[:, :2])


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sparse_ops, "DENSE_CHUNK_ROWS", 7)  # several blocks, the last one short


def test_top_k_csr_keeps_each_rows_best_positive_scores(small_blocks: None) -> None:
    rng = np.random.default_rng(2)
    probs = rng.random((30, 40), dtype=np.float32)
    probs[3, :] = 0.0
    probs[5, :35] = np.nan  # a model that does not know most concepts
    reduced = top_k_csr(probs, probs.shape, 4)
    assert reduced.dtype == np.float32 and reduced.has_sorted_indices
    full = as_score_csr(probs)
    for row in range(30):
        values = full[row].toarray().ravel()
        expected = np.sort(values[values > 0])[::-1][:4]
        np.testing.assert_array_equal(np.sort(reduced[row].data)[::-1], expected)
        np.testing.assert_array_equal(reduced[row].toarray().ravel()[reduced[row].indices], values[reduced[row].indices])
    assert reduced[3].nnz == 0 and reduced[5].nnz == 4


def test_top_k_csr_reads_a_derived_matrix_block_by_block(small_blocks: None) -> None:
    base = np.random.default_rng(3).random((20, 9), dtype=np.float32)
    asked: list[slice] = []

    def block(rows: slice) -> np.ndarray:
        asked.append(rows)
        return 2 * base[rows]

    reduced = top_k_csr(block, base.shape, 9)
    np.testing.assert_allclose(reduced.toarray(), 2 * base)
    assert [(rows.start, rows.stop) for rows in asked] == [(0, 7), (7, 14), (14, 20)]


def test_at_least_csr_is_the_thresholded_matrix(small_blocks: None) -> None:
    probs = np.random.default_rng(4).random((25, 11), dtype=np.float32)
    probs[0, 0] = np.nan
    reduced = at_least_csr(probs, probs.shape, 0.3)
    np.testing.assert_array_equal(reduced.toarray(), np.where(np.nan_to_num(probs) >= 0.3, np.nan_to_num(probs), 0.0))


def test_threshold_curve_is_unchanged_by_dropping_scores_below_the_lowest_threshold(small_blocks: None) -> None:
    rng = np.random.default_rng(5)
    probs = rng.random((40, 15), dtype=np.float32)
    truth = sp.csr_matrix(rng.random((40, 15)) < 0.2)
    outside = rng.integers(0, 2, size=40)
    thresholds = np.linspace(0.02, 0.9, 45)
    expected = []
    for threshold in thresholds:  # the curve from every entry, as it was computed before
        decided = sp.csr_matrix(probs >= threshold)
        hits = np.asarray(decided.multiply(truth).sum(axis=1)).ravel()
        sizes = np.asarray(truth.sum(axis=1)).ravel() + outside
        predicted = np.asarray(decided.sum(axis=1)).ravel()
        with np.errstate(invalid="ignore"):
            f1 = np.where(sizes > 0, 2 * hits / np.maximum(predicted + sizes, 1), np.nan)
        expected.append(np.nanmean(f1))
    np.testing.assert_allclose(threshold_curve(probs, truth, outside, thresholds), expected)


def test_ablation_rows_read_the_routed_and_averaged_models_as_top_k(small_blocks: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from conceptclef.ensemble.inputs import StackingInputs
    from conceptclef.pipeline.stages import ablation

    monkeypatch.setattr(ablation, "ABLATION_TOP_K", 3)
    rng = np.random.default_rng(6)
    n, v = 20, 12
    global_probs = rng.random((n, v), dtype=np.float32)
    own = rng.random((n, v), dtype=np.float32)
    own[:, :4] = np.nan  # concepts the category model does not know
    router = rng.random((n, 2)).astype(np.float32)
    inputs = StackingInputs(
        image_ids=[str(i) for i in range(n)], global_probs=global_probs, category_probs={"A": own},
        router_probs=router, categories=["A", "B"], concept_frequency=np.full(v, 0.1, np.float32),
        category_concept_frequency=np.full((2, v), 0.1, np.float32),
    )
    routed = np.where((router.argmax(axis=1) == 0)[:, None], np.nan_to_num(own), global_probs)
    averaged = 0.5 * (global_probs + routed)
    for reduced, dense in ((ablation.routed_probs(inputs), routed), (ablation.averaged_probs(inputs), averaged),
                           (ablation.top_probs(global_probs), global_probs)):
        assert reduced.shape == (n, v) and np.all(np.diff(reduced.indptr) == 3)
        for row in range(n):
            np.testing.assert_allclose(np.sort(reduced[row].data), np.sort(dense[row])[-3:], rtol=1e-6)
    oracle = ablation.routed_probs(inputs, ["B"] * n)  # every image to B, which has no model: the global one
    np.testing.assert_allclose(oracle.toarray(), ablation.top_probs(global_probs).toarray())
    published = ablation.at_published_threshold(global_probs)
    np.testing.assert_array_equal(published.toarray(), global_probs >= 0.5)
