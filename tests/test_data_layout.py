"""The ImageCLEF 2020 folder layout: joining images with concept rows, strictly."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from conceptclef.data.errors import ConceptFileError, DataError
from conceptclef.data.layout import discover_categories, find_concept_file, list_image_folder, load_split


def make_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (90, 90, 90)).save(path)
    return path


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    data = tmp_path / "DATA"
    make_image(data / "train" / "DRCT" / "synpic1.jpg")
    make_image(data / "train" / "DRCT" / "synpic2.JPEG")
    make_image(data / "train" / "DRXR" / "synpic3.png")
    (data / "train" / "DRXR" / "notes.txt").write_text("not an image")
    make_image(data / "train" / ".cache" / "synpic9.jpg")  # hidden folders are ignored
    (data / "train_concepts.csv").write_text("synpic3\tC1306645\nsynpic1\tC0040405;C0817096\nsynpic2\t\n")
    return data


def test_load_split_joins_in_concept_file_order(dataset: Path) -> None:
    split = load_split(dataset, "train")
    assert split.name == "train"
    assert split.image_ids == ["synpic3", "synpic1", "synpic2"]
    assert split.categories == ["DRXR", "DRCT", "DRCT"]
    assert split.concept_lists == [["C1306645"], ["C0040405", "C0817096"], []]
    assert split.records[0].path == dataset / "train" / "DRXR" / "synpic3.png"


def test_concept_row_without_image_names_file_and_line(dataset: Path) -> None:
    with (dataset / "train_concepts.csv").open("a") as stream:
        stream.write("synpic404\tC0040405\n")
    with pytest.raises(ConceptFileError) as error:
        load_split(dataset, "train")
    assert error.value.line == 4 and error.value.path.name == "train_concepts.csv" and "synpic404" in str(error.value)


def test_unlisted_image_is_an_error_unless_allowed(dataset: Path) -> None:
    extra = make_image(dataset / "train" / "DRXR" / "synpic77.jpg")
    with pytest.raises(DataError) as error:
        load_split(dataset, "train")
    assert str(extra) in str(error.value) and "add a row for each" in str(error.value)
    with pytest.warns(UserWarning, match="1 image"):
        split = load_split(dataset, "train", allow_unlisted=True)
    assert "synpic77" not in split.image_ids and len(split) == 3


def test_concept_file_under_other_names(tmp_path: Path) -> None:
    for name in ("valid_concepts.txt", "valid.csv", "validation-concepts.tsv", "ImageCLEF2020_Valid_Concepts.csv"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / name).write_text("x\tC0040405\n")
        assert find_concept_file(folder, "valid") == folder / name
    with pytest.raises(DataError, match="no concept file for the 'train' split"):
        find_concept_file(tmp_path / "valid.csv", "train")


def test_list_image_folder_flat_and_with_categories(tmp_path: Path) -> None:
    make_image(tmp_path / "flat" / "b.png")
    make_image(tmp_path / "flat" / "a.jpg")
    assert [(r.image_id, r.category) for r in list_image_folder(tmp_path / "flat")] == [("a", None), ("b", None)]
    make_image(tmp_path / "cats" / "DRUS" / "u1.jpg")
    make_image(tmp_path / "cats" / "DRPE" / "p1.jpg")
    assert [(r.image_id, r.category) for r in list_image_folder(tmp_path / "cats")] == [("p1", "DRPE"), ("u1", "DRUS")]


def test_empty_or_imageless_folder_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images") as error:
        list_image_folder(tmp_path / "empty")
    assert error.value.path == tmp_path / "empty"
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "readme.txt").write_text("hello")
    with pytest.raises(DataError, match="no images"):
        list_image_folder(tmp_path / "text")
    with pytest.raises(DataError, match="not found"):
        list_image_folder(tmp_path / "absent")


def test_same_id_in_two_categories_is_an_error(tmp_path: Path) -> None:
    make_image(tmp_path / "t" / "DRCT" / "x.jpg")
    make_image(tmp_path / "t" / "DRMR" / "x.png")
    with pytest.raises(DataError, match="also used by"):
        list_image_folder(tmp_path / "t")


def test_categories_come_from_folder_names(dataset: Path) -> None:
    make_image(dataset / "train" / "MY_NEW_MODALITY" / "z.jpg")
    (dataset / "train" / "EMPTY").mkdir()
    assert discover_categories(dataset) == ["DRCT", "DRXR", "MY_NEW_MODALITY"]
