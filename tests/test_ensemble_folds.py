"""Cross-validation folds: scikit-learn's KFold from the config seed, pairs following their image,
and the estimators of the ensemble behaving as scikit-learn estimators."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.model_selection import KFold

from conceptclef.core.config import EnsembleConfig
from conceptclef.ensemble.decoding import ExpectedF1Decoder
from conceptclef.ensemble.folds import fold_splits, image_folds
from conceptclef.ensemble.stacker import ConceptStacker
from conceptclef.ensemble.thresholds import ConceptThresholdTuner


def test_image_folds_are_sklearn_kfold_and_repeat_with_the_seed():
    folds = image_folds(103, 5, seed=7)
    expected = np.empty(103, dtype=np.int64)
    for fold, (_, held) in enumerate(KFold(5, shuffle=True, random_state=7).split(np.zeros(103))):
        expected[held] = fold
    np.testing.assert_array_equal(folds, expected)
    np.testing.assert_array_equal(image_folds(103, 5, seed=7), folds)
    assert (image_folds(103, 5, seed=8) != folds).any()
    assert sorted(np.bincount(folds).tolist()) == [20, 20, 21, 21, 21]


@pytest.mark.parametrize(("n_images", "n_folds", "message"), [(10, 1, "at least 2 folds"), (3, 5, "3 images cannot")])
def test_image_folds_refuse_impossible_splits(n_images, n_folds, message):
    with pytest.raises(ValueError, match=message):
        image_folds(n_images, n_folds, seed=0)


def test_pairs_follow_their_image_and_each_is_held_out_once():
    rng = np.random.default_rng(0)
    pair_image = np.sort(rng.integers(0, 40, 500))  # pairs sorted by image, as candidate pairs are
    folds = image_folds(40, 4, seed=3)
    held_count = np.zeros(pair_image.size, dtype=np.int64)
    for fit_on, held in fold_splits(folds[pair_image]):
        assert not set(pair_image[fit_on]) & set(pair_image[held])  # no image on both sides
        assert np.all(np.diff(held) > 0) and np.all(np.diff(fit_on) > 0)  # sorted: pair order is kept
        assert fit_on.size + held.size == pair_image.size
        held_count[held] += 1
    np.testing.assert_array_equal(held_count, 1)


@pytest.mark.parametrize(
    ("estimator", "change"),
    [
        (ConceptStacker(candidates_per_model=7, n_estimators=11, seed=3, num_threads=1), {"num_leaves": 7}),
        (ConceptThresholdTuner(prior_strength=4.0, min_labels=2, max_labels=9), {"min_labels": 5}),
        (ExpectedF1Decoder(min_labels=2, max_labels=9), {"max_labels": 4}),
    ],
    ids=lambda value: type(value).__name__ if not isinstance(value, dict) else "",
)
def test_ensemble_estimators_clone_and_set_params_like_sklearn(estimator, change):
    params = estimator.get_params()
    copy = clone(estimator)
    assert type(copy) is type(estimator) and copy is not estimator and copy.get_params() == params
    copy.set_params(**change)
    assert copy.get_params() == {**params, **change}
    assert estimator.get_params() == params  # the original is untouched
    with pytest.raises(ValueError, match="Invalid parameter"):
        estimator.set_params(not_a_parameter=1)


def test_a_clone_of_a_fitted_tuner_is_unfitted_with_the_same_settings():
    rng = np.random.default_rng(0)
    truth = rng.random((60, 5)) < 0.3
    probs = np.clip(truth * 0.4 + rng.random((60, 5)) * 0.6, 0, 1).astype(np.float32)
    tuner = ConceptThresholdTuner.from_config(EnsembleConfig()).fit(probs, truth)
    copy = clone(tuner)
    assert copy.get_params() == tuner.get_params() and not hasattr(copy, "thresholds_")
    np.testing.assert_array_equal(copy.fit(probs, truth).thresholds_, tuner.thresholds_)
