"""Concept scores from the nearest training images in a CNN embedding space.

Retrieval of similar training images and a vote over their concepts was part of the strongest
published ImageCLEF concept-detection systems; it catches concepts a classifier under-ranks
(rare ones especially). Similarities are computed block by block so a 80,000 x 80,000 matrix
never exists.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


# Similarities held at once: a block of queries x all training images. At 2026 size (97,000
# training images) 1,024 queries made a 397 MB block plus an 794 MB int64 argpartition of it;
# this bound keeps a block near 64 MB (+128 MB) however large the training set is.
SIMILARITY_BLOCK_ELEMENTS = 2**24


def _unit_rows(embeddings: np.ndarray) -> np.ndarray:
    vectors = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


class NearestNeighbourScorer:
    """Similarity-weighted vote of the k most cosine-similar training images.

    score(x, y) = sum_{j in kNN(x)} s_j [y in labels_j] / sum_{j in kNN(x)} s_j with s_j = max(cos, 0),
    so a score is the weighted fraction of neighbours carrying the concept, in [0, 1].

    Parameters
    ----------
    n_neighbours : int, default=10
    chunk_size : int, default=1024
        Most query images per block of similarities (bounds memory, not the result); fewer
        when a block would hold more than `SIMILARITY_BLOCK_ELEMENTS` similarities.

    Attributes
    ----------
    train_vectors_ : numpy.ndarray of shape (n_train, dim), float32
        Unit-length training embeddings.
    train_labels_ : scipy.sparse.csr_matrix of shape (n_train, n_concepts), float32
    """

    def __init__(self, n_neighbours: int = 10, chunk_size: int = 1024) -> None:
        self.n_neighbours = n_neighbours
        self.chunk_size = chunk_size

    def fit(self, train_embeddings: np.ndarray, train_labels: sp.spmatrix | np.ndarray) -> "NearestNeighbourScorer":
        """Store the training images.

        Parameters
        ----------
        train_embeddings : numpy.ndarray of shape (n_train, dim), float
        train_labels : numpy.ndarray or scipy.sparse matrix of shape (n_train, n_concepts), 0/1

        Returns
        -------
        self : NearestNeighbourScorer
        """
        labels = sp.csr_matrix(train_labels, dtype=np.float32)
        if labels.shape[0] != len(train_embeddings):
            raise ValueError(f"{len(train_embeddings)} embeddings but {labels.shape[0]} label rows")
        self.train_vectors_ = _unit_rows(train_embeddings)
        self.train_labels_ = labels
        return self

    def neighbours(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(indices, similarities), each (n, k), most similar first.

        Parameters
        ----------
        embeddings : numpy.ndarray of shape (n_images, dim), float

        Returns
        -------
        indices : numpy.ndarray of shape (n_images, k), int64
            Training rows; k = min(n_neighbours, n_train).
        similarities : numpy.ndarray of shape (n_images, k), float32
            Cosine similarities.
        """
        queries = _unit_rows(embeddings)
        k = min(self.n_neighbours, self.train_vectors_.shape[0])
        all_indices = np.empty((queries.shape[0], k), dtype=np.int64)
        all_similarities = np.empty((queries.shape[0], k), dtype=np.float32)
        chunk = max(1, min(self.chunk_size, SIMILARITY_BLOCK_ELEMENTS // max(self.train_vectors_.shape[0], 1)))
        for start in range(0, queries.shape[0], chunk):
            block = queries[start : start + chunk] @ self.train_vectors_.T
            if k < block.shape[1]:
                top = np.argpartition(-block, k - 1, axis=1)[:, :k]
            else:
                top = np.broadcast_to(np.arange(block.shape[1]), (block.shape[0], k))
            similarity = np.take_along_axis(block, top, axis=1)
            order = np.argsort(-similarity, axis=1, kind="stable")
            all_indices[start : start + block.shape[0]] = np.take_along_axis(top, order, axis=1)
            all_similarities[start : start + block.shape[0]] = np.take_along_axis(similarity, order, axis=1)
        return all_indices, all_similarities

    def predict(self, embeddings: np.ndarray) -> sp.csr_matrix:
        """(n, V) CSR float32 of neighbour-vote scores; concepts no neighbour carries are absent.

        Parameters
        ----------
        embeddings : numpy.ndarray of shape (n_images, dim), float

        Returns
        -------
        scipy.sparse.csr_matrix of shape (n_images, n_concepts), float32
        """
        indices, similarities = self.neighbours(embeddings)
        weights = np.maximum(similarities, 0.0)
        totals = weights.sum(axis=1, keepdims=True)
        weights = np.divide(weights, totals, out=np.zeros_like(weights), where=totals > 0)
        n, k = indices.shape
        vote = sp.csr_matrix(
            (weights.ravel(), indices.ravel(), np.arange(0, n * k + 1, k)),
            shape=(n, self.train_vectors_.shape[0]),
        )
        scores = (vote @ self.train_labels_).tocsr()
        scores.eliminate_zeros()
        scores.sort_indices()
        return scores.astype(np.float32)
