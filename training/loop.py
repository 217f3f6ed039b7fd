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
  layerwise  the head trains first; every `unfreeze_every_epochs` epochs one more backbone stage
             (timm's coarse layer groups) unfreezes, from the top down. Frozen batch norms keep
             their ImageNet statistics.

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

import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from conceptclef.core.config import TrainingConfig
from conceptclef.training import distributed
from conceptclef.training.augment import build_augmenter
from conceptclef.training.backbones import ImageClassifier, layer_groups, train_mode_except_frozen, unfreeze_top_groups
from conceptclef.training.batches import FeatureBatches, ImageBatches, Targets, batch_loader, training_batch_sizes
from conceptclef.training.checkpoints import (
    FORMAT_VERSION,
    CheckpointError,
    RunFiles,
    cpu_state_dict,
    load_checkpoint,
    save_checkpoint,
)
from conceptclef.training.feature_store import ExtractionSettings, FeatureStore, compute_features
from conceptclef.training.inference import Activation, DeviceSettings, run_forward, to_probabilities
from conceptclef.training.runtime import (
    capture_rng_state,
    epoch_seed,
    make_repeatable,
    process_seed,
    restore_rng_state,
    seed_everything,
)

log = logging.getLogger("conceptclef")

EpochCallback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Objective:
    """What a network learns: loss on logits, output activation, and the metric that selects epochs."""

    loss: nn.Module
    activation: Activation
    metric_name: str
    metric: Callable[[np.ndarray, Targets], float]  # (validation probabilities, targets) -> higher is better


@dataclass(frozen=True)
class RunSettings:
    """Per-run choices that are not part of the model's config."""

    device: torch.device
    seed: int = 0
    num_workers: int = 0
    progress: bool = False
    label: str = "model"  # shown in logs and progress bars


@dataclass
class FitResult:
    """Outcome of `fit_network`; the network holds the best weights when it returns."""

    history: list[dict[str, Any]]
    best_epoch: int
    best_metric: float
    best_valid_outputs: np.ndarray
    stopped_early: bool
    resumed_at_epoch: int = 0
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Phase:
    """What the optimizer sees: the trainable module, its inputs and its forward function."""

    module: nn.Module
    forward: Callable[[torch.Tensor], torch.Tensor]
    train_data: torch.utils.data.Dataset
    valid_data: torch.utils.data.Dataset
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
    computed here for this network alone.
    """
    files = RunFiles(work_dir)
    device_settings = DeviceSettings.for_device(settings.device, training.amp, training.channels_last)
    make_repeatable(settings.device)
    seed_everything(settings.seed)
    network.to(settings.device)
    if device_settings.channels_last:
        network.to(memory_format=torch.channels_last)
    initial_weights = cpu_state_dict(network)  # copies: restored if a resume attempt fails half-way
    synced = distributed.sync_batch_norm_if_useful(network, settings.device) if training.finetune != "head" else None
    try:
        return _fit(
            network, objective, training, train, valid, files, settings, device_settings, initial_weights,
            checkpoint_metadata, fingerprint, summarize, on_epoch_end, feature_store,
        )
    finally:
        if synced is not None:
            synced.restore()


def _fit(
    network: ImageClassifier,
    objective: Objective,
    training: TrainingConfig,
    train: tuple[Any, Targets],
    valid: tuple[Any, Targets],
    files: RunFiles,
    settings: RunSettings,
    device_settings: DeviceSettings,
    initial_weights: dict[str, torch.Tensor],
    checkpoint_metadata: dict[str, Any],
    fingerprint: str,
    summarize: Callable[[np.ndarray], dict[str, Any]] | None,
    on_epoch_end: EpochCallback | None,
    feature_store: FeatureStore | None,
) -> FitResult:
    phase = _build_phase(network, training, train, valid, settings, device_settings, feature_store)
    optimizer = _build_optimizer(phase.module, training)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=training.lr_reduce_factor, patience=training.lr_reduce_patience
    )
    scaler = torch.amp.GradScaler("cuda", enabled=device_settings.amp)
    progress = _resume(files, fingerprint, network, optimizer, scheduler, scaler, initial_weights, objective)
    resumed_at = len(progress.history)
    distributed.check_same_on_all_ranks(resumed_at, f"{files.work_dir}: epochs to resume after")  # also a barrier
    if resumed_at == 0:
        if distributed.is_main_process():
            files.clear()
            files.write_state(_state(fingerprint, objective, progress, finished=False))
    else:
        _log(settings, "%s: resuming after epoch %d (best %s %.4f)", settings.label, resumed_at, objective.metric_name, progress.best_metric)

    groups = layer_groups(network.backbone) if training.finetune == "layerwise" else []
    best_outputs: np.ndarray | None = None
    for epoch in range(resumed_at, training.epochs):
        if _should_stop(progress, training):
            break
        generator = _seed_epoch(settings.seed, epoch)
        if training.finetune == "layerwise":
            unfreeze_top_groups(network, groups, epoch // max(1, training.unfreeze_every_epochs))
        started = time.perf_counter()
        train_loss = _train_one_epoch(phase, objective, optimizer, scaler, training, settings, device_settings, generator, epoch)
        outputs = _validate(phase, objective, training, settings, device_settings, valid[1])
        # Every rank holds the same gathered outputs; rank 0's metric makes the decisions identical anyway.
        metric = distributed.broadcast_value(float(objective.metric(outputs, valid[1])))
        learning_rate = float(optimizer.param_groups[0]["lr"])
        # While no validation prediction crosses the threshold yet (F1 = 0 everywhere), a flat
        # metric means "not yet", not "no longer improving": patience and LR reduction wait.
        still_at_zero = metric <= 0.0 and progress.best_metric <= 0.0
        if not still_at_zero:
            scheduler.step(metric)
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
            best_outputs = outputs
        elif not still_at_zero:
            progress.epochs_without_improvement += 1
        progress.history.append(record)
        if distributed.is_main_process():
            if improved:
                save_checkpoint(files.best, _best_payload(network, checkpoint_metadata, fingerprint, epoch + 1, metric, objective))
            _save_resume(files.resume, network, optimizer, scheduler, scaler, progress, fingerprint)
            files.write_metrics(progress.history)
            files.write_state(_state(fingerprint, objective, progress, finished=False))
        distributed.barrier()  # the epoch's files are on disk for every rank (and every callback)
        _log(
            settings, "%s epoch %d/%d: loss %.4f, valid %s %.4f, lr %.2g, %.1fs",
            settings.label, epoch + 1, training.epochs, train_loss, objective.metric_name, metric, learning_rate, record["seconds"],
        )
        if on_epoch_end is not None:
            on_epoch_end(dict(record))

    return _finish(files, network, phase, objective, training, settings, device_settings, valid[1], progress, fingerprint, best_outputs, summarize, resumed_at)


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


def _build_optimizer(module: nn.Module, training: TrainingConfig) -> torch.optim.Optimizer:
    # Frozen parameters are included but get no gradient, so the optimizer skips them until a
    # layerwise schedule unfreezes them (and the parameter groups never change across resumes).
    parameters = list(module.parameters())
    if training.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=training.learning_rate, weight_decay=training.weight_decay)
    if training.optimizer == "nadam":
        return torch.optim.NAdam(
            parameters, lr=training.learning_rate, weight_decay=training.weight_decay, decoupled_weight_decay=True
        )
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


def _train_one_epoch(
    phase: _Phase,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    training: TrainingConfig,
    settings: RunSettings,
    device_settings: DeviceSettings,
    generator: torch.Generator,
    epoch: int,
) -> float:
    """One pass over shuffled training batches; returns the sample-weighted mean loss (over all ranks)."""
    train_mode_except_frozen(phase.module)
    shard = distributed.current_shard()
    trained = distributed.wrap_for_training(phase.module, settings.device)  # after layerwise unfreezing
    loader = batch_loader(
        phase.train_data, training.batch_size, shuffle=True, num_workers=phase.loader_workers, generator=generator, shard=shard
    )
    global_sizes = training_batch_sizes(len(phase.train_data), training.batch_size, shard.world)
    total, count = 0.0, 0
    bar = tqdm(loader, desc=f"{settings.label} epoch {epoch + 1}/{training.epochs}", disable=not settings.progress, leave=False)
    for step, (inputs, targets, _) in enumerate(bar):
        inputs = device_settings.inputs(inputs)
        targets = targets.to(settings.device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with device_settings.autocast():
            logits = trained(inputs)
        loss = objective.loss(logits.float(), targets)
        _check_finite(loss, settings, epoch, shard)
        share = len(inputs) * shard.world / global_sizes[step]  # DDP averages ranks: weigh by slice size
        scaler.scale(loss * share if shard.distributed else loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total += float(loss.detach()) * len(inputs)
        count += len(inputs)
        bar.set_postfix(loss=f"{total / count:.4f}", refresh=False)
    distributed.average_buffers(phase.module)
    total, count = distributed.all_reduce_sum([total, float(count)])
    return total / max(count, 1)


def _check_finite(loss: torch.Tensor, settings: RunSettings, epoch: int, shard: distributed.Shard) -> None:
    """Stop on a non-finite loss, on every rank at once (a lone rank raising would leave the others hanging)."""
    here = not bool(torch.isfinite(loss))
    anywhere = distributed.any_rank(here) if shard.distributed else here  # every rank joins the collective
    if anywhere:
        value = loss.item() if here else "non-finite on another rank"
        raise FloatingPointError(f"{settings.label}: loss became {value} in epoch {epoch + 1}; lower training.learning_rate")


def _validate(
    phase: _Phase,
    objective: Objective,
    training: TrainingConfig,
    settings: RunSettings,
    device_settings: DeviceSettings,
    targets: Targets,
) -> np.ndarray:
    """Probabilities of every validation image under the current weights (all N rows on every rank)."""
    phase.module.eval()
    shard = distributed.shard_for(len(phase.valid_data))
    loader = batch_loader(phase.valid_data, training.batch_size, shuffle=False, num_workers=phase.loader_workers, shard=shard)
    (outputs,) = run_forward(
        lambda inputs: to_probabilities(phase.forward(inputs), objective.activation),
        loader,
        len(phase.valid_data),
        device_settings,
        settings.progress,
        f"{settings.label} validate",
        shard,
    )
    return outputs


def _best_payload(
    network: ImageClassifier, metadata: dict[str, Any], fingerprint: str, epoch: int, metric: float, objective: Objective
) -> dict[str, Any]:
    return {
        **metadata,
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "epoch": epoch,
        "metric_name": objective.metric_name,
        "metric": metric,
        "model": cpu_state_dict(network),
    }


def _save_resume(
    path: Path,
    network: ImageClassifier,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau,
    scaler: torch.amp.GradScaler,
    progress: _Progress,
    fingerprint: str,
) -> None:
    save_checkpoint(
        path,
        {
            "format_version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "epoch": len(progress.history),
            "model": cpu_state_dict(network),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "history": progress.history,
            "best_epoch": progress.best_epoch,
            "best_metric": progress.best_metric,
            "epochs_without_improvement": progress.epochs_without_improvement,
            "rng": capture_rng_state(),
        },
    )


def _resume(
    files: RunFiles,
    fingerprint: str,
    network: ImageClassifier,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau,
    scaler: torch.amp.GradScaler,
    initial_weights: dict[str, torch.Tensor],
    objective: Objective,
) -> _Progress:
    """Restore this job's latest epoch; anything unusable means a fresh start (with a warning)."""
    if not files.resume.is_file():
        return _Progress()
    try:
        payload = load_checkpoint(files.resume)
        if payload.get("fingerprint") != fingerprint:
            log.warning("%s: belongs to a different config or dataset; training from scratch", files.resume)
            return _Progress()
        if payload["best_epoch"] > 0:
            load_checkpoint(files.best)  # the best weights must be readable too, or the run cannot finish
        network.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        scaler.load_state_dict(payload["scaler"])
        restore_rng_state(payload["rng"])
        return _Progress(
            history=list(payload["history"]),
            best_epoch=int(payload["best_epoch"]),
            best_metric=float(payload["best_metric"]),
            epochs_without_improvement=int(payload["epochs_without_improvement"]),
        )
    except (CheckpointError, FileNotFoundError, KeyError, RuntimeError, ValueError, TypeError) as error:
        warnings.warn(f"{files.work_dir}: cannot resume ({error}); training from scratch", RuntimeWarning, stacklevel=3)
        network.load_state_dict(initial_weights)
        return _Progress()


def _state(fingerprint: str, objective: Objective, progress: _Progress, finished: bool, **extra: Any) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "finished": finished,
        "fingerprint": fingerprint,
        "metric": objective.metric_name,
        "epochs_completed": len(progress.history),
        "best_epoch": progress.best_epoch,
        "best_metric": progress.best_metric if progress.best_epoch > 0 else None,
        "history": progress.history,
        **extra,
    }


