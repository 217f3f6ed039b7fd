"""A category model's probabilities read on the global columns without a dense copy.

`inputs.project_to_columns` builds an (n, V) float32 matrix per category model, NaN where the
model does not know a concept: at full 2026 size (19,240 validation images x 2,646 concepts) six
of them held 1.2 GB for values that are mostly NaN or a column shuffle of the model's own
(memory-mapped) output file. `ProjectedProbabilities` answers the same reads (a block of rows,
rows picked by index, or values at (row, column) pairs) from the model's matrix as it is asked,
with exactly the values the dense projection holds, so everything downstream (candidates,
features, mixing, the ablation's rows) works unchanged and a block exists only while it is read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class ProjectedProbabilities:
    """(n, V) read-only view of a model's (n, V_model) probabilities on the global columns.

    Reads return float32 arrays equal to `project_to_columns(probs, model_cuis, global_cuis)`
    at the same positions: NaN in the columns the model does not know; concepts the model knows
    but the global vocabulary lacks are dropped.

    Supported reads (what the stacking code uses): ``view[rows]`` with a slice, an int or an
    index/boolean array of rows (a dense (rows, V) block), ``view[rows, cols]`` with two equal-
    length index arrays (values at those pairs), ``np.asarray(view)`` (the whole matrix), `shape`,
    `dtype`, `ndim` and `len`.

    Parameters
    ----------
    probs : numpy.ndarray of shape (n_images, len(model_cuis)), float
        The model's probabilities (a memory map is read only where asked).
    model_cuis : sequence of str
        The model's concept per column.
    global_cuis : sequence of str
        The global vocabulary, one per column of the view.
    """

    dtype = np.dtype(np.float32)
    ndim = 2

    def __init__(self, probs: np.ndarray, model_cuis: Sequence[str], global_cuis: Sequence[str]) -> None:
        if np.ndim(probs) != 2 or probs.shape[1] != len(model_cuis):
            raise ValueError(f"probs has shape {np.shape(probs)} but the model has {len(model_cuis)} concepts")
        global_index = {cui: column for column, cui in enumerate(global_cuis)}
        pairs = [(column, global_index[cui]) for column, cui in enumerate(model_cuis) if cui in global_index]
        self.probs = probs
        self.source = np.array([source for source, _ in pairs], dtype=np.int64)  # model columns kept
        self.target = np.array([target for _, target in pairs], dtype=np.int64)  # their global columns
        self.model_column = np.full(len(global_cuis), -1, dtype=np.int64)  # global column -> model column, -1 unknown
        self.model_column[self.target] = self.source
        self.shape = (int(probs.shape[0]), len(global_cuis))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, tuple):
            if len(key) != 2:
                raise IndexError(f"ProjectedProbabilities takes [rows] or [rows, cols], not {len(key)} indices")
            return self._at_pairs(np.asarray(key[0]), np.asarray(key[1]))
        return self._rows(key)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self._rows(slice(None))
        return whole if dtype is None else whole.astype(dtype, copy=False)

    def _rows(self, rows: Any) -> np.ndarray:
        block = np.asarray(self.probs[rows])
        single = block.ndim == 1
        block = block.reshape(-1, self.probs.shape[1]) if single else block
        projected = np.full((block.shape[0], self.shape[1]), np.nan, dtype=np.float32)
        projected[:, self.target] = block[:, self.source]
        return projected[0] if single else projected

    def _at_pairs(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        if rows.shape != cols.shape or rows.ndim != 1:
            raise IndexError(f"pair reads need two 1-D index arrays of one length, got shapes {rows.shape} and {cols.shape}")
        values = np.full(rows.shape, np.nan, dtype=np.float32)
        model_cols = self.model_column[cols]
        known = model_cols >= 0
        if known.any():
            values[known] = self.probs[rows[known], model_cols[known]]
        return values
