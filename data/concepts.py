"""Readers for the ground-truth concept files of every ImageCLEFmed Caption edition.

The challenge changed its file format almost every year, and ROCO ships yet another one, so the
format is detected from the first data line rather than chosen by the user:

- 2019/2020: ``ID<TAB>CUI;CUI`` (no header; the file is called ``*.csv`` anyway)
- 2022:      ``ID|CUI;CUI``
- 2025:      ``ID,CUIs`` header, then ``ID,CUI;CUI``
- ROCO:      ``ID<TAB>CUI<TAB>CUI...`` where extra fields may hold concept names

Image IDs become file names later, so an ID that could point outside the image folder is refused
here, at the line that introduced it, instead of surfacing as a confusing missing file.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from conceptclef.data.errors import ConceptFileError, DataError

CUI_PATTERN = re.compile(r"^C\d{7}$")
# A field that looks like an attempted CUI (a C followed by digits) must be a valid one, whereas
# other extra fields of a ROCO line are concept names and are ignored.
_CUI_ATTEMPT = re.compile(r"^C\d+$", re.IGNORECASE)
_ID_HEADERS = {"id", "image", "image_id", "imageid", "image id", "name"}
_CONCEPT_HEADERS = {"cuis", "cui", "concepts", "concept", "labels"}
_CATEGORY_HEADERS = {"category", "categories", "modality", "class"}


@dataclass(frozen=True)
class ConceptRow:
    """One image's concepts and the line they came from (for errors found later, e.g. in layout)."""

    image_id: str
    cuis: list[str]
    line: int


def read_concept_file(path: Path | str) -> dict[str, list[str]]:
    """Image ID -> list of upper-cased CUIs, in file order, whatever the edition's format."""
    return {row.image_id: row.cuis for row in read_concept_rows(path)}


def read_concept_rows(path: Path | str) -> list[ConceptRow]:
    """Like read_concept_file but keeps each row's line number."""
    path = Path(path)
    lines = _read_lines(path, ConceptFileError)
    delimiter = _detect_delimiter(lines)
    rows: list[ConceptRow] = []
    first_line: dict[str, int] = {}
    for number, text in lines:
        fields = _split(text, delimiter)
        if not rows and not first_line and _is_header(fields):
            continue
        image_id = check_image_id(fields[0], path, number, ConceptFileError)
        if image_id in first_line:
            raise ConceptFileError(
                path, f"duplicate image ID {image_id!r} (lines {first_line[image_id]} and {number})", number
            )
        first_line[image_id] = number
        rows.append(ConceptRow(image_id, _parse_cuis(fields[1:], path, number), number))
    return rows


def read_cui_list(path: Path | str) -> list[str]:
    """CUIs from a file of one CUI per line, or the first column of a CSV/TSV (header allowed)."""
    path = Path(path)
    lines = _read_lines(path, ConceptFileError)
    delimiter = _detect_delimiter(lines)
    cuis: dict[str, None] = {}
    for index, (number, text) in enumerate(lines):
        field = _split(text, delimiter)[0].strip().upper()
        if index == 0 and not _CUI_ATTEMPT.match(field):
            continue  # a header such as "CUI" or "concept"
        if not CUI_PATTERN.match(field):
            raise ConceptFileError(path, f"malformed CUI {field!r} (expected C and 7 digits)", number)
        cuis[field] = None
    if not cuis:
        raise ConceptFileError(path, "lists no CUI (one per line, or a CSV whose first column holds them)")
    return list(cuis)


def read_category_file(path: Path | str) -> dict[str, str]:
    """Image ID -> category from a CSV (or TSV) of ``ID,CATEGORY``; the header is optional."""
    path = Path(path)
    lines = _read_lines(path, DataError)
    delimiter = "\t" if any("\t" in text for _, text in lines) else ","
    categories: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for index, (number, text) in enumerate(lines):
        fields = [field.strip() for field in _split(text, delimiter)]
        if index == 0 and (fields[0].lower() in _ID_HEADERS or fields[-1].lower() in _CATEGORY_HEADERS):
            continue
        if len(fields) != 2 or not fields[1]:
            raise DataError(path, f"expected ID{delimiter}CATEGORY, got {text!r}", number)
        image_id = check_image_id(fields[0], path, number, DataError)
        if image_id in first_line:
            both = f"lines {first_line[image_id]} and {number}"
            raise DataError(path, f"duplicate image ID {image_id!r} ({both})", number)
        first_line[image_id] = number
        categories[image_id] = fields[1]
    return categories


