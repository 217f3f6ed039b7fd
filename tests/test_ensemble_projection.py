"""Category probabilities read on the global columns without a dense copy give the dense projection's results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from conceptclef.core.config import EnsembleConfig
from conceptclef.core.runfiles import atomic_save_arrays, map_arrays
from conceptclef.ensemble import sparse_ops
from conceptclef.ensemble.features import build_pair_table
from conceptclef.ensemble.inputs import StackingInputs, project_to_columns
from conceptclef.ensemble.mixing import assigned_block, mixture_block, routed_block
from conceptclef.ensemble.projection import ProjectedProbabilities
from conceptclef.ensemble.stacker import cross_fit_out_of_fold

GLOBAL_CUIS = [f"C{i:03d}" for i in range(40)]


def model_columns(rng: np.random.Generator) -> list[str]:
    """A category vocabulary: a shuffled part of the global one plus two concepts the global model lacks."""
    known = [GLOBAL_CUIS[i] for i in rng.choice(len(GLOBAL_CUIS), size=25, replace=False)]
    return [*known[:12], "C900", *known[12:], "C901"]


@pytest.fixture
def saved_category(tmp_path: Path) -> tuple[np.ndarray, list[str]]:
    """A category model's probabilities as the run keeps them: a memory map of its output file."""
    rng = np.random.default_rng(3)
    cuis = model_columns(rng)
    probs = rng.random((30, len(cuis)), dtype=np.float32)
    atomic_save_arrays(tmp_path / "valid_predictions.npz", probs=probs)
    return map_arrays(tmp_path / "valid_predictions.npz")["probs"], cuis


def test_every_read_equals_the_dense_projection(saved_category: tuple[np.ndarray, list[str]]) -> None:
    probs, cuis = saved_category
    dense = project_to_columns(probs, cuis, GLOBAL_CUIS)
    view = ProjectedProbabilities(probs, cuis, GLOBAL_CUIS)
    assert view.shape == dense.shape and len(view) == dense.shape[0]
    np.testing.assert_array_equal(np.asarray(view), dense)  # NaN in the same places
    np.testing.assert_array_equal(view[3:17], dense[3:17])
    np.testing.assert_array_equal(view[5], dense[5])
    picked = np.array([29, 0, 7, 7])
    np.testing.assert_array_equal(view[picked], dense[picked])
    mask = np.arange(30) % 3 == 0
    np.testing.assert_array_equal(view[mask], dense[mask])
    rng = np.random.default_rng(4)
    rows, cols = rng.integers(0, 30, 500), rng.integers(0, len(GLOBAL_CUIS), 500)
    np.testing.assert_array_equal(view[rows, cols], dense[rows, cols])
    np.testing.assert_array_equal(sparse_ops.gather(view, rows, cols), sparse_ops.gather(dense, rows, cols))
    assert view[rows, cols].dtype == np.float32 and view[3:5].dtype == np.float32


def test_a_float16_output_reads_as_its_float32_projection() -> None:
    rng = np.random.default_rng(5)
    cuis = model_columns(rng)
    probs = rng.random((8, len(cuis))).astype(np.float16)
    np.testing.assert_array_equal(np.asarray(ProjectedProbabilities(probs, cuis, GLOBAL_CUIS)), project_to_columns(probs, cuis, GLOBAL_CUIS))


def test_refuses_a_matrix_of_another_width_and_a_bad_pair_read() -> None:
    with pytest.raises(ValueError, match="the model has 3 concepts"):
        ProjectedProbabilities(np.zeros((2, 4), np.float32), ["C000", "C001", "C002"], GLOBAL_CUIS)
    view = ProjectedProbabilities(np.zeros((2, 3), np.float32), ["C000", "C001", "C002"], GLOBAL_CUIS)
    with pytest.raises(IndexError, match="two 1-D index arrays"):
        view[np.array([0, 1]), np.array([0])]


