"""Per-concept threshold tuning on the official sample-averaged F1."""

from __future__ import annotations

import time

import numpy as np
import pytest
import scipy.sparse as sp

from conceptclef.ensemble.sparse_ops import as_score_csr
from conceptclef.ensemble.thresholds import ConceptThresholdTuner, concept_gain_curve, tune_global_threshold
from conceptclef.scoring.f1 import mean_sample_f1_sparse, per_image_f1_sparse


def shifted_concepts(n: int = 800, seed: int = 0):
    """Concept j's positives sit around centre_j + 0.1 and negatives around centre_j - 0.1."""
    rng = np.random.default_rng(seed)
    centres = np.array([0.15, 0.3, 0.5, 0.7, 0.85])
    truth = rng.random((n, centres.size)) < 0.35
    probs = centres + np.where(truth, 0.1, -0.1) + rng.normal(0, 0.03, truth.shape)
    return np.clip(probs, 0.01, 0.99).astype(np.float32), sp.csr_matrix(truth), centres


def random_case(n: int = 300, v: int = 40, seed: int = 1):
    rng = np.random.default_rng(seed)
    truth = sp.csr_matrix(rng.random((n, v)) < 0.1)
    signal = truth.toarray() * rng.uniform(0.0, 0.5, v)
    probs = np.clip(rng.random((n, v)) * 0.6 + signal, 0, 1)
    probs[rng.random((n, v)) < 0.5] = 0.0  # sparse candidates, as after stacking
    outside = rng.poisson(0.5, n)
    return sp.csr_matrix(probs.astype(np.float32)), truth, outside


def test_tuner_beats_a_fixed_half_threshold_when_concepts_need_their_own():
    probs, truth, centres = shifted_concepts()
    tuner = ConceptThresholdTuner(prior_strength=0.0, min_labels=0).fit(probs, truth)
    fixed = mean_sample_f1_sparse(sp.csr_matrix(probs >= 0.5), truth)
    tuned = mean_sample_f1_sparse(tuner.predict(probs), truth)
    assert tuned > 0.97 and tuned > fixed + 0.2, (tuned, fixed)
    assert np.all(np.abs(tuner.thresholds_ - centres) < 0.06), tuner.thresholds_
    held_probs, held_truth, _ = shifted_concepts(seed=1)  # and it generalises
    assert mean_sample_f1_sparse(tuner.predict(held_probs), held_truth) > 0.95


def test_training_objective_equals_the_official_score_of_the_thresholded_matrix():
    probs, truth, outside = random_case()
    tuner = ConceptThresholdTuner(prior_strength=3.0, sweeps=4).fit(probs, truth, outside)
    official = mean_sample_f1_sparse(tuner.decide(probs), truth, outside)
    assert tuner.sweep_scores_[-1] == pytest.approx(official, abs=1e-12)


def test_coordinate_ascent_never_lowers_the_objective_without_shrinkage():
    probs, truth, outside = random_case(seed=4)
    tuner = ConceptThresholdTuner(prior_strength=0.0, sweeps=5, tolerance=-1.0).fit(probs, truth, outside)
    assert np.all(np.diff(tuner.sweep_scores_) >= -1e-12)
    assert tuner.sweep_scores_[-1] > tuner.sweep_scores_[0]  # better than the global threshold alone


