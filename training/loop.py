"""The one training loop shared by the router and every concept model.

What differs between them is an `Objective` (loss on logits, activation, validation metric);
everything else is here: fine-tuning modes, optimizer, early stopping and learning-rate
reduction on the validation METRIC (not the loss, which soft-F1 and asymmetric losses make
incomparable across settings), an atomic checkpoint after every epoch, resume, AMP and
channels_last on CUDA.

Fine-tuning modes:
  full       every weight trains from the first epoch.
  head       the backbone is frozen; its features for train and valid images are computed ONCE
             (no augmentation, batch norm in eval mode) and the head trains on those cached
             tensors, which turns a CPU epoch into milliseconds. With a `FeatureStore`
             (training.feature_store) they are computed once per process for ALL models that
             share the backbone and the images, and can be kept on disk between runs.
  layerwise  the head trains first; every `unfreeze_every_epochs` epochs one more backbone group
             (timm's stages, or with unfreeze_groups = "fine" single blocks) unfreezes, from the
             top down, up to `max_unfrozen_groups`. Frozen batch norms keep their ImageNet statistics.

The fine-tuning recipe (full and layerwise; see training.schedule): with `head_warmup_epochs` the
head is first trained alone on cached features (`warm_start_head`, an ordinary head-mode run in
MODEL/head-warmup) and fine-tuning starts from it; the backbone learns at discriminative rates
(`backbone_lr_factor`, `layer_lr_decay`); the rate warms up linearly over `warmup_steps`
optimizer steps, then follows the plateau rule or a cosine over the step budget (`min_steps`,
`max_steps`); `batchnorm = "frozen"` keeps every batch norm's statistics out of training.

Early stopping and LR reduction do not start counting while the metric has only ever been 0
(with thousands of rare concepts, no probability may reach 0.5 for the first epochs).

Distributed (under torchrun, see training.distributed and docs/DISTRIBUTED.md): the trained
module is wrapped in DistributedDataParallel; each rank trains on its slice of every global batch
(`batches.batch_sampler`) with its loss scaled by its share of that batch, so the averaged
gradient is the single-process one; head-mode features and validation outputs are computed on
contiguous shards and all-gathered (`inference.gather_rows`), so every rank computes the metric
on exactly the N validation rows and rank 0's metric drives early stopping and LR reduction on
all ranks. Batch norm is synchronised across GPUs while training. Only rank 0 writes files;
every rank reads the resume and best checkpoints after a barrier.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from conceptclef.core.config import TrainingConfig
from conceptclef.training import distributed
from conceptclef.training.augment import build_augmenter
from conceptclef.training.backbones import ImageClassifier, layer_groups, train_mode_except_frozen, unfreeze_top_groups
from conceptclef.training.batches import BatchDataset, FeatureBatches, ImageBatches, Targets, TargetsT, batch_loader, training_batch_sizes
from conceptclef.training.checkpoints import (
    FORMAT_VERSION,
    CheckpointError,
    RunFiles,
    cpu_state_dict,
    load_checkpoint,
    save_checkpoint,
)
from conceptclef.training.curves import CURVES_FILE, write_training_curves
from conceptclef.training.feature_extraction import ExtractionSettings, compute_features
from conceptclef.training.feature_store import FeatureStore
from conceptclef.training.inference import Activation, DeviceSettings, run_forward, to_probabilities
from conceptclef.training.runtime import (
    capture_rng_state,
    epoch_seed,
    make_repeatable,
    process_seed,
    report_training_from_scratch,
    restore_rng_state,
    seed_everything,
)
from conceptclef.training.schedule import learning_rate_factor, parameter_groups, planned_epochs, steps_per_epoch

log = logging.getLogger("conceptclef")

EpochCallback = Callable[[dict[str, Any]], None]
HEAD_WARMUP_FOLDER = "head-warmup"  # in a model's work directory: the head trained alone before fine-tuning


@dataclass(frozen=True)
class Objective(Generic[TargetsT]):
    """What a network learns: loss on logits, output activation, and the metric that selects epochs."""

    loss: nn.Module
    activation: Activation
    metric_name: str
    metric: Callable[[np.ndarray, TargetsT], float]  # (validation probabilities, targets) -> higher is better


@dataclass(frozen=True)
class RunSettings:
    """Per-run choices that are not part of the model's config."""

    device: torch.device
    seed: int = 0
    num_workers: int = 0
    progress: bool = False
    label: str = "model"  # shown in logs and progress bars
    config_section: str = "training settings"  # the config table of these settings, named in error messages
    rate_key: str = "learning_rate"  # the key of that table setting this phase's learning rate


