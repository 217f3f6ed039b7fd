"""`evaluate` and `validate`: score a submission file, or check it against the rules, from files alone."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from conceptclef.data.concepts import read_category_file, read_concept_file, read_cui_list
from conceptclef.data.errors import DataError, SubmissionError
from conceptclef.data.layout import list_image_folder
from conceptclef.data.submission import read_scorable_submission, validate_submission
from conceptclef.scoring.f1 import F1Report, sample_f1
from conceptclef.scoring.secondary import SECONDARY_CUIS, secondary_f1


@dataclass(frozen=True)
class EvaluationReport:
    """The primary score and the secondary one (the 2025/2026 list, or the user's `--subset`)."""

    primary: F1Report
    secondary: F1Report
    secondary_concepts: list[str]
    secondary_source: str

    @property
    def score(self) -> float:
        return self.primary.score

    @property
    def n_images(self) -> int:
        return self.primary.n_images

    @property
    def per_category(self) -> dict[str, tuple[float, int]]:
        return self.primary.per_category

    def to_json(self) -> dict:
        secondary = {**self.secondary.to_json(), "concepts": self.secondary_concepts, "source": self.secondary_source}
        return {**self.primary.to_json(), "secondary": secondary}


def evaluate_submission(
    submission_path: Path | str,
    truth_path: Path | str,
    subset_path: Path | str | None = None,
    categories_path: Path | str | None = None,
    secondary_truth_path: Path | str | None = None,
) -> EvaluationReport:
    """The official primary and secondary sample-averaged F1 of a submission file.

    The submission is read as the official evaluator reads it and refused where it refuses: an
    empty file, an image missing or unknown to the truth, a repeated image or concept, more than
    100 concepts. `subset_path` replaces the built-in 2025/2026 secondary list; the secondary
    truth is `secondary_truth_path` when given (the challenge's concepts_manual.csv), else the truth.
    `categories_path` adds a per-category breakdown.
    """
    if not Path(submission_path).is_file():
        raise SubmissionError(submission_path, "submission file not found")
    truth = read_concept_file(truth_path)
    predictions = read_scorable_submission(submission_path, truth.keys())
    secondary_truth = truth
    if secondary_truth_path is not None:
        secondary_truth = read_concept_file(secondary_truth_path)
        unknown = [image_id for image_id in predictions if image_id not in secondary_truth]
        if unknown:
            raise SubmissionError(
                submission_path,
                f"{len(unknown)} image(s) are not in the secondary ground truth {secondary_truth_path}: {', '.join(unknown[:5])}",
            )
    if subset_path is not None:
        concepts, source = read_cui_list(subset_path), str(subset_path)
    else:
        concepts, source = list(SECONDARY_CUIS), "2025/2026 secondary list"
    categories = read_categories(categories_path) if categories_path is not None else None
    return EvaluationReport(
        primary=sample_f1(predictions, truth, categories=categories),
        secondary=secondary_f1(predictions, secondary_truth, concepts, categories=categories),
        secondary_concepts=concepts,
        secondary_source=source,
    )


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
