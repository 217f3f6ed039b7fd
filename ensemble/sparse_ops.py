"""Row-wise operations on (images x concepts) score matrices, dense or CSR, without Python loops.

Everything downstream of the networks works on a few dozen candidate scores per image out of
~3,000 concepts, so these helpers keep the sparse form and do per-row ranking, top-k and
lookups with sorts and searches over flat arrays: that is what makes 80,000 images take seconds.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp

DENSE_CHUNK_ROWS = 4096  # rows of a dense (n, V) matrix handled at once: bounds temporary memory


def _require_matrix(values: sp.spmatrix | np.ndarray, what: str) -> None:
    """Refuse a 1-D array (scipy would read it as a single image) and complex values (the cast to
    float would drop the imaginary part): either would give a silently wrong result."""
    if not sp.issparse(values) and np.ndim(values) != 2:
        raise ValueError(f"{what} must be a 2-D (n_images, n_concepts) matrix, got shape {np.shape(values)}")
    if np.iscomplexobj(values):
        raise ValueError(f"Complex data not supported: {what} must be real")


def as_score_csr(scores: sp.spmatrix | np.ndarray) -> sp.csr_matrix:
    """CSR float32 with sorted indices and no stored zeros or NaNs (a zero score is never chosen).

    Parameters
    ----------
    scores : numpy.ndarray or scipy.sparse matrix/array of shape (n_images, n_concepts)
        Probabilities or scores, any real dtype. NaN means "no score" (a model that does not
        know the concept) and is dropped like a zero; an infinite score is refused.

    Returns
    -------
    scipy.sparse.csr_matrix of shape (n_images, n_concepts), float32
        A copy: the caller's matrix is never modified.

    Raises
    ------
    ValueError
        If `scores` is not 2-D, is complex or holds an infinite value.
    """
    _require_matrix(scores, "scores")
    if sp.issparse(scores):
        matrix = sp.csr_matrix(scores, dtype=np.float32, copy=True)
        matrix.data[np.isnan(matrix.data)] = 0.0
    else:
        dense = np.nan_to_num(np.asarray(scores, dtype=np.float32), nan=0.0, posinf=np.inf, neginf=-np.inf)
        matrix = sp.csr_matrix(dense)
    if np.isinf(matrix.data).any():
        raise ValueError("scores hold an infinite value; probabilities must be finite (NaN marks a missing score)")
    matrix.eliminate_zeros()
    matrix.sort_indices()
    return matrix


def as_bool_csr(matrix: sp.spmatrix | np.ndarray) -> sp.csr_matrix:
    """A 0/1 label matrix as CSR bool with sorted indices.

    Parameters
    ----------
    matrix : numpy.ndarray or scipy.sparse matrix/array of shape (n_images, n_concepts)
        Labels; any nonzero value is a positive.

    Returns
    -------
    scipy.sparse.csr_matrix of shape (n_images, n_concepts), bool
        A copy without stored False entries.

    Raises
    ------
    ValueError
        If `matrix` is not 2-D or is complex.
    """
    _require_matrix(matrix, "labels")
    result = sp.csr_matrix(matrix, dtype=bool, copy=True)
    result.eliminate_zeros()
    result.sort_indices()
    return result


def row_of_entries(matrix: sp.csr_matrix) -> np.ndarray:
    """The row index of every stored entry of a CSR matrix, aligned with `.data`.

    Parameters
    ----------
    matrix : scipy.sparse.csr_matrix of shape (n_rows, n_cols)

    Returns
    -------
    numpy.ndarray of shape (matrix.nnz,), int64
    """
    return np.repeat(np.arange(matrix.shape[0], dtype=np.int64), np.diff(matrix.indptr))


def pair_keys(rows: np.ndarray, cols: np.ndarray, n_cols: int) -> np.ndarray:
    """One int64 key per (row, col) so pairs can be sorted, merged and searched as a flat array.

    Parameters
    ----------
    rows, cols : numpy.ndarray of shape (P,), int
    n_cols : int
        Columns of the matrix the pairs index.

    Returns
    -------
    numpy.ndarray of shape (P,), int64
        rows * n_cols + cols.
    """
    return rows.astype(np.int64) * int(n_cols) + cols.astype(np.int64)


def gather(matrix: sp.spmatrix | np.ndarray | None, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Values of `matrix` at the (row, col) pairs as float32; a missing sparse entry reads 0, None reads NaN.

    Parameters
    ----------
    matrix : numpy.ndarray or scipy.sparse matrix of shape (n_images, n_concepts), or None
    rows, cols : numpy.ndarray of shape (P,), int

    Returns
    -------
    numpy.ndarray of shape (P,), float32
    """
    if matrix is None:
        return np.full(rows.shape, np.nan, dtype=np.float32)
    if not sp.issparse(matrix):
        return np.asarray(matrix[rows, cols], dtype=np.float32)
    csr = sp.csr_matrix(matrix)
    csr.sort_indices()
    keys = pair_keys(row_of_entries(csr), csr.indices, csr.shape[1])
    wanted = pair_keys(rows, cols, csr.shape[1])
    values = np.zeros(rows.shape, dtype=np.float32)
    if keys.size == 0:
        return values
    position = np.minimum(np.searchsorted(keys, wanted), keys.size - 1)
    hit = keys[position] == wanted
    values[hit] = csr.data[position[hit]]
    return values