@dataclass
class FitResult:
    """Outcome of `fit_network`; the network holds the best weights when it returns."""

    history: list[dict[str, Any]]
    best_epoch: int
    best_metric: float
    stopped_early: bool
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Phase:
    """What the optimizer sees: the trainable module, its inputs and its forward function."""

    module: nn.Module
    forward: Callable[[torch.Tensor], torch.Tensor]
    train_data: BatchDataset
    valid_data: BatchDataset
    loader_workers: int


@dataclass
class _Progress:
    """Early-stopping bookkeeping, saved in every resume checkpoint."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = -1
    best_metric: float = -math.inf
    epochs_without_improvement: int = 0



def fit_network(
    network: ImageClassifier,
    objective: Objective,
    training: TrainingConfig,
    train: tuple[Any, Targets],
    valid: tuple[Any, Targets],
    work_dir: Path,
    settings: RunSettings,
    checkpoint_metadata: dict[str, Any],
    fingerprint: str,
    summarize: Callable[[np.ndarray], dict[str, Any]] | None = None,
    on_epoch_end: EpochCallback | None = None,
    feature_store: FeatureStore | None = None,
    warmup_fingerprint: str | None = None,
) -> FitResult:
    """Train `network` (resuming `work_dir` when it holds this job's unfinished state) and keep the best epoch.

    `checkpoint_metadata` (plain values) is stored in checkpoint.pt beside the weights so the
    network can be rebuilt from that file alone; `fingerprint` identifies the job, so a state
    left by a different config or dataset is never resumed. `on_epoch_end` is called after each
    epoch's checkpoint is on disk (an exception raised there interrupts the run resumably).

    Under torchrun this is a collective: every rank calls it with the same data and gets the same
    result; only rank 0 writes the files, and `on_epoch_end` runs on every rank.

    In head mode the frozen backbone's features come from `feature_store` (computed there once
    and shared with every other model using the same backbone and images); without one they are
    computed here for this network alone. In full and layerwise modes with
    `training.head_warmup_epochs`, the head is first trained that way (in `work_dir`/head-warmup)
    and fine-tuning starts from it.
    """
    files = RunFiles(work_dir)
    device_settings = DeviceSettings.for_device(settings.device, training.amp, training.channels_last)
    make_repeatable(settings.device)
    seed_everything(settings.seed)
    network.to(settings.device)
    if device_settings.channels_last:
        network.to(memory_format=torch.channels_last)
    # Also when resuming: the finished warm-up then only loads (and a resume.pt of another job
    # must not make a fresh fine-tuning start without its warm-up).
    if training.finetune != "head" and training.head_warmup_epochs > 0:
        warm_start_head(
            network, objective, training, (train, valid), files.work_dir / HEAD_WARMUP_FOLDER, settings, checkpoint_metadata,
            fingerprint, feature_store, warmup_fingerprint,
        )
        seed_everything(settings.seed)  # fine-tuning starts from the same RNG state whether the head was trained or loaded
    initial_weights = cpu_state_dict(network)  # copies: restored if a resume attempt fails half-way
    wants_sync = training.finetune != "head" and training.batchnorm != "frozen"
    synced = distributed.sync_batch_norm_if_useful(network, settings.device) if wants_sync else None
    try:
        trainer = Trainer(network, objective, training, files, settings, device_settings, checkpoint_metadata, fingerprint)
        return trainer.fit(train, valid, initial_weights, summarize, on_epoch_end, feature_store)
    finally:
        if synced is not None:
            synced.restore()


def warm_start_head(
    network: ImageClassifier,
    objective: Objective,
    training: TrainingConfig,
    data: tuple[tuple[Any, Targets], tuple[Any, Targets]],
    work_dir: Path,
    settings: RunSettings,
    checkpoint_metadata: dict[str, Any],
    fingerprint: str,
    feature_store: FeatureStore | None,
    warmup_fingerprint: str | None = None,
) -> None:
    """Train `network.head` alone on cached features of the untouched backbone and keep its best epoch.

    A random head's large gradients would otherwise flow into the pretrained blocks during the
    first fine-tuning steps; on cached features the head converges in seconds. The run is an
    ordinary head-mode run in `work_dir` (its own checkpoint, curves and resume), so a finished
    warm-up is loaded instead of retrained. `warmup_fingerprint` identifies the warm-up job alone
    (the estimator hashes `head_warmup_config`), so changing only the fine-tuning keeps it.
    """
    head_training = head_warmup_config(training)
    head_fingerprint = warmup_fingerprint or f"{fingerprint}-head-warmup"
    files = RunFiles(work_dir)
    state = files.read_state()
    if state and state.get("finished") and state.get("fingerprint") == head_fingerprint:
        try:
            network.load_state_dict(load_checkpoint(files.best)["model"])
            _log(settings, "%s: head warm-up loaded from %s", settings.label, work_dir)
            return
        except (CheckpointError, FileNotFoundError, KeyError, RuntimeError) as error:
            log.warning("%s: finished head warm-up cannot be loaded (%s); training it again", work_dir, error)
    head_settings = dataclasses.replace(
        settings, label=f"{settings.label} head-warmup", rate_key="head_warmup_learning_rate" if training.head_warmup_learning_rate else "learning_rate"
    )
    train, valid = data
    fit_network(
        network, objective, head_training, train, valid, work_dir, head_settings, checkpoint_metadata, head_fingerprint,
        feature_store=feature_store,
    )


def head_warmup_config(training: TrainingConfig) -> TrainingConfig:
    """The head-only run a fine-tuning starts from: fine-tuning fields reset, so they do not change its identity."""
    defaults = TrainingConfig()
    return dataclasses.replace(
        training,
        finetune="head",
        epochs=training.head_warmup_epochs,
        learning_rate=training.head_warmup_learning_rate or training.learning_rate,
        augment=defaults.augment,  # head mode trains on features of un-augmented images
        **{
            name: getattr(defaults, name)
            for name in (
                "head_warmup_epochs", "head_warmup_learning_rate", "backbone_lr_factor", "layer_lr_decay", "schedule",
                "warmup_steps", "min_steps", "max_steps", "batchnorm", "unfreeze_groups", "max_unfrozen_groups",
                "unfreeze_every_epochs",
            )
        },
    )


@dataclass(eq=False)
class Trainer:
    """One network's training run: the trained module, optimizer, schedules, scaler, files and progress.

    `fit` builds them, resumes this job's last epoch when `files` hold one, runs the epochs and
    leaves the best epoch's weights in the network.
    """

    network: ImageClassifier
    objective: Objective
    training: TrainingConfig
    files: RunFiles
    settings: RunSettings
    device_settings: DeviceSettings
    checkpoint_metadata: dict[str, Any]
    fingerprint: str
    progress: _Progress = field(default_factory=_Progress)

    # -- setup --------------------------------------------------------------------------------
    def _build(self, train: tuple[Any, Targets], valid: tuple[Any, Targets], feature_store: FeatureStore | None) -> None:
        training = self.training
        self.phase = _build_phase(self.network, training, train, valid, self.settings, self.device_settings, feature_store)
        self.groups = layer_groups(self.network.backbone, fine=training.unfreeze_groups == "fine")
        self.epochs = planned_epochs(training, len(self.phase.train_data))
        self.total_steps = self.epochs * steps_per_epoch(len(self.phase.train_data), training.batch_size)
        backbone = None if training.finetune == "head" else self.network.backbone
        self.optimizer = _build_optimizer(parameter_groups(self.network.head, backbone, self.groups, training), training)
        self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="max", factor=training.lr_reduce_factor, patience=training.lr_reduce_patience
        )
        self.step_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: learning_rate_factor(step, training.warmup_steps, self.total_steps, training.schedule)
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.device_settings.amp)

    def unfrozen_groups(self, epoch: int) -> int:
        """Backbone groups trained in `epoch` (-1: all), capped by `max_unfrozen_groups`."""
        training = self.training
        if training.finetune == "head":
            return 0
        if training.finetune == "full":
            count = -1
        else:  # layerwise: a warmed-up head needs no head-only epoch of its own
            already = 1 if training.head_warmup_epochs > 0 else 0
            count = already + epoch // max(1, training.unfreeze_every_epochs)
        if training.max_unfrozen_groups > 0:
            count = training.max_unfrozen_groups if count < 0 else min(count, training.max_unfrozen_groups)
        return count

    # -- the run ------------------------------------------------------------------------------
    def fit(
        self,
        train: tuple[Any, Targets],
        valid: tuple[Any, Targets],
        initial_weights: dict[str, torch.Tensor],
        summarize: Callable[[np.ndarray], dict[str, Any]] | None = None,
        on_epoch_end: EpochCallback | None = None,
        feature_store: FeatureStore | None = None,
    ) -> FitResult:
        self._build(train, valid, feature_store)
        files, settings, objective = self.files, self.settings, self.objective
        self.progress = self._resume(initial_weights)
        resumed_at = len(self.progress.history)
        distributed.check_same_on_all_ranks(resumed_at, f"{files.work_dir}: epochs to resume after")  # also a barrier
        if resumed_at == 0:
            if distributed.is_main_process():
                files.clear()
                files.write_state(self._state(finished=False))
        else:
            _log(settings, "%s: resuming after epoch %d (best %s %.4f)", settings.label, resumed_at, objective.metric_name, self.progress.best_metric)

        best_outputs: np.ndarray | None = None
        for epoch in range(resumed_at, self.epochs):
            if _should_stop(self.progress, self.training):
                break
            record, outputs, improved = self._run_epoch(epoch, valid[1])
            if improved:
                best_outputs = outputs
            if on_epoch_end is not None:
                on_epoch_end(dict(record))
        return self._finish(valid[1], best_outputs, summarize)

    def _run_epoch(self, epoch: int, valid_targets: Targets) -> tuple[dict[str, Any], np.ndarray, bool]:
        """Train and validate one epoch, update early stopping, save its files; (record, outputs, improved)."""
        training, settings, progress, objective = self.training, self.settings, self.progress, self.objective
        generator = _seed_epoch(settings.seed, epoch)
        if training.finetune != "head":
            unfreeze_top_groups(self.network, self.groups, self.unfrozen_groups(epoch))
        started = time.perf_counter()
        train_loss = self._train_one_epoch(generator, epoch)
        outputs = self._validate()
        # Every rank holds the same gathered outputs; rank 0's metric makes the decisions identical anyway.
        metric = distributed.broadcast_value(float(objective.metric(outputs, valid_targets)))
        learning_rate = float(self.optimizer.param_groups[0]["lr"])
        # While no validation prediction crosses the threshold yet (F1 = 0 everywhere), a flat
        # metric means "not yet", not "no longer improving": patience and LR reduction wait.
        still_at_zero = metric <= 0.0 and progress.best_metric <= 0.0
        if not still_at_zero and training.schedule == "plateau":
            self.plateau.step(metric)
        record = {
            "epoch": epoch + 1,
            "train_loss": round(train_loss, 6),
            "valid_metric": round(metric, 6),
            "lr": learning_rate,
            "seconds": round(time.perf_counter() - started, 3),
        }
        improved = metric > progress.best_metric
        if improved:
            progress.best_metric, progress.best_epoch, progress.epochs_without_improvement = metric, epoch + 1, 0
        elif not still_at_zero:
            progress.epochs_without_improvement += 1
        progress.history.append(record)
        if distributed.is_main_process():
            if improved:
                save_checkpoint(self.files.best, self._best_payload(epoch + 1, metric))
            self._save_resume()
            self.files.write_metrics(progress.history)
            self.files.write_state(self._state(finished=False))
        distributed.barrier()  # the epoch's files are on disk for every rank (and every callback)
        _log(
            settings, "%s epoch %d/%d: loss %.4f, valid %s %.4f, lr %.2g, %.1fs",
            settings.label, epoch + 1, self.epochs, train_loss, objective.metric_name, metric, learning_rate, record["seconds"],
        )
        return record, outputs, improved

    def _train_one_epoch(self, generator: torch.Generator, epoch: int) -> float:
        """One pass over shuffled training batches; returns the sample-weighted mean loss (over all ranks)."""
        phase, training, settings, device_settings = self.phase, self.training, self.settings, self.device_settings
        train_mode_except_frozen(phase.module, freeze_statistics=training.batchnorm == "frozen")
        shard = distributed.current_shard()
        trained = distributed.wrap_for_training(phase.module, settings.device)  # after layerwise unfreezing
        loader = batch_loader(
            phase.train_data, training.batch_size, shuffle=True, num_workers=phase.loader_workers, generator=generator, shard=shard
        )
        global_sizes = training_batch_sizes(len(phase.train_data), training.batch_size, shard.world)
        total, count = 0.0, 0
        bar = tqdm(loader, desc=f"{settings.label} epoch {epoch + 1}/{self.epochs}", disable=not settings.progress, leave=False)
        for step, (inputs, targets, _) in enumerate(bar):
            inputs = device_settings.inputs(inputs)
            targets = targets.to(settings.device, non_blocking=True)
            self.optimizer.zero_grad(set_to_none=True)
            with device_settings.autocast():
                logits = trained(inputs)
            loss = self.objective.loss(logits.float(), targets)
            _check_finite(loss, settings, epoch, shard)
            share = len(inputs) * shard.world / global_sizes[step]  # DDP averages ranks: weigh by slice size
            self.scaler.scale(loss * share if shard.distributed else loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self._step_learning_rate()
            total += float(loss.detach()) * len(inputs)
            count += len(inputs)
            bar.set_postfix(loss=f"{total / count:.4f}", refresh=False)
        distributed.average_buffers(phase.module)
        summed_loss, summed_count = distributed.all_reduce_sum([total, float(count)])
        return summed_loss / max(summed_count, 1)

    def _step_learning_rate(self) -> None:
        """Advance the per-step schedule: warm-up then hand over to the plateau rule, or cosine to the end."""
        training = self.training
        if training.schedule == "cosine" or self.step_schedule.last_epoch < training.warmup_steps:
            self.step_schedule.step()

    def _validate(self) -> np.ndarray:
        """Probabilities of every validation image under the current weights (all N rows on every rank)."""
        phase, objective = self.phase, self.objective
        phase.module.eval()
        shard = distributed.shard_for(len(phase.valid_data))
        loader = batch_loader(phase.valid_data, self.training.batch_size, shuffle=False, num_workers=phase.loader_workers, shard=shard)
        (outputs,) = run_forward(
            lambda inputs: to_probabilities(phase.forward(inputs), objective.activation),
            loader,
            len(phase.valid_data),
            self.device_settings,
            self.settings.progress,
            f"{self.settings.label} validate",
            shard,
        )
        return outputs

    # -- files --------------------------------------------------------------------------------
    def _best_payload(self, epoch: int, metric: float) -> dict[str, Any]:
        return {
            **self.checkpoint_metadata,
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "epoch": epoch,
            "metric_name": self.objective.metric_name,
            "metric": metric,
            "model": cpu_state_dict(self.network),
        }

    def _save_resume(self) -> None:
        progress = self.progress
        save_checkpoint(
            self.files.resume,
            {
                "format_version": FORMAT_VERSION,
                "fingerprint": self.fingerprint,
                "epoch": len(progress.history),
                "model": cpu_state_dict(self.network),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.plateau.state_dict(),
                "step_scheduler": self.step_schedule.state_dict(),
                "scaler": self.scaler.state_dict(),
                "history": progress.history,
                "best_epoch": progress.best_epoch,
                "best_metric": progress.best_metric,
                "epochs_without_improvement": progress.epochs_without_improvement,
                "rng": capture_rng_state(),
            },
        )

    def _resume(self, initial_weights: dict[str, torch.Tensor]) -> _Progress:
        """Restore this job's latest epoch; anything unusable means a fresh start (with a warning)."""
        files = self.files
        if not files.resume.is_file():
            return _Progress()
        try:
            payload = load_checkpoint(files.resume)
            if payload.get("fingerprint") != self.fingerprint:
                report_training_from_scratch(files.resume, "belongs to a different config or dataset")
                return _Progress()
            if payload["best_epoch"] > 0:
                load_checkpoint(files.best)  # the best weights must be readable too, or the run cannot finish
            self.network.load_state_dict(payload["model"])
            self.optimizer.load_state_dict(payload["optimizer"])
            self.plateau.load_state_dict(payload["scheduler"])
            self.step_schedule.load_state_dict(payload["step_scheduler"])
            self.scaler.load_state_dict(payload["scaler"])
            restore_rng_state(payload["rng"])
            return _Progress(
                history=list(payload["history"]),
                best_epoch=int(payload["best_epoch"]),
                best_metric=float(payload["best_metric"]),
                epochs_without_improvement=int(payload["epochs_without_improvement"]),
            )
        except (CheckpointError, FileNotFoundError, KeyError, RuntimeError, ValueError, TypeError) as error:
            report_training_from_scratch(files.work_dir, f"cannot resume ({error})")
            self.network.load_state_dict(initial_weights)
            return _Progress()

    def _state(self, finished: bool, **extra: Any) -> dict[str, Any]:
        progress = self.progress
        return {
            "format_version": FORMAT_VERSION,
            "finished": finished,
            "fingerprint": self.fingerprint,
            "metric": self.objective.metric_name,
            "epochs_completed": len(progress.history),
            "best_epoch": progress.best_epoch,
            "best_metric": progress.best_metric if progress.best_epoch > 0 else None,
            "history": progress.history,
            **extra,
        }

    def _finish(
        self,
        valid_targets: Targets,
        best_outputs: np.ndarray | None,
        summarize: Callable[[np.ndarray], dict[str, Any]] | None,
    ) -> FitResult:
        """Load the best weights, summarise them on validation, mark the run finished, drop resume.pt."""
        files, progress = self.files, self.progress
        if progress.best_epoch < 1:
            raise RuntimeError(f"{self.settings.label}: no epoch was trained (training.epochs = {self.training.epochs})")
        distributed.barrier()  # rank 0's last epoch files are complete (already true after the epoch barrier)
        best = load_checkpoint(files.best)
        self.network.load_state_dict(best["model"])
        if best_outputs is None:  # the best epoch ran before a resume: recompute its validation outputs
            best_outputs = self._validate()
        summary = summarize(best_outputs) if summarize is not None else {}
        stopped_early = len(progress.history) < self.epochs
        distributed.barrier()  # every rank has read checkpoint.pt before rank 0 replaces it
        if distributed.is_main_process():
            # checkpoint.pt alone then describes the finished model (history and validation summary too).
            save_checkpoint(files.best, {**best, "history": progress.history, "summary": summary})
            files.write_state(self._state(finished=True, stopped_early=stopped_early, summary=summary))
            files.resume.unlink(missing_ok=True)
            write_training_curves(files.work_dir / CURVES_FILE, progress.history, self.objective.metric_name, self.settings.label)
        distributed.barrier()  # no rank returns before the finished run is on disk
        self.network.eval()
        return FitResult(
            history=progress.history,
            best_epoch=progress.best_epoch,
            best_metric=progress.best_metric,
            stopped_early=stopped_early,
            summary=summary,
        )


