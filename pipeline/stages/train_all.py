"""`train-all`: router, global model, per-category models, then the stacker and thresholds.

Every stage leaves its files in the run directory and is skipped when they are complete, so
rerunning the same command after a crash continues where it stopped, provided the data are the
ones the run recorded (pipeline/run/fingerprint.py); one process at a time holds a run directory
(pipeline/run/lock.py). This module walks the run's table of networks (pipeline/run/networks.py)
to decide what to train; the networks then train one after the other here, or side by side on
several devices through `pipeline.devices.workers`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from conceptclef.core.config import Config, ConfigError, TrainingConfig
from conceptclef.core.memory import release_freed_memory
from conceptclef.core.runfiles import atomic_write_json, read_json
from conceptclef.data.errors import DataError
from conceptclef.data.modalities import UNROUTED
from conceptclef.data.vocabulary import ConceptVocabulary
from conceptclef.pipeline.stages.train_networks import train_concept_model, train_router
from conceptclef.pipeline.run.category_record import categories_from_labels, write_category_record
from conceptclef.pipeline.run.fingerprint import DataFingerprint, check_data_unchanged
from conceptclef.pipeline.image_sets import ImageSet, config_at_image_size, load_training_sets, routable_categories, same_images
from conceptclef.pipeline.errors import RunDirectoryError
from conceptclef.pipeline.devices.workers import check_devices, run_on_devices
from conceptclef.pipeline.run.preflight import SettingOrigin, check_data_fits, check_machine, check_vocabulary_not_empty
from conceptclef.pipeline.devices.ranks import barrier, is_main_process
from conceptclef.pipeline.run.directory import (
    Manifest,
    image_cache_dir,
    resolve_run_config,
    saved_ensemble_config,
    write_run_config,
)
from conceptclef.pipeline.run.layout import RunLayout
from conceptclef.pipeline.run.lock import check_run_directory_writable, run_lock
from conceptclef.pipeline.run.networks import Network, Role, development_networks, every_kind_settings, extra_global_name
from conceptclef.pipeline.stages.cross_fit import cross_fitted, development_set, fit_cross_fitted_ensemble, fold_image_rows
from conceptclef.pipeline.run.specialist_init import specialist_training
from conceptclef.pipeline.stages.final_fit import record_final_fit, step_replay
from conceptclef.pipeline.stages.network_images import TrainingImages, category_members, final_fit_images, specialist_mapping, split_images
from conceptclef.pipeline.stages.stacking import fit_ensemble
from conceptclef.training.replay import StepReplay
from conceptclef.category_models import ConceptModel
from conceptclef.router import ModalityRouter, SingleCategoryRouter
from conceptclef.training.runtime import seed_everything

log = logging.getLogger("conceptclef")


def train_all(
    data_dir: Path,
    run_dir: Path,
    config_path: Path | None = None,
    only: Sequence[str] | None = None,
    overrides: Sequence[str] = (),
    devices: Sequence[str] | None = None,
) -> Manifest:
    """Train what the run still lacks; `devices` (one worker process each) trains the base
    models side by side instead of one after the other (see docs/DISTRIBUTED.md)."""
    if devices:
        check_devices(devices)
    layout = RunLayout(Path(run_dir))
    fitted_ensemble = saved_ensemble_config(layout)
    config = resolve_run_config(layout, config_path, overrides)
    origin = SettingOrigin(config_path, overrides, layout.config_path)
    check_machine(config, origin, _settings_to_check(layout, only, config), check_device=not devices)  # --devices: checked above
    check_run_directory_writable(layout.root)
    _check_cross_fit(config)
    seed_everything(config.seed)
    cache_dir = image_cache_dir(Path(data_dir), config, layout)
    train, valid = load_training_sets(Path(data_dir), config, cache_dir)
    check_data_fits(config, len(valid.records), str(data_dir), origin)
    check_vocabulary_not_empty(config, train.concept_lists or [], origin)
    _check_valid_categories(train, valid)
    # Bad data are refused above without creating the run directory; from here on this process
    # is the only one writing it.
    with run_lock(layout.root):
        return _train_all_locked(layout, config, fitted_ensemble, Path(data_dir), cache_dir, train, valid, only, devices)


def _train_all_locked(
    layout: RunLayout,
    config: Config,
    fitted_ensemble: Any,
    data_dir: Path,
    cache_dir: Path,
    train: ImageSet,
    valid: ImageSet,
    only: Sequence[str] | None,
    devices: Sequence[str] | None,
) -> Manifest:
    """train_all once the data are loaded and this process holds the run directory's lock."""
    check_data_unchanged(layout.root, DataFingerprint.of(Path(data_dir), train, valid), resuming=layout.manifest_path.is_file())
    categories = routable_categories(train)
    # cross_fit: every development image teaches the networks, so the vocabularies and the
    # categories' model-or-fallback decisions come from train + valid
    development = development_set(train, valid, config, cache_dir) if cross_fitted(config) else None
    teaching, deciding = (development, development) if development is not None else (train, valid)
    manifest = _open_manifest(layout, Path(data_dir), categories)
    write_category_record(layout, Path(data_dir), train, valid)
    if fitted_ensemble is not None and fitted_ensemble != config.ensemble and "ensemble" in manifest.finished_stages:
        log.info("run %s: [ensemble] changed; the networks are kept and the stacker and thresholds re-fitted", layout.root)
        manifest.forget_finished(["ensemble"], layout)
    write_run_config(layout, config)
    barrier()
    stages = _plan_stages(categories, only, [extra_global_name(extra) for extra in config.extra_global_models])
    log.info("run %s: %d train / %d valid images, categories %s", layout.root, len(train.records), len(valid.records), ", ".join(categories))

    global_vocabulary = ConceptVocabulary.from_concept_lists(teaching.known_concepts, min_count=config.data.min_concept_count)
    _check_vocabulary(layout, manifest, "global", global_vocabulary)
    manifest.global_vocabulary = global_vocabulary.fingerprint()

    # Every manifest and fallback decision is taken here, before any training, so the models can
    # train in any order or at the same time (--devices) while only this process writes the manifest.
    jobs = _pending_models(layout, manifest, config, stages, categories, teaching, deciding, global_vocabulary)
    manifest.save(layout)
    if any(not job.network.final_fit for job in jobs):  # the final fit feeds test only: the ensemble stays
        manifest.forget_finished(["ensemble"], layout)
    if devices:
        _train_in_parallel(jobs, devices, layout, Path(data_dir), cache_dir, config, train, valid)
    else:
        _train_in_sequence(jobs, layout, config, train, valid, Path(data_dir))
    barrier()
    manifest.save(layout)
    # LightGBM and threshold tuning are single-process work: under torchrun, rank 0 does them.
    if "ensemble" in stages and is_main_process():
        missing = _missing_base_models(layout, manifest, config)
        if missing:
            names = [network.job_name if reason == "not trained" else f"{network.job_name} ({reason})" for network, reason in missing]
            raise RunDirectoryError(f"{layout.root}: cannot fit the ensemble before these models are trained: {', '.join(names)}")
        # Asked for by name, the ensemble is re-fitted from the saved predictions even when done.
        if "ensemble" not in manifest.finished_stages or (only and "ensemble" in only):
            release_freed_memory()
            if development is not None:
                fit_cross_fitted_ensemble(layout, config, manifest, development, global_vocabulary)
            else:
                fit_ensemble(layout, config, manifest, train, valid, global_vocabulary)
            manifest.mark_finished("ensemble", layout)
    manifest.save(layout)
    return manifest


