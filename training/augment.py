"""Training-time geometric augmentation (flip, rotation, zoom, shear) on uint8 image tensors.

Applied per image inside the batch loader (so DataLoader workers share the cost), before the
network normalises the pixels. Each image gets its own random transform: torchvision's v2
transforms draw one set of parameters per call, so a batch is augmented image by image.
Validation and prediction never augment.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from conceptclef.core.config import AugmentConfig


class BatchAugmenter:
    """Random flip + affine (rotation, zoom, shear) of every image in an (N, C, H, W) or (C, H, W) tensor."""

    def __init__(self, config: AugmentConfig) -> None:
        steps: list[torch.nn.Module] = []
        if config.horizontal_flip:
            steps.append(v2.RandomHorizontalFlip(p=0.5))
        if config.rotation_degrees > 0 or config.zoom > 0 or config.shear_degrees > 0:
            steps.append(
                v2.RandomAffine(
                    degrees=config.rotation_degrees,
                    scale=(1.0 - config.zoom, 1.0 + config.zoom) if config.zoom > 0 else None,
                    shear=config.shear_degrees if config.shear_degrees > 0 else None,
                    interpolation=v2.InterpolationMode.BILINEAR,
                    fill=0,  # radiology images mostly have black borders
                )
            )
        self.transform = v2.Compose(steps) if steps else None

    @property
    def active(self) -> bool:
        return self.transform is not None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.transform is None:
            return images
        if images.ndim == 3:
            return self.transform(images)
        return torch.stack([self.transform(image) for image in images])


def build_augmenter(config: AugmentConfig) -> BatchAugmenter | None:
    """The augmenter, or None when the config turns every augmentation off."""
    augmenter = BatchAugmenter(config)
    return augmenter if augmenter.active else None