def descending_rank_within_rows(row_index: np.ndarray, values: np.ndarray, n_rows: int) -> np.ndarray:
    """0-based rank of each entry among its row's entries by descending value (ties by position).

    Parameters
    ----------
    row_index : numpy.ndarray of shape (n_entries,), int
    values : numpy.ndarray of shape (n_entries,), float
    n_rows : int

    Returns
    -------
    numpy.ndarray of shape (n_entries,), int64
    """
    order = np.lexsort((-values.astype(np.float64), row_index))
    counts = np.bincount(row_index, minlength=n_rows)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    ranks = np.empty(values.shape[0], dtype=np.int64)
    ranks[order] = np.arange(values.shape[0]) - starts[row_index[order]]
    return ranks


def top_k_dense_rows(block: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols, ranks) of each row's k largest positive values; NaN and <= 0 are never taken.

    Parameters
    ----------
    block : numpy.ndarray of shape (n_rows, n_cols), float
    k : int

    Returns
    -------
    rows, cols, ranks : numpy.ndarray of shape (n_taken,), int64
        Row, column and 0-based descending rank of each value taken.
    """
    n_rows, n_cols = block.shape
    k = min(k, n_cols)
    if k <= 0 or n_rows == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    # NaN (unknown to the model) sorts last in -values, and fails the > 0 test below.
    values = block.astype(np.float32, copy=False)
    if k < n_cols:
        top = np.argpartition(-values, k - 1, axis=1)[:, :k]
    else:
        top = np.broadcast_to(np.arange(n_cols), (n_rows, n_cols))
    top_values = np.take_along_axis(values, top, axis=1)
    order = np.argsort(-top_values, axis=1, kind="stable")
    top = np.take_along_axis(top, order, axis=1)
    top_values = np.take_along_axis(top_values, order, axis=1)
    ranks = np.broadcast_to(np.arange(k), (n_rows, k))
    rows = np.broadcast_to(np.arange(n_rows)[:, None], (n_rows, k))
    keep = top_values > 0
    return rows[keep].astype(np.int64), top[keep].astype(np.int64), ranks[keep].astype(np.int64)


def top_k_sparse_rows(matrix: sp.spmatrix, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols, ranks) of each row's k largest positive stored values of a sparse matrix.

    Parameters
    ----------
    matrix : scipy.sparse matrix of shape (n_rows, n_cols), float
    k : int

    Returns
    -------
    rows, cols, ranks : numpy.ndarray of shape (n_taken,), int64
    """
    csr = as_score_csr(matrix)
    rows = row_of_entries(csr)
    ranks = descending_rank_within_rows(rows, csr.data, csr.shape[0])
    keep = (ranks < k) & (csr.data > 0)
    return rows[keep], csr.indices[keep].astype(np.int64), ranks[keep]


