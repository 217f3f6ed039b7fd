"""Extra global models (`[[extra_global_models]]`): other backbones or resolutions, each a stacker input.

Each variant is a global model in every respect but one: it does not feed the kNN index (the
main global model's embeddings do). It trains on all training images over the global vocabulary
in RUN/global-<name>/, at its own image size (its own image cache), and its probabilities become
columns of their own in the stacker's features, so the stacker learns how far to trust each.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from conceptclef.core.config import Config, GlobalModelVariant, TrainingConfig
from conceptclef.pipeline.datasets import ImageSet
from conceptclef.pipeline.errors import RunDirectoryError
from conceptclef.pipeline.run_directory import RunLayout

STAGE_PREFIX = "global-"


def stage_name(variant: GlobalModelVariant) -> str:
    """Its name for `--only` and in logs, and its folder in the run: global-<name>."""
    return f"{STAGE_PREFIX}{variant.name}"


def variant_dir(layout: RunLayout, name: str) -> Path:
    return layout.root / f"{STAGE_PREFIX}{name}"


def variant_by_stage(config: Config, stage: str) -> GlobalModelVariant | None:
    return next((variant for variant in config.extra_global_models if stage_name(variant) == stage), None)


def variant_names(config: Config) -> list[str]:
    return [variant.name for variant in config.extra_global_models]


def variant_training(variant: GlobalModelVariant) -> TrainingConfig:
    """The plain TrainingConfig of a variant (what its estimator and checkpoint hold)."""
    names = {item.name for item in dataclasses.fields(TrainingConfig)}
    return TrainingConfig(**{name: getattr(variant, name) for name in names})


def variant_image_size(variant: GlobalModelVariant, config: Config) -> int:
    return variant.image_size or config.data.image_size


def config_at_image_size(config: Config, image_size: int) -> Config:
    """The run's config with another image size: how a variant's images are cached and read."""
    return config.replace(data=dataclasses.replace(config.data, image_size=image_size))


def same_images(reference: ImageSet, other: ImageSet, where: Path | str) -> ImageSet:
    """`other` (the same images at another size), refused when its images are not `reference`'s."""
    if other.image_ids != reference.image_ids:
        raise RunDirectoryError(f"{where}: the images read at another size differ from the run's; were files added or removed meanwhile?")
    return other


ImagesAtSize = Callable[[int], ImageSet]
