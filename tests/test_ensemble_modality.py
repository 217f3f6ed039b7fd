"""The modality features of the stacker: which columns are modality CUIs, and the router's view of them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from conceptclef.ensemble.candidates import build_candidates
from conceptclef.ensemble.features import build_features, feature_names_for
from conceptclef.ensemble.inputs import StackingInputs
from conceptclef.ensemble.modality import MODALITY_FEATURES, modality_columns, modality_features

CATEGORIES = ["DRCO", "DRCT", "DRPE", "DRXR"]
CUIS = ["C0000726", "C0032743", "C0040405", "C1306645", "C0024485"]  # abdomen, PET, CT, XR, MR (no category here)
CATEGORY_OF = {"C0032743": "DRPE", "C0040405": "DRCT", "C1306645": "DRXR", "C0024485": "DRMR"}


def test_modality_columns_name_each_modality_cui_by_router_category() -> None:
    np.testing.assert_array_equal(modality_columns(CUIS, CATEGORY_OF, CATEGORIES), [-1, 2, 1, 3, -1])


def test_modality_features_alone_named_and_rank() -> None:
    router = np.array([[0.3, 0.1, 0.5, 0.1], [0.0, 0.7, 0.2, 0.1]], dtype=np.float32)
    modality = modality_columns(CUIS, CATEGORY_OF, CATEGORIES)
    rows, cols = np.array([0, 0, 0, 1, 1]), np.array([1, 2, 0, 1, 2])
    alone, named, rank = modality_features(router, modality, 0, rows, cols)
    np.testing.assert_allclose(alone[[0, 1, 3, 4]], [0.5, 0.1, 0.2, 0.7])
    np.testing.assert_allclose(named[[0, 1, 3, 4]], [0.8, 0.4, 0.2, 0.7])  # the combined category names both
    np.testing.assert_array_equal(rank[[0, 1, 3, 4]], [1, 2, 2, 1])  # ranked among the single modalities
    assert np.isnan(alone[2]) and np.isnan(named[2]) and np.isnan(rank[2])  # abdomen is no modality
    _, named_without, _ = modality_features(router, modality, -1, rows, cols)
    np.testing.assert_allclose(named_without[[0, 1]], [0.5, 0.1])


def _inputs(modality: bool) -> StackingInputs:
    rng = np.random.default_rng(0)
    n, v, c = 6, len(CUIS), len(CATEGORIES)
    router = rng.dirichlet(np.ones(c), size=n).astype(np.float32)
    return StackingInputs(
        image_ids=[f"i{k}" for k in range(n)],
        global_probs=rng.random((n, v)).astype(np.float32),
        category_probs={},
        router_probs=router,
        categories=CATEGORIES,
        concept_frequency=rng.random(v).astype(np.float32),
        category_concept_frequency=rng.random((c, v)).astype(np.float32),
        modality_category=modality_columns(CUIS, CATEGORY_OF, CATEGORIES) if modality else None,
        several_position=0 if modality else -1,
    )


def test_features_end_with_the_modality_columns_only_when_asked() -> None:
    plain, with_modality = _inputs(False), _inputs(True)
    candidates = build_candidates(plain, 5)
    table = build_features(plain, candidates)
    extended = build_features(with_modality, build_candidates(with_modality, 5))
    assert extended.feature_names == feature_names_for(CATEGORIES, (), modality=True) == table.feature_names + MODALITY_FEATURES
    np.testing.assert_array_equal(extended.features[:, : len(table.feature_names)], table.features)
    expected = modality_features(with_modality.router_probs, with_modality.modality_category, 0, candidates.rows, candidates.cols)
    np.testing.assert_array_equal(extended.features[:, len(table.feature_names):], np.stack(expected, axis=1))
    subset = with_modality.subset([1, 3])
    assert subset.several_position == 0 and subset.modality_category is with_modality.modality_category
    with pytest.raises(ValueError, match="modality_category"):
        dataclasses.replace(with_modality, modality_category=np.array([0, 9, 1, 1, 1]))


def test_concept_statistics_keep_the_modality_columns(tmp_path) -> None:
    from conceptclef.pipeline.stages.stacking import ConceptStatistics

    plain = ConceptStatistics(np.ones(5, np.float32), np.ones((4, 5), np.float32))
    plain.save(tmp_path / "plain.npz")
    assert ConceptStatistics.load(tmp_path / "plain.npz").modality_category is None
    modality = dataclasses.replace(plain, modality_category=modality_columns(CUIS, CATEGORY_OF, CATEGORIES), several_position=0)
    modality.save(tmp_path / "modality.npz")
    loaded = ConceptStatistics.load(tmp_path / "modality.npz")
    np.testing.assert_array_equal(loaded.modality_category, [-1, 2, 1, 3, -1])
    assert loaded.several_position == 0


def test_one_modality_keeps_the_most_probable_unless_combined() -> None:
    import scipy.sparse as sp

    from conceptclef.ensemble.modality import modality_count_errors, modality_rule_gain, one_modality

    modality = modality_columns(CUIS, CATEGORY_OF, CATEGORIES)  # PET col 1 (DRPE), CT col 2 (DRCT), XR col 3 (DRXR)
    decisions = sp.csr_matrix(np.array([
        [1, 1, 1, 0, 0],  # PET and CT, router says PET: keep the more probable (PET)
        [1, 1, 1, 0, 0],  # PET and CT, router says combined: both stay
        [1, 0, 0, 0, 0],  # no modality, router sure of XR: XR added
        [1, 0, 0, 0, 0],  # no modality, router unsure: nothing added
    ], dtype=bool))
    probs = sp.csr_matrix(np.array([[0.9, 0.8, 0.6, 0.1, 0.0]] * 4, dtype=np.float32))
    router = np.array([[0.1, 0.2, 0.6, 0.1], [0.7, 0.1, 0.1, 0.1], [0.0, 0.1, 0.1, 0.8], [0.1, 0.3, 0.3, 0.3]], dtype=np.float32)
    result = one_modality(decisions, probs, router, modality, several_position=0).toarray()
    np.testing.assert_array_equal(result, [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 1, 0], [1, 0, 0, 0, 0]])
    truth = sp.csr_matrix(np.array([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 1, 0], [0, 0, 1, 0, 0]], dtype=bool))
    assert modality_count_errors(decisions, truth, modality) == {
        "truth_one": 3, "predicted_none": 2, "predicted_several": 1, "predicted_other": 0
    }
    assert modality_count_errors(result, truth, modality)["predicted_none"] == 1
    gain, error = modality_rule_gain(decisions, sp.csr_matrix(result), truth, np.zeros(4, dtype=np.int64))
    assert gain > 0 and error >= 0
