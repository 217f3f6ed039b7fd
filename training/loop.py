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

Fixed budget (`replay`, training.replay): no validation at all; the run takes exactly
`replay.steps` optimizer steps (the last pass cut short), its learning rate and layer-wise
unfreezing follow another run's steps, and every round still ends in a resumable checkpoint.
The final fit on train + valid trains this way.

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
import itertools
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
from conceptclef.training.augment import DeviceAugmenter, build_augmenter
from conceptclef.training.backbones import ImageClassifier, layer_groups, train_mode_except_frozen, unfreeze_top_groups
from conceptclef.training.batches import (
    BatchDataset,
    FeatureBatches,
    ImageBatches,
    ShuffledPasses,
    Targets,
    TargetsT,
    batch_loader,
    training_batch_sizes,
    training_loader,
)
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
from conceptclef.training.replay import StepReplay
from conceptclef.training.runtime import (
    capture_rng_state,
    configure_cudnn,
    epoch_seed,
    process_seed,
    report_training_from_scratch,
    restore_rng_state,
    seed_everything,
)
from conceptclef.training.schedule import (
    learning_rate_factor,
    parameter_groups,
    passes_per_validation,
    planned_epochs,
    steps_per_epoch,
)
from conceptclef.training.shared_memory import check_shared_memory

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

    def on(self, device: torch.device | str) -> "Objective":
        """The objective with its loss's buffers (class weights) on `device`, where the logits are.

        Losses are built on the CPU from label counts; without this move a class-weighted loss
        fails at the first CUDA step ('Expected all tensors to be on the same device').
        """
        return dataclasses.replace(self, loss=self.loss.to(device))


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
    replay: StepReplay | None = None,
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

    With `replay` the run has a fixed budget instead (see the module docstring): `valid` may be
    empty, nothing is validated, and the network ends with the weights of the budget's last step.
    """
    files = RunFiles(work_dir)
    device_settings = DeviceSettings.for_training(settings.device, training)
    configure_cudnn(settings.device, training.deterministic)
    seed_everything(settings.seed)
    network.to(settings.device)
    objective = objective.on(settings.device)
    if device_settings.channels_last:
        network.to(memory_format=torch.channels_last)
    # Also when resuming: the finished warm-up then only loads (and a resume.pt of another job
    # must not make a fresh fine-tuning start without its warm-up).
    if training.finetune != "head" and training.head_warmup_epochs > 0:
        warm_start_head(
            network, objective, training, (train, valid), files.work_dir / HEAD_WARMUP_FOLDER, settings, checkpoint_metadata,
            fingerprint, feature_store, warmup_fingerprint, replay.warmup if replay is not None else None,
        )
        seed_everything(settings.seed)  # fine-tuning starts from the same RNG state whether the head was trained or loaded
    initial_weights = cpu_state_dict(network)  # copies: restored if a resume attempt fails half-way
    wants_sync = training.finetune != "head" and training.batchnorm != "frozen"
    synced = distributed.sync_batch_norm_if_useful(network, settings.device) if wants_sync else None
    try:
        trainer = Trainer(network, objective, training, files, settings, device_settings, checkpoint_metadata, fingerprint, replay)
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
    replay: StepReplay | None = None,
) -> None:
    """Train `network.head` alone on cached features of the untouched backbone and keep its best epoch.

    A random head's large gradients would otherwise flow into the pretrained blocks during the
    first fine-tuning steps; on cached features the head converges in seconds. The run is an
    ordinary head-mode run in `work_dir` (its own checkpoint, curves and resume), so a finished
    warm-up is loaded instead of retrained. `warmup_fingerprint` identifies the warm-up job alone
    (the estimator hashes `head_warmup_config`), so changing only the fine-tuning keeps it.
    `replay`: the warm-up of a fixed-budget run, replaying the usual run's warm-up.
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
        feature_store=feature_store, replay=replay,
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
    replay: StepReplay | None = None  # a fixed budget replaying another run's steps (no validation)
    progress: _Progress = field(default_factory=_Progress)

    # -- setup --------------------------------------------------------------------------------
    def _build(self, train: tuple[Any, Targets], valid: tuple[Any, Targets], feature_store: FeatureStore | None) -> None:
        training = self.training
        self.phase = _build_phase(self.network, training, train, valid, self.settings, self.device_settings, feature_store)
        per_rank = math.ceil(training.batch_size / distributed.world_size())
        check_shared_memory(self.phase.loader_workers, _batch_bytes(self.phase.train_data, per_rank))
        self.groups = layer_groups(self.network.backbone, fine=training.unfreeze_groups == "fine")
        self.steps_per_pass = steps_per_epoch(len(self.phase.train_data), training.batch_size)
        self.epochs = planned_epochs(training, len(self.phase.train_data))
        self.total_steps = self.epochs * self.steps_per_pass
        if self.replay is not None:  # the passes holding the budget; the cosine spans the replayed run's steps
            self.epochs = max(1, math.ceil(self.replay.steps / self.steps_per_pass))
            self.total_steps = self.replay.total_steps
        self.passes_per_round = passes_per_validation(training, len(self.phase.train_data))
        self.rounds = math.ceil(self.epochs / self.passes_per_round)
        self.images_per_pass = sum(training_batch_sizes(len(self.phase.train_data), training.batch_size, distributed.world_size()))
        self.unfrozen = -2  # groups unfrozen now (-2: not set yet)
        self.device_augmenter = (
            DeviceAugmenter(training.augment) if training.augment_on_device and training.finetune != "head" else None
        )
        self._build_optimization()
        self._train_loader: tuple[torch.utils.data.DataLoader, ShuffledPasses] | None = None
        self._wrapped: tuple[tuple[bool, ...], nn.Module] | None = None

    def _build_optimization(self) -> None:
        """Fresh optimizer, schedules and scaler (also what a failed resume falls back to)."""
        training = self.training
        backbone = None if training.finetune == "head" else self.network.backbone
        self.optimizer = _build_optimizer(parameter_groups(self.network.head, backbone, self.groups, training), training)
        self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="max", factor=training.lr_reduce_factor, patience=training.lr_reduce_patience
        )
        replay = self.replay
        self.step_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            (lambda step: learning_rate_factor(step, training.warmup_steps, self.total_steps, training.schedule))
            if replay is None
            else replay.learning_rate_factor,
        )
        self.scaler = grad_scaler(self.device_settings)
        self.optimizer_steps = 0
        self.skipped_steps = 0  # float16 steps the scaler skipped (overflow): they do not advance the LR schedule
        self.consecutive_skips = 0

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
            passes_done = int(self.progress.history[-1]["epoch"])
            _log(settings, "%s: resuming after epoch %d (best %s %.4f)", settings.label, passes_done, objective.metric_name, self.progress.best_metric)
        _log(settings, "%s: training on %s", settings.label, self.device_settings.describe())

        best_outputs: np.ndarray | None = None
        try:
            # a fixed budget runs until its steps are taken (float16 skipped steps may need one more pass)
            for round_index in range(resumed_at, self.rounds) if self.replay is None else itertools.count(resumed_at):
                if _should_stop(self.progress, self.training) or self._budget_spent():
                    break
                record, outputs, improved = self._run_round(round_index, valid[1])
                if improved:
                    best_outputs = outputs
                if on_epoch_end is not None:
                    on_epoch_end(dict(record))
        finally:
            self._train_loader = None  # ends the persistent loader workers
            self._wrapped = None
        return self._finish(valid[1], best_outputs, summarize)

    def _budget_spent(self) -> bool:
        return self.replay is not None and self.optimizer_steps >= self.replay.steps

    def _unfreeze(self, round_index: int) -> bool:
        """Unfreeze the backbone groups of `round_index` (a fixed budget: of the replayed run's round
        holding the next step), and put newly trainable batch norms in training mode."""
        if self.training.finetune == "head":
            return False
        if self.replay is not None:
            round_index = self.replay.round_at(self.optimizer_steps)
        count = self.unfrozen_groups(round_index)
        if count != self.unfrozen:
            unfreeze_top_groups(self.network, self.groups, count)
            if self.unfrozen != -2:  # mid-round: the new groups' batch norms learn from the next step
                train_mode_except_frozen(self.phase.module, freeze_statistics=self.training.batchnorm == "frozen")
            self.unfrozen = count
            return True
        return False

    def _run_round(self, round_index: int, valid_targets: Targets) -> tuple[dict[str, Any], np.ndarray, bool]:
        """Train the passes up to the next validation, validate, update early stopping, save the files.

        A round is one pass, or with `validate_every_steps` the fewest passes holding that many
        optimizer steps; early stopping, LR reduction and layer-wise unfreezing count rounds.
        Returns (record, validation outputs, improved).
        """
        training, settings, progress, objective = self.training, self.settings, self.progress, self.objective
        first = round_index * self.passes_per_round
        last = first + self.passes_per_round if self.replay is not None else min(first + self.passes_per_round, self.epochs)
        self._unfreeze(round_index)
        started = time.perf_counter()
        train_loss = self._train_passes(first, last)
        images_per_second = self.images_per_pass * (last - first) / max(time.perf_counter() - started, 1e-9)
        if self.replay is not None:
            return self._end_budget_round(last, train_loss, started, images_per_second)
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
            "epoch": last,
            "train_loss": round(train_loss, 6),
            "valid_metric": round(metric, 6),
            "lr": learning_rate,
            "seconds": round(time.perf_counter() - started, 3),
        }
        if self.passes_per_round > 1 or self.skipped_steps:
            record["steps"] = self.optimizer_steps
            record["skipped_steps"] = self.skipped_steps
        improved = metric > progress.best_metric
        if improved:
            progress.best_metric, progress.best_epoch, progress.epochs_without_improvement = metric, last, 0
        elif not still_at_zero:
            progress.epochs_without_improvement += 1
        progress.history.append(record)
        if distributed.is_main_process():
            if improved:
                save_checkpoint(self.files.best, self._best_payload(last, metric))
            self._save_resume()
            self.files.write_metrics(progress.history)
            self.files.write_state(self._state(finished=False))
        distributed.barrier()  # the round's files are on disk for every rank (and every callback)
        _log(
            settings, "%s epoch %d/%d: loss %.4f, valid %s %.4f, lr %.2g, %.1fs (training %.0f images/s)",
            settings.label, last, self.epochs, train_loss, objective.metric_name, metric, learning_rate, record["seconds"], images_per_second,
        )
        return record, outputs, improved

    def _end_budget_round(self, last: int, train_loss: float, started: float, images_per_second: float) -> tuple[dict[str, Any], np.ndarray, bool]:
        """A fixed-budget round's record and files: no validation; the budget's last round is the "best"."""
        progress, settings = self.progress, self.settings
        last = self.passes_done
        record = {
            "epoch": last,
            "train_loss": round(train_loss, 6),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "seconds": round(time.perf_counter() - started, 3),
            "steps": self.optimizer_steps,
            "skipped_steps": self.skipped_steps,
        }
        done = self._budget_spent()
        if done:
            progress.best_metric, progress.best_epoch = math.nan, last
        progress.history.append(record)
        if distributed.is_main_process():
            if done:
                save_checkpoint(self.files.best, self._best_payload(last, math.nan))
            self._save_resume()
            self.files.write_metrics(progress.history)
            self.files.write_state(self._state(finished=False))
        distributed.barrier()
        _log(
            settings, "%s epoch %d/%d: loss %.4f, %d of %d steps, lr %.2g, %.1fs (training %.0f images/s)",
            settings.label, last, self.epochs, train_loss, self.optimizer_steps, self.replay.steps if self.replay else 0,
            record["lr"], record["seconds"], images_per_second,
        )
        return record, np.zeros((0, 0), np.float32), done

    def _trained_module(self) -> nn.Module:
        """The module the optimizer steps through: DDP-wrapped when distributed, rebuilt only when
        the set of trainable parameters changes (layer-wise unfreezing), never once per pass."""
        module = self.phase.module
        trainable = tuple(parameter.requires_grad for parameter in module.parameters())
        if self._wrapped is None or self._wrapped[0] != trainable:
            self._wrapped = (trainable, distributed.wrap_for_training(module, self.settings.device))
        return self._wrapped[1]

    def _loader(self, shard: distributed.Shard) -> tuple[torch.utils.data.DataLoader, ShuffledPasses]:
        if self._train_loader is None:
            self._train_loader = training_loader(
                self.phase.train_data, self.training.batch_size, self.phase.loader_workers, self.device_settings.pin_memory, shard
            )
        return self._train_loader

    def _train_passes(self, first: int, last: int) -> float:
        """Passes first..last-1 over shuffled batches; the sample-weighted mean loss over all ranks.

        The loss is summed on the device (no GPU sync per step); its finiteness is checked every
        FINITE_CHECK_STEPS steps and once more in the round's one reduction over ranks.
        """
        phase, training, settings = self.phase, self.training, self.settings
        train_mode_except_frozen(phase.module, freeze_statistics=training.batchnorm == "frozen")
        shard = distributed.current_shard()
        trained = self._trained_module()
        loader, sampler = self._loader(shard)
        global_sizes = training_batch_sizes(len(phase.train_data), training.batch_size, shard.world)
        tally = LossTally(settings.device)
        self.passes_done = first
        for epoch in range(first, last):
            if self._budget_spent():
                break
            self.passes_done = epoch + 1
            sampler.set_pass(_seed_epoch(settings.seed, epoch))
            self._train_one_pass(trained, loader, global_sizes, shard, tally, epoch)
        distributed.average_buffers(phase.module)
        total, count, nonfinite = distributed.all_reduce_sum(tally.totals())  # the round's one reduction, flag included
        self._raise_if_nonfinite(int(nonfinite), first, last)
        return total / max(count, 1)

    def _train_one_pass(
        self,
        trained: nn.Module,
        loader: torch.utils.data.DataLoader,
        global_sizes: list[int],
        shard: distributed.Shard,
        tally: "LossTally",
        epoch: int,
    ) -> None:
        settings, device_settings = self.settings, self.device_settings
        bar = tqdm(loader, desc=f"{settings.label} epoch {epoch + 1}/{self.epochs}", disable=not settings.progress, leave=False)
        for step, (inputs, targets, _) in enumerate(bar):
            if self.replay is not None:
                if self._budget_spent():
                    break
                if self._unfreeze(0):
                    trained = self._trained_module()
            inputs = inputs.to(settings.device, non_blocking=True)
            if self.device_augmenter is not None:
                inputs = self.device_augmenter(inputs)
            inputs = device_settings.inputs(inputs)
            targets = targets.to(settings.device, non_blocking=True)
            self.optimizer.zero_grad(set_to_none=True)
            with device_settings.autocast():
                logits = trained(inputs)
            loss = self.objective.loss(logits.float(), targets)
            share = len(inputs) * shard.world / global_sizes[step]  # DDP averages ranks: weigh by slice size
            self.scaler.scale(loss * share if shard.distributed else loss).backward()
            if self.scaler.is_enabled():
                scale = self.scaler.get_scale()  # scaler.step syncs anyway: reading the scale costs nothing more
                self.scaler.step(self.optimizer)
                self.scaler.update()
                stepped = self.scaler.get_scale() >= scale  # an overflow halves the scale and skips the step
            else:
                self.optimizer.step()
                stepped = True
            if stepped:
                self.optimizer_steps += 1
                self._step_learning_rate()
                self.consecutive_skips = 0
            else:
                self._skipped_step(epoch)
            tally.add(loss.detach(), len(inputs))
            if tally.steps % FINITE_CHECK_STEPS == 0:
                if not self.scaler.is_enabled():
                    nonfinite = tally.nonfinite_count()
                    if shard.distributed:  # every rank checks after the same step: the collective is safe
                        nonfinite = int(distributed.all_reduce_sum([float(nonfinite)])[0])
                    self._raise_if_nonfinite(nonfinite, epoch, epoch + 1)
                if settings.progress:
                    bar.set_postfix(loss=f"{tally.mean():.4f}", refresh=False)

    def _skipped_step(self, epoch: int) -> None:
        """A float16 step the scaler skipped (gradient overflow): it halves the scale and tries again.

        The LR schedule does not advance (the step did not happen). Only MAX_CONSECUTIVE_SKIPS in a
        row (the scale then fell by 2^-50: the loss is NaN, not an overflow) stop the run; every rank
        sees the same scale, so all stop together.
        """
        self.skipped_steps += 1
        self.consecutive_skips += 1
        if self.consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
            raise FloatingPointError(
                f"{self.settings.label}: the float16 loss scaler skipped {self.consecutive_skips} steps in a row in epoch "
                f"{epoch + 1} (non-finite loss or gradients); lower {_rate_key_name(self.settings)} or set amp_dtype = \"bfloat16\" in {self.settings.config_section}"
            )

    def _raise_if_nonfinite(self, nonfinite: int, first: int, last: int) -> None:
        """Stop on non-finite losses (counted over all ranks, so all ranks raise together instead of hanging).

        Without loss scaling a non-finite loss has already poisoned the weights; none of it is
        saved, since this runs before the round's validation and checkpoint.
        """
        if nonfinite == 0 or self.scaler.is_enabled():
            return
        passes = f"epoch {first + 1}" if last == first + 1 else f"epochs {first + 1}-{last}"
        raise FloatingPointError(
            f"{self.settings.label}: the loss became non-finite in {passes} ({nonfinite} steps); lower {_rate_key_name(self.settings)}"
        )

    def _step_learning_rate(self) -> None:
        """Advance the per-step schedule: warm-up then hand over to the plateau rule, or cosine to the end."""
        training = self.training
        if self.replay is not None or training.schedule == "cosine" or self.step_schedule.last_epoch < training.warmup_steps:
            self.step_schedule.step()

    def _validate(self) -> np.ndarray:
        """Probabilities of every validation image under the current weights (all N rows on every rank)."""
        phase, objective = self.phase, self.objective
        phase.module.eval()
        shard = distributed.shard_for(len(phase.valid_data))
        loader = batch_loader(
            phase.valid_data, self.training.batch_size, shuffle=False, num_workers=phase.loader_workers,
            pin_memory=self.device_settings.pin_memory, shard=shard,
        )
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
                "skipped_steps": self.skipped_steps,
                "optimizer_steps": self.optimizer_steps,
                "history": progress.history,
                "best_epoch": progress.best_epoch,
                "best_metric": progress.best_metric,
                "epochs_without_improvement": progress.epochs_without_improvement,
                "rng": capture_rng_state(),
            },
        )

    def _resume(self, initial_weights: dict[str, torch.Tensor]) -> _Progress:
        """Restore this job's latest round; anything unusable means a fresh start (with a warning).

        Every part is read and checked before any is applied, and a failure while applying resets
        the network, optimizer, schedules and scaler alike: a half-restored state (the network
        fresh but the optimizer's moments from the file) would train on silently.
        """
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
            parts = {key: payload[key] for key in ("model", "optimizer", "scheduler", "step_scheduler", "scaler", "rng")}
            progress = _Progress(
                history=list(payload["history"]),
                best_epoch=int(payload["best_epoch"]),
                best_metric=float(payload["best_metric"]),
                epochs_without_improvement=int(payload["epochs_without_improvement"]),
            )
            counters = int(payload.get("skipped_steps", 0)), int(payload.get("optimizer_steps", 0))
        except (CheckpointError, FileNotFoundError, KeyError, RuntimeError, ValueError, TypeError) as error:
            report_training_from_scratch(files.work_dir, f"cannot resume ({error})")
            return _Progress()
        try:
            self.network.load_state_dict(parts["model"])
            self.optimizer.load_state_dict(parts["optimizer"])
            self.plateau.load_state_dict(parts["scheduler"])
            self.step_schedule.load_state_dict(parts["step_scheduler"])
            if parts["scaler"] and self.scaler.is_enabled():
                self.scaler.load_state_dict(parts["scaler"])
            # else: saved without loss scaling (a CPU or bfloat16 run) and resumed with it, or the other way
            # round: the scaler starts afresh (its scale adapts within a few steps); nothing else differs.
            restore_rng_state(parts["rng"])
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as error:
            report_training_from_scratch(files.work_dir, f"cannot resume ({type(error).__name__}: {str(error)[:200]})")
            self.network.load_state_dict(initial_weights)
            self._build_optimization()
            return _Progress()
        self.skipped_steps, self.optimizer_steps = counters
        return progress

    def _state(self, finished: bool, **extra: Any) -> dict[str, Any]:
        progress = self.progress
        return {
            "format_version": FORMAT_VERSION,
            "finished": finished,
            "fingerprint": self.fingerprint,
            "metric": self.objective.metric_name,
            "epochs_completed": len(progress.history),
            "best_epoch": progress.best_epoch,
            "best_metric": progress.best_metric if progress.best_epoch > 0 and math.isfinite(progress.best_metric) else None,
            "history": progress.history,
            # what a final fit replaying this run needs (training.replay): its passes' steps and the cosine's span
            "steps_per_pass": self.steps_per_pass,
            "total_steps": self.total_steps,
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
        if best_outputs is None and self.replay is None:  # the best epoch ran before a resume: recompute its validation outputs
            best_outputs = self._validate()
        summary = summarize(best_outputs) if summarize is not None and best_outputs is not None and self.replay is None else {}
        stopped_early = len(progress.history) < self.rounds
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
    augmenter = None if training.augment_on_device else build_augmenter(training.augment)  # else: Trainer.device_augmenter
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


def _seed_epoch(seed: int, epoch: int) -> int:
    """Re-seed every RNG for this epoch (and rank); returns the seed that shuffles its batches.

    The shuffle seed is the same on every rank, so all ranks slice the same global batches.
    """
    value = epoch_seed(seed, epoch)
    seed_everything(process_seed(value, distributed.rank()))
    return value


def _should_stop(progress: _Progress, training: TrainingConfig) -> bool:
    patience = training.early_stopping_patience
    return patience > 0 and progress.epochs_without_improvement >= patience


FINITE_CHECK_STEPS = 100  # without loss scaling, non-finite losses are looked for every this many steps (and per round)
MAX_CONSECUTIVE_SKIPS = 50  # float16: this many skipped steps in a row means NaN, not overflow


class LossTally:
    """A round's training loss summed on the device, so no step waits for the GPU to report it.

    Non-finite losses are counted, not summed (with float16 loss scaling they are skipped steps).
    float64 where the device has it: the sum is then the one Python floats gave before.
    """

    def __init__(self, device: torch.device) -> None:
        dtype = torch.float32 if device.type == "mps" else torch.float64
        self.total = torch.zeros((), dtype=dtype, device=device)
        self.count = torch.zeros((), dtype=dtype, device=device)
        self.nonfinite = torch.zeros((), dtype=torch.int64, device=device)
        self.steps = 0

    def add(self, loss: torch.Tensor, weight: int) -> None:
        finite = torch.isfinite(loss)
        self.total += torch.where(finite, loss.to(self.total.dtype) * weight, 0.0)
        self.count += finite.to(self.count.dtype) * weight
        self.nonfinite += (~finite).to(torch.int64)
        self.steps += 1

    def nonfinite_count(self) -> int:
        return int(self.nonfinite.item())

    def totals(self) -> list[float]:
        """(loss sum, images, non-finite steps) as plain numbers: one sync, at the end of a round."""
        return [float(value) for value in torch.stack([self.total, self.count, self.nonfinite.to(self.total.dtype)]).cpu()]

    def mean(self) -> float:
        total, count, _ = self.totals()
        return total / max(count, 1.0)


def grad_scaler(device_settings: DeviceSettings) -> torch.amp.GradScaler:
    """Loss scaling for float16 autocast only (bfloat16 and float32 gradients do not underflow)."""
    return torch.amp.GradScaler(device_settings.device.type, enabled=device_settings.scales_loss)


def _batch_bytes(dataset: torch.utils.data.Dataset, batch_size: int) -> int:
    """Bytes of one uint8 image batch of `dataset` (0 for cached features)."""
    images = getattr(dataset, "images", None)
    shape = tuple(getattr(images, "shape", ()))
    return batch_size * int(np.prod(shape[1:])) if len(shape) == 4 else 0


def _rate_key_name(settings: RunSettings) -> str:
    """The config key a user lowers when training diverges, e.g. category_model.learning_rate."""
    section = settings.config_section
    return f"{settings.rate_key} of {section}" if " " in section else f"{section}.{settings.rate_key}"
