"""Batches for training and prediction, read lazily from (memory-mapped) uint8 image arrays.

Images may be any array-like of shape (N, S, S, 3) that supports len() and indexing with a
sorted integer array (np.ndarray, np.memmap, pipeline's SubsetImages): only the rows of one
batch are read at a time, so 80,000 cached images never have to fit in memory. Datasets are
indexed by whole batches (a BatchSampler yields index lists) so a memmap is read in one
sorted gather per batch rather than one seek per image.

Sampling lives in `batch_sampler` alone. Distributed (see training.distributed): evaluation gives
each rank a contiguous shard of the rows (sizes may differ by one, nothing is padded or
duplicated); training draws the single-process global batches from the shared (seed, epoch)
generator and gives each rank its contiguous slice of every batch (`RankSlices`), so the
per-rank batch is batch_size / world and the global batch, the order of batches and the
gradient (averaged by DDP, see `training_batch_sizes`) stay those of one process.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeAlias, TypeVar

import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler

from conceptclef.training.augment import BatchAugmenter
from conceptclef.training.distributed import SINGLE, Shard, shard_bounds, shard_indices
from conceptclef.training.runtime import process_seed

Targets: TypeAlias = sp.spmatrix | np.ndarray | None
TargetsT = TypeVar("TargetsT", bound=Targets)  # one model's kind of targets (class indices, or a csr matrix)


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

    def __getitem__(self, item: Sequence[int] | SeededBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        indices = item.indices if isinstance(item, SeededBatch) else item
        rows = np.sort(np.asarray(indices, dtype=np.int64))
        pixels = np.ascontiguousarray(self.images[rows])
        # NCHW as a view of the NHWC pixels: channels_last strides, which the device keeps or copies
        # (DeviceSettings.inputs); a .contiguous() here cost ~27 ms a batch of 64 at 384 px.
        batch = torch.from_numpy(pixels).permute(0, 3, 1, 2)
        if self.augmenter is not None:
            if isinstance(item, SeededBatch) and torch.utils.data.get_worker_info() is not None:
                # In a loader worker: the batch's own stream, whichever worker draws it and however long
                # the (persistent) worker has lived. In the main process the per-pass seeded generator serves.
                torch.manual_seed(item.seed)
            batch = self.augmenter(batch)
        return batch, targets_for(self.targets, rows), torch.from_numpy(rows)


@dataclass(frozen=True)
class SeededBatch:
    """A training batch's row indices and the seed of its augmentation (see `ShuffledPasses`)."""

    indices: list[int]
    seed: int


class ShuffledPasses(Sampler[SeededBatch]):
    """Training batches of one pass, reshuffled for each pass from its seed (`set_pass`).

    One sampler (and so one DataLoader with persistent workers) serves every pass of a run: the
    permutation of a pass depends on its seed alone, exactly the one an epoch's own
    `batch_sampler(shuffle=True)` and DataLoader drew from that seed in earlier versions. Each
    batch carries a seed from (pass, batch, rank), so loader workers augment it alike whatever
    worker draws it, and a resumed run draws what an uninterrupted one drew.
    """

    def __init__(self, size: int, batch_size: int, shard: Shard = SINGLE) -> None:
        if shard.distributed and (batch_size < shard.world or size < shard.world):
            raise ValueError(
                f"{shard.world} processes need training.batch_size and the training set to hold at least one image per "
                f"process (batch_size {batch_size}, {size} images)"
            )
        self.size, self.batch_size, self.shard = size, batch_size, shard
        self.drop_last = trailing_batch_dropped(size, batch_size, shard.world)
        self.pass_seed = 0

    def set_pass(self, seed: int) -> None:
        self.pass_seed = seed

    def __iter__(self) -> Iterator[SeededBatch]:
        generator = torch.Generator().manual_seed(self.pass_seed)
        # The draw a new DataLoader iterator made from the shared generator (its workers' base seed)
        # before the permutation: keeps the batches of earlier versions and of num_workers = 0.
        torch.empty((), dtype=torch.int64).random_(generator=generator)
        batches = BatchSampler(RandomSampler(range(self.size), generator=generator), batch_size=self.batch_size, drop_last=self.drop_last)
        for number, batch in enumerate(batches):
            start, stop = shard_bounds(len(batch), self.shard.rank, self.shard.world) if self.shard.distributed else (0, len(batch))
            seed = process_seed((self.pass_seed * 1_000_003 + number * 7_919 + 1) % 2**63, self.shard.rank)
            yield SeededBatch(batch[start:stop], seed)

    def __len__(self) -> int:
        return self.size // self.batch_size if self.drop_last else math.ceil(self.size / self.batch_size)


