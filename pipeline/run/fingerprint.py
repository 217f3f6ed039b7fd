"""What data a run was trained on, so that a resumed run never reuses models of other data.

`train-all` skips every stage whose files exist. Rerun after the validation labels changed (same
vocabulary), with `--data` pointing at another folder, or after adding an image, it would return
the old models as if they were trained on the new data. So a run records, in RUN/data.json:

- per split (train, valid), every image ID with its category (from the records the pipeline uses,
  so categories derived from labels are covered as well as folder categories), a digest of its
  concepts, and a digest of its file's path (relative to the data folder), size and mtime;
- the SHA-256 of each concept file (its row order is the training order);
- the data folder.

A resume whose data differ is refused, naming what changed. Retraining "only what changed" is
not offered: the validation labels choose every network's best epoch (early stopping), so even a
validation-label change reaches the networks; a fresh --out is the only result equal to a run
trained on the new data from the start.

Files are identified by size and mtime, not by a content hash: hashing ~116,000 images (15-30 GB)
costs minutes on every resume (far more on network storage) while 116,000 stat calls take well
under a second; the image cache already keys its pixels on the same (path, size, mtime), and only
a deliberately forged same-size, same-mtime replacement escapes both.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from conceptclef.core.runfiles import atomic_write_text, read_json
from conceptclef.data.errors import DataError
from conceptclef.data.layout import find_concept_file
from conceptclef.pipeline.image_sets import ImageSet
from conceptclef.pipeline.errors import RunDirectoryError
from conceptclef.pipeline.devices.ranks import is_main_process
from conceptclef.pipeline.run.layout import RunLayout

log = logging.getLogger("conceptclef")

_FORMAT = "conceptclef-data-fingerprint-v1"
_SHOWN = 3  # image IDs named per kind of change


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_identity(path: Path, data_dir: Path) -> str:
    """Path inside the data folder, size and mtime: moving the whole folder keeps it, editing a file does not."""
    try:
        stat = path.stat()
        size, mtime = stat.st_size, stat.st_mtime_ns
    except OSError:
        size, mtime = -1, -1
    return _digest(f"{os.path.relpath(path, data_dir)}\0{size}\0{mtime}")


@dataclass(frozen=True)
class DataFingerprint:
    """Images (category, concepts digest, file digest) per split, concept-file hashes, data folder."""

    data_dir: str
    splits: Mapping[str, Mapping[str, list[str]]]  # split -> image ID -> [category, concepts, file]
    concept_files: Mapping[str, list[str]]  # split -> [path, sha256]

    @classmethod
    def of(cls, data_dir: Path, train: ImageSet, valid: ImageSet) -> "DataFingerprint":
        """The fingerprint of the image sets train-all is about to use."""
        data_dir = Path(data_dir).resolve()
        splits = {name: _split_entries(image_set, data_dir) for name, image_set in (("train", train), ("valid", valid))}
        concept_files = {}
        for split in ("train", "valid"):
            try:
                path = find_concept_file(data_dir, split)
            except DataError:
                continue  # no valid split (held out of train), or concepts found another way
            concept_files[split] = [str(path), _file_sha256(path)]
        return cls(str(data_dir), splits, concept_files)

    def to_json(self) -> dict[str, Any]:
        return {"format": _FORMAT, "data_dir": self.data_dir, "splits": self.splits, "concept_files": self.concept_files}

    @classmethod
    def from_json(cls, payload: Any, path: Path) -> "DataFingerprint":
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            raise RunDirectoryError(f"{path}: not a conceptclef data fingerprint (made by another version?)")
        return cls(payload["data_dir"], payload["splits"], payload["concept_files"])

    def save(self, path: Path) -> None:
        # Compact (at full scale ~116,000 images, ~10 MB), and unsorted: the image order is the training order.
        atomic_write_text(path, json.dumps(self.to_json(), separators=(",", ":")) + "\n")

    @classmethod
    def load(cls, path: Path) -> "DataFingerprint":
        return cls.from_json(read_json(path), path)

    def differences(self, other: "DataFingerprint") -> list[str]:
        """What changed from `self` (recorded) to `other` (now), one phrase each; empty when equal."""
        changes = []
        for split in sorted(set(self.splits) | set(other.splits)):
            changes.extend(_split_changes(split, self.splits.get(split, {}), other.splits.get(split, {})))
        for split in sorted(set(self.concept_files) | set(other.concept_files)):
            before, now = self.concept_files.get(split), other.concept_files.get(split)
            if before is None or now is None:
                changes.append(f"{split} concept file was {before[0] if before else 'none'}, now {now[0] if now else 'none'}")
            elif before[1] != now[1]:
                what = _concept_file_change(self.splits.get(split, {}), other.splits.get(split, {}))
                moved = f" (was {before[0]})" if before[0] != now[0] else ""
                changes.append(f"{split} concept file {now[0]}{moved} changed: {what}")
        if changes and self.data_dir != other.data_dir:
            changes.append(f"data folder was {self.data_dir}, now {other.data_dir}")
        return changes


def _split_entries(image_set: ImageSet, data_dir: Path) -> dict[str, list[str]]:
    concept_lists = image_set.concept_lists or [[] for _ in image_set.records]
    return {
        record.image_id: [str(record.category), _digest(";".join(concepts)), _file_identity(record.path, data_dir)]
        for record, concepts in zip(image_set.records, concept_lists)
    }


def _split_changes(split: str, before: Mapping[str, list[str]], now: Mapping[str, list[str]]) -> list[str]:
    added = [image_id for image_id in now if image_id not in before]
    removed = [image_id for image_id in before if image_id not in now]
    kept = [image_id for image_id in now if image_id in before]
    kinds = (
        ("added", added),
        ("removed", removed),
        ("moved to another category", [i for i in kept if before[i][0] != now[i][0]]),
        ("relabelled", [i for i in kept if before[i][1] != now[i][1]]),
        ("with a changed file (size or modification time)", [i for i in kept if before[i][2] != now[i][2]]),
    )
    changes = []
    for kind, image_ids in kinds:
        if image_ids:
            shown = ", ".join(image_ids[:_SHOWN]) + (", ..." if len(image_ids) > _SHOWN else "")
            changes.append(f"{split}: {len(image_ids)} image(s) {kind} ({shown})")
    if not changes and list(before) != list(now):
        changes.append(f"{split}: the same images in another order")
    return changes


def _concept_file_change(before: Mapping[str, list[str]], now: Mapping[str, list[str]]) -> str:
    """What a concept file's new bytes mean for training: other labels, another row order (the
    training order), or nothing but bytes (line endings, spacing, quoting)."""
    relabelled = sum(1 for image_id, entry in now.items() if image_id in before and before[image_id][1] != entry[1])
    if relabelled:
        return f"the labels of {relabelled} image(s)"
    if set(before) != set(now):
        return "its images (see above)"
    if list(before) != list(now):
        return "the same labels in another row order (the training order)"
    return "only its bytes (line endings, spacing or quoting); the labels and their order are the same"


def check_data_unchanged(run_root: Path, fingerprint: DataFingerprint, resuming: bool) -> None:
    """Record the data of a new run; refuse a resume whose data differ from the recorded ones.

    `resuming` is whether the run already holds trained work (a manifest): a run made before
    fingerprints existed has none recorded, so its current data are recorded with a warning.
    """
    path = RunLayout(Path(run_root)).fingerprint_path
    if not path.is_file():
        if resuming:
            log.warning("%s: this run recorded no data fingerprint (older conceptclef); recording the current data", run_root)
        if is_main_process():
            fingerprint.save(path)
        return
    recorded = DataFingerprint.load(path)
    changes = recorded.differences(fingerprint)
    if changes:
        raise RunDirectoryError(
            f"{run_root}: the data differ from what this run was trained on: {'; '.join(changes)}. "
            "Resuming would reuse models of the old data: use a new --out directory to train on these data"
        )
    if recorded.data_dir != fingerprint.data_dir:
        log.info("%s: the same data, moved from %s to %s", run_root, recorded.data_dir, fingerprint.data_dir)
        if is_main_process():
            fingerprint.save(path)
