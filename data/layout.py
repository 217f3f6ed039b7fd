"""Where images and concept files live in a dataset folder (the ImageCLEF 2020 layout).

    DATA/train/<CATEGORY>/<ID>.jpg     DATA/train_concepts.csv
    DATA/valid/<CATEGORY>/<ID>.jpg     DATA/valid_concepts.csv
    <test folder>/<ID>.jpg             (flat; category subfolders are also understood)

Since 2021 the split folders are flat (DATA/train/<ID>.jpg; categories then come from the labels,
see data.modalities), and 2026 ships one concepts file for train and valid together: a single
`*concepts*` file naming neither split (or both) serves both, each row going to the split its
ID names (`..._train_000123`, `..._valid_000123`).

Categories are whatever the sub-folders are called, so another year's or another dataset's
modality set needs no code change. Images and concept rows are joined strictly: a label for a
missing image or an image without a label usually means the wrong file was copied, and training
on half a dataset without noticing costs far more than an early error.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from conceptclef.data.concepts import ConceptRow, read_concept_rows
from conceptclef.data.errors import ConceptFileError, DataError
from conceptclef.data.images import readable_image_extensions

log = logging.getLogger("conceptclef")

IMAGE_EXTENSIONS = readable_image_extensions()  # every format Pillow reads: .jpg .png .tif .webp .bmp .gif ...
_SPLIT_ALIASES = {
    "train": ("train", "training"),
    "valid": ("valid", "validation", "val", "dev"),
    "test": ("test", "testing"),
}
_ALL_SPLIT_NAMES = {alias for aliases in _SPLIT_ALIASES.values() for alias in aliases}
_CONCEPT_SUFFIXES = (".csv", ".txt", ".tsv")


@dataclass(frozen=True)
class ImageRecord:
    """One image file; `category` is its sub-folder name, None in a flat folder."""

    image_id: str
    path: Path
    category: str | None = None


@dataclass(frozen=True)
class LabelledSplit:
    """Images of one split with their concepts; `records` fixes the order everything else follows."""

    name: str
    records: tuple[ImageRecord, ...]
    concepts: Mapping[str, list[str]]
    source: Path | None = None  # the concept file, so later errors about an image can cite its row
    lines: Mapping[str, int] = field(default_factory=dict)  # image ID -> line in `source`

    def __len__(self) -> int:
        return len(self.records)

    @property
    def image_ids(self) -> list[str]:
        return [record.image_id for record in self.records]

    @property
    def paths(self) -> list[Path]:
        return [record.path for record in self.records]

    @property
    def categories(self) -> list[str | None]:
        return [record.category for record in self.records]

    @property
    def concept_lists(self) -> list[list[str]]:
        return [self.concepts[record.image_id] for record in self.records]


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def why_not_an_image(path: Path) -> str:
    """Why a folder entry is not taken as an image, for the warning that names it."""
    if path.name.startswith("."):
        return "hidden file (its name starts with '.')"
    if path.is_symlink() and not path.exists():
        return "broken symbolic link"
    if path.is_dir():
        return "a folder inside a category folder (only one level of folders is read)"
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return "not a regular file"
    return f"{path.suffix or 'no extension'}: not an image format Pillow reads"


def _first_skipped(skipped: list[tuple[Path, str]], shown: int = 5) -> str:
    listed = ", ".join(f"{path} ({reason})" for path, reason in skipped[:shown])
    return listed + (f", and {len(skipped) - shown} more" if len(skipped) > shown else "")


def _is_silent(entry: Path) -> bool:
    """Hidden entries skipped without a word: folders (.cache, .git) and system files (.DS_Store).
    A hidden file in an image format (`.x.jpg`) is named in the warning: it may be a real image."""
    return entry.name.startswith(".") and (entry.is_dir() or entry.suffix.lower() not in IMAGE_EXTENSIONS)


def _images_in(folder: Path, category: str | None, skipped: list[tuple[Path, str]]) -> list[ImageRecord]:
    records = []
    for path in sorted(folder.iterdir()):
        if is_image_file(path):
            records.append(ImageRecord(path.stem, path, category))
        elif not _is_silent(path):
            skipped.append((path, why_not_an_image(path)))
    return records


def list_image_folder(folder: Path | str, mixed_layout_error: bool = False) -> list[ImageRecord]:
    """Images of a folder sorted by ID: the files directly inside (a flat folder), or, when there
    are none, one level of category sub-folders (the 2020 layout: DATA/test/<CATEGORY>/<ID>.jpg).

    Anything else is left out with one warning naming the first five and the count: other files,
    hidden image files, folders nested deeper, every sub-folder of a flat folder, and folders
    named as a split (train/, valid/, test/: the data folder given instead of one split, whose
    images must never be read as one set). With `mixed_layout_error` (training splits), images
    both directly inside and in category folders are an error, not a warning. The same ID twice
    (e.g. in two categories) is an error.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "image folder not found")
    skipped: list[tuple[Path, str]] = []
    records = _images_in(folder, None, skipped)
    folders = [entry for entry, _ in skipped if entry.is_dir()]
    skipped = [(entry, reason) for entry, reason in skipped if not entry.is_dir()]
    split_folders = [entry for entry in folders if entry.name.lower() in _ALL_SPLIT_NAMES]
    categories = [entry for entry in folders if entry not in split_folders]
    skipped.extend((entry, "a split folder: give it alone as the image folder") for entry in split_folders)
    if records:
        nested = [entry for entry in categories if any(is_image_file(path) for path in entry.iterdir())]
        if nested and mixed_layout_error:
            raise DataError(
                records[0].path,
                f"this image lies directly in {folder} while others are in its sub-folders ({', '.join(entry.name for entry in nested[:5])}); "
                "use one layout for train/ and valid/",
            )
        skipped.extend((entry, "a folder inside a flat image folder (its images are not read)") for entry in categories)
    else:
        for entry in categories:
            records.extend(_images_in(entry, entry.name, skipped))
    skipped.sort()
    if skipped and records:
        log.warning("%s: skipped %d entries that are not readable images: %s", folder, len(skipped), _first_skipped(skipped))
    if not records:
        if split_folders:
            names = ", ".join(entry.name for entry in split_folders)
            example = next((entry for entry in split_folders if entry.name.lower() in _SPLIT_ALIASES["test"]), split_folders[0])
            raise DataError(folder, f"this is a data folder (it holds {names}), not an image folder: give one split, e.g. {example}")
        found = f"; skipped {len(skipped)}: {_first_skipped(skipped)}" if skipped else ""
        raise DataError(folder, f"no images ({', '.join(IMAGE_EXTENSIONS[:8])}, ... any format Pillow reads) in this folder or its sub-folders{found}")
    seen: dict[str, Path] = {}
    for record in records:
        if record.image_id in seen:
            raise DataError(record.path, f"image ID {record.image_id!r} also used by {seen[record.image_id]}")
        seen[record.image_id] = record.path
    return sorted(records, key=lambda record: record.image_id)