def limit_labels_per_row(
    scores: sp.csr_matrix, passed: np.ndarray, min_labels: int, max_labels: int
) -> sp.csr_matrix:
    """Bool CSR of the chosen entries: those that `passed`, topped up to `min_labels` by score and cut to
    `max_labels` by score, so every image gets a usable, bounded label set.

    Parameters
    ----------
    scores : scipy.sparse.csr_matrix of shape (n_images, n_concepts), float
    passed : numpy.ndarray of shape (scores.nnz,), bool
        Which stored entries passed the rule, aligned with `scores.data`.
    min_labels, max_labels : int

    Returns
    -------
    scipy.sparse.csr_matrix of shape (n_images, n_concepts), bool
    """
    rows = row_of_entries(scores)
    n_rows = scores.shape[0]
    # Passed entries first (by score), then the rest (by score): the first r of a row are then exactly
    # "the best passed ones" or "all passed plus the best of the others".
    order = np.lexsort((-scores.data.astype(np.float64), ~passed, rows))
    counts = np.bincount(rows, minlength=n_rows)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    position = np.empty(rows.shape[0], dtype=np.int64)
    position[order] = np.arange(rows.shape[0]) - starts[rows[order]]
    n_passed = np.bincount(rows, weights=passed, minlength=n_rows).astype(np.int64)
    keep_count = np.minimum(np.maximum(n_passed, min_labels), max_labels)
    chosen = position < keep_count[rows]
    result = sp.csr_matrix((chosen, scores.indices.copy(), scores.indptr.copy()), shape=scores.shape, dtype=bool)
    result.eliminate_zeros()
    return result


BlockSource = Callable[[slice], np.ndarray]  # rows -> that block of an (n, V) score matrix, float


def _blocks_to_csr(
    blocks: BlockSource | np.ndarray, shape: tuple[int, int], keep: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
) -> sp.csr_matrix:
    """Assemble a CSR float32 from blocks of rows (a block source, or an array read by row slices),
    each reduced by `keep` to (rows, cols) of the entries kept."""
    source = blocks if callable(blocks) else (lambda rows: blocks[rows])
    n_rows, n_cols = shape
    parts_rows, parts_cols, parts_values = [], [], []
    for start in range(0, n_rows, DENSE_CHUNK_ROWS):
        block = np.asarray(source(slice(start, min(start + DENSE_CHUNK_ROWS, n_rows))), dtype=np.float32)
        rows, cols = keep(block)
        parts_rows.append(rows + start)
        parts_cols.append(cols)
        parts_values.append(block[rows, cols])
    if not parts_rows:
        return sp.csr_matrix(shape, dtype=np.float32)
    matrix = sp.csr_matrix(
        (np.concatenate(parts_values), (np.concatenate(parts_rows), np.concatenate(parts_cols))), shape=shape, dtype=np.float32
    )
    matrix.sort_indices()
    return matrix


def top_k_csr(blocks: BlockSource | np.ndarray, shape: tuple[int, int], k: int) -> sp.csr_matrix:
    """Each image's k highest positive scores of an (n, V) matrix, as CSR float32, built in blocks of rows.

    What a rule that labels at most k concepts per image needs from a dense matrix: at full
    2026 size (19,240 x 2,646) the dense matrix as CSR holds 51 million entries, its top 100
    per image 1.9 million. NaN and scores <= 0 are never kept (as `as_score_csr` drops them).

    Parameters
    ----------
    blocks : numpy.ndarray of shape (n_images, n_concepts), or callable
        The matrix (a memory map is read block by block), or a function of a slice of rows
        returning that block (so a derived matrix, e.g. routed probabilities, never exists whole).
    shape : tuple of int
        (n_images, n_concepts).
    k : int
        Entries kept per image.

    Returns
    -------
    scipy.sparse.csr_matrix of shape `shape`, float32, sorted indices
    """

    def keep(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows, cols, _ = top_k_dense_rows(block, k)
        return rows, cols

    return _blocks_to_csr(blocks, shape, keep)


def at_least_csr(blocks: BlockSource | np.ndarray, shape: tuple[int, int], floor: float) -> sp.csr_matrix:
    """The scores >= `floor` (and > 0) of an (n, V) matrix as CSR float32, built in blocks of rows.

    Exact for any rule that only looks at scores of at least `floor` (e.g. a sweep of global
    thresholds starting at `floor`).

    Parameters
    ----------
    blocks : numpy.ndarray of shape (n_images, n_concepts), or callable
        As in `top_k_csr`.
    shape : tuple of int
    floor : float

    Returns
    -------
    scipy.sparse.csr_matrix of shape `shape`, float32, sorted indices
    """

    def keep(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows, cols = np.nonzero((block >= floor) & (block > 0))
        return rows.astype(np.int64), cols.astype(np.int64)

    return _blocks_to_csr(blocks, shape, keep)
