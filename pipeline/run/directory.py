"""The run directory's manifest and config: what ties a run to its data and settings.

A run directory is all `predict` needs, so it records the categories, the vocabularies'
fingerprints and the resolved config; anything that does not match is refused with a clear
error instead of silently mixing two runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from conceptclef.core.config import Config, ConfigError, apply_overrides, load_config, save_config
from conceptclef.core.partial_files import create_partial
from conceptclef.core.runfiles import atomic_write_json, read_json
from conceptclef.pipeline.errors import RunDirectoryError
from conceptclef.pipeline.devices.ranks import is_main_process
from conceptclef.pipeline.run.layout import RunLayout

log = logging.getLogger("conceptclef")

MANIFEST_VERSION = 1


@dataclass
class Manifest:
    """What a run was trained on; written by train-all, checked by every later command."""

    data_dir: str
    categories: list[str]
    global_vocabulary: str = ""  # fingerprint
    category_vocabularies: dict[str, str] = dataclasses.field(default_factory=dict)
    fallback_categories: list[str] = dataclasses.field(default_factory=list)
    finished_stages: list[str] = dataclasses.field(default_factory=list)
    version: int = MANIFEST_VERSION

    def save(self, layout: RunLayout) -> None:
        if not is_main_process():
            return
        payload = dataclasses.asdict(self)
        if layout.manifest_path.is_file() and read_json(layout.manifest_path) == payload:
            return  # a resumed run leaves an unchanged manifest untouched
        atomic_write_json(layout.manifest_path, payload)

    @classmethod
    def load(cls, layout: RunLayout) -> "Manifest":
        if not layout.manifest_path.is_file():
            raise RunDirectoryError(f"{layout.root}: not a conceptclef run directory (no manifest.json); run train-all first")
        raw: dict[str, Any] = read_json(layout.manifest_path)
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = set(raw) - known
        if unknown or raw.get("version") != MANIFEST_VERSION:
            raise RunDirectoryError(f"{layout.manifest_path}: made by another version of conceptclef")
        return cls(**raw)

    def mark_finished(self, stage: str, layout: RunLayout) -> None:
        if stage not in self.finished_stages:
            self.finished_stages.append(stage)
        self.save(layout)

    def forget_finished(self, stages: list[str], layout: RunLayout) -> None:
        self.finished_stages = [stage for stage in self.finished_stages if stage not in stages]
        self.save(layout)


def resolve_run_config(layout: RunLayout, config_path: Path | None, overrides: Sequence[str] = ()) -> Config:
    """The run's config: the given file (or defaults) with `--set` overrides, checked on resume.

    Rerunning the command that started a run resumes it. Resuming with a different config would
    mix models trained under two settings, so a resolved config that differs from the saved one
    is refused, except in [ensemble] alone: the stacker and thresholds are re-fitted from the saved
    predictions then (train-all sees the change through `saved_ensemble_config`); and
    `development.scheme` between "split" and "final_fit" (the final fit adds networks beside the
    split run's, which stay as they are). Without
    --config or --set, a resume simply takes the saved config.
    """
    saved = load_config(layout.config_path) if layout.config_path.is_file() else None
    if saved is not None and config_path is None and not overrides:
        return saved
    requested = load_config(config_path) if config_path is not None else (saved or Config())
    if overrides:
        requested = apply_overrides(requested, list(overrides))
    if saved is not None and requested != saved and _network_settings(requested, saved) != saved:
        given = " ".join([f"--config {config_path}"] * (config_path is not None) + [f"--set {item}" for item in overrides])
        raise ConfigError(
            f"{layout.config_path}: {given} differs from the config this run was started with; "
            "use a new --out directory, or rerun without --config/--set to resume"
        )
    return requested


SWITCHABLE_SCHEMES = ("split", "final_fit")  # final_fit only adds networks to a split run, so either way needs no retraining


def _network_settings(requested: Config, saved: Config) -> Config:
    """`requested` with what a resume may change taken from `saved`: [ensemble], and the scheme
    between split and final_fit."""
    development = requested.development
    if development.scheme in SWITCHABLE_SCHEMES and saved.development.scheme in SWITCHABLE_SCHEMES:
        development = dataclasses.replace(development, scheme=saved.development.scheme)
    return dataclasses.replace(requested, ensemble=saved.ensemble, development=development)


def saved_ensemble_config(layout: RunLayout) -> Any:
    """The [ensemble] section the run was last fitted with (None for a new run)."""
    return load_config(layout.config_path).ensemble if layout.config_path.is_file() else None


def image_cache_dir(data_dir: Path, config: Config, layout: RunLayout) -> Path:
    """Where train-all caches the images: data.cache_dir, else DATA/.cache, else (read-only data) RUN/cache.

    DATA/.cache is shared by every run on the same data; when the data folder cannot be written
    (a read-only dataset mount, another user's folder) the cache goes into the run directory
    instead of failing on the first cache write.
    """
    if config.data.cache_dir:
        return configured_cache_dir(config)
    shared = Path(data_dir) / ".cache"
    if not Path(data_dir).is_dir():
        return shared  # no data folder at all: loading the data names it; no fallback to announce
    problem = why_not_writable(shared)
    if problem is not None:
        log.warning("%s is not writable (%s): caching the images in %s (set data.cache_dir to choose)", shared, problem, layout.cache_dir)
        return layout.cache_dir
    return shared


def configured_cache_dir(config: Config, where: str = "data.cache_dir") -> Path:
    """`data.cache_dir`, created; a folder that cannot be made is a one-line error naming the key."""
    folder = Path(config.data.cache_dir)
    problem = why_not_writable(folder)
    if problem is not None:
        raise ConfigError(f"{where} = {config.data.cache_dir!r}: cannot write the image cache there ({problem}); choose another folder")
    return folder


@contextlib.contextmanager
def prediction_cache_dir(images_dir: Path, config: Config, data_dir: Path | None) -> Iterator[Path]:
    """Where predict (and ablation --images) cache the test images: never inside the run (a run is
    what train-all wrote; predict must work from a read-only copy) nor inside the image folder.

    data.cache_dir when set; else, for a test folder of the run's data folder (DATA/test), the
    DATA/.cache train-all already uses, so the next predict reuses it; else (images elsewhere, or
    DATA read-only) a temporary folder removed afterwards: the images are decoded again next time.
    """
    if config.data.cache_dir:
        yield configured_cache_dir(config)
        return
    parent = Path(images_dir).resolve().parent
    problem = "not in the run's data folder"
    if data_dir is not None and parent == Path(data_dir).resolve():
        shared = parent / ".cache"
        problem = why_not_writable(shared) or ""
        if not problem:
            yield shared
            return
    with tempfile.TemporaryDirectory(prefix="conceptclef-test-cache-") as temporary:
        log.info("%s: caching the test images in %s until predict ends (%s)", images_dir, temporary, problem)
        yield Path(temporary)


def why_not_writable(folder: Path) -> str | None:
    """Why files cannot be created in `folder` (made if missing), or None.

    A real file is created and removed: permissions alone miss /proc, read-only mounts and full
    disks (as root, os.access says yes to all of them)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = create_partial(folder / "probe")
        os.close(handle)
        probe.unlink()
    except OSError as error:
        return error.strerror or str(error)
    return None


def write_run_config(layout: RunLayout, config: Config) -> None:
    if not is_main_process():
        return
    if layout.config_path.is_file() and load_config(layout.config_path) == config:
        return
    layout.root.mkdir(parents=True, exist_ok=True)
    save_config(config, layout.config_path)


def load_run_config(layout: RunLayout) -> Config:
    if not layout.config_path.is_file():
        raise RunDirectoryError(f"{layout.root}: no config.toml; this run directory is incomplete")
    return load_config(layout.config_path)