def training_loader(dataset: BatchDataset, batch_size: int, num_workers: int, pin_memory: bool, shard: Shard = SINGLE) -> tuple[DataLoader, ShuffledPasses]:
    """One loader for every pass of a training run, and the sampler whose `set_pass` reshuffles it.

    Its workers live as long as the loader (persistent_workers): with min_steps, a small category
    makes hundreds of one-batch passes, and starting 8 workers for each cost more than the step.
    """
    sampler = ShuffledPasses(len(dataset), batch_size, shard)
    loader = DataLoader(
        dataset,
        sampler=sampler,
        batch_size=None,
        num_workers=num_workers,
        generator=torch.Generator(),  # the workers' base seed: never drawn from the global generator
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )
    return loader, sampler


class FeatureBatches(Dataset):
    """Batch of rows of cached backbone features -> (features, targets, row indices)."""

    def __init__(self, features: torch.Tensor, targets: Targets = None) -> None:
        self.features = features
        self.targets = targets

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def __getitem__(self, item: Sequence[int] | SeededBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = np.sort(np.asarray(item.indices if isinstance(item, SeededBatch) else item, dtype=np.int64))
        index = torch.from_numpy(rows)
        return self.features[index], targets_for(self.targets, rows), index


BatchDataset: TypeAlias = ImageBatches | FeatureBatches  # a batch-indexed dataset with a length


def trailing_batch_dropped(size: int, batch_size: int, world: int = 1) -> bool:
    """Training drops a trailing batch too small for batch norm: one image, or under 2 per rank.

    (Batch norm cannot compute statistics of one image whose feature map is 1 x 1.)
    """
    trailing = size % batch_size
    return size > batch_size and 0 < trailing < (2 * world if world > 1 else 2)


def training_batch_sizes(size: int, batch_size: int, world: int = 1) -> list[int]:
    """Global size of every training batch of an epoch (the same on every rank, whatever the shuffle).

    The loop scales each rank's mean loss by its share of the global batch, so DDP's average of
    the ranks' gradients is the gradient of the global batch's mean loss even when slices differ.
    """
    sizes = [batch_size] * (size // batch_size)
    if size % batch_size and not trailing_batch_dropped(size, batch_size, world):
        sizes.append(size % batch_size)
    return sizes


class RankSlices(Sampler[list[int]]):
    """This rank's contiguous slice of every global batch (the batches are drawn identically on all ranks)."""

    def __init__(self, batches: BatchSampler, shard: Shard) -> None:
        self.batches = batches
        self.shard = shard

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            start, stop = shard_bounds(len(batch), self.shard.rank, self.shard.world)
            yield batch[start:stop]

    def __len__(self) -> int:
        return len(self.batches)


def batch_sampler(
    size: int, batch_size: int, shuffle: bool, generator: torch.Generator | None = None, shard: Shard = SINGLE
) -> Sampler:
    """Index lists for one pass of this rank (see the module docstring for the distributed split)."""
    if not shuffle:
        rows = shard_indices(size, shard.rank, shard.world).tolist() if shard.distributed else SequentialSampler(range(size))
        return BatchSampler(rows, batch_size=batch_size, drop_last=False)
    if shard.distributed and (batch_size < shard.world or size < shard.world):
        raise ValueError(
            f"{shard.world} processes need training.batch_size and the training set to hold at least one image per "
            f"process (batch_size {batch_size}, {size} images)"
        )
    drop_last = trailing_batch_dropped(size, batch_size, shard.world)
    batches = BatchSampler(RandomSampler(range(size), generator=generator), batch_size=batch_size, drop_last=drop_last)
    return RankSlices(batches, shard) if shard.distributed else batches


def batch_loader(
    dataset: BatchDataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    generator: torch.Generator | None = None,
    pin_memory: bool = False,
    shard: Shard = SINGLE,
) -> DataLoader:
    """A DataLoader yielding whole batches (this rank's share of them) from a batch-indexed dataset.

    `generator` draws the shuffle and the workers' base seed, identically on every rank; workers
    of other ranks than 0 are re-seeded per rank so ranks do not augment alike.
    """
    reseed = partial(_reseed_worker, shard.rank) if shard.distributed and num_workers > 0 else None
    return DataLoader(
        dataset,
        sampler=batch_sampler(len(dataset), batch_size, shuffle, generator, shard),
        batch_size=None,
        num_workers=num_workers,
        generator=generator,
        pin_memory=pin_memory,
        persistent_workers=False,
        worker_init_fn=reseed,
    )


def _reseed_worker(rank: int, worker_id: int) -> None:
    """Give a loader worker of `rank` its own random stream (the base seed is shared by all ranks)."""
    seed = process_seed(torch.initial_seed(), rank)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)

