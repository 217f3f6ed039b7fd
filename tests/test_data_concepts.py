"""Concept, CUI-list and category readers across the challenge's formats and failure modes."""

from __future__ import annotations

from pathlib import Path

import pytest

from conceptclef.data.concepts import read_category_file, read_concept_file, read_concept_rows, read_cui_list
from conceptclef.data.errors import ConceptFileError, DataError


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


EXPECTED = {"synpic100": ["C0040405", "C0817096"], "synpic101": ["C1306645"]}


@pytest.mark.parametrize(
    "text",
    [
        "synpic100\tC0040405;C0817096\nsynpic101\tC1306645\n",  # 2019/2020
        "synpic100|C0040405;C0817096\nsynpic101|C1306645\n",  # 2022
        "ID,CUIs\nsynpic100,C0040405;C0817096\nsynpic101,C1306645\n",  # 2025
        "synpic100\tC0040405\tC0817096\nsynpic101\tC1306645\n",  # ROCO cuis.txt
        "synpic100\tC0040405\tTomography, X-Ray Computed\tC0817096\tChest\nsynpic101\tC1306645\tPlain x-ray\n",
    ],
    ids=["2020-tsv", "2022-pipe", "2025-csv", "roco", "roco-with-names"],
)
def test_every_edition_format_reads_the_same(tmp_path: Path, text: str) -> None:
    assert read_concept_file(write(tmp_path / "concepts.csv", text)) == EXPECTED


def test_crlf_bom_blank_lines_lowercase_and_empty_rows(tmp_path: Path) -> None:
    text = "\ufeffsynpic100\tc0040405;C0817096\r\n\r\nsynpic101\tC1306645\r\nsynpic102\t\r\nsynpic103\r\n"
    concepts = read_concept_file(write(tmp_path / "c.csv", text))
    assert concepts == {**EXPECTED, "synpic102": [], "synpic103": []}


def test_2025_header_with_empty_row(tmp_path: Path) -> None:
    path = write(tmp_path / "c.csv", "\ufeffID,CUIs\r\nimg_1,C0040405\r\nimg_2,\r\n")
    assert read_concept_file(path) == {"img_1": ["C0040405"], "img_2": []}


def test_rows_keep_their_line_numbers(tmp_path: Path) -> None:
    path = write(tmp_path / "c.csv", "ID,CUIs\n\nimg_1,C0040405\nimg_2,C0817096\n")
    assert [(row.image_id, row.line) for row in read_concept_rows(path)] == [("img_1", 3), ("img_2", 4)]


def test_malformed_cui_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.csv", "synpic1\tC0040405\nsynpic2\tC0040405;C12345\n")
    with pytest.raises(ConceptFileError) as error:
        read_concept_file(path)
    assert error.value.line == 2 and str(path) in str(error.value) and "C12345" in str(error.value)
    assert str(error.value).startswith(f"{path}:2:")


def test_malformed_cui_in_roco_line(tmp_path: Path) -> None:
    path = write(tmp_path / "cuis.txt", "ROCO_00001\tC0040405\tC004040\n")
    with pytest.raises(ConceptFileError, match=r"cuis.txt:1: malformed CUI 'C004040'"):
        read_concept_file(path)


def test_duplicate_id_names_both_lines(tmp_path: Path) -> None:
    path = write(tmp_path / "dup.csv", "a\tC0040405\nb\tC0040405\na\tC0817096\n")
    with pytest.raises(ConceptFileError, match=r"dup.csv:3: duplicate image ID 'a' \(lines 1 and 3\)"):
        read_concept_file(path)


@pytest.mark.parametrize("bad_id", ["../etc/passwd", "sub/img", "sub\\img", "..", ".hidden", "C:img"])
def test_ids_that_could_escape_the_image_folder(tmp_path: Path, bad_id: str) -> None:
    path = write(tmp_path / "c.csv", f"ok\tC0040405\n{bad_id}\tC0040405\n")
    with pytest.raises(ConceptFileError) as error:
        read_concept_file(path)
    assert error.value.line == 2 and "escape" in str(error.value)


def test_missing_file_and_non_utf8(tmp_path: Path) -> None:
    with pytest.raises(ConceptFileError, match="not found"):
        read_concept_file(tmp_path / "absent.csv")
    path = tmp_path / "latin.csv"
    path.write_bytes(b"a\tC0040405\nb\xe9\tC0040405\n")
    with pytest.raises(ConceptFileError, match=r"latin.csv:2: not UTF-8"):
        read_concept_file(path)


def test_cui_list_one_per_line_and_csv_column(tmp_path: Path) -> None:
    assert read_cui_list(write(tmp_path / "a.txt", "c0040405\n\nC0817096\r\nC0040405\n")) == ["C0040405", "C0817096"]
    csv_list = write(tmp_path / "b.csv", "CUI,Name\nC0040405,CT\nC0817096,Chest\n")
    assert read_cui_list(csv_list) == ["C0040405", "C0817096"]
    with pytest.raises(ConceptFileError, match=r"c.txt:2: malformed CUI"):
        read_cui_list(write(tmp_path / "c.txt", "C0040405\nX1\n"))


def test_category_file_with_and_without_header(tmp_path: Path) -> None:
    assert read_category_file(write(tmp_path / "a.csv", "ID,CATEGORY\ni1,DRCT\ni2,DRXR\n")) == {"i1": "DRCT", "i2": "DRXR"}
    assert read_category_file(write(tmp_path / "b.csv", "i1,DRCT\r\ni2,DRXR\r\n")) == {"i1": "DRCT", "i2": "DRXR"}
    with pytest.raises(DataError, match=r"c.csv:2: expected ID,CATEGORY"):
        read_category_file(write(tmp_path / "c.csv", "i1,DRCT\ni2\n"))
    with pytest.raises(DataError, match=r"lines 1 and 2"):
        read_category_file(write(tmp_path / "d.csv", "i1,DRCT\ni1,DRXR\n"))
