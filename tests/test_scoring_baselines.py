"""The trivial baselines that train-all reports beside every model, on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from conceptclef.scoring.baselines import best_most_frequent_k, majority_class_accuracy, most_frequent_concepts_f1, most_frequent_predictions


def test_most_frequent_concepts_picks_the_best_k_by_hand():
    # Column 0 is on every training image, column 1 on two of three, column 2 on one.
    train = np.array([[1, 1, 0], [1, 1, 0], [1, 0, 1]])
    valid = np.array([[1, 0, 0], [1, 1, 0]])
    # k=1 predicts {0}: F1 = 1 and 2*1/(1+2) = 2/3 -> 5/6. k=2 predicts {0,1}: 2/3 and 1 -> 5/6 (not better).
    score, k = most_frequent_concepts_f1(sp.csr_matrix(train), sp.csr_matrix(valid))
    assert k == 1
    assert score == pytest.approx(5 / 6)


def test_most_frequent_concepts_uses_more_concepts_when_they_pay():
    train = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]])
    valid = np.array([[1, 1, 0], [1, 1, 0]])
    score, k = most_frequent_concepts_f1(train, valid)
    assert (score, k) == (pytest.approx(1.0), 2)


def test_most_frequent_concepts_refuses_mismatched_vocabularies():
    with pytest.raises(ValueError, match="columns"):
        most_frequent_concepts_f1(np.ones((2, 3)), np.ones((2, 4)))


def test_majority_class_accuracy():
    assert majority_class_accuracy(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 0])) == pytest.approx(0.5)
    assert majority_class_accuracy(np.array([0]), np.array([], dtype=int)) == 0.0


def test_most_frequent_predictions_give_every_image_the_same_top_k():
    predicted = most_frequent_predictions(np.array([3, 9, 9, 1]), n_images=2, k=2).toarray()
    assert predicted.tolist() == [[False, True, True, False]] * 2


def test_best_k_counts_out_of_vocabulary_truth_as_misses():
    frequency = np.array([5, 1])
    truth = sp.csr_matrix(np.array([[1, 0]]))
    assert best_most_frequent_k(frequency, truth)[0] == pytest.approx(1.0)
    # One more true concept outside the columns: F1 = 2*1/(1+2).
    assert best_most_frequent_k(frequency, truth, np.array([1]))[0] == pytest.approx(2 / 3)
