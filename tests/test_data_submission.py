"""Submission files: both formats round-trip, and every challenge rule is enforced with file:line."""

from __future__ import annotations

from pathlib import Path

import pytest

from conceptclef.data.errors import SubmissionError
from conceptclef.data.submission import read_submission, validate_submission, write_submission

PREDICTIONS = {"img1": ["C0040405", "c0817096"], "img2": [], "img3": ["C1306645"]}
PREDICTIONS_2025 = {**PREDICTIONS, "img2": ["C0024485"]}  # the 2025/2026 checker wants a concept on every line
IDS = ["img1", "img2", "img3"]


def test_2020_format_exact_text(tmp_path: Path) -> None:
    write_submission(tmp_path / "run.txt", PREDICTIONS, format="2020")
    assert (tmp_path / "run.txt").read_text() == "img1\tC0040405;C0817096\nimg2\t\nimg3\tC1306645\n"


def test_2025_format_exact_text(tmp_path: Path) -> None:
    write_submission(tmp_path / "run.csv", PREDICTIONS_2025, format="2025")
    assert (tmp_path / "run.csv").read_text() == "ID,CUIs\nimg1,C0040405;C0817096\nimg2,C0024485\nimg3,C1306645\n"


@pytest.mark.parametrize("format", ["2020", "2025"])
def test_round_trip_with_sniffed_format(tmp_path: Path, format: str) -> None:
    path = tmp_path / f"run-{format}.csv"
    write_submission(path, PREDICTIONS_2025, format=format)
    expected = {"img1": ["C0040405", "C0817096"], "img2": ["C0024485"], "img3": ["C1306645"]}
    assert read_submission(path) == expected
    assert read_submission(path, format=format) == expected
    assert validate_submission(path, IDS) == 3


def test_write_refuses_unknown_format_and_unwritable_ids(tmp_path: Path) -> None:
    with pytest.raises(SubmissionError, match="unknown submission format"):
        write_submission(tmp_path / "x", PREDICTIONS, format="2021")
    with pytest.raises(SubmissionError, match="cannot be written"):
        write_submission(tmp_path / "x", {"a,b": ["C0040405"]}, format="2025")
    assert not (tmp_path / "x").exists()


def test_crlf_is_accepted_and_a_bom_read_for_scoring(tmp_path: Path) -> None:
    path = tmp_path / "run.csv"
    path.write_bytes("ID,CUIs\r\nimg1,C0040405\r\nimg2,C0024485\r\nimg3,C1306645;C0817096\r\n".encode())
    assert validate_submission(path, IDS) == 3
    path.write_bytes("\ufeffID,CUIs\r\nimg1,C0040405\r\nimg2,\r\nimg3,C1306645;C0817096\r\n".encode())
    assert read_submission(path)["img3"] == ["C1306645", "C0817096"]  # the evaluator reads it; validate does not


def invalid(tmp_path: Path, text: str, ids: list[str] = IDS) -> SubmissionError:
    path = tmp_path / "run.txt"
    path.write_text(text)
    with pytest.raises(SubmissionError) as error:
        validate_submission(path, ids)
    assert str(error.value).startswith(str(path))
    return error.value


def test_101_concepts_are_rejected_100_accepted(tmp_path: Path) -> None:
    many = ";".join(f"C{number:07d}" for number in range(101))
    error = invalid(tmp_path, f"img1\tC0040405\nimg2\t{many}\nimg3\t\n")
    assert error.line == 2 and "101 concepts" in str(error)
    (tmp_path / "ok.txt").write_text(f"img1\t{many.rsplit(';', 1)[0]}\nimg2\t\nimg3\t\n")
    assert validate_submission(tmp_path / "ok.txt", IDS) == 3


def test_repeated_concept_within_an_image(tmp_path: Path) -> None:
    error = invalid(tmp_path, "img1\tC0040405;c0040405\nimg2\t\nimg3\t\n")
    assert error.line == 1 and "C0040405 repeated" in str(error)


def test_duplicate_image_line(tmp_path: Path) -> None:
    error = invalid(tmp_path, "img1\t\nimg2\t\nimg1\tC0040405\nimg3\t\n")
    assert error.line == 3 and "lines 1 and 3" in str(error)


def test_unknown_image(tmp_path: Path) -> None:
    error = invalid(tmp_path, "img1\t\nimg2\t\nimg3\t\nimg9\tC0040405\n")
    assert error.line == 4 and "unknown image ID 'img9'" in str(error)


def test_missing_images_are_counted_and_named(tmp_path: Path) -> None:
    ids = IDS + [f"extra{number}" for number in range(10)]
    error = invalid(tmp_path, "img1\t\nimg2\t\nimg3\t\n", ids)
    assert error.line is None and "10 of 13 test images are missing: extra0, extra1, extra2, extra3, extra4, ..." in str(error)


def test_malformed_cui_and_structure(tmp_path: Path) -> None:
    assert invalid(tmp_path, "img1\tC004\nimg2\t\nimg3\t\n").line == 1
    assert "expected ID, a tab" in str(invalid(tmp_path, "img1\tC0040405\tC0817096\nimg2\t\nimg3\t\n"))


def test_2025_needs_its_header(tmp_path: Path) -> None:
    path = tmp_path / "run.csv"
    path.write_text("img1,C0040405\nimg2,\nimg3,\n")
    with pytest.raises(SubmissionError, match=r"run.csv:1: header must be exactly ID,CUIs, got 'img1,C0040405'"):
        validate_submission(path, IDS, format="2025")
