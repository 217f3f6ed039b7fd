"""Bad input through the user-facing entry points: the CLI and the pipeline functions it calls.

The tool runs for hours on other people's data, so garbage must never pass silently. Each case
ends either in one clear line (`error: path[:line]: problem`, exit code 2, no traceback) naming the
file to fix and, for text files, the line; or, where the user asked to skip bad images
(`data.skip_bad_images = true`), in a warning with a count. Failing never destroys earlier work:
an old submission and an existing run directory are left as they were.

Module-level checks of the same readers live in tests/test_data_*.py; here every case starts from
a corrupted copy of one small demo dataset. Cases that fail before training need no model; the
ones that predict share one tiny run trained once (configs/test.toml) and are marked slow.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile
from typer.testing import CliRunner

from cli_helpers import cli_error
from conceptclef.cli import app
from conceptclef.core.config import load_config
from conceptclef.data.concepts import read_concept_file
from conceptclef.data.demo import make_demo_dataset
from conceptclef.data.errors import ConceptFileError
from conceptclef.data.images import load_resized_array
from conceptclef.data.submission import write_submission
from conceptclef.pipeline.image_sets import load_training_sets
from conceptclef.pipeline.stages.evaluate import evaluate_submission, validate_submission_file

REPO = Path(__file__).resolve().parents[1]
TEST_CONFIG = REPO / "configs" / "test.toml"
BOMB_SIDE = 30_000
runner = CliRunner()


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The module's demo dataset; tests corrupt copies of it, never this."""
    out = tmp_path_factory.mktemp("reliability") / "DATA"
    make_demo_dataset(out, n_train=70, n_valid=35, n_test=20, seed=0, image_size=48)
    return out