@dataclass(frozen=True)
class ModelJob:
    """One network to train, with its vocabulary (None: the router)."""

    network: Network
    vocabulary: ConceptVocabulary | None
    train_images: int  # how big a job it is, for scheduling

    @property
    def name(self) -> str:
        return self.network.job_name


def _pending_models(
    layout: RunLayout,
    manifest: Manifest,
    config: Config,
    stages: set[str],
    categories: list[str],
    train: ImageSet,
    valid: ImageSet,
    global_vocabulary: ConceptVocabulary,
) -> list[ModelJob]:
    """The networks still to train, in the table's order; records category decisions in the manifest.

    `train` and `valid` decide the vocabularies and which categories get a model (cross_fit: the
    development set for both)."""
    networks = development_networks(layout, config, categories)
    by_name = {network.job_name: network for network in networks}
    decided: dict[str, ConceptVocabulary | None] = {}
    jobs: list[ModelJob] = []
    for network in networks:
        if network.name not in stages:
            continue
        vocabulary: ConceptVocabulary | None = None if network.role is Role.ROUTER else global_vocabulary
        if network.category is not None:
            if network.category not in decided:  # once for all folds
                decided[network.category] = _decide_category(layout, manifest, config, network.category, train, valid)
            vocabulary = decided[network.category]
            if vocabulary is None:
                continue  # the category uses the global model
        queued = {job.name for job in jobs}
        reason = network.stale_reason(layout, retraining=queued)
        if reason is None:
            continue
        for dependency in network.dependency_jobs:
            if dependency not in queued and not by_name[dependency].is_finished():
                raise RunDirectoryError(
                    f"{by_name[dependency].work_dir}: {network.description} starts from {by_name[dependency].description} "
                    f"(category_model.init_from = \"global\"), which is not trained; add {dependency} to --only"
                )
        if network.is_finished():
            log.warning("%s: %s; it is retrained", network.job_name, reason)
        images = len(category_members(train, network.category, specialist_mapping(config, layout))) if network.category is not None else len(train.records)
        jobs.append(ModelJob(network, vocabulary, images))
    return jobs