def check_image_id(raw: str, path: Path, line: int, error: type[DataError] = ConceptFileError) -> str:
    """Return the stripped ID, refusing one that could name a file outside the image folder."""
    image_id = raw.strip()
    if not image_id:
        raise error(path, "empty image ID", line)
    if (
        "/" in image_id
        or "\\" in image_id
        or ".." in image_id
        or ":" in image_id
        or image_id.startswith(".")
        or any(ord(character) < 32 for character in image_id)
    ):
        raise error(path, f"image ID {image_id!r} is not a plain file name (it could escape the image folder)", line)
    return image_id


def _read_lines(path: Path, error: type[DataError]) -> list[tuple[int, str]]:
    """Non-blank lines with 1-based numbers; BOM and CRLF tolerated."""
    if not path.is_file():
        raise error(path, "file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as problem:
        line = path.read_bytes()[: problem.start].count(b"\n") + 1
        raise error(path, "not UTF-8 text", line) from None
    return [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _detect_delimiter(lines: list[tuple[int, str]]) -> str | None:
    """The first delimiter (tab, then pipe, then comma) seen on a data line; None for ID-only files."""
    for delimiter in ("\t", "|", ","):
        if any(delimiter in text for _, text in lines[:50]):
            return delimiter
    return None


def _split(text: str, delimiter: str | None) -> list[str]:
    if delimiter is None:
        return [text]
    if delimiter == ",":
        return next(csv.reader([text]))
    return text.split(delimiter)


def _is_header(fields: list[str]) -> bool:
    first = fields[0].strip().lower()
    second = fields[1].strip().lower() if len(fields) > 1 else ""
    return first in _ID_HEADERS or second in _CONCEPT_HEADERS


def _parse_cuis(fields: list[str], path: Path, line: int) -> list[str]:
    """CUIs of one row; several fields (ROCO) may mix CUIs and concept names."""
    strict = len([field for field in fields if field.strip()]) <= 1
    cuis: dict[str, None] = {}
    for field in fields:
        for token in field.split(";"):
            token = token.strip().upper()
            if not token:
                continue
            if not strict and not _CUI_ATTEMPT.match(token):
                continue  # a concept name beside the CUI in ROCO's cuis.txt
            if not CUI_PATTERN.match(token):
                raise ConceptFileError(path, f"malformed CUI {token!r} (expected C and 7 digits)", line)
            cuis[token] = None
    return list(cuis)


def read_cui_names(path: Path | str) -> dict[str, str]:
    """CUI -> canonical name from the 2026 `cui_mapping.csv` (``CUI,name``; header optional), so
    reports can say "Tomography, X-Ray Computed" where a CUI alone means nothing to a reader."""
    path = Path(path)
    lines = _read_lines(path, ConceptFileError)
    delimiter = "\t" if any("\t" in text for _, text in lines[:50]) else ","
    names: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for index, (number, text) in enumerate(lines):
        fields = _split(text, delimiter)
        cui = fields[0].strip().upper()
        if index == 0 and not _CUI_ATTEMPT.match(cui):
            continue  # a header such as "CUI,Canonical name"
        if not CUI_PATTERN.match(cui) or len(fields) < 2:
            raise ConceptFileError(path, f"expected CUI{delimiter}NAME with a CUI of C and 7 digits, got {text!r}", number)
        if cui in first_line:
            raise ConceptFileError(path, f"duplicate CUI {cui} (lines {first_line[cui]} and {number})", number)
        first_line[cui] = number
        names[cui] = delimiter.join(fields[1:]).strip()
    return names
