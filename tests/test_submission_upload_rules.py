"""The 2025/2026 upload rules: what validate rejects, what the writer produces, the upload zip.

Each rejected file below is one the 2025/2026 checker (submission_check.py of the organisers)
refuses; `validate` must refuse it too, with one line naming the file and the line.
"""

from __future__ import annotations

import random
import zipfile
from pathlib import Path

import pytest

from conceptclef.data.errors import SubmissionError
from conceptclef.data.submission import (
    natural_key,
    read_submission,
    validate_submission,
    write_submission,
    write_upload_zip,
)

from cli_helpers import run_cli

IDS = ["ImageCLEFmedical_Caption_2025_test_1", "ImageCLEFmedical_Caption_2025_test_2", "ImageCLEFmedical_Caption_2025_test_10"]
CT, MR, XR = "C0040405", "C0024485", "C1306645"
GOOD = f"ID,CUIs\n{IDS[0]},{CT};{MR}\n{IDS[1]},{XR}\n{IDS[2]},{CT}\n"


def rejected(tmp_path: Path, data: str | bytes, ids: list[str] = IDS) -> SubmissionError:
    path = tmp_path / "submission.csv"
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    with pytest.raises(SubmissionError) as error:
        validate_submission(path, ids)
    assert str(error.value).startswith(f"{path}:") and "\n" not in str(error.value)
    return error.value


def test_a_good_file_passes(tmp_path: Path) -> None:
    (tmp_path / "submission.csv").write_text(GOOD)
    assert validate_submission(tmp_path / "submission.csv", IDS) == 3


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        (GOOD.replace(f"\n{IDS[1]}", f"\n\n{IDS[1]}"), 3, "blank line"),
        (GOOD + "\n", 5, "blank line"),
        (GOOD.replace("ID,CUIs", "id,cuis"), 1, "header must be exactly ID,CUIs, got 'id,cuis'"),
        (GOOD.replace(f"{IDS[1]},{XR}", f"{IDS[1]},"), 3, f"image {IDS[1]!r} has no concept"),
        (GOOD.replace(f"{IDS[1]},{XR}", f"{IDS[1]}"), 3, "expected exactly 2 columns ID,CUIs, got 1"),
        (GOOD.replace(f"{IDS[1]},{XR}", f"{IDS[1]},{XR};"), 3, "empty CUI in 'C1306645;'"),
        (GOOD.replace(f"{CT};{MR}", f"{CT};;{MR}"), 2, "empty CUI in"),
        (GOOD.replace(f"{IDS[1]},{XR}", f"{IDS[1]}, {XR}"), 3, "whitespace around the CUIs field ' C1306645'"),
        (GOOD.replace(f"{IDS[1]},{XR}", f"{IDS[1]} ,{XR}"), 3, "whitespace around the image ID"),
        (GOOD.replace(f"{IDS[1]},{XR}", f"{IDS[1]},{XR.lower()}"), 3, "lower-case CUI 'c1306645'"),
        (GOOD.replace(f"{CT};{MR}", f"{CT};{MR};{CT}"), 2, f"concept {CT} repeated"),
        (GOOD.replace(f"{IDS[1]},{XR}", f"{IDS[1]},C13066"), 3, "malformed CUI 'C13066'"),
        (GOOD + f"{IDS[0]},{CT}\n", 5, f"image {IDS[0]!r} listed twice (lines 2 and 5)"),
        (GOOD + f"ImageCLEFmedical_Caption_2025_test_3,{CT}\n", 5, "unknown image ID"),
    ],
)
def test_validate_rejects_what_the_checker_rejects(tmp_path: Path, text: str, line: int, problem: str) -> None:
    error = rejected(tmp_path, text)
    assert error.line == line and problem in error.message


def test_validate_rejects_a_bom_an_empty_file_and_a_missing_image(tmp_path: Path) -> None:
    error = rejected(tmp_path, b"\xef\xbb\xbf" + GOOD.encode())
    assert error.line == 1 and "byte-order mark" in error.message
    assert "empty file (0 bytes)" in rejected(tmp_path, b"", IDS).message
    error = rejected(tmp_path, GOOD, IDS + ["ImageCLEFmedical_Caption_2025_test_3"])
    assert error.line is None and "1 of 4 test images are missing: ImageCLEFmedical_Caption_2025_test_3" in error.message


