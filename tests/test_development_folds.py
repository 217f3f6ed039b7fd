"""Folds over the development images for cross-fitted networks: stratified, seeded, disjoint, covering."""

from __future__ import annotations

import numpy as np
import pytest

from conceptclef.core.config import ConfigError, apply_overrides, load_config
from conceptclef.pipeline.run.development_folds import development_folds, fold_rows, fold_seed
from cli_helpers import TEST_CONFIG

CATEGORIES = ["DRCT"] * 53 + ["DRMR"] * 31 + ["DRXR"] * 12 + ["DRPE"] * 3 + ["UNROUTED"] * 7


def test_every_image_is_in_exactly_one_fold_and_every_fold_has_images():
    folds = development_folds(CATEGORIES, 5, seed=0)
    assert folds.shape == (len(CATEGORIES),) and folds.dtype == np.int64
    assert set(folds.tolist()) == set(range(5))


def test_folds_are_stratified_by_category():
    folds = development_folds(CATEGORIES, 5, seed=3)
    labels = np.array(CATEGORIES)
    for category in set(CATEGORIES):
        counts = np.bincount(folds[labels == category], minlength=5)
        assert counts.max() - counts.min() <= 1, (category, counts)


def test_folds_are_seeded():
    assert np.array_equal(development_folds(CATEGORIES, 5, seed=7), development_folds(CATEGORIES, 5, seed=7))
    assert not np.array_equal(development_folds(CATEGORIES, 5, seed=7), development_folds(CATEGORIES, 5, seed=8))


def test_too_few_images_or_folds_are_refused():
    with pytest.raises(ValueError, match="cannot be split into 5 folds"):
        development_folds(["A"] * 4, 5, seed=0)
    with pytest.raises(ValueError, match="at least 2 folds"):
        development_folds(["A"] * 4, 1, seed=0)


@pytest.mark.parametrize("fold", [0, 2, 4])
def test_fold_rows_are_disjoint_and_cover_the_development_set(fold):
    folds = development_folds(CATEGORIES, 5, seed=1)
    rows = fold_rows(CATEGORIES, folds, fold, stopping_fraction=0.1, seed=1)
    parts = [rows.fit, rows.stopping, rows.held_out]
    assert sum(len(part) for part in parts) == len(CATEGORIES)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(CATEGORIES)))
    assert np.array_equal(rows.held_out, np.flatnonzero(folds == fold))
    assert np.array_equal(rows.training, np.flatnonzero(folds != fold))


def test_stopping_rows_come_from_every_category_of_the_fold_training_part():
    folds = development_folds(CATEGORIES, 5, seed=1)
    rows = fold_rows(CATEGORIES, folds, 0, stopping_fraction=0.1, seed=1)
    labels = np.array(CATEGORIES)
    for category in set(CATEGORIES):
        in_training = int(np.sum(labels[rows.training] == category))
        in_stopping = int(np.sum(labels[rows.stopping] == category))
        expected = min(max(1, round(0.1 * in_training)), in_training - 1) if in_training >= 2 else 0
        assert in_stopping == expected, category
        assert np.sum(labels[rows.fit] == category) >= 1


def test_stopping_rows_are_seeded_and_differ_between_folds():
    folds = development_folds(CATEGORIES, 5, seed=1)
    first = fold_rows(CATEGORIES, folds, 1, 0.2, seed=4)
    assert np.array_equal(first.stopping, fold_rows(CATEGORIES, folds, 1, 0.2, seed=4).stopping)
    assert not np.array_equal(first.stopping, fold_rows(CATEGORIES, folds, 1, 0.2, seed=5).stopping)


def test_fold_seed_minus_one_is_the_run_seed():
    assert fold_seed(-1, 11) == 11
    assert fold_seed(3, 11) == 3


def test_the_development_section_is_checked():
    config = load_config(TEST_CONFIG)
    assert config.development.scheme == "split"  # the default keeps the train/valid split
    assert apply_overrides(config, ["development.scheme=cross_fit", "development.folds=3"]).development.folds == 3
    with pytest.raises(ConfigError, match="development.scheme"):
        apply_overrides(config, ["development.scheme=kfold"])
    with pytest.raises(ConfigError, match="development.folds"):
        apply_overrides(config, ["development.folds=1"])


def test_cross_fit_with_an_extra_global_model_at_another_image_size_is_refused_before_any_image_is_read(tmp_path):
    from cli_helpers import cli_error

    error = cli_error(
        "train-all", "--data", tmp_path / "no-data", "--out", tmp_path / "run", "--config", TEST_CONFIG,
        "--set", "development.scheme=cross_fit", "--set", 'extra_global_models=[{name = "big", image_size = 48}]',
    )
    assert "extra_global_models.big.image_size = 48" in error and "cross_fit" in error
    assert not (tmp_path / "run").exists()