def _finish(
    files: RunFiles,
    network: ImageClassifier,
    phase: _Phase,
    objective: Objective,
    training: TrainingConfig,
    settings: RunSettings,
    device_settings: DeviceSettings,
    valid_targets: Targets,
    progress: _Progress,
    fingerprint: str,
    best_outputs: np.ndarray | None,
    summarize: Callable[[np.ndarray], dict[str, Any]] | None,
    resumed_at: int,
) -> FitResult:
    """Load the best weights, summarise them on validation, mark the run finished, drop resume.pt."""
    if progress.best_epoch < 1:
        raise RuntimeError(f"{settings.label}: no epoch was trained (training.epochs = {training.epochs})")
    distributed.barrier()  # rank 0's last epoch files are complete (already true after the epoch barrier)
    best = load_checkpoint(files.best)
    network.load_state_dict(best["model"])
    if best_outputs is None:  # the best epoch ran before a resume: recompute its validation outputs
        best_outputs = _validate(phase, objective, training, settings, device_settings, valid_targets)
    summary = summarize(best_outputs) if summarize is not None else {}
    stopped_early = len(progress.history) < training.epochs
    distributed.barrier()  # every rank has read checkpoint.pt before rank 0 replaces it
    if distributed.is_main_process():
        # checkpoint.pt alone then describes the finished model (history and validation summary too).
        save_checkpoint(files.best, {**best, "history": progress.history, "summary": summary})
        files.write_state(_state(fingerprint, objective, progress, finished=True, stopped_early=stopped_early, summary=summary))
        files.resume.unlink(missing_ok=True)
    distributed.barrier()  # no rank returns before the finished run is on disk
    network.eval()
    return FitResult(
        history=progress.history,
        best_epoch=progress.best_epoch,
        best_metric=progress.best_metric,
        best_valid_outputs=best_outputs,
        stopped_early=stopped_early,
        resumed_at_epoch=resumed_at,
        summary=summary,
    )