def test_validate_rejects_more_than_100_concepts(tmp_path: Path) -> None:
    many = ";".join(f"C{number:07d}" for number in range(1, 102))
    error = rejected(tmp_path, GOOD.replace(f"{IDS[1]},{XR}", f"{IDS[1]},{many}"))
    assert error.line == 3 and "101 concepts" in error.message


def test_the_cli_names_file_and_line_and_exits_non_zero(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    for image_id in IDS:
        Image.new("RGB", (4, 4)).save(images / f"{image_id}.jpg")
    path = tmp_path / "submission.csv"
    path.write_text(GOOD.replace(f"{IDS[1]},{XR}", f"{IDS[1]},{XR};"))
    result = run_cli("validate", path, "--images", images)
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {path}:3: empty CUI in 'C1306645;' of image {IDS[1]!r} (a trailing ';' or ';;')"
    path.write_text(GOOD)
    assert run_cli("validate", path, "--images", images).exit_code == 0


def test_writer_rows_are_in_natural_order_with_one_concept_at_least(tmp_path: Path) -> None:
    predictions = {IDS[2]: [CT], IDS[0]: [MR.lower(), " " + CT], IDS[1]: [XR]}
    write_submission(tmp_path / "submission.csv", predictions, format="2025")
    assert (tmp_path / "submission.csv").read_bytes() == (
        f"ID,CUIs\n{IDS[0]},{MR};{CT}\n{IDS[1]},{XR}\n{IDS[2]},{CT}\n".encode()
    )
    assert sorted(["x_10", "x_2", "x_1", "y", "x_02"], key=natural_key) == ["x_1", "x_02", "x_2", "x_10", "y"]
    with pytest.raises(SubmissionError, match=f"image '{IDS[1]}' has no concept"):
        write_submission(tmp_path / "empty.csv", {**predictions, IDS[1]: []}, format="2025")
    assert not (tmp_path / "empty.csv").exists()


def test_the_writer_never_writes_a_file_its_validator_rejects(tmp_path: Path) -> None:
    """Random tricky predictions: each is either refused by the writer or passes validate."""
    rng = random.Random(0)
    good_pieces = [CT, MR.lower(), f" {XR} ", "c0000001", "C0000002"]
    bad_pieces = ["C12", "", CT + ";" + MR, "C0040405 C0024485"]
    good_ids = ["a_1", "a_10", "a_2", "a_02", "b", "img 7", "x" * 300]
    bad_ids = [" c", "d,e", "f|g", 'h"i', "", "j\n"]
    written = refused = 0
    for trial in range(300):
        chosen = rng.sample(good_ids, rng.randint(1, len(good_ids))) + [rng.choice(bad_ids)] * (rng.random() < 0.1)
        predictions = {}
        for image_id in chosen:
            count = rng.choices([0, 1, 3, 100, 101], weights=[1, 20, 20, 2, 1])[0]
            predictions[image_id] = [rng.choice(good_pieces + bad_pieces * (rng.random() < 0.02)) for _ in range(count)]
        path = tmp_path / f"run{trial}.csv"
        try:
            write_submission(path, predictions, format="2025")
        except SubmissionError:
            refused += 1
            assert not path.exists()
            continue
        written += 1
        assert validate_submission(path, chosen) == len(chosen)
        assert list(read_submission(path)) == sorted(chosen, key=natural_key)
    assert written > 20 and refused > 20


def test_upload_zip_holds_only_submission_csv_and_is_validated(tmp_path: Path) -> None:
    (tmp_path / "run.csv").write_text(GOOD)
    zip_path = write_upload_zip(tmp_path / "run.csv", tmp_path / "run.zip")
    with zipfile.ZipFile(zip_path) as archive:
        assert archive.namelist() == ["submission.csv"] and archive.read("submission.csv") == GOOD.encode()
    assert validate_submission(zip_path, IDS) == 3
    first = zip_path.read_bytes()
    assert write_upload_zip(tmp_path / "run.csv", tmp_path / "again.zip").read_bytes() == first  # reproducible
    with zipfile.ZipFile(tmp_path / "two.zip", "w") as archive:
        archive.writestr("submission.csv", GOOD)
        archive.writestr("notes.txt", "")
    with pytest.raises(SubmissionError, match="must hold only submission.csv"):
        validate_submission(tmp_path / "two.zip", IDS)
