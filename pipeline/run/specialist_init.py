"""Specialists started from the generalist: category models whose backbone begins as the global model's.

With `category_model.init_from = "global"` each category model starts from the trained global
model's backbone (it has seen every image) instead of `category_model.weights`, and sharpens it
on its modality. That makes specialists depend on the global model: they train after it, and a
specialist is only as current as the global checkpoint it started from. So:

- the global backbone is exported to a file named by the global checkpoint's content hash
  (RUN/global/backbone-<hash>.pth); the specialist trains with that file as its `weights`, so the
  estimator's own job fingerprint changes with the global model and a stale finished or
  half-trained specialist is never resumed;
- the specialist's work directory records the hash (init.json); train-all retrains a specialist
  whose record does not match the current global checkpoint, and `--only ensemble` and `predict`
  refuse to use it.

With `finetune = "head"` for the global model its backbone stays the ImageNet one, so starting
from it equals starting from `weights`: the switch pays only after a fine-tuned global model.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch

from conceptclef.core.config import Config, TrainingConfig
from conceptclef.core.runfiles import atomic_output, atomic_write_json, read_json
from conceptclef.pipeline.errors import RunDirectoryError
from conceptclef.pipeline.devices.ranks import barrier, is_main_process
from conceptclef.pipeline.run.layout import BACKBONE_PREFIX, RunLayout
from conceptclef.training.checkpoints import RunFiles
from conceptclef.training.weights import read_state_dict



def starts_from_global(config: Config) -> bool:
    return config.category_model.init_from == "global"


def global_checkpoint_digest(layout: RunLayout) -> str:
    """sha256 of the global model's best checkpoint: which generalist a specialist started from."""
    path = RunFiles(layout.global_dir).best
    if not path.is_file():
        raise RunDirectoryError(f"{path}: the global model is not trained; category_model.init_from = \"global\" needs it first")
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_global_backbone(layout: RunLayout, digest: str) -> Path:
    """The global backbone's weights in a file named by `digest` (written once, atomically)."""
    target = layout.files(layout.global_dir).exported_backbone(digest)
    if is_main_process() and not target.is_file():
        state = read_state_dict(RunFiles(layout.global_dir).best)
        backbone = {key: value for key, value in state.items() if key.startswith("backbone.")}
        if not backbone:
            raise RunDirectoryError(f"{RunFiles(layout.global_dir).best}: holds no backbone weights to start the category models from")
        with atomic_output(target) as stream:
            torch.save(backbone, stream)
        for older in layout.global_dir.glob(f"{BACKBONE_PREFIX}*.pth"):
            if older != target:
                older.unlink(missing_ok=True)  # from a global model that no longer exists
    barrier()  # under torchrun, the other ranks read the file rank 0 wrote
    return target


def specialist_training(config: Config, layout: RunLayout, work_dir: Path) -> TrainingConfig:
    """The category model's training settings, its start recorded in `work_dir` when it is the global model."""
    if not starts_from_global(config):
        return config.category_model
    digest = global_checkpoint_digest(layout)
    weights = export_global_backbone(layout, digest)
    if is_main_process():
        work_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(layout.files(work_dir).init_record, {"init_from": "global", "global_checkpoint_sha256": digest, "weights": weights.name})
    return dataclasses.replace(config.category_model, weights=str(weights.resolve()))


def started_from_current_global(layout: RunLayout, work_dir: Path) -> bool:
    """True when the specialist in `work_dir` started from the global checkpoint the run holds now."""
    record = layout.files(work_dir).init_record
    if not record.is_file() or not RunFiles(layout.global_dir).best.is_file():
        return False
    return read_json(record).get("global_checkpoint_sha256") == global_checkpoint_digest(layout)