def train_model(job: ModelJob, layout: RunLayout, config: Config, train: ImageSet, valid: ImageSet, data_dir: Path | None = None) -> None:
    """Train one network into its work directory (and nowhere else).

    `data_dir` is needed only by a network at another image size than the run's (its own image
    cache) and by a fold network (the development images' cache). A network records the settings
    it trained with (`settings.json`), which `Network.stale_reason` compares with the config's.
    A final-fit network trains on train + valid for its split-run network's step budget.
    """
    network = job.network
    if network.fold is not None:
        if data_dir is None:
            raise ValueError(f"{network.job_name}: a fold network needs the data folder (its image cache)")
        if network.image_size != config.data.image_size:  # refused before training by _check_cross_fit
            raise ConfigError(f"{network.settings_key}.image_size: cross-fitted networks train at the run's image size only")
        development = development_set(train, valid, config, image_cache_dir(data_dir, config, layout))
        rows = fold_image_rows(config, development, network.fold)
        images = TrainingImages(
            development.subset(rows.fit), development.subset(rows.stopping), development.subset(rows.held_out), development.subset(rows.training)
        )
    else:
        if network.image_size != config.data.image_size:
            train, valid = _at_image_size(network, config, train, valid, data_dir)
        images = final_fit_images(train, valid) if network.final_fit else split_images(train, valid)
    replay = step_replay(network, layout) if network.final_fit else None
    model = _train_on(job, network.layout(layout), config, images, replay)
    if network.final_fit:
        record_final_fit(network, layout, replay, model, images.index, job.vocabulary)
    if is_main_process():
        atomic_write_json(network.files.settings_record, network.settings_record)


def _at_image_size(network: Network, config: Config, train: ImageSet, valid: ImageSet, data_dir: Path | None) -> tuple[ImageSet, ImageSet]:
    """train and valid at the network's own image size (an extra global model), from its own image cache."""
    if data_dir is None:
        raise ValueError(f"{network.name}: a network at {network.image_size} px needs the data folder")
    resized_train, resized_valid = load_training_sets(data_dir, config_at_image_size(config, network.image_size), announce=False)
    return same_images(train, resized_train, data_dir), same_images(valid, resized_valid, data_dir)


def _train_on(
    job: ModelJob, layout: RunLayout, config: Config, images: TrainingImages, replay: StepReplay | None
) -> ConceptModel | ModalityRouter | SingleCategoryRouter:
    """Train the job's network on `images` (`replay`: the final fit's budget); returns the fitted model."""
    network = job.network
    train, valid = images.fit, images.stopping
    if network.role is Role.ROUTER:
        return train_router(layout, config, train, valid, images.predicted, replay)
    assert job.vocabulary is not None
    if network.category is None:
        return train_concept_model(
            network.work_dir, config, train, job.vocabulary, valid, images.predicted,
            train_all_images=images.index, is_global=network.role is Role.GLOBAL, settings=network.settings, image_size=network.image_size,
            seed=network.seed, replay=replay,
        )
    by_modality = specialist_mapping(config, layout)
    category_train = train.subset(category_members(train, network.category, by_modality))
    category_valid = valid.subset(category_members(valid, network.category, by_modality))
    settings = specialist_training(config, layout, network.work_dir) if network.depends_on else network.settings
    return train_concept_model(
        network.work_dir, config, category_train, job.vocabulary, category_valid, images.predicted, settings=settings, replay=replay
    )


