"""`evaluate` and `validate`: score a submission file, or check it against the rules, from files alone."""

from __future__ import annotations

from pathlib import Path

from conceptclef.data.concepts import read_category_file, read_concept_file, read_cui_list
from conceptclef.data.errors import DataError, SubmissionError
from conceptclef.data.layout import list_image_folder
from conceptclef.data.submission import read_submission, validate_submission
from conceptclef.scoring.f1 import F1Report, sample_f1


def evaluate_submission(
    submission_path: Path | str,
    truth_path: Path | str,
    subset_path: Path | str | None = None,
    categories_path: Path | str | None = None,
) -> F1Report:
    """The official sample-averaged F1 of a submission against a ground-truth concept file.

    Images of the truth that the submission leaves out score 0. Images the truth does not know are
    an error: they almost always mean the submission is scored against the wrong split.
    `subset_path` gives the 2025 secondary score; `categories_path` adds a per-category breakdown.
    """
    predictions = read_submission(submission_path)
    truth = read_concept_file(truth_path)
    unknown = sorted(predictions.keys() - truth.keys())
    if unknown:
        examples = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise SubmissionError(
            submission_path, f"{len(unknown)} image(s) are not in the ground truth {truth_path}: {examples}"
        )
    subset = read_cui_list(subset_path) if subset_path is not None else None
    categories = read_categories(categories_path) if categories_path is not None else None
    return sample_f1(predictions, truth, subset=subset, categories=categories)


def read_categories(path: Path | str) -> dict[str, str]:
    """Image ID -> category from a CSV of ID,CATEGORY or from an image folder's category sub-folders."""
    path = Path(path)
    if not path.is_dir():
        return read_category_file(path)
    categories = {record.image_id: record.category for record in list_image_folder(path) if record.category}
    if not categories:
        raise DataError(path, "no category sub-folders here; give a CSV of ID,CATEGORY instead")
    return categories


def validate_submission_file(
    submission_path: Path | str, images_dir: Path | str, submission_format: str | None = None
) -> int:
    """Check a submission covers exactly the images of `images_dir` by the rules; return the image count."""
    image_ids = [record.image_id for record in list_image_folder(images_dir)]
    return validate_submission(submission_path, image_ids, format=submission_format)
