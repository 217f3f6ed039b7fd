"""The official sample-averaged F1 against hand-computed cases, and evaluate_submission on files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conceptclef.data.errors import SubmissionError
from conceptclef.data.submission import write_submission
from conceptclef.data.vocabulary import ConceptVocabulary
from conceptclef.pipeline.stages.evaluate import evaluate_submission
from conceptclef.scoring.f1 import image_f1, mean_sample_f1_sparse, per_image_f1_sparse, sample_f1

A, B, C, D = "C0000001", "C0000002", "C0000003", "C0000004"


def test_image_f1_by_hand() -> None:
    assert image_f1([A, B], [A, C]) == pytest.approx(2 * 1 / 4)
    assert image_f1([A], [A, B, C]) == pytest.approx(2 * 1 / 4)
    assert image_f1([], [A]) == 0.0  # an empty prediction scores 0
    assert image_f1([a.lower() for a in (A, B)], [B, A]) == 1.0  # case-insensitive


def test_sample_f1_skips_empty_truth_and_scores_missing_images_zero() -> None:
    truth = {"i1": [A, B], "i2": [C], "i3": [], "i4": [D]}
    predicted = {"i1": [A], "i2": [C], "i3": [A]}  # i4 missing from the submission
    report = sample_f1(predicted, truth)
    # i1: 2*1/(1+2) = 2/3; i2: 1; i3 skipped (empty truth); i4: 0
    assert report.n_images == 3 and set(report.per_image) == {"i1", "i2", "i4"}
    assert report.score == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_out_of_vocabulary_truth_counts_as_a_miss() -> None:
    """A CUI no model can predict stays in |G|: vectorised and dict scores must agree."""
    truth_lists = [[A, D], [B]]  # D is outside the vocabulary
    predicted_lists = [[A], [B, C]]
    vocabulary = ConceptVocabulary([A, B, C])
    predicted, truth, outside = (vocabulary.encode(predicted_lists), vocabulary.encode(truth_lists),
                                 vocabulary.outside_counts(truth_lists))
    # image x: P={A}, G={A,D} -> 2/3; image y: P={B,C}, G={B} -> 2/3
    assert per_image_f1_sparse(predicted, truth, outside).tolist() == pytest.approx([2 / 3, 2 / 3])
    expected = sample_f1(dict(zip("xy", predicted_lists)), dict(zip("xy", truth_lists))).score
    assert expected == pytest.approx(2 / 3)
    assert mean_sample_f1_sparse(predicted, truth, outside) == pytest.approx(expected)
    # Without the outside counts the score would wrongly be higher.
    assert np.nanmean(per_image_f1_sparse(predicted, truth)) > expected


def test_subset_rule_of_2025() -> None:
    truth = {"i1": [A, B], "i2": [C], "i3": [A]}
    predicted = {"i1": [A, C], "i2": [C], "i3": [B]}
    report = sample_f1(predicted, truth, subset=[A, B])
    # i1: P={A}, G={A,B} -> 2/3; i2: filtered truth empty -> skipped; i3: P={B}, G={A} -> 0
    assert report.n_images == 2 and report.score == pytest.approx((2 / 3 + 0) / 2)


def test_per_category_breakdown() -> None:
    truth = {"i1": [A], "i2": [B], "i3": [C]}
    predicted = {"i1": [A], "i2": [C], "i3": [C]}
    report = sample_f1(predicted, truth, categories={"i1": "DRCT", "i2": "DRCT", "i3": "DRXR"})
    assert report.per_category == {"DRCT": (0.5, 2), "DRXR": (1.0, 1)}
    assert report.to_json()["per_category"]["DRCT"] == {"score": 0.5, "n_images": 2}


def test_evaluate_submission_files(tmp_path: Path) -> None:
    (tmp_path / "truth.csv").write_text(f"i1\t{A};{B}\ni2\t{C}\ni3\t\n")
    (tmp_path / "run.csv").write_text(f"ID,CUIs\ni1,{A.lower()}\ni2,\ni3,\n")  # rough, but the evaluator scores it
    (tmp_path / "subset.txt").write_text(f"{A}\n{C}\n")
    (tmp_path / "categories.csv").write_text("ID,CATEGORY\ni1,DRCT\ni2,DRXR\ni3,DRXR\n")
    report = evaluate_submission(tmp_path / "run.csv", tmp_path / "truth.csv")
    assert report.n_images == 2 and report.score == pytest.approx((2 / 3 + 0) / 2)
    subset = evaluate_submission(tmp_path / "run.csv", tmp_path / "truth.csv", subset_path=tmp_path / "subset.txt")
    assert subset.score == report.score  # --subset replaces the secondary list, not the primary score
    assert subset.secondary.n_images == 2 and subset.secondary.score == pytest.approx((1 + 0) / 2)
    by_category = evaluate_submission(
        tmp_path / "run.csv", tmp_path / "truth.csv", categories_path=tmp_path / "categories.csv"
    )
    assert by_category.per_category == {"DRCT": (pytest.approx(2 / 3), 1), "DRXR": (0.0, 1)}


def test_categories_from_an_image_folder(tmp_path: Path) -> None:
    from PIL import Image

    for image_id, category in (("i1", "DRCT"), ("i2", "DRUS")):
        (tmp_path / "images" / category).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / "images" / category / f"{image_id}.jpg")
    (tmp_path / "truth.csv").write_text(f"i1\t{A}\ni2\t{B}\n")
    write_submission(tmp_path / "run.txt", {"i1": [A], "i2": [A]})
    report = evaluate_submission(tmp_path / "run.txt", tmp_path / "truth.csv", categories_path=tmp_path / "images")
    assert report.per_category == {"DRCT": (1.0, 1), "DRUS": (0.0, 1)}


def test_evaluate_refuses_images_unknown_to_the_truth(tmp_path: Path) -> None:
    (tmp_path / "truth.csv").write_text(f"i1\t{A}\n")
    write_submission(tmp_path / "run.txt", {"i1": [A], "other": [A]})
    with pytest.raises(SubmissionError, match="run.txt:2: image 'other' is not in the ground truth"):
        evaluate_submission(tmp_path / "run.txt", tmp_path / "truth.csv")
