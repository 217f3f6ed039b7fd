"""The kNN scorer against a brute-force vote over the full similarity matrix."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from conceptclef.ensemble.knn import NearestNeighbourScorer


def brute_force_scores(train: np.ndarray, labels: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    train_unit = train / np.linalg.norm(train, axis=1, keepdims=True)
    query_unit = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    scores = np.zeros((len(queries), labels.shape[1]))
    for i, query in enumerate(query_unit):
        similarity = train_unit @ query
        nearest = np.argsort(-similarity)[:k]
        weights = np.maximum(similarity[nearest], 0)
        if weights.sum() > 0:
            scores[i] = weights @ labels[nearest] / weights.sum()
    return scores


def test_knn_matches_brute_force_across_chunk_sizes():
    rng = np.random.default_rng(0)
    train = rng.standard_normal((300, 16))
    labels = (rng.random((300, 25)) < 0.15).astype(np.float32)
    queries = rng.standard_normal((70, 16))
    expected = brute_force_scores(train, labels, queries, k=7)
    for chunk in (8, 1024):
        scorer = NearestNeighbourScorer(n_neighbours=7, chunk_size=chunk).fit(train, sp.csr_matrix(labels))
        got = scorer.predict(queries)
        assert sp.issparse(got) and got.shape == (70, 25)
        np.testing.assert_allclose(got.toarray(), expected, atol=1e-5)


def test_knn_finds_an_identical_image_first_and_scores_are_fractions():
    rng = np.random.default_rng(1)
    train = rng.standard_normal((50, 8))
    labels = sp.csr_matrix((rng.random((50, 10)) < 0.3).astype(np.float32))
    scorer = NearestNeighbourScorer(n_neighbours=5).fit(train, labels)
    indices, similarities = scorer.neighbours(train[[3, 17]] * 2.5)  # scaling does not change cosine
    np.testing.assert_array_equal(indices[:, 0], [3, 17])
    np.testing.assert_allclose(similarities[:, 0], 1.0, atol=1e-5)
    assert np.all(np.diff(similarities, axis=1) <= 1e-7)
    scores = scorer.predict(rng.standard_normal((20, 8)))
    assert scores.data.min() > 0 and scores.data.max() <= 1.0 + 1e-6


def test_knn_with_fewer_training_images_than_neighbours():
    train = np.eye(3, 4)
    labels = sp.csr_matrix(np.eye(3, 5, dtype=np.float32))
    scores = NearestNeighbourScorer(n_neighbours=10).fit(train, labels).predict(np.array([[1.0, 0, 0, 0]]))
    np.testing.assert_allclose(scores.toarray(), [[1.0, 0, 0, 0, 0]])  # the other two have similarity 0


def test_similarity_blocks_shrink_with_the_training_set(monkeypatch):
    """A block holds at most SIMILARITY_BLOCK_ELEMENTS similarities (1,024 queries x 97,000 training
    images were 1.2 GB with the argpartition), and the scores do not depend on it."""
    from conceptclef.ensemble import knn

    rng = np.random.default_rng(3)
    train = rng.standard_normal((300, 16))
    labels = sp.csr_matrix((rng.random((300, 25)) < 0.15).astype(np.float32))
    queries = rng.standard_normal((70, 16))
    expected = NearestNeighbourScorer(n_neighbours=7).fit(train, labels).predict(queries).toarray()
    blocks: list[int] = []
    real_argpartition = np.argpartition

    def recording_argpartition(values, *args, **kwargs):
        blocks.append(values.shape[0])
        return real_argpartition(values, *args, **kwargs)

    monkeypatch.setattr(knn, "SIMILARITY_BLOCK_ELEMENTS", 300 * 16)
    monkeypatch.setattr(knn.np, "argpartition", recording_argpartition)
    got = NearestNeighbourScorer(n_neighbours=7).fit(train, labels).predict(queries).toarray()
    assert max(blocks) == 16 and sum(blocks) == 70
    np.testing.assert_allclose(got, expected, atol=1e-6)
