"""The LightGBM stacker: better than any single input, honest out-of-fold, deterministic, saved as text."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.metrics import roc_auc_score

from conceptclef.core.config import EnsembleConfig
from conceptclef.ensemble.features import build_pair_table
from conceptclef.ensemble.folds import image_folds
from conceptclef.ensemble.mixing import mixture_block, routed_block
from conceptclef.ensemble.stacker import ConceptStacker, cross_fit_out_of_fold, cross_fit_table, negative_subsample, pair_labels
from conceptclef.ensemble.thresholds import tune_global_threshold
from synthetic_stacking import SyntheticSignals, make_synthetic_set

FAST = dict(candidates_per_model=10, n_estimators=60, learning_rate=0.1, num_leaves=15, num_threads=1)


@pytest.fixture(scope="module")
def informative():
    """Global model noisy; category models sharp on their own category; router mostly right."""
    signals = SyntheticSignals(
        global_signal=0.6, category_signal=2.0, off_category_signal=0.0, router_accuracy=0.9, knn_recall=0.3
    )
    return make_synthetic_set(1500, 80, n_categories=4, labels_per_image=5, signals=signals, seed=5)


def dense_scores(probs) -> np.ndarray:
    return np.nan_to_num(np.asarray(probs.toarray() if sp.issparse(probs) else probs, dtype=np.float32))


def best_f1(probs, truth, outside) -> float:
    return tune_global_threshold(probs, truth, outside)[1]


def test_stacker_beats_every_single_input_on_held_out_images(informative):
    train, held = np.arange(1000), np.arange(1000, 1500)
    inputs = informative.inputs
    stacker = ConceptStacker(**FAST).fit(inputs.subset(train), informative.truth[train])
    test_inputs = inputs.subset(held)
    truth, outside = informative.truth[held], informative.truth_outside[held]
    stacked = best_f1(stacker.predict_proba(test_inputs), truth, outside)
    n = len(held)
    singles = {
        "global": test_inputs.global_probs,
        "routed": routed_block(test_inputs, slice(0, n)),
        "mixture": mixture_block(test_inputs, slice(0, n))[0],
        "knn": test_inputs.knn_scores,
        **{name: probs for name, probs in test_inputs.category_probs.items()},
    }
    scores = {name: best_f1(dense_scores(p), truth, outside) for name, p in singles.items()}
    # Measured: stacked ~0.83, best single input (router mixture) ~0.74, global ~0.36.
    assert stacked > max(scores.values()) + 0.03, (stacked, scores)


def test_out_of_fold_predictions_do_not_see_their_own_labels(informative):
    """With labels independent of the inputs, an honest OOF score is chance while in-sample is not."""
    inputs = informative.inputs.subset(np.arange(600))
    rng = np.random.default_rng(0)
    random_truth = sp.csr_matrix(rng.random((600, inputs.n_concepts)) < 0.08)
    # A fixed number of rounds, so the final model can overfit: the point is that OOF does not.
    config = EnsembleConfig(candidates_per_model=10, n_estimators=60, learning_rate=0.1, num_leaves=31, folds=3, choose_rounds=False)
    oof, final, rounds = cross_fit_out_of_fold(inputs, random_truth, config, seed=1, num_threads=1)
    assert rounds == 60
    table = build_pair_table(inputs, config.candidates_per_model)
    labels = pair_labels(table, random_truth)
    rows, cols = table.candidates.rows, table.candidates.cols
    oof_auc = roc_auc_score(labels, np.asarray(oof[rows, cols]).ravel())
    in_sample_auc = roc_auc_score(labels, final.predict_table(table))
    assert abs(oof_auc - 0.5) < 0.05, oof_auc
    assert in_sample_auc > oof_auc + 0.1, (in_sample_auc, oof_auc)
    assert oof.shape == (600, inputs.n_concepts) and oof.nnz == table.candidates.n_pairs


def test_out_of_fold_uses_every_fold_and_keeps_informative_signal(informative):
    inputs = informative.inputs.subset(np.arange(600))
    truth = informative.truth[:600]
    config = EnsembleConfig(candidates_per_model=10, n_estimators=40, learning_rate=0.1, folds=3)
    oof, final, _ = cross_fit_out_of_fold(inputs, truth, config, seed=0, num_threads=1)
    table = build_pair_table(inputs, 10)
    auc = roc_auc_score(pair_labels(table, truth), np.asarray(oof[table.candidates.rows, table.candidates.cols]).ravel())
    assert auc > 0.8
    assert final.n_train_pairs_ == table.candidates.n_pairs  # the final model saw every image
    folds = image_folds(600, 3, seed=0)
    assert sorted(np.bincount(folds).tolist()) == [200, 200, 200]


def test_fit_is_deterministic_and_save_load_round_trips(informative, tmp_path):
    inputs = informative.inputs.subset(np.arange(400))
    truth = informative.truth[:400]
    first = ConceptStacker(**FAST, seed=3).fit(inputs, truth).predict_proba(inputs)
    stacker = ConceptStacker(**FAST, seed=3).fit(inputs, truth)
    second = stacker.predict_proba(inputs)
    assert (first != second).nnz == 0
    model_path = stacker.save(tmp_path / "ensemble")
    assert model_path.name == "stacker.txt" and model_path.read_text().startswith("tree")
    settings = json.loads((tmp_path / "ensemble" / "stacker.json").read_text())
    assert settings["params"]["seed"] == 3 and settings["categories"] == inputs.categories
    loaded = ConceptStacker.load(tmp_path / "ensemble")
    assert (loaded.predict_proba(inputs) != second).nnz == 0


def test_predict_refuses_inputs_with_other_categories(informative):
    inputs = informative.inputs.subset(np.arange(200))
    stacker = ConceptStacker(**FAST).fit(inputs, informative.truth[:200])
    other = inputs.subset(np.arange(200))
    other.categories = list(reversed(other.categories))
    with pytest.raises(ValueError, match="categories"):
        stacker.predict_proba(other)


def test_rounds_are_chosen_on_held_out_folds(informative):
    """Noise labels stop boosting almost at once; informative ones keep many rounds, and the
    final model has exactly the chosen number of trees."""
    inputs = informative.inputs.subset(np.arange(600))
    config = EnsembleConfig(candidates_per_model=10, n_estimators=150, learning_rate=0.1, num_leaves=31, folds=3)
    random_truth = sp.csr_matrix(np.random.default_rng(0).random((600, inputs.n_concepts)) < 0.08)
    _, noise_model, noise_rounds = cross_fit_out_of_fold(inputs, random_truth, config, seed=1, num_threads=1)
    _, model, rounds = cross_fit_out_of_fold(inputs, informative.truth[:600], config, seed=1, num_threads=1)
    assert noise_rounds < 20 < rounds <= 150, (noise_rounds, rounds)
    assert model.booster_.num_trees() == rounds and noise_model.booster_.num_trees() == noise_rounds


def test_folds_stop_boosting_after_their_patience(informative):
    """A generous cap costs little: noise stops every fold within `rounds_patience` of its best."""
    inputs = informative.inputs.subset(np.arange(300))
    config = EnsembleConfig(candidates_per_model=10, n_estimators=2000, learning_rate=0.1, folds=3, rounds_patience=10)
    random_truth = sp.csr_matrix(np.random.default_rng(1).random((300, inputs.n_concepts)) < 0.08)
    table = build_pair_table(inputs, 10)
    labels = pair_labels(table, random_truth)
    folds = image_folds(300, 3, seed=0)
    oof, final, rounds = cross_fit_table(table, labels, folds, inputs.categories, config, seed=0, num_threads=1)
    assert rounds < 50 and final.booster_.num_trees() == rounds
    # Each fold's out-of-fold probabilities come from exactly `rounds` trees, even where that fold ran longer.
    held = folds[table.candidates.rows] == 0
    refit = EnsembleConfig(candidates_per_model=10, n_estimators=rounds, learning_rate=0.1, folds=3)
    fold_model = ConceptStacker.from_config(refit, 0, 1).fit_table(table.take(~held), labels[~held], inputs.categories)
    np.testing.assert_allclose(oof[held], fold_model.predict_table(table.take(held)), rtol=1e-5, atol=1e-6)


def test_negative_subsample_keeps_every_positive_and_weights_the_kept_negatives():
    labels = (np.random.default_rng(0).random(40_000) < 0.05).astype(np.float32)
    rows, weights = negative_subsample(labels, 0.25, from_pairs=10_000, seed=3)
    assert rows is not None and weights is not None
    assert set(np.flatnonzero(labels)) <= set(rows)  # every positive pair is fitted on
    kept_negatives = int((labels[rows] == 0).sum())
    assert abs(kept_negatives - 0.25 * (labels == 0).sum()) < 0.02 * (labels == 0).sum()
    np.testing.assert_array_equal(weights, np.where(labels[rows] > 0, 1.0, 4.0).astype(np.float32))
    # The weighted negatives stand for all of them: the weighted base rate is the table's.
    assert abs(float((weights * labels[rows]).sum() / weights.sum()) - float(labels.mean())) < 0.003
    again, _ = negative_subsample(labels, 0.25, from_pairs=10_000, seed=3)
    np.testing.assert_array_equal(rows, again)  # seeded: a rerun fits on the same pairs


@pytest.mark.parametrize("fraction, from_pairs", [(1.0, 0), (0.25, 40_001)])
def test_negative_subsample_keeps_small_tables_and_fraction_one_whole(fraction, from_pairs):
    labels = np.zeros(40_000, dtype=np.float32)
    assert negative_subsample(labels, fraction, from_pairs, seed=0) == (None, None)


def test_subsampled_stacker_stays_calibrated_and_informative(informative):
    """Fitted on a quarter of the negatives, weighted: probabilities keep the base rate and the ranking."""
    inputs, truth = informative.inputs, informative.truth
    table = build_pair_table(inputs.subset(np.arange(1000)), 10)
    labels = pair_labels(table, truth[:1000])
    held_table = build_pair_table(inputs.subset(np.arange(1000, 1500)), 10)
    held_labels = pair_labels(held_table, truth[1000:])
    settings = dict(FAST, n_estimators=120, learning_rate=0.05)
    whole = ConceptStacker(**settings, subsample_from_pairs=10**9).fit_table(table, labels, inputs.categories)
    sampled = ConceptStacker(**settings, negative_fraction=0.25, subsample_from_pairs=0).fit_table(table, labels, inputs.categories)
    whole_probs, sampled_probs = whole.predict_table(held_table), sampled.predict_table(held_table)
    assert not np.allclose(whole_probs, sampled_probs)  # the subsample was used
    assert abs(float(sampled_probs.mean()) - float(held_labels.mean())) < 0.02
    assert roc_auc_score(held_labels, sampled_probs) > roc_auc_score(held_labels, whole_probs) - 0.01


@pytest.mark.parametrize("rounds", [1, 37, 80])
def test_held_out_probabilities_from_kept_scores_equal_a_fresh_prediction(informative, rounds):
    inputs, truth = informative.inputs, informative.truth
    table = build_pair_table(inputs, 10)
    labels = pair_labels(table, truth)
    held = np.asarray(image_folds(inputs.n_images, 4, 0))[table.candidates.rows] == 0
    stacker = ConceptStacker(**dict(FAST, n_estimators=80)).fit_table(
        table.take(~held), labels[~held], inputs.categories, table.take(held), labels[held]
    )
    held_table = table.take(held)
    np.testing.assert_allclose(
        stacker.held_out_probabilities(held_table, rounds), stacker.predict_table(held_table, rounds), rtol=0, atol=1e-6
    )
    with pytest.raises(ValueError, match="after 81"):
        stacker.held_out_probabilities(held_table, 81)
