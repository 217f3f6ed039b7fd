"""The 2026 development set: one concepts file for train and valid (split by the ID's
`_train_` / `_valid_` part), and cui_mapping.csv (CUI, canonical name)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conceptclef.data.concepts import read_cui_names
from conceptclef.data.errors import ConceptFileError, DataError
from conceptclef.data.layout import find_concept_file, load_split, splits_named

PREFIX = "ImageCLEFmedical_Caption_2026"
COMBINED = f"{PREFIX}_concepts.csv"


def make_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)


@pytest.fixture
def dataset_2026(tmp_path: Path) -> Path:
    for split, number in [("train", 1), ("train", 2), ("valid", 3)]:
        make_image(tmp_path / split / f"{PREFIX}_{split}_{number:06d}.jpg")
    (tmp_path / COMBINED).write_text(
        "ID,CUIs\n"
        f"{PREFIX}_train_000001,C0040405;C0817096\n"
        f"{PREFIX}_valid_000003,C0024485\n"
        f"{PREFIX}_train_000002,C1306645\n"
    )
    (tmp_path / "test_concepts.csv").write_text("ID,CUIs\nx_test_1,C0040405\n")  # names the test split: not the combined file
    return tmp_path


def test_one_file_serves_train_and_valid_by_the_ids_split(dataset_2026: Path):
    train, valid = load_split(dataset_2026, "train"), load_split(dataset_2026, "valid")
    assert train.image_ids == [f"{PREFIX}_train_000001", f"{PREFIX}_train_000002"]
    assert valid.image_ids == [f"{PREFIX}_valid_000003"]
    assert valid.concept_lists == [["C0024485"]]
    assert train.source == valid.source == dataset_2026 / COMBINED
    assert train.lines[f"{PREFIX}_train_000002"] == 4  # errors about an image still cite its row


def test_an_id_naming_neither_split_is_an_error_at_its_line(dataset_2026: Path):
    with (dataset_2026 / COMBINED).open("a") as handle:
        handle.write(f"{PREFIX}_test_000009,C0040405\n")
    with pytest.raises(ConceptFileError) as error:
        load_split(dataset_2026, "train")
    assert error.value.path == dataset_2026 / COMBINED and error.value.line == 5
    assert f"{PREFIX}_test_000009" in str(error.value) and f"{COMBINED}:5" in str(error.value)


def test_per_split_files_win_over_a_combined_one(dataset_2026: Path):
    (dataset_2026 / "valid_concepts.csv").write_text(f"ID,CUIs\n{PREFIX}_valid_000003,C0041618\n")
    assert find_concept_file(dataset_2026, "valid") == dataset_2026 / "valid_concepts.csv"
    assert find_concept_file(dataset_2026, "train") == dataset_2026 / COMBINED
    assert load_split(dataset_2026, "valid").concept_lists == [["C0041618"]]


def test_two_candidate_combined_files_are_refused(dataset_2026: Path):
    (dataset_2026 / "train_valid_concepts.csv").write_text("ID,CUIs\n")
    with pytest.raises(DataError, match="several concept files could be the combined"):
        find_concept_file(dataset_2026, "train")


def test_split_names_are_whole_words():
    assert splits_named(f"{PREFIX}_train_000123") == {"train"}
    assert splits_named("ImageCLEF2020_Validation_Concepts.csv") == {"valid"}
    assert splits_named("train_valid_concepts.csv") == {"train", "valid"}
    assert splits_named("interval_trainer_concepts.csv") == set()


def test_cui_names(tmp_path: Path):
    path = tmp_path / "cui_mapping.csv"
    path.write_text('CUI,Canonical name\nC0040405,"Tomography, X-Ray Computed"\nc0024485,Magnetic Resonance Imaging\n')
    assert read_cui_names(path) == {"C0040405": "Tomography, X-Ray Computed", "C0024485": "Magnetic Resonance Imaging"}
    path.write_text("CUI,Canonical name\nC0040405,CT\nC0040405,CT again\n")
    with pytest.raises(ConceptFileError, match="duplicate CUI C0040405") as error:
        read_cui_names(path)
    assert error.value.line == 3
    path.write_text("CUI,Canonical name\nX123,CT\n")
    with pytest.raises(ConceptFileError, match="expected CUI,NAME"):
        read_cui_names(path)