def _log(settings: RunSettings, message: str, *arguments: Any) -> None:
    """Log on rank 0 only (every rank runs the same epochs)."""
    if distributed.is_main_process():
        log.info(message, *arguments)


def _build_phase(
    network: ImageClassifier,
    training: TrainingConfig,
    train: tuple[Any, Targets],
    valid: tuple[Any, Targets],
    settings: RunSettings,
    device_settings: DeviceSettings,
    feature_store: FeatureStore | None = None,
) -> _Phase:
    if training.finetune == "head":
        unfreeze_top_groups(network, layer_groups(network.backbone), 0)
        shared = (training.batch_size, settings, device_settings, feature_store)
        train_features = _head_features(network, train[0], *shared, "features (train)")
        valid_features = _head_features(network, valid[0], *shared, "features (valid)")
        return _Phase(network.head, network.head, FeatureBatches(train_features, train[1]), FeatureBatches(valid_features, valid[1]), 0)
    if training.finetune == "full":
        unfreeze_top_groups(network, layer_groups(network.backbone), -1)
    augmenter = build_augmenter(training.augment)
    return _Phase(
        network, network, ImageBatches(train[0], train[1], augmenter), ImageBatches(valid[0], valid[1]), settings.num_workers
    )


def _head_features(
    network: ImageClassifier,
    images: Any,
    batch_size: int,
    settings: RunSettings,
    device_settings: DeviceSettings,
    feature_store: FeatureStore | None,
    description: str,
) -> torch.Tensor:
    """Frozen-backbone features for head training: from the shared store when there is one."""
    if feature_store is None:
        return extract_features(network, images, batch_size, settings, device_settings, description)
    extraction = ExtractionSettings(batch_size, device_settings, settings.num_workers, settings.progress, f"{settings.label} {description}")
    return torch.from_numpy(feature_store.features(network, images, extraction))


