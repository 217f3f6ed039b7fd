"""Augmentation keeps shapes and dtypes, transforms images independently, and can be turned off."""

from __future__ import annotations

import torch

from conceptclef.core.config import AugmentConfig
from conceptclef.training.augment import BatchAugmenter, build_augmenter


def test_augmented_batch_keeps_shape_and_uint8_dtype():
    torch.manual_seed(0)
    batch = torch.randint(0, 256, (5, 3, 40, 40), dtype=torch.uint8)
    augmented = BatchAugmenter(AugmentConfig(rotation_degrees=20, zoom=0.2, shear_degrees=10))(batch)
    assert augmented.shape == batch.shape and augmented.dtype == torch.uint8
    assert not torch.equal(augmented, batch)
    single = BatchAugmenter(AugmentConfig())(batch[0])
    assert single.shape == batch[0].shape and single.dtype == torch.uint8


def test_each_image_of_a_batch_gets_its_own_random_transform():
    torch.manual_seed(0)
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    image[:, :, :4] = 255  # left half white: a flip is visible
    batch = image.expand(32, -1, -1, -1).clone()
    flipped = BatchAugmenter(AugmentConfig(horizontal_flip=True, rotation_degrees=0, zoom=0, shear_degrees=0))(batch)
    left_white = flipped[:, 0, 0, 0] == 255
    assert 0 < int(left_white.sum()) < 32


def test_all_augmentations_off_gives_no_augmenter():
    assert build_augmenter(AugmentConfig(horizontal_flip=False, rotation_degrees=0, zoom=0, shear_degrees=0)) is None
    assert build_augmenter(AugmentConfig()) is not None