def split_folder(data_dir: Path | str, split: str) -> Path:
    """The image folder of a split (`valid` also matches `validation/`, `val/`...)."""
    data_dir = Path(data_dir)
    for name in _SPLIT_ALIASES.get(split, (split,)):
        if (data_dir / name).is_dir():
            return data_dir / name
    raise DataError(data_dir, f"no image folder for the {split!r} split (expected {data_dir / split})")


def find_concept_file(data_dir: Path | str, split: str) -> Path:
    """The concept file of a split under the usual names, else the one file naming split and concepts."""
    data_dir = Path(data_dir)
    aliases = _SPLIT_ALIASES.get(split, (split,))
    for alias in aliases:
        for stem in (f"{alias}_concepts", f"{alias}-concepts", f"{alias}", f"{alias}/concepts", f"{alias}/cuis"):
            for suffix in _CONCEPT_SUFFIXES:
                candidate = data_dir / f"{stem}{suffix}"
                if candidate.is_file():
                    return candidate
    loose = sorted(
        path
        for path in _loose_concept_files(data_dir)
        if any(alias in path.name.lower() for alias in aliases) and splits_named(path.name) <= {split}
    )
    if len(loose) == 1:
        return loose[0]
    if len(loose) > 1:
        names = ", ".join(path.name for path in loose)
        raise DataError(data_dir, f"several concept files could be the {split!r} one: {names}")
    if split in COMBINED_SPLITS:
        combined = find_combined_concept_file(data_dir)
        if combined is not None:
            return combined
    expected = data_dir / f"{split}_concepts.csv"
    raise DataError(data_dir, f"no concept file for the {split!r} split (expected {expected}, or one file for train and valid)")