def extract_features(
    network: ImageClassifier,
    images: Any,
    batch_size: int,
    settings: RunSettings,
    device_settings: DeviceSettings,
    description: str = "features",
) -> torch.Tensor:
    """Pooled backbone features of every image, in eval mode (batch norm uses its running statistics).

    Distributed, each rank computes a shard and every rank receives all rows.
    """
    extraction = ExtractionSettings(batch_size, device_settings, settings.num_workers, settings.progress, f"{settings.label} {description}")
    return torch.from_numpy(compute_features(network, images, extraction))


def _build_optimizer(groups: list[dict[str, Any]], training: TrainingConfig) -> torch.optim.Optimizer:
    if training.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=training.learning_rate, weight_decay=training.weight_decay)
    if training.optimizer == "nadam":
        return torch.optim.NAdam(groups, lr=training.learning_rate, weight_decay=training.weight_decay, decoupled_weight_decay=True)
    raise ValueError(f"unknown optimizer {training.optimizer!r}")


def _seed_epoch(seed: int, epoch: int) -> torch.Generator:
    """Re-seed every RNG for this epoch (and rank); returns the generator that shuffles its batches.

    The shuffle generator is the same on every rank, so all ranks slice the same global batches.
    """
    value = epoch_seed(seed, epoch)
    seed_everything(process_seed(value, distributed.rank()))
    return torch.Generator().manual_seed(value)


def _should_stop(progress: _Progress, training: TrainingConfig) -> bool:
    patience = training.early_stopping_patience
    return patience > 0 and progress.epochs_without_improvement >= patience


def _check_finite(loss: torch.Tensor, settings: RunSettings, epoch: int, shard: distributed.Shard) -> None:
    """Stop on a non-finite loss, on every rank at once (a lone rank raising would leave the others hanging)."""
    here = not bool(torch.isfinite(loss))
    anywhere = distributed.any_rank(here) if shard.distributed else here  # every rank joins the collective
    if anywhere:
        value = loss.item() if here else "non-finite on another rank"
        section = settings.config_section
        where = f"{settings.rate_key} of {section}" if " " in section else f"{section}.{settings.rate_key}"
        raise FloatingPointError(f"{settings.label}: loss became {value} in epoch {epoch + 1}; lower {where}")