def test_gain_curve_matches_rescoring_with_the_official_metric():
    probs, truth, outside = random_case(seed=2)
    scores = as_score_csr(probs)
    concept = 7
    above = (scores >= 0.45).toarray()
    above[:, concept] = False
    base = sp.csr_matrix(above)
    column = scores[:, concept].toarray().ravel()
    order = [i for i in np.argsort(-column, kind="stable") if column[i] > 0]
    sizes = np.diff(truth.indptr) + outside
    dense_truth = truth.toarray()
    hits = np.asarray(base.multiply(truth).sum(axis=1)).ravel().astype(float)
    predicted = np.diff(base.indptr).astype(float)
    gains = concept_gain_curve(hits[order], predicted[order], sizes[order].astype(float), dense_truth[order, concept])
    start = np.nansum(per_image_f1_sparse(base, truth, outside))
    for m in (1, 5, len(order) // 2, len(order)):
        chosen = above.copy()
        chosen[order[:m], concept] = True
        total = np.nansum(per_image_f1_sparse(sp.csr_matrix(chosen), truth, outside))
        assert gains[m - 1] == pytest.approx(total - start, abs=1e-9)


def test_global_threshold_score_is_the_official_score_at_that_threshold():
    probs, truth, outside = random_case(seed=3)
    threshold, score = tune_global_threshold(probs, truth, outside)
    assert score == pytest.approx(mean_sample_f1_sparse(sp.csr_matrix(probs >= threshold), truth, outside), abs=1e-12)
    for other in np.linspace(0.05, 0.95, 19):
        assert score >= mean_sample_f1_sparse(sp.csr_matrix(probs >= other), truth, outside) - 1e-9


def test_predict_respects_min_and_max_labels():
    probs, truth, outside = random_case(seed=5)
    tuner = ConceptThresholdTuner(prior_strength=1.0, min_labels=2, max_labels=3).fit(probs, truth, outside)
    tuner.thresholds_[:] = 0.0  # everything passes: the max rule must cut
    counts = np.diff(tuner.predict(probs).indptr)
    assert counts.max() == 3
    tuner.thresholds_[:] = 2.0  # nothing passes: the min rule must fill with the best scores
    chosen = tuner.predict(probs)
    available = np.diff(as_score_csr(probs).indptr)
    np.testing.assert_array_equal(np.diff(chosen.indptr), np.minimum(available, 2))
    dense, picked = probs.toarray(), chosen.toarray()
    for i in range(dense.shape[0]):
        if picked[i].any():
            assert dense[i][picked[i]].min() >= np.sort(dense[i])[-2]  # the two best of the row


def test_shrinkage_pulls_rare_concepts_toward_the_global_threshold():
    rng = np.random.default_rng(6)
    n = 2000
    common = rng.random(n) < 0.5
    rare = np.zeros(n, dtype=bool)
    rare[:3] = True
    truth = sp.csr_matrix(np.stack([common, rare], axis=1))
    probs = np.stack([np.where(common, 0.6, 0.4), np.where(rare, 0.08, 0.02)], axis=1).astype(np.float32)
    probs += rng.normal(0, 0.01, probs.shape).astype(np.float32)
    loose = ConceptThresholdTuner(prior_strength=0.0).fit(probs, truth)
    shrunk = ConceptThresholdTuner(prior_strength=50.0).fit(probs, truth)
    g = shrunk.global_threshold_
    assert abs(loose.thresholds_[1] - 0.05) < 0.03  # alone, the rare concept gets its own low cut
    # 3 positives vs 50 pseudo-counts: weight 3/53 on its own cut, the rest on the global one.
    expected_rare = 3 / 53 * loose.thresholds_[1] + 50 / 53 * g
    assert shrunk.thresholds_[1] == pytest.approx(expected_rare, abs=0.01)
    assert abs(shrunk.thresholds_[1] - g) < abs(loose.thresholds_[1] - g) / 10
    # The common concept (~1000 positives) keeps ~95% of its own cut.
    assert abs(shrunk.thresholds_[0] - loose.thresholds_[0]) < 0.06 * abs(loose.thresholds_[0] - g) + 0.01


def test_save_load_round_trip_gives_identical_predictions(tmp_path):
    probs, truth, outside = random_case(seed=7)
    tuner = ConceptThresholdTuner(prior_strength=2.0, min_labels=1, max_labels=5).fit(probs, truth, outside)
    path = tuner.save(tmp_path)
    assert path.name == "thresholds.json"
    loaded = ConceptThresholdTuner.load(path)
    np.testing.assert_array_equal(loaded.thresholds_, tuner.thresholds_)
    assert (loaded.predict(probs) != tuner.predict(probs)).nnz == 0
    assert loaded.get_params() == tuner.get_params()


def test_tuning_is_fast_on_many_images_and_concepts():
    rng = np.random.default_rng(8)
    n, v, per_image = 20_000, 1_000, 40
    rows = np.repeat(np.arange(n), per_image)
    cols = rng.integers(0, v, rows.size)
    probs = sp.csr_matrix((rng.random(rows.size).astype(np.float32), (rows, cols)), shape=(n, v))
    probs.sum_duplicates()
    truth = sp.csr_matrix((probs.data > 0.7, probs.indices, probs.indptr), shape=(n, v))
    start = time.perf_counter()
    tuner = ConceptThresholdTuner().fit(probs, truth)
    elapsed = time.perf_counter() - start
    assert elapsed < 15.0, elapsed
    assert tuner.sweep_scores_[-1] > 0.95  # the 0.7 cut is found


def test_tied_probabilities_across_neighbouring_concepts_do_not_break_fit():
    """A concept whose entries all equal the next concept's first value still gets a threshold."""
    import numpy as np
    import scipy.sparse as sp

    from conceptclef.ensemble.thresholds import ConceptThresholdTuner

    probs = sp.csr_matrix(np.array([[0.3, 0.3, 0.0], [0.3, 0.3, 0.9], [0.3, 0.0, 0.9]]))
    truth = sp.csr_matrix(np.array([[1, 0, 0], [0, 1, 1], [1, 0, 1]]))
    tuner = ConceptThresholdTuner(prior_strength=0.0).fit(probs, truth)
    assert tuner.thresholds_.shape == (3,)
    assert tuner.predict(probs).toarray()[:, 0].all()  # concept 0 is right on 2 of its 3 images: worth predicting
