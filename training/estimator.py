"""The sklearn-style shell shared by ModalityRouter and ConceptModel.

`__init__` only stores settings; `fit` trains through `training.loop.fit_network` (or loads the
finished work directory); learned state ends with `_`. Subclasses only say how their targets are
encoded, which loss and metric they use, and what they remember from validation.

Head-only models (finetune = "head") get their frozen-backbone features from a
`training.feature_store.FeatureStore` (by default the process-wide one), so the router, the global
and the category models push each image through a shared frozen backbone once, in `fit` and in
prediction alike; the head then runs on the stored features. Other modes run the whole network.

Under torchrun, `fit`, `predict_proba`, `embed` and `predict_proba_and_embed` are collectives:
every rank calls them with the same images. Prediction is sharded (each rank runs 1/world of the
images) and all-gathered, so every rank returns the full result in the original row order and
rank 0 can write it. `load` involves no other rank.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np
import scipy.sparse as sp
import torch

from conceptclef.core.config import AugmentConfig, ConfigError, TrainingConfig
from conceptclef.training import distributed
from conceptclef.training.backbones import ImageClassifier, create_network
from conceptclef.training.batches import ImageBatches, Targets, TargetsT, batch_loader, check_images
from conceptclef.training.checkpoints import FORMAT_VERSION, CheckpointError, RunFiles, load_checkpoint
from conceptclef.training.feature_extraction import ExtractionSettings, head_probabilities
from conceptclef.training.feature_registry import shared_feature_store
from conceptclef.training.feature_store import FeatureStore
from conceptclef.training.inference import Activation, DeviceSettings, run_forward, to_probabilities
from conceptclef.training.loop import EpochCallback, FitResult, Objective, RunSettings, fit_network, head_warmup_config
from conceptclef.training.replay import StepReplay
from conceptclef.training.runtime import progress_enabled, report_training_from_scratch, resolve_device, seed_everything

log = logging.getLogger("conceptclef")


def training_config_from_dict(values: dict[str, Any], source: Path | str = "checkpoint") -> TrainingConfig:
    """Rebuild the TrainingConfig stored (as plain values) in a checkpoint.

    Keys this version does not know are refused, as core.config refuses them in a TOML: dropped,
    they would load a network trained with a setting that no longer means anything here.
    """
    values = dict(values)
    augment = dict(values.pop("augment", {}))
    unknown = sorted(set(values) - {item.name for item in dataclasses.fields(TrainingConfig)})
    unknown += [f"augment.{key}" for key in sorted(set(augment) - {item.name for item in dataclasses.fields(AugmentConfig)})]
    if unknown:
        raise ConfigError(f"{source}: training settings unknown to this version of conceptclef: {', '.join(unknown)}")
    return TrainingConfig(**values, augment=AugmentConfig(**augment))


# Keys added after runs already existed: at their defaults they stay out of the job fingerprint,
# so a run trained before they existed is still recognised as the same job (and not retrained).
KEYS_FINGERPRINTED_WHEN_SET = ("amp_dtype", "deterministic", "validate_every_steps", "augment_on_device", "pooling", "gem_p")


def fingerprinted_settings(training: TrainingConfig) -> dict[str, Any]:
    """The training settings that identify a job: every key, less later additions left at their defaults."""
    values = dataclasses.asdict(training)
    defaults = TrainingConfig()
    for key in KEYS_FINGERPRINTED_WHEN_SET:
        if values.get(key) == getattr(defaults, key):
            values.pop(key, None)
    return values


def _targets_digest(targets: Targets) -> str:
    digest = hashlib.sha256()
    if sp.issparse(targets):
        matrix = sp.csr_matrix(targets)
        matrix.sort_indices()
        for part in (matrix.indptr, matrix.indices, matrix.data):
            digest.update(np.ascontiguousarray(part).tobytes())
        digest.update(str(matrix.shape).encode())
    else:
        digest.update(np.ascontiguousarray(targets).tobytes())
    return digest.hexdigest()[:16]


EstimatorT = TypeVar("EstimatorT", bound="NetworkEstimator[Any]")


class NetworkEstimator(Generic[TargetsT]):
    """Common fit/load/predict machinery; see ModalityRouter and ConceptModel (`TargetsT`: their targets)."""

    kind: ClassVar[str] = ""
    activation: ClassVar[Activation] = "sigmoid"

    def __init__(
        self,
        training: TrainingConfig,
        image_size: int,
        device: str = "auto",
        seed: int = 0,
        num_workers: int = 0,
        feature_store: FeatureStore | None = None,
        replay: StepReplay | None = None,
    ) -> None:
        self.training = training
        self.image_size = image_size
        self.device = device
        self.seed = seed
        self.num_workers = num_workers
        self.feature_store = feature_store  # None: the process-wide store (memory only)
        self.replay = replay  # a fixed step budget replaying another run (training.replay): no validation needed

    def _store(self) -> FeatureStore:
        return self.feature_store if self.feature_store is not None else shared_feature_store()

    # -- what subclasses define -------------------------------------------------------------
    def _objective(self, targets: TargetsT, num_classes: int) -> Objective[TargetsT]:
        raise NotImplementedError

    def _initial_bias(self, targets: TargetsT, num_classes: int) -> torch.Tensor | None:
        return None

    def _summarize(self, outputs: np.ndarray, targets: TargetsT) -> dict[str, Any]:
        return {}

    def _adopt(self, classes: list[str], history: list[dict[str, Any]], best_metric: float, summary: dict[str, Any]) -> None:
        """Set the subclass's public learned attributes."""
        raise NotImplementedError

    # -- training ---------------------------------------------------------------------------
    def _fit(
        self,
        images: Any,
        targets: TargetsT,
        classes: list[str],
        valid_images: Any,
        valid_targets: TargetsT,
        work_dir: Path,
        on_epoch_end: EpochCallback | None,
    ) -> "NetworkEstimator[TargetsT]":
        work_dir = Path(work_dir)
        check_images(images, self.image_size, f"{self.kind} training images")
        check_images(valid_images, self.image_size, f"{self.kind} validation images")
        if len(images) == 0 or (len(valid_images) == 0 and self.replay is None):
            raise ValueError(f"{self.kind}: needs at least one training and one validation image (early stopping uses validation)")
        fingerprint = self._fingerprint(classes, targets, valid_targets)
        finished = self._load_finished(work_dir, fingerprint)
        # Every rank must take the same branch: one training while another returns would hang.
        distributed.check_same_on_all_ranks(float(finished), f"{work_dir}: finished run found")
        if finished:
            if distributed.is_main_process():
                log.info("%s: %s is already trained; loaded", self.kind, work_dir)
            return self
        device = resolve_device(self.device)
        seed_everything(self.seed)  # the new head (and a "none" backbone) start from the seed too
        training = self.training
        network = create_network(training.backbone, training.weights, len(classes), training.drop_rate, training.pooling, training.gem_p)
        bias = self._initial_bias(targets, len(classes))
        if bias is not None:
            network.set_head_bias(bias)
        settings = RunSettings(
            device, self.seed, self.num_workers, progress_enabled(),
            label=run_label(self.kind, work_dir.name), config_section=config_section_of(work_dir.name),
        )
        result: FitResult = fit_network(
            network,
            self._objective(targets, len(classes)),
            self.training,
            (images, targets),
            (valid_images, valid_targets),
            work_dir,
            settings,
            checkpoint_metadata=self._metadata(network, classes),
            fingerprint=fingerprint,
            summarize=lambda outputs: self._summarize(outputs, valid_targets),
            on_epoch_end=on_epoch_end,
            feature_store=self._store(),
            warmup_fingerprint=self._fingerprint(classes, targets, valid_targets, head_warmup_config(self.training), warmup=True),
            replay=self.replay,
        )
        self.network_, self.device_ = network, device
        self._adopt(classes, result.history, result.best_metric, result.summary)
        return self

    def _fingerprint(
        self, classes: list[str], targets: Targets, valid_targets: Targets, training: TrainingConfig | None = None, warmup: bool = False
    ) -> str:
        job: dict[str, Any] = {
            "kind": self.kind,
            "training": fingerprinted_settings(training or self.training),
            "image_size": self.image_size,
            "seed": self.seed,
            "classes": classes,
            "train": _targets_digest(targets),
            "valid": _targets_digest(valid_targets),
        }
        replay = self.replay.warmup if warmup and self.replay is not None else self.replay
        if replay is not None:  # a fixed budget: the replayed run (and so its steps and schedule) is part of the job
            job["replay"] = replay.fingerprint
        return hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:24]

    def _metadata(self, network: ImageClassifier, classes: list[str]) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "activation": self.activation,
            "backbone": self.training.backbone,
            "num_classes": len(classes),
            "num_features": network.num_features,
            "drop_rate": self.training.drop_rate,
            "image_size": self.image_size,
            "seed": self.seed,
            "classes": list(classes),
            "training": dataclasses.asdict(self.training),
        }

    def _load_finished(self, work_dir: Path, fingerprint: str) -> bool:
        """Adopt a finished run of this very job; False (retrain) when it is absent, different or damaged."""
        state = RunFiles(work_dir).read_state()
        if not state or not state.get("finished"):
            return False
        if state.get("fingerprint") != fingerprint:
            report_training_from_scratch(work_dir, "trained with another config or dataset")
            return False
        try:
            self._restore(load_checkpoint(RunFiles(work_dir).best), resolve_device(self.device))
        except (CheckpointError, FileNotFoundError, KeyError, RuntimeError) as error:
            report_training_from_scratch(work_dir, f"finished run cannot be loaded ({error})")
            return False
        return True

    def _restore(self, payload: dict[str, Any], device: torch.device) -> None:
        if payload.get("kind") != self.kind:
            raise CheckpointError(f"checkpoint holds a {payload.get('kind')!r} network, not a {self.kind!r}")
        stored = payload.get("training", {})  # checkpoints from before GeM pooling hold no pooling key: avg
        network = create_network(
            payload["backbone"], "none", int(payload["num_classes"]), float(payload["drop_rate"]),
            stored.get("pooling", "avg"), float(stored.get("gem_p", 3.0)),
        )
        network.load_state_dict(payload["model"])
        self.network_ = network.to(device).eval()
        self.device_ = device
        if self._device_settings().channels_last:  # its inputs are channels_last: so must the weights be
            self.network_.to(memory_format=torch.channels_last)
        self._adopt(list(payload["classes"]), list(payload.get("history", [])), float(payload["metric"]), dict(payload.get("summary", {})))

    # -- loading ----------------------------------------------------------------------------
    @classmethod
    def load(cls: type[EstimatorT], work_dir: Path, device: str = "auto", feature_store: FeatureStore | None = None) -> EstimatorT:
        """A trained model from checkpoint.pt alone (no config file or data needed)."""
        payload = load_checkpoint(RunFiles(work_dir).best)
        estimator = cls._class_for(payload)(
            training_config_from_dict(payload["training"], RunFiles(work_dir).best),
            int(payload["image_size"]),
            device,
            int(payload.get("seed", 0)),
            feature_store=feature_store,
        )
        estimator._restore(payload, resolve_device(device))
        return estimator

    @classmethod
    def _class_for(cls: type[EstimatorT], payload: dict[str, Any]) -> type[EstimatorT]:
        """The class that reads this checkpoint: `cls`, unless a subclass's head wrote it (see ModalityRouter)."""
        return cls

    @staticmethod
    def is_trained(work_dir: Path) -> bool:
        """True when the run finished and its checkpoint is readable."""
        files = RunFiles(work_dir)
        state = files.read_state()
        if not state or not state.get("finished") or state.get("format_version") != FORMAT_VERSION:
            return False
        try:
            load_checkpoint(files.best)
        except (CheckpointError, FileNotFoundError):
            return False
        return True

    # -- prediction -------------------------------------------------------------------------
    def _device_settings(self) -> DeviceSettings:
        return DeviceSettings.for_training(self.device_, self.training)

    def _outputs(self, images: Any, probabilities: bool, embeddings: bool) -> list[np.ndarray]:
        if not hasattr(self, "network_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit() or load() first")
        check_images(images, self.image_size, f"{self.kind} images")
        network = self.network_.eval()
        widths = ([network.num_classes] if probabilities else []) + ([network.num_features] if embeddings else [])
        if len(images) == 0:
            return [np.zeros((0, width), dtype=np.float32) for width in widths]
        settings = self._device_settings()
        if self.training.finetune == "head":
            return self._outputs_from_stored_features(images, probabilities, embeddings, settings)

        def forward(inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
            features = network.features(inputs)
            outputs = []
            if probabilities:
                outputs.append(to_probabilities(network.head(features), self.activation))
            if embeddings:
                outputs.append(features)
            return tuple(outputs)

        shard = distributed.shard_for(len(images))
        loader = batch_loader(
            ImageBatches(images), self.training.batch_size, shuffle=False, num_workers=self.num_workers, shard=shard,
            pin_memory=settings.pin_memory,
        )
        return run_forward(forward, loader, len(images), settings, progress_enabled(), f"{self.kind} predict", shard)

    def _outputs_from_stored_features(
        self, images: Any, probabilities: bool, embeddings: bool, settings: DeviceSettings
    ) -> list[np.ndarray]:
        """Head-mode outputs: the frozen backbone's features from the store, then the head on them.

        Every rank gets all features from the store (a collective) and runs the cheap head itself.
        """
        network = self.network_
        extraction = ExtractionSettings(
            self.training.batch_size, settings, self.num_workers, progress_enabled(), f"{self.kind} predict"
        )
        features = self._store().features(network, images, extraction)
        outputs = []
        if probabilities:
            outputs.append(head_probabilities(network, features, self.activation, self.training.batch_size, settings))
        if embeddings:
            outputs.append(features)
        return outputs

    def predict_proba(self, images: Any) -> np.ndarray:
        """(n, classes) float32 probabilities."""
        return self._outputs(images, probabilities=True, embeddings=False)[0]

    def embed(self, images: Any) -> np.ndarray:
        """(n, D) float32 pooled backbone features (what the head sees; used for kNN retrieval)."""
        return self._outputs(images, probabilities=False, embeddings=True)[0]

    def predict_proba_and_embed(self, images: Any) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities and embeddings from one forward pass."""
        probabilities, embeddings = self._outputs(images, probabilities=True, embeddings=True)
        return probabilities, embeddings


def run_label(kind: str, work_dir_name: str) -> str:
    """How logs, progress bars and curves.png name a network: "concepts global", and "router", not "router router"."""
    return work_dir_name if work_dir_name == kind else f"{kind} {work_dir_name}"


def config_section_of(work_dir_name: str) -> str:
    """The config table that holds a network's training settings, named from its work folder
    (pipeline.run.layout: router/, global/, global-<NAME>/, category-<NAME>/), for messages."""
    if work_dir_name == "router":
        return "router"
    if work_dir_name == "global":
        return "global_model"
    if work_dir_name.startswith("global-"):
        return f"extra_global_models (name = {work_dir_name.removeprefix('global-')!r})"
    if work_dir_name.startswith("category-"):
        return "category_model"
    return "training settings"
