"""Easy synthetic image tasks (colour encodes the class) for the training tests.

A network that learns nothing from them has a broken loop, not a hard problem, which is what
the tests need; and they have the shapes and dtypes of the real image cache. A plain module
beside the tests (not in the installed package): test files, and the torchrun worker that
tests/test_training_distributed.py runs as a script, import it as `synthetic_images`.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

_PALETTE = np.array(
    [[220, 40, 40], [40, 200, 40], [40, 60, 220], [220, 220, 40], [200, 40, 200], [40, 200, 200], [128, 128, 128]],
    dtype=np.float64,
)


def colour_coded_images(count: int, image_size: int, num_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (count, S, S, 3) noisy images tinted by class, and their class indices (count,)."""
    if not 1 <= num_classes <= len(_PALETTE):
        raise ValueError(f"num_classes must be 1..{len(_PALETTE)}")
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, num_classes, count)
    noise = rng.normal(0.0, 25.0, (count, image_size, image_size, 3))
    images = np.clip(_PALETTE[classes][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return images, classes


def class_concepts(classes: np.ndarray, num_classes: int, concepts_per_class: int = 2) -> sp.csr_matrix:
    """Multi-hot labels: class c has concepts c*k .. c*k+k-1, and every image has one shared last concept."""
    count = len(classes)
    width = num_classes * concepts_per_class + 1
    rows = np.repeat(np.arange(count), concepts_per_class + 1)
    columns = np.concatenate(
        [np.append(np.asarray(c) * concepts_per_class + np.arange(concepts_per_class), width - 1) for c in classes]
    ) if count else np.zeros(0, dtype=np.int64)
    return sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, columns)), shape=(count, width))