@pytest.fixture()
def data(pristine: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "DATA"
    shutil.copytree(pristine, copy, ignore=shutil.ignore_patterns(".cache"))
    return copy


def cli_ok(*args: object) -> str:
    result = runner.invoke(app, [str(arg) for arg in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def train_all_error(data: Path, out: Path, *extra: object) -> str:
    """train-all refused before training: the run directory is not even created."""
    message = cli_error("train-all", "--data", data, "--out", out, "--config", TEST_CONFIG, *extra)
    assert not out.exists()
    return message


def concept_lines(data: Path, split: str = "train") -> list[str]:
    return (data / f"{split}_concepts.csv").read_text().splitlines()


def write_concept_lines(data: Path, lines: list[str], split: str = "train") -> Path:
    path = data / f"{split}_concepts.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def image_at(data: Path, line: int, split: str = "train") -> tuple[str, Path]:
    """The ID listed at a (1-based) line of a split's concept file, and its image file."""
    image_id = concept_lines(data, split)[line - 1].split("\t")[0]
    return image_id, next((data / split).rglob(f"{image_id}.*"))


def png_bomb(side: int) -> bytes:
    """A valid PNG signature and IHDR claiming side x side pixels over a few bytes of data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def jpeg_bomb(side: int) -> bytes:
    """SOI, a baseline SOF0 claiming side x side RGB pixels, SOS and a few bytes: 53 bytes in all."""

    def segment(marker: bytes, payload: bytes) -> bytes:
        return b"\xff" + marker + struct.pack(">H", len(payload) + 2) + payload

    frame = struct.pack(">BHHB", 8, side, side, 3) + b"".join(struct.pack(">BBB", c, 0x11, 0) for c in (1, 2, 3))
    scan = struct.pack(">B", 3) + b"".join(struct.pack(">BB", c, 0) for c in (1, 2, 3)) + b"\x00\x3f\x00"
    return b"\xff\xd8" + segment(b"\xc0", frame) + segment(b"\xda", scan) + b"\x00" * 16 + b"\xff\xd9"


BAD_IMAGES = {
    # kind: what the one-line error says about it
    "zero-byte": "empty image file (0 bytes)",
    "truncated-jpeg": "cannot decode image: image file is truncated",
    "text-named-jpg": "not an image Pillow can read (wrong extension or damaged file)",
    "png-30000x30000-header": f"refused: image too large to decode safely (Image size ({BOMB_SIDE**2} pixels)",
    "jpeg-30000x30000-header": f"refused: image too large to decode safely (Image size ({BOMB_SIDE**2} pixels)",
}


def spoil(path: Path, kind: str) -> Path:
    """Turn one image file into a bad one; returns the file now holding it (PNGs get .png)."""
    if kind == "zero-byte":
        path.write_bytes(b"")
    elif kind == "truncated-jpeg":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "text-named-jpg":
        path.write_text("<html><body>404 Not Found</body></html>\n")
    elif kind == "png-30000x30000-header":
        path.unlink()
        path = path.with_suffix(".png")
        path.write_bytes(png_bomb(BOMB_SIDE))
    elif kind == "jpeg-30000x30000-header":
        path.write_bytes(jpeg_bomb(BOMB_SIDE))
    else:
        raise ValueError(kind)
    return path


def to_cmyk(path: Path) -> Path:
    with Image.open(path) as image:
        cmyk = image.convert("CMYK")
    cmyk.save(path, format="JPEG")
    assert Image.open(path).mode == "CMYK"
    return path


def to_16_bit(path: Path) -> Path:
    """The same picture as a 16-bit grayscale PNG spanning only part of the range (as scans do)."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L"), dtype=np.uint16) * 64 + 1000
    path.unlink()
    path = path.with_suffix(".png")
    Image.fromarray(pixels).save(path)
    assert Image.open(path).mode == "I;16"
    return path


@pytest.fixture()
def decoded_sizes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Sizes of every image whose pixels Pillow decodes during the test."""
    sizes: list[tuple[int, int]] = []
    original = ImageFile.ImageFile.load

    def load(self):  # noqa: ANN001, ANN202
        sizes.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return sizes


def skip_bad_config(tmp_path: Path) -> Path:
    path = tmp_path / "skip.toml"
    path.write_text("seed = 0\ndevice = \"cpu\"\n\n[data]\nimage_size = 32\nskip_bad_images = true\n")
    return path


# ---------------------------------------------------------------- bad images in the training data


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_bad_training_image_is_one_line_naming_image_and_concept_line(
    data: Path, tmp_path: Path, kind: str, decoded_sizes: list[tuple[int, int]]
) -> None:
    image_id, path = image_at(data, 9)
    bad = spoil(path, kind)
    message = train_all_error(data, tmp_path / "run")
    assert message.startswith(f"error: {bad}: {BAD_IMAGES[kind]}")  # the image and the reason...
    assert message.endswith(f" (image {image_id!r}, listed at {data / 'train_concepts.csv'}:9)")  # ...ends with its row
    assert (BOMB_SIDE, BOMB_SIDE) not in decoded_sizes  # a forged header is refused before any pixel is decoded
    assert len(decoded_sizes) >= 1  # the good images before it were decoded: the patch is in force


def test_bad_validation_image_is_found_before_training(data: Path, tmp_path: Path) -> None:
    image_id, path = image_at(data, 3, "valid")
    spoil(path, "zero-byte")
    message = train_all_error(data, tmp_path / "run")
    expected = f"error: {path}: empty image file (0 bytes) (image {image_id!r}, listed at {data / 'valid_concepts.csv'}:3)"
    assert message == expected


def test_bad_images_are_skipped_with_a_warning_and_count_when_asked(
    data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad_train = [spoil(image_at(data, line)[1], kind) for line, kind in zip((4, 11, 20, 33, 50), sorted(BAD_IMAGES))]
    bad_valid = spoil(image_at(data, 6, "valid")[1], "truncated-jpeg")
    bad_ids = {path.stem for path in bad_train}
    config = load_config(skip_bad_config(tmp_path))
    with caplog.at_level(logging.WARNING, logger="conceptclef"), pytest.warns(UserWarning) as recorded:
        train, valid = load_training_sets(data, config)
    assert len(train.records) == 65 and len(valid.records) == 34
    assert not bad_ids & set(train.image_ids) and bad_valid.stem not in valid.image_ids
    assert train.images.shape == (65, 32, 32, 3) and np.asarray(train.images).reshape(65, -1).std(axis=1).min() > 0
    logged = [record.getMessage() for record in caplog.records]
    paths = ", ".join(str(path) for path in bad_train)
    assert f"train: skipped 5 of 70 unreadable images (data.skip_bad_images = true): {paths}" in logged
    assert f"valid: skipped 1 of 35 unreadable images (data.skip_bad_images = true): {bad_valid}" in logged
    assert any("5 of 70 images could not be read" in str(warning.message) for warning in recorded)


def test_skip_bad_images_from_the_command_line_still_refuses_bad_text(data: Path, tmp_path: Path) -> None:
    """skip_bad_images is about unreadable images only: a broken concept file is still an error."""
    spoil(image_at(data, 2)[1], "zero-byte")
    lines = concept_lines(data)
    lines[6] = lines[6].split("\t")[0] + "\tC0040405;c00404"
    concepts = write_concept_lines(data, lines)
    message = train_all_error(data, tmp_path / "run", "--set", "data.skip_bad_images=true")
    assert message == f"error: {concepts}:7: malformed CUI 'C00404' (expected C and 7 digits)"


def test_cmyk_and_16_bit_images_are_accepted_as_real_pictures(data: Path, pristine: Path) -> None:
    cmyk = to_cmyk(image_at(data, 2)[1])
    deep = to_16_bit(image_at(data, 3)[1])
    config = load_config(TEST_CONFIG)
    train, _ = load_training_sets(data, config)
    assert train.image_ids[1:3] == [cmyk.stem, deep.stem] and len(train.records) == 70
    assert train.records[2].path == deep
    for row in (1, 2):
        pixels = np.asarray(train.images[row])
        assert pixels.shape == (32, 32, 3) and pixels.std() > 5  # a picture, not a blank conversion
    # The 16-bit copy (values 1000..17320 of 65535) is stretched by its own range: it looks like the
    # 8-bit original, not crushed to dark grey or clipped to white.
    original = load_resized_array(image_at(pristine, 3)[1], 32).astype(float)
    assert np.abs(np.asarray(train.images[2], dtype=float) - original).mean() < 8


# ---------------------------------------------------------------- concept files


def _missing_image(data: Path) -> tuple[int, str]:
    image_id, path = image_at(data, 5)
    path.unlink()
    return 5, f"image {image_id!r} has concepts but no image file under {data / 'train'}"


def _duplicate_id(data: Path) -> tuple[int, str]:
    lines = concept_lines(data)
    image_id = lines[4].split("\t")[0]
    write_concept_lines(data, lines + [f"{image_id}\tC0040405"])
    return len(lines) + 1, f"duplicate image ID {image_id!r} (lines 5 and {len(lines) + 1})"


def _malformed_cui(data: Path) -> tuple[int, str]:
    lines = concept_lines(data)
    lines[4] = lines[4].split("\t")[0] + "\tC0040405;C12345"
    write_concept_lines(data, lines)
    return 5, "malformed CUI 'C12345' (expected C and 7 digits)"


def _parent_directory_id(data: Path) -> tuple[int, str]:
    lines = concept_lines(data)
    lines[4] = "../" + lines[4]
    write_concept_lines(data, lines)
    image_id = lines[4].split("\t")[0]
    return 5, f"image ID {image_id!r} is not a plain file name (it could escape the image folder)"


def _malformed_cui_after_bom_and_crlf(data: Path) -> tuple[int, str]:
    lines = concept_lines(data)
    lines[11] = lines[11].split("\t")[0] + "\tCUI0040405"
    (data / "train_concepts.csv").write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode("utf-8"))
    return 12, "malformed CUI 'CUI0040405' (expected C and 7 digits)"


CONCEPT_FILE_FAULTS = {
    "listed-image-missing": _missing_image,
    "duplicated-id": _duplicate_id,
    "malformed-cui": _malformed_cui,
    "id-with-dot-dot-slash": _parent_directory_id,
    "bom-crlf-keeps-line-numbers": _malformed_cui_after_bom_and_crlf,
}


@pytest.mark.parametrize("fault", sorted(CONCEPT_FILE_FAULTS))
def test_concept_file_fault_names_file_and_line(data: Path, tmp_path: Path, fault: str) -> None:
    line, problem = CONCEPT_FILE_FAULTS[fault](data)
    concepts = data / "train_concepts.csv"
    assert train_all_error(data, tmp_path / "run") == f"error: {concepts}:{line}: {problem}"
    with pytest.raises(ConceptFileError) as error:
        load_training_sets(data, load_config(TEST_CONFIG))
    assert (error.value.path, error.value.line) == (concepts, line)


def test_fault_in_the_validation_concept_file_is_found_before_training(data: Path, tmp_path: Path) -> None:
    lines = concept_lines(data, "valid")
    lines[20] = lines[20].split("\t")[0] + "\tC0040405;;C004040X"
    concepts = write_concept_lines(data, lines, "valid")
    message = train_all_error(data, tmp_path / "run")
    assert message == f"error: {concepts}:21: malformed CUI 'C004040X' (expected C and 7 digits)"


def test_image_present_but_not_listed_is_named(data: Path, tmp_path: Path) -> None:
    extra = data / "train" / "DRCT" / "synpic_unlisted.jpg"
    shutil.copy(image_at(data, 1)[1], extra)
    message = train_all_error(data, tmp_path / "run")
    assert message.startswith(f"error: {extra}: image is not listed in {data / 'train_concepts.csv'} (1 unlisted image(s)")
    assert "allow_unlisted" not in message  # a Python argument means nothing to a CLI user


def test_same_id_in_two_category_folders_is_named(data: Path, tmp_path: Path) -> None:
    image_id, path = image_at(data, 1)
    other = next(folder for folder in sorted((data / "train").iterdir()) if folder != path.parent)
    shutil.copy(path, other / path.name)
    message = train_all_error(data, tmp_path / "run")
    first, second = sorted([path, other / path.name])
    assert message == f"error: {second}: image ID {image_id!r} also used by {first}"


def test_empty_concept_rows_and_bom_crlf_are_accepted(data: Path, pristine: Path) -> None:
    lines = concept_lines(data)
    emptied = lines[7].split("\t")[0]
    lines[7] = emptied + "\t"
    (data / "train_concepts.csv").write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode("utf-8"))
    train, _ = load_training_sets(data, load_config(TEST_CONFIG))
    original = read_concept_file(pristine / "train_concepts.csv")
    assert train.image_ids == list(original)  # the BOM did not glue itself to the first ID
    assert train.concept_lists[7] == [] and train.image_ids[7] == emptied
    assert {i: c for i, c in zip(train.image_ids, train.concept_lists) if i != emptied} == {
        i: c for i, c in original.items() if i != emptied
    }


# ---------------------------------------------------------------- config files


def test_config_with_unknown_key_names_file_and_line(data: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("seed = 0\n\n[data]\nimage_size = 32\nimage_sise = 48\n")
    message = cli_error("train-all", "--data", data, "--out", tmp_path / "run", "--config", bad)
    assert not (tmp_path / "run").exists()
    assert message.startswith(f"error: {bad}:5: unknown key 'data.image_sise'; known keys in [data]: ")
    assert "image_size" in message


def test_config_with_wrong_type_names_file_and_line(data: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('seed = 0\n[router]\nepochs = 2\nlearning_rate = "fast"\n')
    message = cli_error("train-all", "--data", data, "--out", tmp_path / "run", "--config", bad)
    assert message == f"error: {bad}:4: router.learning_rate must be a number, got 'fast'"
    assert not (tmp_path / "run").exists()


def test_override_with_wrong_type_is_refused(data: Path, tmp_path: Path) -> None:
    message = train_all_error(data, tmp_path / "run", "--set", "data.skip_bad_images=maybe")
    assert message == "error: --set data.skip_bad_images=maybe: data.skip_bad_images must be true or false, got 'maybe'"


# ---------------------------------------------------------------- submissions: validate and evaluate


def test_validate_refuses_an_empty_test_folder(data: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    (empty / ".cache").mkdir(parents=True)  # hidden folders do not count as images
    (empty / "readme.txt").write_text("the images were not copied\n")
    submission = tmp_path / "run.txt"
    write_submission(submission, read_concept_file(data / "test_concepts.csv"))
    message = cli_error("validate", submission, "--images", empty)
    assert message == (
        f"error: {empty}: no images (.jpg, .jpeg, .png, .tif, .tiff, .webp, .bmp, .gif, ... any format Pillow reads) "
        f"in this folder or its sub-folders; skipped 1: {empty / 'readme.txt'} (.txt: not an image format Pillow reads)"
    )


def test_validate_refuses_101_concepts_and_accepts_100(data: Path, tmp_path: Path) -> None:
    truth = read_concept_file(data / "test_concepts.csv")
    crowded = list(truth)[6]
    many = [f"C{number:07d}" for number in range(1, 102)]
    submission = tmp_path / "run.csv"
    write_submission(submission, {**truth, crowded: many[:100]}, format="2025")
    lines = submission.read_text().splitlines()  # the writer refuses 101 concepts, so add one by hand
    lines = [f"{crowded},{';'.join(many)}" if line.startswith(f"{crowded},") else line for line in lines]
    submission.write_text("\n".join(lines) + "\n")
    message = cli_error("validate", submission, "--images", data / "test")
    line = 1 + next(number for number, text in enumerate(lines) if text.startswith(f"{crowded},"))  # header is line 1
    assert message == f"error: {submission}:{line}: 101 concepts for image {crowded!r} (at most 100)"
    write_submission(submission, {**truth, crowded: many[:100]}, format="2025")
    assert cli_ok("validate", submission, "--images", data / "test").strip() == f"{submission}: valid (20 images)"


def test_validate_names_the_line_of_a_duplicate_a_malformed_cui_and_a_path_id(data: Path, tmp_path: Path) -> None:
    truth = read_concept_file(data / "test_concepts.csv")
    submission = tmp_path / "run.txt"
    write_submission(submission, truth)
    lines = submission.read_text().splitlines()
    cases = [
        (lines + [lines[2]], len(lines) + 1, f"image {lines[2].split(chr(9))[0]!r} listed twice (lines 3 and {len(lines) + 1})"),
        (lines[:4] + [lines[4] + ";C99"] + lines[5:], 5, f"malformed CUI 'C99' for image {lines[4].split(chr(9))[0]!r}"),
        (lines[:2] + ["../" + lines[2]] + lines[3:], 3, f"unknown image ID {'../' + lines[2].split(chr(9))[0]!r} (not a test image)"),
    ]
    for text_lines, line, problem in cases:
        submission.write_text("\n".join(text_lines) + "\n")
        assert cli_error("validate", submission, "--images", data / "test") == f"error: {submission}:{line}: {problem}"


def test_evaluate_names_the_line_of_bad_ground_truth(data: Path, tmp_path: Path) -> None:
    truth_path = data / "test_concepts.csv"
    truth = read_concept_file(truth_path)
    submission = tmp_path / "run.txt"
    write_submission(submission, truth)
    lines = truth_path.read_text().splitlines()
    broken = tmp_path / "truth.csv"
    broken.write_text("\n".join(lines[:3] + [lines[3].split("\t")[0] + "\tC0040405;X0040405"] + lines[4:]) + "\n")
    message = cli_error("evaluate", submission, broken)
    assert message == f"error: {broken}:4: malformed CUI 'X0040405' (expected C and 7 digits)"
    broken.write_text("\n".join(lines + [lines[0]]) + "\n")
    first_id = lines[0].split("\t")[0]
    message = cli_error("evaluate", submission, broken)
    assert message == f"error: {broken}:{len(lines) + 1}: duplicate image ID {first_id!r} (lines 1 and {len(lines) + 1})"


def test_evaluate_refuses_a_submission_listing_an_image_twice(data: Path, tmp_path: Path) -> None:
    submission = tmp_path / "run.txt"
    write_submission(submission, read_concept_file(data / "test_concepts.csv"))
    lines = submission.read_text().splitlines()
    submission.write_text("\n".join(lines[:5] + [lines[1]] + lines[5:]) + "\n")
    message = cli_error("evaluate", submission, data / "test_concepts.csv")
    assert message == f"error: {submission}:6: image {lines[1].split(chr(9))[0]!r} listed twice (lines 2 and 6)"


def test_evaluate_accepts_ground_truth_with_bom_crlf_and_empty_rows(data: Path, tmp_path: Path) -> None:
    truth = read_concept_file(data / "test_concepts.csv")
    emptied = list(truth)[4]
    truth[emptied] = []
    crlf = tmp_path / "truth.csv"
    rows = [f"{image_id}\t{';'.join(cuis)}" for image_id, cuis in truth.items()]
    crlf.write_bytes(("\ufeff" + "\r\n".join(rows) + "\r\n").encode("utf-8"))
    submission = tmp_path / "run.txt"
    write_submission(submission, truth)
    report = json.loads(cli_ok("evaluate", submission, crlf, "--json"))
    assert report["score"] == 1.0 and report["n_images"] == 19  # the official scorer leaves empty-truth images out
    assert evaluate_submission(submission, crlf).score == 1.0
    assert validate_submission_file(submission, data / "test") == 20


# ---------------------------------------------------------------- with a trained run (slow)


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {
        str(path.relative_to(folder)): (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def messy_run(pristine: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """train-all through the CLI on data that is messy but usable, bad images skipped on request:
    CMYK and 16-bit images, an empty concept row, a BOM+CRLF concept file, two unreadable training
    images and one unreadable validation image."""
    root = tmp_path_factory.mktemp("messy")
    data = root / "DATA"
    shutil.copytree(pristine, data, ignore=shutil.ignore_patterns(".cache"))
    cmyk = to_cmyk(image_at(data, 2)[1])
    deep = to_16_bit(image_at(data, 3)[1])
    bad_train = [spoil(image_at(data, 6)[1], "zero-byte"), spoil(image_at(data, 7)[1], "truncated-jpeg")]
    bad_valid = spoil(image_at(data, 2, "valid")[1], "text-named-jpg")
    lines = concept_lines(data)
    lines[3] = lines[3].split("\t")[0] + "\t"
    (data / "train_concepts.csv").write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode("utf-8"))
    run = root / "run"
    collect = _Collect()
    logger = logging.getLogger("conceptclef")
    logger.addHandler(collect)
    try:
        with warnings.catch_warnings(record=True) as recorded:
            warnings.simplefilter("always")
            result = runner.invoke(
                app,
                ["train-all", "--data", str(data), "--out", str(run), "--config", str(TEST_CONFIG), "--set", "data.skip_bad_images=true"],
            )
    finally:
        logger.removeHandler(collect)
    assert result.exit_code == 0, (result.output, result.exception)
    return {
        "data": data, "run": run, "logs": collect.messages, "warnings": [str(w.message) for w in recorded],
        "bad_train": bad_train, "bad_valid": bad_valid, "cmyk": cmyk, "deep": deep,
    }


def _test_folder(messy_run: dict, tmp_path: Path) -> Path:
    folder = tmp_path / "test"
    shutil.copytree(messy_run["data"] / "test", folder)
    return folder


def _strict_copy(messy_run: dict, tmp_path: Path) -> Path:
    """The trained run, but with bad images refused (predict takes the setting from the run's config)."""
    copy = tmp_path / "strict-run"
    shutil.copytree(messy_run["run"], copy)
    config = copy / "config.toml"
    text = config.read_text()
    assert "skip_bad_images = true" in text
    config.write_text(text.replace("skip_bad_images = true", "skip_bad_images = false"))
    return copy


@pytest.mark.slow
def test_train_all_on_messy_data_skips_bad_images_with_warning_and_count(messy_run: dict) -> None:
    manifest = json.loads((messy_run["run"] / "manifest.json").read_text())
    assert "ensemble" in manifest["finished_stages"]
    paths = ", ".join(str(path) for path in messy_run["bad_train"])
    assert f"train: skipped 2 of 70 unreadable images (data.skip_bad_images = true): {paths}" in messy_run["logs"]
    assert f"valid: skipped 1 of 35 unreadable images (data.skip_bad_images = true): {messy_run['bad_valid']}" in messy_run["logs"]
    assert any(message.startswith("2 of 70 images could not be read") for message in messy_run["warnings"])
    assert "skip_bad_images = true" in (messy_run["run"] / "config.toml").read_text()  # recorded with the run


@pytest.mark.slow
def test_predict_accepts_cmyk_and_16_bit_test_images(messy_run: dict, tmp_path: Path) -> None:
    folder = _test_folder(messy_run, tmp_path)
    images = sorted(folder.glob("*.jpg"))
    cmyk, deep = to_cmyk(images[0]), to_16_bit(images[1])
    out = tmp_path / "submission.tsv"
    summary = json.loads(cli_ok("predict", "--run", _strict_copy(messy_run, tmp_path), "--images", folder, "--out", out))
    assert summary["images"] == 20 and summary["unreadable_images"] == 0
    predicted = dict(line.split("\t") for line in out.read_text().splitlines())
    assert predicted[cmyk.stem] and predicted[deep.stem]  # both got concepts
    assert cli_ok("validate", out, "--images", folder).strip() == f"{out}: valid (20 images)"


@pytest.mark.slow
def test_predict_skips_a_bad_test_image_when_asked_with_warning_and_count(
    messy_run: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = _test_folder(messy_run, tmp_path)
    bad = spoil(sorted(folder.glob("*.jpg"))[5], "zero-byte")
    out = tmp_path / "submission.tsv"
    with caplog.at_level(logging.WARNING, logger="conceptclef"):
        summary = json.loads(cli_ok("predict", "--run", messy_run["run"], "--images", folder, "--out", out))
    assert summary["images"] == 20 and summary["unreadable_images"] == 1
    expected = f"{folder}: 1 of 20 unreadable images get predictions from a blank image (data.skip_bad_images = true): {bad}"
    assert expected in [record.getMessage() for record in caplog.records]
    assert bad.stem in {line.split("\t")[0] for line in out.read_text().splitlines()}  # still covered
    assert cli_ok("validate", out, "--images", folder).strip() == f"{out}: valid (20 images)"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["zero-byte", "truncated-jpeg", "png-30000x30000-header"])
def test_predict_refuses_a_bad_test_image_and_keeps_the_old_submission(messy_run: dict, tmp_path: Path, kind: str) -> None:
    run = _strict_copy(messy_run, tmp_path)
    folder = _test_folder(messy_run, tmp_path)
    bad = spoil(sorted(folder.glob("*.jpg"))[5], kind)
    out = tmp_path / "out" / "submission.tsv"
    out.parent.mkdir()
    out.write_text("synpic1\tC0040405\n")  # an earlier submission
    probabilities = out.with_name(out.name + ".probabilities.npz")
    probabilities.write_bytes(b"earlier probabilities")
    before, run_before = _snapshot(out.parent), _snapshot(run)
    message = cli_error("predict", "--run", run, "--images", folder, "--out", out)
    assert message.startswith(f"error: {bad}: {BAD_IMAGES[kind]}")
    assert _snapshot(out.parent) == before  # old files intact, no partial file left beside them
    assert not [path for path in run.rglob("*") if path.name.endswith(".partial")]
    def models(snapshot: dict) -> dict:  # the cache is predict's scratch space; the rest is the run's work
        return {name: entry for name, entry in snapshot.items() if not name.startswith("cache/")}

    assert models(_snapshot(run)) == models(run_before) and len(models(run_before)) > 20


@pytest.mark.slow
def test_predict_refuses_an_empty_test_folder(messy_run: dict, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "DRCT").mkdir(parents=True)  # a category folder with nothing in it
    out = tmp_path / "submission.tsv"
    out.write_text("synpic1\tC0040405\n")
    message = cli_error("predict", "--run", messy_run["run"], "--images", empty, "--out", out, "--overwrite")
    assert message == f"error: {empty}: no images (.jpg, .jpeg, .png, .tif, .tiff, .webp, .bmp, .gif, ... any format Pillow reads) in this folder or its sub-folders"
    assert out.read_text() == "synpic1\tC0040405\n"
    assert not out.with_name(out.name + ".probabilities.npz").exists()


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["malformed-cui", "listed-image-missing", "duplicated-id"])
def test_failed_train_all_leaves_the_existing_run_untouched(messy_run: dict, tmp_path: Path, fault: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(messy_run["run"], run)
    data = tmp_path / "DATA"
    shutil.copytree(messy_run["data"], data, ignore=shutil.ignore_patterns(".cache"))
    (data / "train_concepts.csv").write_text((data / "train_concepts.csv").read_text(encoding="utf-8-sig"))  # plain LF
    line, problem = CONCEPT_FILE_FAULTS[fault](data)
    before = _snapshot(run)
    message = cli_error("train-all", "--data", data, "--out", run)  # resume: the run's own config
    assert message == f"error: {data / 'train_concepts.csv'}:{line}: {problem}"
    assert _snapshot(run) == before


@pytest.mark.slow
def test_rerunning_the_same_command_with_set_resumes(messy_run: dict, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(messy_run["run"], run)
    before = {name: entry for name, entry in _snapshot(run).items() if not name.startswith("cache/")}
    cli_ok(
        "train-all", "--data", messy_run["data"], "--out", run, "--config", TEST_CONFIG, "--set", "data.skip_bad_images=true"
    )
    assert {name: entry for name, entry in _snapshot(run).items() if not name.startswith("cache/")} == before
