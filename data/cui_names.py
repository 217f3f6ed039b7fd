"""Concept names for reports: the 2026 ``cui_mapping.csv`` (CUI, canonical name).

Names only make a per-concept report readable; nothing is learned from them. The header is
optional, the delimiter a comma (names with commas are quoted) or a tab.
"""

from __future__ import annotations

import csv
from pathlib import Path

from conceptclef.data.concepts import CUI_PATTERN
from conceptclef.data.errors import ConceptFileError


def read_cui_names(path: Path | str) -> dict[str, str]:
    """CUI (upper-case) -> name; a malformed CUI or a repeated one is an error naming the line."""
    path = Path(path)
    if not path.is_file():
        raise ConceptFileError(path, "file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as problem:
        raise ConceptFileError(path, "not UTF-8 text", path.read_bytes()[: problem.start].count(b"\n") + 1) from None
    lines = text.splitlines()
    delimiter = "\t" if lines and "\t" in lines[0] else ","
    names: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for number, fields in enumerate(csv.reader(lines, delimiter=delimiter), start=1):
        if not fields or not "".join(fields).strip():
            continue
        cui = fields[0].strip().upper()
        if number == 1 and not CUI_PATTERN.match(cui):
            continue  # the header, e.g. "CUI,Canonical name"
        if not CUI_PATTERN.match(cui) or len(fields) < 2:
            raise ConceptFileError(path, f"expected CUI{delimiter}name, got {delimiter.join(fields)!r}", number)
        if cui in first_line:
            raise ConceptFileError(path, f"CUI {cui} named twice (lines {first_line[cui]} and {number})", number)
        first_line[cui] = number
        names[cui] = fields[1].strip()
    return names