def stacking_inputs(category_probs: dict, n: int, seed: int = 0) -> StackingInputs:
    rng = np.random.default_rng(seed)
    return StackingInputs(
        image_ids=[f"img{i}" for i in range(n)],
        global_probs=rng.random((n, len(GLOBAL_CUIS)), dtype=np.float32),
        category_probs=category_probs,
        router_probs=rng.dirichlet(np.ones(3), n).astype(np.float32),
        categories=["CT", "MR", "XR"],  # XR fell back to the global model
        concept_frequency=rng.random(len(GLOBAL_CUIS)).astype(np.float32),
        category_concept_frequency=rng.random((3, len(GLOBAL_CUIS))).astype(np.float32),
        knn_scores=sp.random(n, len(GLOBAL_CUIS), density=0.2, random_state=seed, format="csr", dtype=np.float32),
    )


def test_stacker_inputs_and_out_of_fold_probabilities_match_the_dense_path(tmp_path: Path) -> None:
    """Candidates, every feature column, the routed and mixed blocks and the cross-fitted stacker:
    identical whether the category models are projected densely or read through the view."""
    n, rng = 240, np.random.default_rng(7)
    views, dense = {}, {}
    for name in ("CT", "MR"):
        cuis = model_columns(rng)
        atomic_save_arrays(tmp_path / f"{name}.npz", probs=rng.random((n, len(cuis)), dtype=np.float32))
        probs = map_arrays(tmp_path / f"{name}.npz")["probs"]
        views[name] = ProjectedProbabilities(probs, cuis, GLOBAL_CUIS)
        dense[name] = project_to_columns(probs, cuis, GLOBAL_CUIS)
    lazy_inputs, dense_inputs = stacking_inputs(views, n), stacking_inputs(dense, n)
    lazy_table, dense_table = build_pair_table(lazy_inputs, 6), build_pair_table(dense_inputs, 6)
    np.testing.assert_array_equal(lazy_table.candidates.rows, dense_table.candidates.rows)
    np.testing.assert_array_equal(lazy_table.candidates.cols, dense_table.candidates.cols)
    np.testing.assert_array_equal(lazy_table.features, dense_table.features)
    block = slice(10, 90)
    np.testing.assert_array_equal(routed_block(lazy_inputs, block), routed_block(dense_inputs, block))
    for lazy_part, dense_part in zip(mixture_block(lazy_inputs, block), mixture_block(dense_inputs, block)):
        np.testing.assert_array_equal(lazy_part, dense_part)
    assigned = np.random.default_rng(8).integers(-1, 3, 80)
    np.testing.assert_array_equal(assigned_block(lazy_inputs, assigned, block), assigned_block(dense_inputs, assigned, block))
    truth = sp.csr_matrix(np.random.default_rng(9).random((n, len(GLOBAL_CUIS))) < 0.1)
    config = EnsembleConfig(candidates_per_model=6, n_estimators=20, num_leaves=7, folds=3)
    lazy_fit = cross_fit_out_of_fold(lazy_inputs, truth, config, seed=1, num_threads=1)
    dense_fit = cross_fit_out_of_fold(dense_inputs, truth, config, seed=1, num_threads=1)
    assert lazy_fit.rounds == dense_fit.rounds
    assert (lazy_fit.oof_probs != dense_fit.oof_probs).nnz == 0


def test_synthetic_outputs_on_disk_read_as_the_in_memory_ones(tmp_path: Path) -> None:
    """benchmarks/postprocess_scale.py --on-disk: category outputs saved over their own concepts
    and read through the view hold the in-memory set's values (NaN where a model does not know)."""
    from synthetic_stacking import make_synthetic_set

    in_memory = make_synthetic_set(300, 50, n_categories=3, labels_per_image=4, seed=6)
    on_disk = make_synthetic_set(300, 50, n_categories=3, labels_per_image=4, seed=6, out_dir=tmp_path)
    np.testing.assert_array_equal(np.asarray(on_disk.inputs.global_probs), in_memory.inputs.global_probs)
    for name, probs in in_memory.inputs.category_probs.items():
        view = on_disk.inputs.category_probs[name]
        assert isinstance(view, ProjectedProbabilities) and view.probs.shape[1] < 50  # only its own concepts stored
        np.testing.assert_array_equal(np.asarray(view), probs.astype(np.float32))
    assert (on_disk.truth != in_memory.truth).nnz == 0
