"""`train-all`: router, global model, per-category models, then the stacker and thresholds.

Every stage leaves its files in the run directory and is skipped when they are complete, so
rerunning the same command after a crash continues where it stopped.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Sequence

import numpy as np

from category_models import ConceptModel
from core.config import Config, ConfigError, apply_overrides, load_config
from core.runfiles import atomic_write_json
from data.vocabulary import ConceptVocabulary
from pipeline.base_models import PREDICTIONS_FILE, TRAIN_EMBEDDINGS_FILE, train_concept_stage, train_router_stage
from pipeline.datasets import ImageSet, load_training_sets
from pipeline.errors import RunDirectoryError
from pipeline.ranks import barrier, is_main_process
from pipeline.run_directory import Manifest, RunLayout, resolve_run_config, write_run_config
from pipeline.stacking import fit_ensemble_stage
from router import ModalityRouter

log = logging.getLogger("conceptclef")


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_all(
    data_dir: Path,
    run_dir: Path,
    config_path: Path | None = None,
    only: Sequence[str] | None = None,
    overrides: Sequence[str] = (),
) -> Manifest:
    layout = RunLayout(Path(run_dir))
    config = _resolve_config(layout, config_path, overrides)
    seed_everything(config.seed)
    train, valid = load_training_sets(Path(data_dir), config)
    categories = sorted({str(category) for category in train.categories})
    manifest = _open_manifest(layout, Path(data_dir), categories)
    write_run_config(layout, config)
    barrier()
    stages = _plan_stages(categories, only)
    log.info("run %s: %d train / %d valid images, categories %s", layout.root, len(train.records), len(valid.records), ", ".join(categories))

    global_vocabulary = ConceptVocabulary.from_concept_lists(train.concept_lists, min_count=config.data.min_concept_count)
    _check_vocabulary(layout, manifest, "global", global_vocabulary)
    manifest.global_vocabulary = global_vocabulary.fingerprint()

    if "router" in stages and not _finished(layout.router_dir, ModalityRouter, PREDICTIONS_FILE):
        train_router_stage(layout, config, train, valid)
        manifest.forget_finished(["ensemble"], layout)
    barrier()
    if "global" in stages and not (
        _finished(layout.global_dir, ConceptModel, PREDICTIONS_FILE) and (layout.global_dir / TRAIN_EMBEDDINGS_FILE).is_file()
    ):
        train_concept_stage(layout.global_dir, config, train, global_vocabulary, valid, valid, train_all_images=train, is_global=True)
        manifest.forget_finished(["ensemble"], layout)
    barrier()
    for category in categories:
        if category in stages:
            _train_category(layout, manifest, config, category, train, valid)
            barrier()
    manifest.save(layout)
    # LightGBM and threshold tuning are single-process work: under torchrun, rank 0 does them.
    if "ensemble" in stages and is_main_process():
        missing = _missing_base_models(layout, manifest)
        if missing:
            raise RunDirectoryError(f"{layout.root}: cannot fit the ensemble before these models are trained: {', '.join(missing)}")
        # Asked for by name, the ensemble is re-fitted from the saved predictions even when done.
        if "ensemble" not in manifest.finished_stages or (only and "ensemble" in only):
            fit_ensemble_stage(layout, config, manifest, train, valid, global_vocabulary)
            manifest.mark_finished("ensemble", layout)
    manifest.save(layout)
    return manifest


def _resolve_config(layout: RunLayout, config_path: Path | None, overrides: Sequence[str]) -> Config:
    config = resolve_run_config(layout, config_path)
    if overrides:
        changed = apply_overrides(config, list(overrides))
        if layout.config_path.is_file() and changed != load_config(layout.config_path):
            raise ConfigError(f"--set {' '.join(overrides)}: changes the config this run was started with; use a new --out directory")
        config = changed
    return config


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


def _plan_stages(categories: list[str], only: Sequence[str] | None) -> set[str]:
    everything = {"router", "global", "ensemble", *categories}
    if not only:
        return everything
    unknown = [stage for stage in only if stage not in everything]
    if unknown:
        raise ConfigError(f"--only: unknown stage(s) {', '.join(unknown)}; choose from {', '.join(sorted(everything))}")
    return set(only)


def _finished(work_dir: Path, model_class: type, predictions_file: str) -> bool:
    return model_class.is_trained(work_dir) and (work_dir / predictions_file).is_file()


def _train_category(layout: RunLayout, manifest: Manifest, config: Config, category: str, train: ImageSet, valid: ImageSet) -> None:
    work_dir = layout.category_dir(category)
    members = np.flatnonzero(np.array([str(c) for c in train.categories]) == category)
    valid_members = np.flatnonzero(np.array([str(c) for c in valid.categories]) == category)
    category_train = train.subset(members)
    vocabulary = ConceptVocabulary.from_concept_lists(category_train.concept_lists, min_count=config.data.min_concept_count)
    too_few = len(members) < config.data.min_category_images or len(valid_members) == 0 or len(vocabulary) == 0
    if too_few:
        reason = (
            f"{len(members)} training images (< min_category_images = {config.data.min_category_images})"
            if len(members) < config.data.min_category_images
            else "no validation images" if len(valid_members) == 0 else "no concept reaches min_concept_count"
        )
        log.warning("category %s has %s: it uses the global model", category, reason)
        if is_main_process():
            atomic_write_json(layout.fallback_path(category), {"category": category, "reason": reason})
        if category not in manifest.fallback_categories:
            manifest.fallback_categories.append(category)
        manifest.category_vocabularies.pop(category, None)
        return
    _check_vocabulary(layout, manifest, category, vocabulary)
    manifest.category_vocabularies[category] = vocabulary.fingerprint()
    if category in manifest.fallback_categories:
        manifest.fallback_categories.remove(category)
    if is_main_process():
        layout.fallback_path(category).unlink(missing_ok=True)
    if _finished(work_dir, ConceptModel, PREDICTIONS_FILE):
        return
    train_concept_stage(work_dir, config, category_train, vocabulary, valid.subset(valid_members), valid)
    manifest.forget_finished(["ensemble"], layout)


def _missing_base_models(layout: RunLayout, manifest: Manifest) -> list[str]:
    missing = []
    if not _finished(layout.router_dir, ModalityRouter, PREDICTIONS_FILE):
        missing.append("router")
    if not _finished(layout.global_dir, ConceptModel, PREDICTIONS_FILE):
        missing.append("global")
    for category in manifest.categories:
        if category in manifest.fallback_categories:
            continue
        if not _finished(layout.category_dir(category), ConceptModel, PREDICTIONS_FILE):
            missing.append(category)
    return missing
