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


def test_a_data_folder_is_not_an_image_folder(tmp_path: Path) -> None:
    """`--images DATA` instead of DATA/test: train/, valid/ and test/ are never read as one set."""
    data = tmp_path / "DATA"
    for split in ("train", "valid", "test"):
        make_image(data / split / f"{split}1.jpg")
    with pytest.raises(DataError) as error:
        list_image_folder(data)
    assert str(error.value) == f"{data}: this is a data folder (it holds test, train, valid), not an image folder: give one split, e.g. {data / 'test'}"


def test_sub_folders_of_a_flat_folder_are_left_out_with_the_warning(tmp_path: Path, caplog) -> None:
    make_image(tmp_path / "test" / "a.jpg")
    make_image(tmp_path / "test" / "more" / "b.jpg")  # would have been image ID "b" of category "more"
    make_image(tmp_path / "test" / "train" / "t.jpg")
    with caplog.at_level("WARNING", logger="conceptclef"):
        assert [record.image_id for record in list_image_folder(tmp_path / "test")] == ["a"]
    assert caplog.messages == [
        f"{tmp_path / 'test'}: skipped 2 entries that are not readable images: "
        f"{tmp_path / 'test' / 'more'} (a folder inside a flat image folder (its images are not read)), "
        f"{tmp_path / 'test' / 'train'} (a split folder: give it alone as the image folder)"
    ]


def test_the_2020_test_layout_keeps_its_category_folders(tmp_path: Path) -> None:
    make_image(tmp_path / "test" / "DRCT" / "c1.jpg")
    make_image(tmp_path / "test" / "DRXR" / "x1.jpg")
    make_image(tmp_path / "test" / "DRXR" / "deeper" / "lost.jpg")
    records = list_image_folder(tmp_path / "test")
    assert [(record.image_id, record.category) for record in records] == [("c1", "DRCT"), ("x1", "DRXR")]


def test_a_training_split_mixing_flat_images_and_category_folders_is_an_error(dataset: Path) -> None:
    make_image(dataset / "train" / "synpic4.jpg")
    with pytest.raises(DataError, match="synpic4.jpg: this image lies directly in .* while others are in its sub-folders \\(DRCT, DRXR\\)"):
        load_split(dataset, "train")
