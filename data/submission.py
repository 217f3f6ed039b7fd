"""Challenge submission files: writing, reading, and checking them against the rules.

Formats: 2020 is ``ID<TAB>CUI;CUI`` per line without header; 2025 is a CSV with header
``ID,CUIs`` then ``ID,CUI;CUI``. The organisers reject a run that lists a test image twice, misses
one, names an unknown image, repeats a concept within an image or gives more than 100 concepts,
so `validate_submission` checks exactly these before a run is uploaded (runs per team are limited).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from conceptclef.core.runfiles import atomic_write_text
from conceptclef.data.concepts import CUI_PATTERN
from conceptclef.data.errors import SubmissionError

FORMATS = ("2020", "2025")
MAX_CONCEPTS_PER_IMAGE = 100
_HEADER_2025 = ("ID", "CUIs")


@dataclass(frozen=True)
class SubmissionRow:
    image_id: str
    concepts: list[str]  # as written: not de-duplicated, so validation can see repeats
    line: int


def write_submission(
    path: Path | str, predictions: Mapping[str, Sequence[str]], format: str = "2020"
) -> None:
    """Write predictions (image ID -> CUIs, in mapping order) atomically in a challenge format."""
    path = Path(path)
    _check_format(path, format)
    lines: list[str] = ["ID,CUIs"] if format == "2025" else []
    for image_id, concepts in predictions.items():
        if not image_id or any(character in image_id for character in "\t,;\r\n"):
            raise SubmissionError(path, f"image ID {image_id!r} cannot be written in a submission")
        joined = ";".join(concept.strip().upper() for concept in concepts)
        lines.append(f"{image_id},{joined}" if format == "2025" else f"{image_id}\t{joined}")
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_submission(path: Path | str, format: str | None = None) -> dict[str, list[str]]:
    """Image ID -> concepts (upper-cased, repeats dropped); the format is sniffed when None.

    Structure errors and repeated image IDs raise SubmissionError; the rules on concepts are left
    to validate_submission so that a rough submission can still be scored.
    """
    path = Path(path)
    return {
        row.image_id: list(dict.fromkeys(concept.upper() for concept in row.concepts))
        for row in _once_each(path, read_submission_rows(path, format))
    }


def _once_each(path: Path, rows: list[SubmissionRow]) -> Iterator[SubmissionRow]:
    """The rows in order; an image ID seen before is an error naming both lines."""
    first_line: dict[str, int] = {}
    for row in rows:
        if row.image_id in first_line:
            raise SubmissionError(
                path, f"image {row.image_id!r} listed twice (lines {first_line[row.image_id]} and {row.line})", row.line
            )
        first_line[row.image_id] = row.line
        yield row


def read_submission_rows(path: Path | str, format: str | None = None) -> list[SubmissionRow]:
    """Every data row with its line number, as written."""
    path = Path(path)
    lines = _read_lines(path)
    if format is None:
        format = sniff_format(lines)
    _check_format(path, format)
    rows: list[SubmissionRow] = []
    for index, (number, text) in enumerate(lines):
        if format == "2025":
            fields = next(csv.reader(io.StringIO(text)))
            if index == 0 and [field.strip().lower() for field in fields] == [name.lower() for name in _HEADER_2025]:
                continue
            if index == 0 and fields and fields[0].strip().lower() == "id":
                raise SubmissionError(path, f"header must be {','.join(_HEADER_2025)}, got {text!r}", number)
        else:
            fields = text.split("\t")
        if len(fields) > 2:
            separator = "a comma" if format == "2025" else "a tab"
            raise SubmissionError(path, f"expected ID, {separator}, then CUIs separated by ';'; got {text!r}", number)
        image_id = fields[0].strip()
        if not image_id:
            raise SubmissionError(path, "empty image ID", number)
        concept_text = fields[1] if len(fields) == 2 else ""
        concepts = [concept.strip() for concept in concept_text.split(";") if concept.strip()]
        rows.append(SubmissionRow(image_id, concepts, number))
    return rows


def validate_submission(path: Path | str, image_ids: Iterable[str], format: str | None = None) -> int:
    """Check a submission against the challenge rules for the given test images; return the image count."""
    path = Path(path)
    lines = _read_lines(path)
    if format is None:
        format = sniff_format(lines)
    if format == "2025" and lines:
        header = [field.strip().lower() for field in next(csv.reader(io.StringIO(lines[0][1])))]
        if header != [name.lower() for name in _HEADER_2025]:
            raise SubmissionError(path, f"2025 submissions start with the header {','.join(_HEADER_2025)}", lines[0][0])
    expected = set(image_ids)
    listed: set[str] = set()
    for row in _once_each(path, read_submission_rows(path, format)):
        if row.image_id not in expected:
            raise SubmissionError(path, f"unknown image ID {row.image_id!r} (not a test image)", row.line)
        _check_concepts(path, row)
        listed.add(row.image_id)
    missing = sorted(expected - listed)
    if missing:
        examples = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise SubmissionError(path, f"{len(missing)} of {len(expected)} test images are missing: {examples}")
    return len(listed)


def sniff_format(lines: list[tuple[int, str]]) -> str:
    """2020 when the first line has a tab or no delimiter at all, 2025 for a comma-separated file."""
    if not lines:
        return "2020"
    first = lines[0][1]
    if "\t" in first:
        return "2020"
    return "2025" if "," in first or first.strip().lower() == "id" else "2020"


def _check_concepts(path: Path, row: SubmissionRow) -> None:
    seen: set[str] = set()
    for concept in row.concepts:
        cui = concept.upper()
        if not CUI_PATTERN.match(cui):
            raise SubmissionError(path, f"malformed CUI {concept!r} for image {row.image_id!r}", row.line)
        if cui in seen:
            raise SubmissionError(path, f"concept {cui} repeated for image {row.image_id!r}", row.line)
        seen.add(cui)
    if len(seen) > MAX_CONCEPTS_PER_IMAGE:
        raise SubmissionError(
            path, f"{len(seen)} concepts for image {row.image_id!r} (at most {MAX_CONCEPTS_PER_IMAGE})", row.line
        )


def _check_format(path: Path, format: str) -> None:
    if format not in FORMATS:
        raise SubmissionError(path, f"unknown submission format {format!r} (expected {' or '.join(FORMATS)})")


def _read_lines(path: Path) -> list[tuple[int, str]]:
    if not path.is_file():
        raise SubmissionError(path, "submission file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise SubmissionError(path, "not UTF-8 text") from None
    return [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
