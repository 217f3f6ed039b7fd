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


class DeviceAugmenter:
    """The same augmentation for a whole batch on the training device: one affine_grid/grid_sample.

    Per image, as BatchAugmenter: a horizontal flip with probability 0.5, a rotation in
    [-rotation_degrees, rotation_degrees], a scale in [1 - zoom, 1 + zoom] and an x-shear in
    [-shear_degrees, shear_degrees] about the image centre, bilinear, black outside the image.
    Drawn from the global torch generator (re-seeded every pass, as the loader's augmentation).
    Returns float pixels in 0..255 (the network normalises floats and uint8 alike); the CPU
    path rounds to uint8, so the two are close, not bit-equal.
    """

    def __init__(self, config: AugmentConfig) -> None:
        self.config = config

    @property
    def active(self) -> bool:
        config = self.config
        return config.horizontal_flip or config.rotation_degrees > 0 or config.zoom > 0 or config.shear_degrees > 0

    def matrices(self, count: int, device: torch.device) -> torch.Tensor:
        """(count, 2, 3) affine_grid matrices: output pixel -> input pixel, in normalised coordinates."""
        config = self.config
        draws = torch.rand(count, 4).to(device)  # drawn on the CPU: the same numbers on every device type
        angle = torch.deg2rad((2 * draws[:, 0] - 1) * config.rotation_degrees)
        scale = 1 + (2 * draws[:, 1] - 1) * config.zoom
        shear = torch.deg2rad((2 * draws[:, 2] - 1) * config.shear_degrees)
        flip = torch.where((draws[:, 3] < 0.5) & config.horizontal_flip, -1.0, 1.0)
        cos, sin = torch.cos(angle), torch.sin(angle)
        # forward map: rotate . shear-x . scale (torchvision's order), then flip the input first
        forward = torch.stack(
            [
                torch.stack([cos, cos * torch.tan(shear) - sin], dim=1),
                torch.stack([sin, sin * torch.tan(shear) + cos], dim=1),
            ],
            dim=1,
        ) * scale.view(-1, 1, 1)
        inverse = torch.linalg.inv(forward)
        inverse[:, :, 0] = inverse[:, :, 0] * flip.view(-1, 1)  # x of the output mirrors before the inverse map
        return torch.cat([inverse, torch.zeros(count, 2, 1, device=device)], dim=2)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) uint8 or float images on any device -> augmented float32 images."""
        if not self.active or images.shape[0] == 0:
            return images
        pixels = images.float()
        grid = torch.nn.functional.affine_grid(self.matrices(images.shape[0], images.device), list(pixels.shape), align_corners=False)
        return torch.nn.functional.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
