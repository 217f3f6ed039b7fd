"""Checks that need the machine or the data rather than the config file alone, made before any work.

A config can be well-formed and still unusable here: `cuda:7` on a one-GPU machine, a weights
file that was moved, a weight package not installed, five stacker folds over three validation
images. Each would otherwise fail after the run directory was written (so a corrected rerun is
refused as "a different config") or after hours of training. Every check raises ConfigError
naming the config file and line, or the `--set` override, that asked for it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

from conceptclef.core.config import Config, ConfigError, TrainingConfig, locate_key

class SettingOrigin:
    """Where a resolved config value came from, for errors: a --set override, the config file, or the run."""

    def __init__(self, config_path: Path | None, overrides: Sequence[str] = (), saved_config: Path | None = None) -> None:
        self.config_path = config_path
        self.overrides = list(overrides)
        self.saved_config = saved_config

    def where(self, key_path: tuple[str, ...]) -> str:
        dotted = ".".join(key_path)
        for override in reversed(self.overrides):  # the last override of a key wins
            if override.split("=", 1)[0].strip() == dotted:
                return f"--set {override}"
        for path in (self.config_path, self.saved_config):
            if path is not None and path.is_file():
                return locate_key(path, key_path)
        return "default config"


def check_machine(config: Config, origin: SettingOrigin, networks: Iterable[tuple[str, TrainingConfig]], check_device: bool = True) -> None:
    """The device exists and the weight source of each network still to train can be read.

    `networks`: the config key and settings of each network still to train (`Network.settings_key`
    and `Network.settings` of the table in pipeline.run.networks, or `every_kind_settings(config)`).
    """
    to_check = list(networks)
    if to_check and check_device:
        check_device_available(config.device, origin.where(("device",)))
    checked: set[str] = set()
    for key, training in to_check:
        if key not in checked:  # one check per config table (every category model shares [category_model])
            checked.add(key)
            check_weight_source(training, key, origin)


def check_device_available(device: str, where: str) -> None:
    """`cuda` needs CUDA, `cuda:N` a visible GPU N (under torchrun each process takes its LOCAL_RANK)."""
    import torch

    from conceptclef.training import distributed

    kind, _, index = device.partition(":")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{where}: device = {device!r} but this machine has no MPS (Apple GPU); use 'cpu' or 'auto'")
    if kind != "cuda":
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError(f"{where}: device = {device!r} but CUDA is not available here; use 'cpu' or 'auto'")
    if index and int(index) >= count and not distributed.launched():
        raise ConfigError(f"{where}: device = {device!r} but only {count} CUDA device(s) are visible (cuda:0..cuda:{count - 1})")


def check_weight_source(training: TrainingConfig, section: str, origin: SettingOrigin) -> None:
    """The backbone exists in timm and its weights can be found, without loading them."""
    import timm

    from conceptclef.training.weights import HUB_WEIGHTS, LITE_PACKAGE_WEIGHTS, NO_WEIGHTS, WeightsError, is_weight_file, lite_package_weight_file

    if not timm.is_model(training.backbone):
        where = origin.where((section, "backbone"))
        raise ConfigError(f"{where}: {section}.backbone = {training.backbone!r} is not a timm model name (see timm.list_models())")
    if training.pooling == "gem":
        check_gem_pooling(training, section, origin)
    where = origin.where((section, "weights"))
    weights = training.weights
    if weights in (NO_WEIGHTS, HUB_WEIGHTS):
        return
    if weights == LITE_PACKAGE_WEIGHTS:
        try:
            lite_package_weight_file(training.backbone)
        except WeightsError as error:
            raise ConfigError(f"{where}: {section}.weights: {error}") from None
        return
    if not is_weight_file(weights):
        raise ConfigError(
            f"{where}: {section}.weights = {weights!r} is not a weight source: use {NO_WEIGHTS!r}, {HUB_WEIGHTS!r}, "
            f"{LITE_PACKAGE_WEIGHTS!r} or a path ending in .pth, .pt or .safetensors"
        )
    if not Path(os.path.expanduser(weights)).is_file():
        raise ConfigError(f"{where}: {section}.weights = {weights!r}: weight file not found")


def check_gem_pooling(training: TrainingConfig, section: str, origin: SettingOrigin) -> None:
    """GeM replaces a CNN's global pooling layer: refused, before any training, for a backbone without one (ViT...)."""
    import timm
    import torch

    from conceptclef.training.backbones import use_gem_pooling
    from conceptclef.training.weights import WeightsError

    with torch.device("meta"):  # the architecture only: no memory, no initialisation
        backbone = timm.create_model(training.backbone, pretrained=False, num_classes=0)
    try:
        use_gem_pooling(backbone, training.backbone, training.gem_p)
    except WeightsError as error:
        raise ConfigError(f"{origin.where((section, 'pooling'))}: {section}.pooling: {error}") from None


def check_data_fits(config: Config, n_valid_images: int, valid_name: str, origin: SettingOrigin) -> None:
    """Stacker cross-fitting deals the validation images into `folds` folds: each needs one image."""
    folds = config.ensemble.folds
    if folds > n_valid_images:
        raise ConfigError(
            f"{origin.where(('ensemble', 'folds'))}: ensemble.folds = {folds} is more than the {n_valid_images} "
            f"usable validation images of {valid_name}; lower it or add validation images"
        )


def check_vocabulary_not_empty(config: Config, train_concept_lists: Sequence[Sequence[str]], origin: SettingOrigin) -> None:
    """Every concept model needs one CUI seen `data.min_concept_count` times in training; above every
    concept's count the vocabulary is empty, which used to fail only after the router had trained."""
    counts: dict[str, int] = {}
    for concepts in train_concept_lists:
        for cui in set(concepts):
            counts[cui] = counts.get(cui, 0) + 1
    needed = config.data.min_concept_count
    if counts and max(counts.values()) >= needed:
        return
    most = max(counts.items(), key=lambda item: (item[1], item[0])) if counts else None
    found = f"the most frequent, {most[0]}, is on {most[1]}" if most else "no training image has a concept"
    raise ConfigError(
        f"{origin.where(('data', 'min_concept_count'))}: data.min_concept_count = {needed} leaves no concept to learn: "
        f"{found} of the {len(train_concept_lists)} training images; lower it"
    )