COMBINED_SPLITS = ("train", "valid")  # the splits a combined (2026) concepts file holds


def find_combined_concept_file(data_dir: Path | str) -> Path | None:
    """The one concepts file for train and valid together (2026): it names neither split, or both."""
    data_dir = Path(data_dir)
    candidates = sorted(
        path for path in _loose_concept_files(data_dir) if splits_named(path.name) in (set(), set(COMBINED_SPLITS))
    )
    if len(candidates) > 1:
        names = ", ".join(path.name for path in candidates)
        raise DataError(data_dir, f"several concept files could be the combined train+valid one: {names}")
    return candidates[0] if candidates else None


def splits_named(name: str) -> set[str]:
    """The splits a file name or image ID names by a whole word (`..._train_00012` -> {"train"})."""
    words = set(re.split(r"[^a-z0-9]+", Path(name).stem.lower() if "." in name else name.lower()))
    return {split for split, aliases in _SPLIT_ALIASES.items() if words & set(aliases)}


def _loose_concept_files(data_dir: Path) -> list[Path]:
    return [
        path
        for path in (data_dir.iterdir() if data_dir.is_dir() else ())
        if path.is_file() and path.suffix.lower() in _CONCEPT_SUFFIXES and "concept" in path.name.lower()
    ]


def rows_of_split(rows: list[ConceptRow], split: str, path: Path) -> list[ConceptRow]:
    """A combined file's rows of one split; an ID naming neither train nor valid is an error at its line,
    since guessing would put validation images into training (or drop them) without a word."""
    kept = []
    for row in rows:
        named = splits_named(row.image_id) & set(COMBINED_SPLITS)
        if len(named) != 1:
            raise ConceptFileError(
                path,
                f"image ID {row.image_id!r} names neither the train nor the valid split (or both); a combined "
                "concepts file needs '_train_' or '_valid_' in every ID",
                row.line,
            )
        if named == {split}:
            kept.append(row)
    return kept


def load_split(data_dir: Path | str, split: str, allow_unlisted: bool = False) -> LabelledSplit:
    """Join a split's images with its concept file, in concept-file order.

    A concept row without an image is a ConceptFileError at that row. An image without a row is an
    error naming the image unless `allow_unlisted`, which leaves such images out with a warning.
    """
    concept_path = find_concept_file(data_dir, split)
    image_folder = split_folder(data_dir, split)
    images = {record.image_id: record for record in list_image_folder(image_folder, mixed_layout_error=True)}
    rows = read_concept_rows(concept_path)
    if split in COMBINED_SPLITS and concept_path.parent == Path(data_dir) and splits_named(concept_path.name) != {split}:
        rows = rows_of_split(rows, split, concept_path)  # the combined train+valid file
    listed = set()
    records: list[ImageRecord] = []
    for row in rows:
        record = images.get(row.image_id)
        if record is None:
            message = f"image {row.image_id!r} has concepts but no image file under {image_folder}"
            raise ConceptFileError(concept_path, message, row.line)
        listed.add(row.image_id)
        records.append(record)
    unlisted = [record for image_id, record in sorted(images.items()) if image_id not in listed]
    if unlisted and not allow_unlisted:
        raise DataError(
            unlisted[0].path,
            f"image is not listed in {concept_path} ({len(unlisted)} unlisted image(s) in the {split!r} split; "
            "add a row for each, or move them out of the folder)",
        )
    if unlisted:
        warnings.warn(
            f"{len(unlisted)} image(s) of the {split!r} split are not in {concept_path} and were left out "
            f"(first: {unlisted[0].path})",
            stacklevel=2,
        )
    return LabelledSplit(
        split,
        tuple(records),
        {row.image_id: row.cuis for row in rows},
        source=concept_path,
        lines={row.image_id: row.line for row in rows},
    )


def discover_categories(data_dir: Path | str) -> list[str]:
    """Category names from the sub-folders (holding images) of the train split, else the valid split."""
    for split in ("train", "valid"):
        try:
            folder = split_folder(data_dir, split)
        except DataError:
            continue
        names = sorted(
            entry.name
            for entry in folder.iterdir()
            if entry.is_dir() and not entry.name.startswith(".") and any(is_image_file(p) for p in entry.iterdir())
        )
        if names:
            return names
    return []
