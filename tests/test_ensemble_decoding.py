"""Expected-F1 decoding on hand-computed cases, and choosing/saving the decision rule."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp

from conceptclef.core.config import EnsembleConfig
from conceptclef.ensemble.decoding import ExpectedF1Decoder, choose_decision_rule, load_decision, save_decision
from conceptclef.ensemble.thresholds import ConceptThresholdTuner
from conceptclef.scoring.f1 import mean_sample_f1_sparse


def rows_to_csr(rows: list[list[float]]) -> sp.csr_matrix:
    return sp.csr_matrix(np.array(rows, dtype=np.float32))


def test_expected_f1_picks_the_hand_computed_k():
    # Row 0: sum 1.8; E(1)=1.8/2.8=.643, E(2)=3.4/3.8=.895, E(3)=3.6/4.8=.75 -> k=2.
    # Row 1: sum 1.5; E(1)=1.8/2.5=.72, E(2)=2.2/3.5=.629 -> k=1.
    # Row 2: sum 2.4 (0.6 x 4); E(k)=1.2k/(k+2.4): .353,.545,.667,.750 -> k=4 (all).
    probs = rows_to_csr([[0.1, 0.9, 0.8, 0, 0], [0.2, 0.9, 0.2, 0.2, 0], [0.6, 0.6, 0, 0.6, 0.6]])
    chosen = ExpectedF1Decoder(min_labels=1, max_labels=10).predict(probs).toarray()
    np.testing.assert_array_equal(chosen[0], [False, True, True, False, False])
    np.testing.assert_array_equal(chosen[1], [False, True, False, False, False])
    np.testing.assert_array_equal(chosen[2], [True, True, False, True, True])
    _, k, gain = ExpectedF1Decoder().expected_f1(probs)
    np.testing.assert_allclose(gain[:3], [1.8 / 2.8, 3.4 / 3.8, 3.6 / 4.8], rtol=1e-6)
    np.testing.assert_array_equal(k[:3], [1, 2, 3])


def test_expected_f1_respects_label_bounds_and_empty_rows():
    probs = rows_to_csr([[0.6, 0.6, 0.6, 0.6], [0.05, 0.01, 0, 0], [0, 0, 0, 0]])
    decoder = ExpectedF1Decoder(min_labels=2, max_labels=3)
    counts = np.diff(decoder.predict(probs).indptr)
    np.testing.assert_array_equal(counts, [3, 2, 0])  # cut at 3; topped up to 2; nothing to take


def test_expected_missing_truth_is_learned_and_changes_the_cut():
    # Row sum 1.0; without missing truth E(1)=1.2/2=.6, E(2)=1.6/3=.533, E(3)=2/4=.5 -> k=1;
    # with 2 more expected true concepts E(1)=1.2/4=.3, E(2)=1.6/5=.32, E(3)=2/6=.333 -> k=3.
    probs = rows_to_csr([[0.6, 0.2, 0.2]])
    assert np.diff(ExpectedF1Decoder().predict(probs).indptr)[0] == 1
    truth = sp.csr_matrix(np.array([[1, 1, 1]], dtype=bool))
    decoder = ExpectedF1Decoder().fit(probs, truth, truth_outside=np.array([0]))
    assert decoder.expected_missing_ == pytest.approx(2.0)
    assert np.diff(decoder.predict(probs).indptr)[0] == 3


def calibrated_case(n: int, v: int, seed: int):
    rng = np.random.default_rng(seed)
    probs = rng.beta(0.3, 2.0, (n, v)).astype(np.float32)
    probs[probs < 0.02] = 0
    truth = sp.csr_matrix(rng.random((n, v)) < probs)
    return sp.csr_matrix(probs), truth, np.zeros(n, dtype=np.int64)


def test_choose_decision_rule_compares_by_cross_validation_and_refits():
    probs, truth, outside = calibrated_case(600, 30, seed=0)
    config = EnsembleConfig(folds=3)
    name, decider, scores = choose_decision_rule(probs, truth, outside, config, seed=0)
    assert set(scores) == {"thresholds", "expected_f1"}
    assert name == max(scores, key=scores.get)
    assert all(0.0 < score < 1.0 for score in scores.values())
    # On calibrated probabilities, expected-F1 decoding is the rule that should win.
    assert name == "expected_f1"
    assert mean_sample_f1_sparse(decider.predict(probs), truth, outside) > 0


def test_forced_decision_rule_is_honoured():
    probs, truth, outside = calibrated_case(200, 20, seed=1)
    config = EnsembleConfig(decision_rule="thresholds", threshold_prior_strength=4.0, max_labels=7)
    name, decider, scores = choose_decision_rule(probs, truth, outside, config)
    assert name == "thresholds" and scores == {}
    assert isinstance(decider, ConceptThresholdTuner)
    assert decider.prior_strength == 4.0 and decider.max_labels == 7


@pytest.mark.parametrize("rule", ["thresholds", "expected_f1"])
def test_decision_save_load_round_trip(rule, tmp_path):
    probs, truth, outside = calibrated_case(300, 20, seed=2)
    config = EnsembleConfig(decision_rule=rule)
    name, decider, scores = choose_decision_rule(probs, truth, outside, config)
    path = save_decision(tmp_path, name, decider, scores)
    record = json.loads(path.read_text())
    assert record["rule"] == rule and (tmp_path / record["file"]).is_file()
    loaded_name, loaded = load_decision(tmp_path)
    assert loaded_name == rule
    assert (loaded.predict(probs) != decider.predict(probs)).nnz == 0
