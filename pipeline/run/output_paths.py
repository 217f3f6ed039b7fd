"""Where `predict` may write: never into a run, an image folder or the run's training data, never
over a run's input or a ground-truth file (not even with --overwrite), never over a file it did
not write (unless --overwrite).

A mistyped `--out` used to replace whatever it named: `DATA/test_concepts.csv` (the ground truth),
`DATA/train_concepts.csv` (the run's labels: the run could no longer resume) or
`RUN/manifest.json` (the run). Every check here is made before any model is loaded, so a bad
path costs a second, not a prediction pass, and nothing is written when one fails.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from conceptclef.data.errors import DataError
from conceptclef.data.layout import split_folder
from conceptclef.pipeline.run.directory import why_not_writable
from conceptclef.pipeline.run.fingerprint import DataFingerprint
from conceptclef.pipeline.run.layout import RunLayout

PROBABILITIES_SUFFIX = ".probabilities.npz"


class OutputPathError(DataError):
    """An output path that would destroy an input or a run, or that cannot be written."""


def probabilities_path_for(submission: Path) -> Path:
    """The per-image probabilities written beside a submission; its presence marks predict's own files."""
    return submission.with_name(submission.name + PROBABILITIES_SUFFIX)


def was_written_by_predict(submission: Path) -> bool:
    """A submission predict wrote has its probabilities file beside it (written right after it)."""
    return probabilities_path_for(submission).is_file()


def check_submission_path(out: Path, protected: dict[str, Path], overwrite: bool = False) -> None:
    """Refuse `out` (and its probabilities file) when writing it could lose work or must fail.

    `protected` names folders predict must never write into (the run, the test images), e.g.
    {"the run directory": RUN}. Replacing an existing file needs `overwrite` unless predict wrote it.
    """
    out = Path(out)
    sidecar = probabilities_path_for(out)
    for path in (out, sidecar):
        if path.is_dir():
            raise OutputPathError(path, "is a directory; give --out a file name, e.g. submission.csv")
    for role, folder in protected.items():
        if _is_within(out, folder):
            raise OutputPathError(out, f"is inside {role} {folder}; predict never writes there: choose another --out")
    parent = out.parent
    if not parent.is_dir():
        raise OutputPathError(parent, "folder of --out does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(parent, "folder of --out is not writable")
    problem = why_not_writable(parent)
    if problem is not None:  # e.g. /proc: the prediction pass would otherwise end in a failed write
        raise OutputPathError(parent, f"folder of --out cannot be written: {problem}")
    _refuse_replacing_foreign(out, out, overwrite, f"was not written by predict (no {sidecar.name} beside it)")


def check_upload_zip_path(zip_path: Path, submission: Path, overwrite: bool = False) -> None:
    """The `--zip` upload sits beside the submission: replace it only as the submission may be replaced."""
    if zip_path.is_dir():
        raise OutputPathError(zip_path, "is a directory; --zip writes the upload there: choose another --out")
    _refuse_replacing_foreign(zip_path, submission, overwrite, f"{submission.name} beside it was not written by predict")


def _refuse_replacing_foreign(path: Path, submission: Path, overwrite: bool, why: str) -> None:
    """An existing file is replaced only with --overwrite or when predict wrote `submission`."""
    if path.exists() and not overwrite and not was_written_by_predict(submission):
        raise OutputPathError(path, f"already exists and {why}; pass --overwrite to replace it, or choose another --out")


def _is_within(path: Path, folder: Path) -> bool:
    """`path` is `folder` or lies below it (both resolved: symlinks and `..` cannot sneak around it)."""
    return Path(path).resolve().is_relative_to(folder.resolve())


# Names of concept and ground-truth files: *concepts*, *cuis*, *categories*, *truth*, gt.* (and cui_mapping.csv).
_GROUND_TRUTH_NAME = re.compile(r"concept|categor|truth|(^|[^a-z])(cuis?|gt)([^a-z]|$)")
_TABLE_SUFFIXES = (".csv", ".tsv", ".txt")


def looks_like_ground_truth(path: Path) -> bool:
    return path.suffix.lower() in _TABLE_SUFFIXES and _GROUND_TRUTH_NAME.search(path.name.lower()) is not None


@dataclass(frozen=True)
class RunInputs:
    """What a run was trained from (RUN/data.json): its concept files and its train/valid image folders.

    A run made before data.json existed records none of them; then only the image folder's
    neighbourhood is protected.
    """

    data_dir: Path | None = None
    concept_files: dict[Path, str] = field(default_factory=dict)  # resolved path -> what it is
    image_folders: dict[str, Path] = field(default_factory=dict)  # "the run's training folder" -> folder

    @classmethod
    def of(cls, layout: RunLayout) -> "RunInputs":
        if not layout.fingerprint_path.is_file():
            return cls()
        recorded = DataFingerprint.load(layout.fingerprint_path)
        data_dir = Path(recorded.data_dir)
        splits: dict[Path, list[str]] = {}
        for split, (path, _) in recorded.concept_files.items():
            splits.setdefault(Path(path).resolve(), []).append(split)
        files = {
            path: f"the run's {' and '.join(names)} concept file (recorded in {layout.fingerprint_path})"
            for path, names in splits.items()
        }
        folders = {}
        for split, role in (("train", "the run's training folder"), ("valid", "the run's validation folder")):
            try:
                folders[role] = split_folder(data_dir, split)
            except DataError:
                continue  # moved away since, or no valid split (held out of train)
        return cls(data_dir, files, folders)


def check_images_folder(images_dir: Path, inputs: RunInputs) -> None:
    """Test images must not be the run's own training or validation images: their scores would be
    meaningless and the submission would cover the wrong images."""
    for role, folder in inputs.image_folders.items():
        if _is_within(images_dir, folder):
            raise OutputPathError(images_dir, f"is {role} ({folder}); predict takes the test images: give e.g. {folder.parent / 'test'}")


def check_not_an_input(paths: list[Path], inputs: RunInputs, images_dir: Path) -> None:
    """Refuse, even with --overwrite, writing over a run's input or next to it a file named like
    a concept or ground-truth file: in the run's data folder a new `*concepts*` file would also
    change which concept file the run reads, and beside the test images it is the truth."""
    data_folders = {folder.resolve() for folder in (inputs.data_dir, Path(images_dir).resolve().parent) if folder is not None}
    for path in paths:
        resolved = Path(path).resolve()
        role = inputs.concept_files.get(resolved)
        if role is not None:
            raise OutputPathError(path, f"is {role}; predict never replaces a run's input, even with --overwrite: choose another --out")
        if resolved.parent in data_folders and looks_like_ground_truth(resolved):
            raise OutputPathError(
                path,
                f"is named like a concept or ground-truth file in the data folder {resolved.parent}; predict never writes "
                "one there, even with --overwrite: choose another --out (e.g. submission.csv)",
            )
