"""Challenge submission files: writing, reading, and checking them against the rules.

Formats: 2020 is ``ID<TAB>CUI;CUI`` per line without header; 2022 is ``ID|CUI;CUI`` (read only);
2025 (also 2026) is a CSV with header ``ID,CUIs`` then ``ID,CUI;CUI``. The organisers reject a run
that lists a test image twice, misses one, names an unknown image, repeats a concept within an
image or gives more than 100 concepts, so `validate_submission` checks exactly these before a run
is uploaded (runs per team are limited). For 2025 files it also applies the stricter 2025/2026
upload checker: header exactly ``ID,CUIs``, UTF-8 without BOM, no blank line, no whitespace
around a field, no empty CUIs field, upper-case CUIs, no empty CUI between separators.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from conceptclef.core.runfiles import atomic_output, atomic_write_text
from conceptclef.data.concepts import CUI_PATTERN
from conceptclef.data.errors import SubmissionError

FORMATS = ("2020", "2025")  # what predict writes
READ_FORMATS = ("2020", "2022", "2025")  # what evaluate reads
FORMAT_ALIASES = {"2026": "2025"}  # 2026 kept the 2025 format and checker


def canonical_format(format: str | None) -> str | None:
    """The format a name stands for: 2026 is the 2025 format."""
    return FORMAT_ALIASES.get(format, format) if format is not None else None
MAX_CONCEPTS_PER_IMAGE = 100
UPLOAD_MEMBER = "submission.csv"  # the only file the 2025/2026 challenge site takes inside the zip
_HEADER_2025 = ("ID", "CUIs")
_UNWRITABLE_IN_ID = "\t,;|\"\r\n"
_ZIP_TIMESTAMP = (1980, 1, 1, 0, 0, 0)  # fixed, so the same submission gives a byte-identical zip


@dataclass(frozen=True)
class SubmissionRow:
    image_id: str
    concepts: list[str]  # as written: not de-duplicated, so validation can see repeats
    line: int


def natural_key(image_id: str) -> tuple:
    """Sort key putting ``..._test_2`` before ``..._test_10`` (digit runs compare as numbers)."""
    parts = re.split(r"(\d+)", image_id)
    return tuple(int(part) if index % 2 else part for index, part in enumerate(parts)), image_id


def write_submission(
    path: Path | str, predictions: Mapping[str, Sequence[str]], format: str = "2020"
) -> None:
    """Write predictions (image ID -> CUIs, most probable first) atomically in a challenge format.

    Rows come in the IDs' natural order. Anything the official checker would reject (a malformed
    or repeated CUI, more than 100 concepts, and for 2025 an image without any concept) is refused
    here with the image named, so the file on disk always passes `validate_submission`.
    """
    path = Path(path)
    format = canonical_format(format) or format
    _check_format(path, format, FORMATS)
    lines: list[str] = [",".join(_HEADER_2025)] if format == "2025" else []
    for image_id in sorted(predictions, key=natural_key):
        concepts = _writable_concepts(path, image_id, predictions[image_id], needs_one=format == "2025")
        joined = ";".join(concepts)
        lines.append(f"{image_id},{joined}" if format == "2025" else f"{image_id}\t{joined}")
    text = "\n".join(lines) + "\n"
    if format == "2025":
        check_upload_2025(path, text.encode("utf-8"), predictions.keys())
    atomic_write_text(path, text)


def _writable_concepts(path: Path, image_id: str, concepts: Sequence[str], needs_one: bool) -> list[str]:
    if not image_id or image_id != image_id.strip() or any(character in image_id for character in _UNWRITABLE_IN_ID):
        raise SubmissionError(path, f"image ID {image_id!r} cannot be written in a submission")
    written: list[str] = []
    for concept in concepts:
        cui = concept.strip().upper()
        if not CUI_PATTERN.match(cui):
            raise SubmissionError(path, f"cannot write malformed CUI {concept!r} for image {image_id!r}")
        if cui in written:
            raise SubmissionError(path, f"concept {cui} given twice for image {image_id!r}")
        written.append(cui)
    if needs_one and not written:
        raise SubmissionError(
            path, f"image {image_id!r} has no concept; the 2025/2026 checker rejects an empty CUIs field"
        )
    if len(written) > MAX_CONCEPTS_PER_IMAGE:
        raise SubmissionError(
            path, f"{len(written)} concepts for image {image_id!r} (at most {MAX_CONCEPTS_PER_IMAGE})"
        )
    return written


def write_upload_zip(submission_path: Path | str, zip_path: Path | str) -> Path:
    """The archive the 2025/2026 challenge site takes: one member, ``submission.csv``, nothing else."""
    submission_path, zip_path = Path(submission_path), Path(zip_path)
    data = submission_path.read_bytes()
    member = zipfile.ZipInfo(UPLOAD_MEMBER, date_time=_ZIP_TIMESTAMP)
    member.compress_type = zipfile.ZIP_DEFLATED
    member.external_attr = 0o644 << 16
    with atomic_output(zip_path, "wb") as stream:
        with zipfile.ZipFile(stream, "w") as archive:
            archive.writestr(member, data)
    return zip_path


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


def read_scorable_submission(path: Path | str, truth_ids: Iterable[str]) -> dict[str, list[str]]:
    """Read a submission the way the official evaluator does, refusing what it refuses.

    The evaluator rejects an empty file, a repeated or unknown image, a concept repeated within an
    image, more than 100 concepts, and any ground-truth image left out; scoring such a file
    anyway would give a figure the challenge never would. Concepts are compared upper-cased.
    """
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise SubmissionError(path, "empty file (0 bytes); the official evaluator refuses it")
    rows = read_submission_rows(path)
    truth = list(truth_ids)
    known = set(truth)
    predictions: dict[str, list[str]] = {}
    for row in _once_each(path, rows):
        if row.image_id not in known:
            raise SubmissionError(path, f"image {row.image_id!r} is not in the ground truth", row.line)
        predictions[row.image_id] = _check_concept_count_and_repeats(path, row)
    missing = [image_id for image_id in truth if image_id not in predictions]
    if missing:
        raise SubmissionError(
            path, f"{len(missing)} of {len(truth)} ground-truth images are missing: {_examples(missing)}"
        )
    return predictions


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
    format = canonical_format(format) or sniff_format(lines)
    _check_format(path, format, READ_FORMATS)
    rows: list[SubmissionRow] = []
    for index, (number, text) in enumerate(lines):
        if format == "2025":
            fields = next(csv.reader(io.StringIO(text)))
            if index == 0 and [field.strip().lower() for field in fields] == [name.lower() for name in _HEADER_2025]:
                continue
            if index == 0 and fields and fields[0].strip().lower() == "id":
                raise SubmissionError(path, f"header must be {','.join(_HEADER_2025)}, got {text!r}", number)
        else:
            fields = text.split("\t" if format == "2020" else "|")
            if format == "2022" and index == 0 and fields[0].strip().lower() == "id":
                continue
        if len(fields) > 2:
            separator = {"2025": "a comma", "2020": "a tab", "2022": "a '|'"}[format]
            raise SubmissionError(path, f"expected ID, {separator}, then CUIs separated by ';'; got {text!r}", number)
        image_id = fields[0].strip()
        if not image_id:
            raise SubmissionError(path, "empty image ID", number)
        concept_text = fields[1] if len(fields) == 2 else ""
        concepts = [concept.strip() for concept in concept_text.split(";") if concept.strip()]
        rows.append(SubmissionRow(image_id, concepts, number))
    return rows


def validate_submission(path: Path | str, image_ids: Iterable[str], format: str | None = None) -> int:
    """Check a submission against the challenge rules for the given test images; return the image count.

    A ``.zip`` is checked as the 2025/2026 upload: exactly one member, ``submission.csv``.
    """
    path = Path(path)
    if path.suffix.lower() == ".zip":
        return check_upload_2025(path, _read_upload_zip(path), image_ids)
    lines = _read_lines(path)
    format = canonical_format(format) or sniff_format(lines)
    _check_format(path, format, READ_FORMATS)
    if format == "2025":
        return check_upload_2025(path, path.read_bytes(), image_ids)
    if not lines:
        size = path.stat().st_size
        raise SubmissionError(path, "empty file (0 bytes)" if size == 0 else "no image is listed (only blank lines)")
    expected = set(image_ids)
    listed: set[str] = set()
    for row in _once_each(path, read_submission_rows(path, format)):
        if row.image_id not in expected:
            raise SubmissionError(path, f"unknown image ID {row.image_id!r} (not a test image)", row.line)
        _check_concepts(path, row)
        listed.add(row.image_id)
    missing = sorted(expected - listed, key=natural_key)
    if missing:
        raise SubmissionError(path, f"{len(missing)} of {len(expected)} test images are missing: {_examples(missing)}")
    return len(listed)


def check_upload_2025(path: Path, data: bytes, image_ids: Iterable[str]) -> int:
    """The 2025/2026 upload checker's rules on a file's bytes; return the image count.

    Each broken rule is one SubmissionError naming the line, in the order the checker meets them.
    """
    if not data:
        raise SubmissionError(path, f"empty file (0 bytes); expected the header {','.join(_HEADER_2025)}")
    if data.startswith(codecs.BOM_UTF8):
        raise SubmissionError(path, "starts with a UTF-8 byte-order mark (BOM); save it as UTF-8 without BOM", 1)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as problem:
        raise SubmissionError(path, "not UTF-8 text", data[: problem.start].count(b"\n") + 1) from None
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise SubmissionError(path, "blank line (the 2025/2026 checker allows none)", number)
    if _csv_fields(path, lines[0], 1) != list(_HEADER_2025):
        raise SubmissionError(path, f"header must be exactly {','.join(_HEADER_2025)}, got {lines[0]!r}", 1)
    expected = set(image_ids)
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines[1:], start=2):
        image_id, concepts = _upload_row(path, line, number)
        if image_id in first_line:
            raise SubmissionError(path, f"image {image_id!r} listed twice (lines {first_line[image_id]} and {number})", number)
        first_line[image_id] = number
        if image_id not in expected:
            raise SubmissionError(path, f"unknown image ID {image_id!r} (not a test image)", number)
        _check_concepts(path, SubmissionRow(image_id, concepts, number), case_sensitive=True)
    missing = sorted(expected - first_line.keys(), key=natural_key)
    if missing:
        raise SubmissionError(path, f"{len(missing)} of {len(expected)} test images are missing: {_examples(missing)}")
    return len(first_line)


def _upload_row(path: Path, line: str, number: int) -> tuple[str, list[str]]:
    fields = _csv_fields(path, line, number)
    if len(fields) != 2:
        raise SubmissionError(path, f"expected exactly 2 columns ID,CUIs, got {len(fields)}: {line!r}", number)
    image_id, cuis = fields
    if not image_id.strip():
        raise SubmissionError(path, "empty image ID", number)
    if image_id != image_id.strip():
        raise SubmissionError(path, f"whitespace around the image ID {image_id!r}", number)
    if cuis != cuis.strip():
        raise SubmissionError(path, f"whitespace around the CUIs field {cuis!r} of image {image_id!r}", number)
    if not cuis:
        raise SubmissionError(
            path, f"image {image_id!r} has no concept; the 2025/2026 checker rejects an empty CUIs field", number
        )
    concepts = [concept.strip() for concept in cuis.split(";")]
    if not all(concepts):
        raise SubmissionError(
            path, f"empty CUI in {cuis!r} of image {image_id!r} (a trailing ';' or ';;')", number
        )
    return image_id, concepts


def _csv_fields(path: Path, line: str, number: int) -> list[str]:
    try:
        return next(csv.reader([line]), [])
    except csv.Error as problem:
        raise SubmissionError(path, f"not a CSV row ({problem}): {line!r}", number) from None


def _read_upload_zip(path: Path) -> bytes:
    if not path.is_file():
        raise SubmissionError(path, "submission file not found")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if names != [UPLOAD_MEMBER]:
                raise SubmissionError(path, f"the upload zip must hold only {UPLOAD_MEMBER}, it holds {names}")
            return archive.read(UPLOAD_MEMBER)
    except zipfile.BadZipFile:
        raise SubmissionError(path, "not a zip archive") from None


def sniff_format(lines: list[tuple[int, str]]) -> str:
    """2020 for a tab (or no delimiter at all), 2022 for a '|', 2025 for a comma-separated file."""
    if not lines:
        return "2020"
    first = lines[0][1]
    if "\t" in first:
        return "2020"
    if "|" in first:
        return "2022"
    return "2025" if "," in first or first.strip().lower() == "id" else "2020"


def _check_concepts(path: Path, row: SubmissionRow, case_sensitive: bool = False) -> None:
    """CUIs well formed; the 2025/2026 checker also wants them upper-case (2020's upper-cased them)."""
    for concept in row.concepts:
        if not CUI_PATTERN.match(concept.upper()):
            raise SubmissionError(path, f"malformed CUI {concept!r} for image {row.image_id!r}", row.line)
        if case_sensitive and not CUI_PATTERN.match(concept):
            raise SubmissionError(path, f"lower-case CUI {concept!r} for image {row.image_id!r} (write C and digits)", row.line)
    _check_concept_count_and_repeats(path, row)


def _check_concept_count_and_repeats(path: Path, row: SubmissionRow) -> list[str]:
    seen: dict[str, None] = {}
    for concept in row.concepts:
        cui = concept.upper()
        if cui in seen:
            raise SubmissionError(path, f"concept {cui} repeated for image {row.image_id!r}", row.line)
        seen[cui] = None
    if len(seen) > MAX_CONCEPTS_PER_IMAGE:
        raise SubmissionError(
            path, f"{len(seen)} concepts for image {row.image_id!r} (at most {MAX_CONCEPTS_PER_IMAGE})", row.line
        )
    return list(seen)


def _examples(image_ids: list[str]) -> str:
    return ", ".join(image_ids[:5]) + (", ..." if len(image_ids) > 5 else "")


def _check_format(path: Path, format: str, allowed: tuple[str, ...]) -> None:
    if format not in allowed:
        raise SubmissionError(path, f"unknown submission format {format!r} (expected {' or '.join(allowed)})")


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """The non-blank lines of a submission, or of the submission.csv inside a 2025/2026 upload zip."""
    if not path.is_file():
        raise SubmissionError(path, "submission file not found")
    try:
        if path.suffix.lower() == ".zip":
            text = _read_upload_zip(path).decode("utf-8-sig")
        else:
            text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise SubmissionError(path, "not UTF-8 text") from None
    return [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