def _train_in_sequence(jobs: list[ModelJob], layout: RunLayout, config: Config, train: ImageSet, valid: ImageSet, data_dir: Path) -> None:
    for job in jobs:
        train_model(job, layout, config, train, valid, data_dir)
        release_freed_memory()  # one network's freed temporaries must not stay resident under the next
        barrier()


def largest_first(jobs: Sequence[ModelJob]) -> list[ModelJob]:
    """The global model, then the router and extra global models (all see every image), then
    categories by training images: the longest jobs start first so that no worker is left with a
    big one at the end."""
    return sorted(
        jobs, key=lambda job: (job.network.role is Role.CATEGORY, job.network.role is not Role.GLOBAL, -job.train_images, job.name)
    )


def _train_in_parallel(
    jobs: list[ModelJob],
    devices: Sequence[str],
    layout: RunLayout,
    data_dir: Path,
    cache_dir: Path,
    config: Config,
    train: ImageSet,
    valid: ImageSet,
) -> None:
    expected = _image_ids_digest(train, valid)
    for wave in dependency_waves(jobs):
        run_on_devices(
            largest_first(wave),
            devices,
            prepare=functools.partial(_prepare_worker, layout, data_dir, cache_dir, config, expected),
            work=_train_in_worker,
        )


def dependency_waves(jobs: Sequence[ModelJob]) -> list[list[ModelJob]]:
    """Jobs that may run side by side: a network waits for the jobs of the networks it depends on
    (category models started from the global model wait for it)."""
    waves: list[list[ModelJob]] = []
    waiting = list(jobs)
    while waiting:
        names = {job.name for job in waiting}
        ready = [job for job in waiting if not names.intersection(job.network.dependency_jobs)]
        if not ready:
            raise ValueError(f"networks depend on each other in a circle: {', '.join(sorted(names))}")
        waves.append(ready)
        waiting = [job for job in waiting if job not in ready]
    return waves


@dataclass
class _WorkerContext:
    layout: RunLayout
    config: Config
    train: ImageSet
    valid: ImageSet
    data_dir: Path


def _prepare_worker(
    layout: RunLayout, data_dir: Path, cache_dir: Path, config: Config, expected_ids: str, device: str
) -> _WorkerContext:
    """In a worker: the same data as the parent (its cache is built, so this only opens it), on `device`.

    The device is an execution detail: the run's saved config keeps what the user asked for.
    """
    seed_everything(config.seed)
    train, valid = load_training_sets(data_dir, config, cache_dir, announce=False)  # the parent said it
    if _image_ids_digest(train, valid) != expected_ids:
        raise RunDirectoryError(f"{data_dir}: the images changed while train-all was starting; run it again")
    return _WorkerContext(layout, config.replace(device=device), train, valid, data_dir)


def _train_in_worker(job: ModelJob, context: _WorkerContext) -> None:
    train_model(job, context.layout, context.config, context.train, context.valid, context.data_dir)


