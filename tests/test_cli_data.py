"""The make-demo, evaluate and validate commands, end to end through the Typer app."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conceptclef.cli import app
from conceptclef.data.concepts import read_concept_file
from conceptclef.data.submission import write_submission

runner = CliRunner()


@pytest.fixture(scope="module")
def default_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, float]:
    """`make-demo` with its default sizes (what `make demo` runs): 1,300 images at 128 px."""
    out = tmp_path_factory.mktemp("cli") / "DATA"
    start = time.perf_counter()
    result = runner.invoke(app, ["make-demo", str(out)])
    elapsed = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    return out, json.loads(result.output), elapsed


def test_make_demo_defaults_are_fast_and_summarised(default_demo: tuple[Path, dict, float]) -> None:
    out, summary, elapsed = default_demo
    assert elapsed < 45
    assert {name: split["images"] for name, split in summary["splits"].items()} == {"train": 700, "valid": 350, "test": 250}
    assert set(summary["splits"]["train"]["categories"]) == {"DRAN", "DRCO", "DRCT", "DRMR", "DRPE", "DRUS", "DRXR"}
    assert summary["vocabulary_size"] > 50 and Path(summary["paths"]["test_concepts"]).is_file()
    assert len(list((out / "test").glob("*.jpg"))) == 250


def test_evaluate_perfect_and_empty_submissions_as_json(default_demo: tuple[Path, dict, float], tmp_path: Path) -> None:
    out, _, _ = default_demo
    truth = read_concept_file(out / "test_concepts.csv")
    write_submission(tmp_path / "perfect.csv", truth, format="2025")
    result = runner.invoke(app, ["evaluate", str(tmp_path / "perfect.csv"), str(out / "test_concepts.csv"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["score"] == 1.0 and report["n_images"] == 250

    write_submission(tmp_path / "empty.txt", {image_id: [] for image_id in truth})
    result = runner.invoke(
        app,
        ["evaluate", str(tmp_path / "empty.txt"), str(out / "test_concepts.csv"),
         "--categories", str(out / "test_categories.csv"), "--json"],
    )
    report = json.loads(result.output)
    assert report["score"] == 0.0 and set(report["per_category"]) == set(_categories(out))


def test_evaluate_text_output_with_subset(default_demo: tuple[Path, dict, float], tmp_path: Path) -> None:
    out, _, _ = default_demo
    truth = read_concept_file(out / "test_concepts.csv")
    only_ct = {image_id: ["C0040405"] for image_id in truth}  # predict "CT" for everything
    write_submission(tmp_path / "ct.txt", only_ct)
    (tmp_path / "subset.txt").write_text("C0040405\n")
    result = runner.invoke(app, ["evaluate", str(tmp_path / "ct.txt"), str(out / "test_concepts.csv"),
                                 "--subset", str(tmp_path / "subset.txt")])
    assert result.exit_code == 0 and result.output.splitlines()[1].startswith("secondary F1 1.0000 over ")  # only CT-labelled images count


def test_validate_accepts_a_good_submission(default_demo: tuple[Path, dict, float], tmp_path: Path) -> None:
    out, _, _ = default_demo
    write_submission(tmp_path / "run.txt", read_concept_file(out / "test_concepts.csv"))
    result = runner.invoke(app, ["validate", str(tmp_path / "run.txt"), "--images", str(out / "test")])
    assert result.exit_code == 0 and "valid (250 images)" in result.output


def test_validate_rejects_a_bad_submission_with_file_and_line(default_demo: tuple[Path, dict, float], tmp_path: Path) -> None:
    out, _, _ = default_demo
    truth = read_concept_file(out / "test_concepts.csv")
    first = next(iter(truth))
    write_submission(tmp_path / "run.txt", truth)
    lines = (tmp_path / "run.txt").read_text().splitlines()
    lines[0] = f"{first}\tC0040405;C0040405"  # the writer refuses a repeat, so break the file by hand
    (tmp_path / "run.txt").write_text("\n".join(lines) + "\n")
    result = runner.invoke(app, ["validate", str(tmp_path / "run.txt"), "--images", str(out / "test")])
    assert result.exit_code != 0
    assert f"{tmp_path / 'run.txt'}:1: concept C0040405 repeated" in result.output
    assert "Traceback" not in result.output


def test_evaluate_missing_file_is_a_one_line_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["evaluate", str(tmp_path / "none.txt"), str(tmp_path / "truth.csv")])
    assert result.exit_code == 2 and "none.txt: submission file not found" in result.output


def _categories(out: Path) -> set[str]:
    return {line.split(",")[1] for line in (out / "test_categories.csv").read_text().splitlines()[1:]}
