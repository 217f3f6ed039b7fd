"""Where `predict` may write: never into a run or an image folder, never over a file it did not write.

A mistyped `--out` used to replace whatever it named: `DATA/test_concepts.csv` (the ground truth)
or `RUN/manifest.json` (the run). Every check here is made before any model is loaded, so a bad
path costs a second, not a prediction pass, and nothing is written when one fails.
"""

from __future__ import annotations

import os
from pathlib import Path

from conceptclef.data.errors import DataError

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
    resolved = out.resolve()
    for role, folder in protected.items():
        if resolved == folder.resolve() or folder.resolve() in resolved.parents:
            raise OutputPathError(out, f"is inside {role} {folder}; predict never writes there: choose another --out")
    parent = out.parent
    if not parent.is_dir():
        raise OutputPathError(parent, "folder of --out does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(parent, "folder of --out is not writable")
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
