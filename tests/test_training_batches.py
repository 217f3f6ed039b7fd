"""Batches are read lazily, one sorted gather per batch, with targets aligned to the rows read."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from conceptclef.core.config import AugmentConfig
from conceptclef.training.augment import BatchAugmenter
from conceptclef.training.batches import FeatureBatches, ImageBatches, batch_loader, batch_sampler, targets_for


class RowsOnly:
    """An image source that can only be read by rows (like a memmap subset): never as a whole array."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.reads: list[list[int]] = []

    def __len__(self) -> int:
        return len(self.array)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    dtype = np.dtype(np.uint8)

    def __getitem__(self, rows):
        self.reads.append(list(np.asarray(rows)))
        return self.array[rows]

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole image array was loaded")


def test_image_batches_read_only_their_rows_in_file_order_with_aligned_targets():
    pixels = np.arange(10, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 3), np.uint8)
    source = RowsOnly(pixels)
    labels = sp.csr_matrix(np.eye(10, dtype=np.float32))
    images, targets, rows = ImageBatches(source, labels)[[7, 2, 5]]
    assert source.reads == [[2, 5, 7]]
    assert images.shape == (3, 3, 4, 4) and images.dtype == torch.uint8
    assert images[:, 0, 0, 0].tolist() == [2, 5, 7] == rows.tolist()
    assert targets.argmax(dim=1).tolist() == [2, 5, 7]


def test_a_loader_pass_covers_every_row_once_and_augments_without_changing_dtype():
    pixels = np.random.default_rng(0).integers(0, 255, (37, 8, 8, 3), dtype=np.uint8)
    loader = batch_loader(
        ImageBatches(RowsOnly(pixels), np.arange(37), BatchAugmenter(AugmentConfig())), 8, shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    seen = []
    for images, targets, rows in loader:
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 8, 8)
        assert targets.tolist() == rows.tolist()
        seen.extend(rows.tolist())
    assert sorted(seen) == list(range(37))


def test_training_drops_only_a_trailing_single_image_batch():
    assert [len(batch) for batch in batch_sampler(33, 8, shuffle=True)] == [8, 8, 8, 8]
    assert [len(batch) for batch in batch_sampler(33, 8, shuffle=False)] == [8, 8, 8, 8, 1]
    assert sorted(len(batch) for batch in batch_sampler(30, 8, shuffle=True)) == [6, 8, 8, 8]


def test_targets_and_feature_batches():
    labels = sp.csr_matrix(np.array([[0, 1], [1, 0], [1, 1]], dtype=np.float32))
    assert targets_for(labels, np.array([0, 2])).tolist() == [[0.0, 1.0], [1.0, 1.0]]
    assert targets_for(np.array([4, 5, 6]), np.array([1])).tolist() == [5]
    assert targets_for(None, np.array([1])).numel() == 0
    features, targets, rows = FeatureBatches(torch.arange(6.0).view(3, 2), labels)[[2, 0]]
    assert features.tolist() == [[0.0, 1.0], [4.0, 5.0]] and rows.tolist() == [0, 2]


def test_worker_processes_read_a_memmap_batch_by_batch(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 255, (20, 6, 6, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", pixels)
    mapped = np.load(tmp_path / "images.npy", mmap_mode="r")
    loader = batch_loader(ImageBatches(mapped), 6, shuffle=False, num_workers=2)
    gathered = torch.cat([images for images, _, _ in loader])
    assert torch.equal(gathered, torch.from_numpy(pixels).permute(0, 3, 1, 2))
