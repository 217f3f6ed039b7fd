"""Batches for training and prediction, read lazily from (memory-mapped) uint8 image arrays.

Images may be any array-like of shape (N, S, S, 3) that supports len() and indexing with a
sorted integer array (np.ndarray, np.memmap, pipeline's SubsetImages): only the rows of one
batch are read at a time, so 80,000 cached images never have to fit in memory. Datasets are
indexed by whole batches (a BatchSampler yields index lists) so a memmap is read in one
sorted gather per batch rather than one seek per image.

Sampling lives in `batch_sampler` alone: distributed training replaces its inner sampler by a
DistributedSampler and nothing else changes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler

from training.augment import BatchAugmenter

Targets = sp.spmatrix | np.ndarray | None


def targets_for(targets: Targets, indices: np.ndarray) -> torch.Tensor:
    """Rows of the targets: multi-hot csr -> float (B, V); class indices -> int64 (B,); None -> empty."""
    if targets is None:
        return torch.empty(0)
    if sp.issparse(targets):
        return torch.from_numpy(targets[indices].toarray().astype(np.float32, copy=False))
    return torch.from_numpy(np.asarray(targets)[indices])


def check_images(images: Any, image_size: int, what: str) -> None:
    """Refuse arrays that are not (N, S, S, 3) uint8 at the model's image size, before any training."""
    shape = tuple(getattr(images, "shape", ()))
    dtype = getattr(images, "dtype", None)
    if len(shape) != 4 or shape[1:] != (image_size, image_size, 3):
        raise ValueError(f"{what}: expected uint8 images of shape (N, {image_size}, {image_size}, 3), got {shape}")
    if dtype is not None and np.dtype(dtype) != np.uint8:
        raise ValueError(f"{what}: expected uint8 pixels, got {dtype}")


class ImageBatches(Dataset):
    """Batch of rows -> (uint8 NCHW images, targets, row indices), optionally augmented."""

    def __init__(self, images: Any, targets: Targets = None, augmenter: BatchAugmenter | None = None) -> None:
        self.images = images
        self.targets = targets
        self.augmenter = augmenter

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = np.sort(np.asarray(indices, dtype=np.int64))
        pixels = np.ascontiguousarray(self.images[rows])
        batch = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
        if self.augmenter is not None:
            batch = self.augmenter(batch)
        return batch, targets_for(self.targets, rows), torch.from_numpy(rows)


class FeatureBatches(Dataset):
    """Batch of rows of cached backbone features -> (features, targets, row indices)."""

    def __init__(self, features: torch.Tensor, targets: Targets = None) -> None:
        self.features = features
        self.targets = targets

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def __getitem__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = np.sort(np.asarray(indices, dtype=np.int64))
        index = torch.from_numpy(rows)
        return self.features[index], targets_for(self.targets, rows), index


def batch_sampler(size: int, batch_size: int, shuffle: bool, generator: torch.Generator | None = None) -> Sampler:
    """Index lists for one pass; training drops a trailing batch of a single image.

    (Batch norm cannot compute statistics of one image whose feature map is 1 x 1.)
    """
    inner: Sampler = RandomSampler(range(size), generator=generator) if shuffle else SequentialSampler(range(size))
    drop_last = shuffle and size > batch_size and size % batch_size == 1
    return BatchSampler(inner, batch_size=batch_size, drop_last=drop_last)


def batch_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    generator: torch.Generator | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader yielding whole batches from a batch-indexed dataset."""
    return DataLoader(
        dataset,
        sampler=batch_sampler(len(dataset), batch_size, shuffle, generator),
        batch_size=None,
        num_workers=num_workers,
        generator=generator,
        pin_memory=pin_memory,
        persistent_workers=False,
    )


def batch_count(size: int, batch_size: int) -> int:
    return math.ceil(size / batch_size)
