"""Horizontal-flip test-time augmentation: a model's probabilities averaged over each image and its mirror.

Every prediction the stacker sees goes through here, for validation images (what the stacker
learns from) and test images alike, so a model trained with `flip_tta = true` is always read the
same way: the switch travels in its checkpoint's training settings, not in the caller's config.
Embeddings (the kNN index and queries) stay those of the unflipped image.

The mirror is an in-memory copy made in blocks: head-mode models share their frozen backbone's
features through the feature store, which identifies an in-memory block by its bytes, so the
router, the global and the category models still push each mirrored image through the shared
backbone once.
"""

from __future__ import annotations

from typing import Any

import numpy as np

MIRROR_BLOCK_IMAGES = 2048  # bounds the mirrored copy's memory (2048 x 224 x 224 x 3 bytes = 308 MB)


def mirrored(images: Any) -> np.ndarray:
    """uint8 (N, S, S, 3) images flipped left-right (the width axis)."""
    return np.ascontiguousarray(np.asarray(images)[:, :, ::-1, :])


def uses_flip_tta(model: Any) -> bool:
    training = getattr(model, "training", None)
    return bool(getattr(training, "flip_tta", False))


def _mirrored_probabilities(model: Any, images: Any) -> np.ndarray:
    blocks = [
        model.predict_proba(mirrored(images[start : start + MIRROR_BLOCK_IMAGES]))
        for start in range(0, len(images), MIRROR_BLOCK_IMAGES)
    ]
    return np.concatenate(blocks) if blocks else model.predict_proba(images[:0])


def _with_mirror(model: Any, images: Any, probs: np.ndarray) -> np.ndarray:
    if not uses_flip_tta(model):
        return probs
    return (0.5 * (probs.astype(np.float32) + _mirrored_probabilities(model, images))).astype(np.float32)


def predict_proba(model: Any, images: Any) -> np.ndarray:
    """The model's probabilities, averaged with those of the mirrored images when it asks for flip TTA."""
    return _with_mirror(model, images, model.predict_proba(images))


def predict_proba_and_embed(model: Any, images: Any) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (flip-averaged when asked) and the unflipped images' embeddings."""
    probs, embeddings = model.predict_proba_and_embed(images)
    return _with_mirror(model, images, probs), embeddings
