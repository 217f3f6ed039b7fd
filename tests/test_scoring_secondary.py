"""The 2025/2026 secondary score by hand, and `evaluate` refusing what the official evaluator refuses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conceptclef.data.vocabulary import ConceptVocabulary
from conceptclef.ensemble.nonempty import at_least_one_concept
from conceptclef.scoring.secondary import SECONDARY_CUIS, outside_counts, per_image_subset_f1_sparse, secondary_f1

from cli_helpers import run_cli

CT, MR, XR, CHEST, OCT = "C0040405", "C0024485", "C1306645", "C0817096", "C0920367"
FINDING, OTHER = "C0577559", "C0030705"  # not in the secondary list


def test_the_list_is_the_organisers_15_cuis() -> None:
    assert len(SECONDARY_CUIS) == len(set(SECONDARY_CUIS)) == 15
    assert {CT, MR, XR, CHEST, OCT, "C0002978", "C0032743", "C0041618", "C0000726"} <= set(SECONDARY_CUIS)
    assert FINDING not in SECONDARY_CUIS


def test_secondary_f1_by_hand() -> None:
    truth = {"a": [CT, FINDING], "b": [XR, CHEST], "c": [FINDING], "d": [MR]}
    predicted = {"a": [CT, OTHER], "b": [XR, MR, FINDING], "c": [CT], "d": [FINDING]}
    report = secondary_f1(predicted, truth)
    # a: P={CT}, G={CT} -> 1; b: P={XR,MR}, G={XR,CHEST} -> 2*1/4 = 0.5;
    # c: filtered truth empty -> skipped (its wrong CT costs nothing); d: P={}, G={MR} -> 0
    assert set(report.per_image) == {"a", "b", "d"}
    assert report.score == pytest.approx((1 + 0.5 + 0) / 3)


def test_sparse_secondary_agrees_and_counts_list_cuis_outside_the_vocabulary() -> None:
    vocabulary = ConceptVocabulary([CT, XR, FINDING, OTHER])  # MR and CHEST are not columns
    truth_lists = [[CT, FINDING], [XR, CHEST], [FINDING], [MR]]
    predicted_lists = [[CT, OTHER], [XR, FINDING], [CT], [FINDING]]
    outside = outside_counts(truth_lists, vocabulary.cuis)
    assert outside.tolist() == [0, 1, 0, 1]
    scores = per_image_subset_f1_sparse(
        vocabulary.encode(predicted_lists), vocabulary.encode(truth_lists), vocabulary.cuis, truth_outside=outside
    )
    # a 1; b P={XR}, G={XR,CHEST} -> 2/3; c skipped; d P={}, G={MR} -> 0
    assert np.isnan(scores[2]) and scores[[0, 1, 3]].tolist() == pytest.approx([1, 2 / 3, 0])
    expected = secondary_f1(dict(zip("abcd", predicted_lists)), dict(zip("abcd", truth_lists))).score
    assert np.nanmean(scores) == pytest.approx(expected)


def test_every_image_gets_a_concept() -> None:
    import scipy.sparse as sp

    decisions = sp.csr_matrix(np.array([[1, 0, 0], [0, 0, 0], [0, 0, 0]], dtype=bool))
    probs = sp.csr_matrix(np.array([[0.9, 0.2, 0.0], [0.1, 0.0, 0.3], [0.0, 0.0, 0.0]], dtype=np.float32))
    chosen = at_least_one_concept(decisions, probs, fallback_scores=np.array([0.1, 0.5, 0.2]))
    # row 0 keeps its decision; row 1 gets its most probable concept; row 2 (nothing scored) the most frequent
    assert chosen.toarray().tolist() == [[True, False, False], [False, False, True], [False, True, False]]


# ---------------------------------------------------------------- evaluate on files, through the CLI

IDS = ["img_1", "img_2", "img_10"]


@pytest.fixture
def truth(tmp_path: Path) -> Path:
    path = tmp_path / "truth.csv"
    path.write_text(f"ID,CUIs\nimg_1,{CT};{FINDING}\nimg_2,{XR};{CHEST}\nimg_10,{FINDING}\n")
    return path


def evaluate_error(submission: Path, truth: Path) -> str:
    result = run_cli("evaluate", submission, truth)
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    return result.output.strip()


def test_evaluate_prints_primary_and_secondary_by_default(tmp_path: Path, truth: Path) -> None:
    submission = tmp_path / "run.csv"
    submission.write_text(f"ID,CUIs\nimg_1,{CT}\nimg_2,{XR};{MR}\nimg_10,{FINDING}\n")
    result = run_cli("evaluate", submission, truth)
    assert result.exit_code == 0, result.output
    # primary: img_1 2*1/3, img_2 2*1/4, img_10 1; secondary: img_1 1, img_2 0.5, img_10 skipped
    primary, secondary = (2 / 3 + 0.5 + 1) / 3, (1 + 0.5) / 2
    assert result.output.splitlines()[:2] == [
        f"F1 {primary:.4f} over 3 images",
        f"secondary F1 {secondary:.4f} over 2 images (15 CUIs: 2025/2026 secondary list)",
    ]
    report = json.loads(run_cli("evaluate", submission, truth, "--json").output)
    assert report["score"] == pytest.approx(primary) and report["secondary"]["score"] == pytest.approx(secondary)
    assert report["secondary"]["n_images"] == 2 and report["secondary"]["concepts"] == list(SECONDARY_CUIS)
    (tmp_path / "subset.txt").write_text(f"{MR}\n{FINDING}\n")
    report = json.loads(run_cli("evaluate", submission, truth, "--subset", tmp_path / "subset.txt", "--json").output)
    # --subset replaces the list: img_1 P={} G={FINDING} -> 0; img_2 P={MR} G={} skipped; img_10 -> 1
    assert report["score"] == pytest.approx(primary) and report["secondary"]["score"] == pytest.approx(0.5)
    manual = tmp_path / "concepts_manual.csv"
    manual.write_text(f"ID,CUIs\nimg_1,{CT}\nimg_2,{XR};{MR}\nimg_10,{OCT}\n")
    report = json.loads(run_cli("evaluate", submission, truth, "--secondary-gt", manual, "--json").output)
    assert report["secondary"]["score"] == pytest.approx((1 + 1 + 0) / 3)  # scored against the manual truth


def test_evaluate_refuses_an_empty_file(tmp_path: Path, truth: Path) -> None:
    submission = tmp_path / "run.csv"
    submission.write_bytes(b"")
    assert evaluate_error(submission, truth) == f"error: {submission}: empty file (0 bytes); the official evaluator refuses it"


def test_evaluate_refuses_missing_images(tmp_path: Path, truth: Path) -> None:
    submission = tmp_path / "run.csv"
    submission.write_text(f"ID,CUIs\nimg_1,{CT}\n")
    message = evaluate_error(submission, truth)
    assert message == f"error: {submission}: 2 of 3 ground-truth images are missing: img_2, img_10"


def test_evaluate_refuses_more_than_100_concepts_and_repeats(tmp_path: Path, truth: Path) -> None:
    submission = tmp_path / "run.csv"
    many = ";".join(f"C{number:07d}" for number in range(1, 150))
    submission.write_text(f"ID,CUIs\nimg_1,{CT}\nimg_2,{many}\nimg_10,{CT}\n")
    assert evaluate_error(submission, truth) == f"error: {submission}:3: 149 concepts for image 'img_2' (at most 100)"
    submission.write_text(f"ID,CUIs\nimg_1,{CT};{CT.lower()}\nimg_2,{XR}\nimg_10,{CT}\n")
    assert evaluate_error(submission, truth) == f"error: {submission}:2: concept {CT} repeated for image 'img_1'"


def test_evaluate_reads_a_2022_pipe_separated_submission(tmp_path: Path, truth: Path) -> None:
    submission = tmp_path / "run.txt"
    submission.write_text(f"img_1|{CT};{FINDING}\nimg_2|{XR};{CHEST}\nimg_10|{FINDING}\n")
    report = json.loads(run_cli("evaluate", submission, truth, "--json").output)
    assert report["score"] == 1.0 and report["n_images"] == 3 and report["secondary"]["score"] == 1.0