def _image_ids_digest(*image_sets: ImageSet) -> str:
    digest = hashlib.sha256()
    for image_set in image_sets:
        digest.update("\n".join(image_set.image_ids).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _check_cross_fit(config: Config) -> None:
    """What cross-fitted networks cannot do yet, refused before any image is read."""
    if not cross_fitted(config):
        return
    for extra in config.extra_global_models:
        if extra.image_size not in (0, config.data.image_size):
            raise ConfigError(
                f"extra_global_models.{extra.name}.image_size = {extra.image_size}: with development.scheme = \"cross_fit\" "
                f"every network trains at data.image_size ({config.data.image_size}); set it to 0"
            )


def _check_valid_categories(train: ImageSet, valid: ImageSet) -> None:
    """A validation category without training images: the router has no class for it, found before training."""
    known = {str(category) for category in train.categories}
    unseen = [record for record in valid.records if str(record.category) not in known | {UNROUTED}]
    if unseen:
        names = sorted({str(record.category) for record in unseen})
        raise DataError(
            unseen[0].path,
            f"validation category {', '.join(names)} ({len(unseen)} image(s)) has no training images (training "
            f"categories: {', '.join(sorted(known))}), so no model can learn it; add training images of it or move "
            "these validation images out",
        )


def _open_manifest(layout: RunLayout, data_dir: Path, categories: list[str]) -> Manifest:
    if layout.manifest_path.is_file():
        manifest = Manifest.load(layout)
        if manifest.categories != categories:
            raise RunDirectoryError(
                f"{layout.manifest_path}: this run was trained on categories {manifest.categories}, "
                f"but {data_dir} has {categories}; use a new --out directory"
            )
        return manifest
    manifest = Manifest(data_dir=str(data_dir.resolve()), categories=categories)
    if is_main_process():
        layout.root.mkdir(parents=True, exist_ok=True)
    manifest.save(layout)
    return manifest


def _check_vocabulary(layout: RunLayout, manifest: Manifest, name: str, vocabulary: ConceptVocabulary) -> None:
    recorded = manifest.global_vocabulary if name == "global" else manifest.category_vocabularies.get(name, "")
    if recorded and recorded != vocabulary.fingerprint():
        raise RunDirectoryError(
            f"{layout.manifest_path}: the {name} vocabulary of this run differs from the one built from the data now; "
            "the data changed since the run started: use a new --out directory"
        )


def _plan_stages(categories: list[str], only: Sequence[str] | None, extra_global_stages: Sequence[str] = ()) -> set[str]:
    clashing = sorted(set(categories) & set(extra_global_stages))
    if clashing:
        raise ConfigError(f"extra_global_models: {', '.join(clashing)} is also a category's name; rename the extra global model")
    everything = {"router", "global", "ensemble", *categories, *extra_global_stages}
    if not only:
        return everything
    unknown = [stage for stage in only if stage not in everything]
    if unknown:
        raise ConfigError(f"--only: unknown stage(s) {', '.join(unknown)}; choose from {', '.join(sorted(everything))}")
    return set(only)


def _decide_category(
    layout: RunLayout, manifest: Manifest, config: Config, category: str, train: ImageSet, valid: ImageSet
) -> ConceptVocabulary | None:
    """The category model's vocabulary, or None when the category uses the global model; recorded in the manifest."""
    by_modality = specialist_mapping(config, layout)
    members = category_members(train, category, by_modality)
    valid_members = category_members(valid, category, by_modality)
    vocabulary = ConceptVocabulary.from_concept_lists(train.subset(members).known_concepts, min_count=config.data.min_concept_count)
    only_category = len(manifest.categories) == 1
    too_few = only_category or len(members) < config.data.min_category_images or len(valid_members) == 0 or len(vocabulary) == 0
    if too_few:
        reason = (
            "it is the only category"
            if only_category
            else f"{len(members)} training images (< min_category_images = {config.data.min_category_images})"
            if len(members) < config.data.min_category_images
            else "no validation images" if len(valid_members) == 0 else "no concept reaches min_concept_count"
        )
        log.warning("category %s: %s; it uses the global model", category, reason)
        record = {"category": category, "reason": reason}
        path = layout.fallback_path(category)
        if is_main_process() and not (path.is_file() and read_json(path) == record):
            atomic_write_json(path, record)
        if category not in manifest.fallback_categories:
            manifest.fallback_categories.append(category)
        manifest.category_vocabularies.pop(category, None)
        return None
    _check_vocabulary(layout, manifest, category, vocabulary)
    manifest.category_vocabularies[category] = vocabulary.fingerprint()
    if category in manifest.fallback_categories:
        manifest.fallback_categories.remove(category)
    if is_main_process():
        layout.fallback_path(category).unlink(missing_ok=True)
    return vocabulary


def _settings_to_check(layout: RunLayout, only: Sequence[str] | None, config: Config) -> list[tuple[str, TrainingConfig]]:
    """Settings of the networks this command may still train: all for a new run, none when a resume
    only re-fits the ensemble (that needs neither the weight files nor the training device)."""
    if not layout.manifest_path.is_file():
        return every_kind_settings(config)
    missing = [network for network, _ in _missing_base_models(layout, Manifest.load(layout), config) if not only or network.name in only]
    return [(network.settings_key, network.settings) for network in missing]


def _missing_base_models(layout: RunLayout, manifest: Manifest, config: Config) -> list[tuple[Network, str]]:
    """The run's networks that are not finished or out of date, each with the reason."""
    networks = development_networks(layout, config, manifest.categories, manifest.fallback_categories)
    stale = [(network, network.stale_reason(layout)) for network in networks]
    return [(network, reason) for network, reason in stale if reason is not None]
