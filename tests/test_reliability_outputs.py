"""predict never destroys an input or a run, finds output-path problems first, and reads every image format.

`--out DATA/test_concepts.csv` used to replace the ground truth and `--out RUN/manifest.json` the
run. Now predict refuses to write into the run or the image folder at all, and replaces an existing
file only when it wrote that file itself (its probabilities file lies beside it) or when asked with
--overwrite. Path problems are refused before any model is loaded: the fast tests give predict an
empty run folder, so an error about the run would mean the path was checked too late.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from cli_helpers import TEST_CONFIG, cli_error, invoke, train
from conceptclef.data.demo import make_demo_dataset
from conftest import write_real_scans_in_formats


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {str(path.relative_to(folder)): (digest(path), path.stat().st_mtime_ns) for path in sorted(folder.rglob("*")) if path.is_file()}


def predict(run: Path, images: Path, out: Path, *extra: object) -> str:
    return invoke("predict", "--run", run, "--images", images, "--out", out, *extra)


# ---------------------------------------------------------------- before any model is loaded (fast)


@pytest.fixture()
def empty_run(tmp_path: Path) -> tuple[Path, Path]:
    """A run folder with nothing in it and a test folder: predict fails on the run unless it fails first on --out."""
    run, images = tmp_path / "run", tmp_path / "test"
    run.mkdir()
    images.mkdir()
    return run, images


def test_out_that_is_a_directory_is_refused_first(empty_run: tuple[Path, Path], tmp_path: Path) -> None:
    run, images = empty_run
    folder = tmp_path / "submissions"
    folder.mkdir()
    message = cli_error("predict", "--run", run, "--images", images, "--out", folder)
    assert message == f"error: {folder}: is a directory; give --out a file name, e.g. submission.csv"


def test_out_in_a_missing_folder_is_refused_first(empty_run: tuple[Path, Path], tmp_path: Path) -> None:
    run, images = empty_run
    out = tmp_path / "no-such-folder" / "submission.csv"
    message = cli_error("predict", "--run", run, "--images", images, "--out", out)
    assert message == f"error: {out.parent}: folder of --out does not exist; create it first"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_out_in_a_read_only_folder_is_refused_first(empty_run: tuple[Path, Path], tmp_path: Path) -> None:
    run, images = empty_run
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        message = cli_error("predict", "--run", run, "--images", images, "--out", folder / "submission.csv")
    finally:
        folder.chmod(0o755)
    assert message == f"error: {folder}: folder of --out is not writable"


def test_out_inside_the_run_or_the_image_folder_is_refused_even_with_overwrite(empty_run: tuple[Path, Path]) -> None:
    run, images = empty_run
    for out, role, folder in [(run / "manifest.json", "the run directory", run), (images / "submission.csv", "the image folder", images)]:
        message = cli_error("predict", "--run", run, "--images", images, "--out", out, "--overwrite")
        assert message == f"error: {out}: is inside {role} {folder}; predict never writes there: choose another --out"
    assert not list(run.iterdir()) and not list(images.iterdir())


def test_existing_file_predict_did_not_write_is_refused_first(empty_run: tuple[Path, Path], tmp_path: Path) -> None:
    run, images = empty_run
    (tmp_path / "elsewhere").mkdir()
    notes = tmp_path / "elsewhere" / "notes.csv"
    notes.write_text("synpic1\tC0040405\n")
    message = cli_error("predict", "--run", run, "--images", images, "--out", notes)
    assert message == (
        f"error: {notes}: already exists and was not written by predict (no notes.csv.probabilities.npz "
        "beside it); pass --overwrite to replace it, or choose another --out"
    )
    assert notes.read_text() == "synpic1\tC0040405\n"


def test_ground_truth_beside_the_images_is_refused_even_with_overwrite(empty_run: tuple[Path, Path], tmp_path: Path) -> None:
    run, images = empty_run
    truth = tmp_path / "test_concepts.csv"
    truth.write_text("synpic1\tC0040405\n")
    for out in (truth, tmp_path / "predicted_concepts.csv"):
        message = cli_error("predict", "--run", run, "--images", images, "--out", out, "--overwrite")
        assert message == (
            f"error: {out}: is named like a concept or ground-truth file in the data folder {tmp_path}; predict never "
            "writes one there, even with --overwrite: choose another --out (e.g. submission.csv)"
        )
    assert truth.read_text() == "synpic1\tC0040405\n" and not (tmp_path / "predicted_concepts.csv").exists()


def test_the_files_a_run_recorded_are_refused_even_with_overwrite(empty_run: tuple[Path, Path], tmp_path: Path) -> None:
    """The 2026 combined concepts file, recorded in RUN/data.json for both splits, elsewhere than the test images."""
    run, images = empty_run
    data = tmp_path / "corpus"
    (data / "train").mkdir(parents=True)
    combined = data / "ImageCLEFmedical_Caption_2026_concepts.csv"
    combined.write_text("ID,CUIs\n")
    recorded = {"format": "conceptclef-data-fingerprint-v1", "data_dir": str(data), "splits": {},
                "concept_files": {"train": [str(combined), "0"], "valid": [str(combined), "0"]}}
    (run / "data.json").write_text(json.dumps(recorded))
    elsewhere = tmp_path / "out"
    elsewhere.mkdir()
    link = elsewhere / "labels.csv"
    link.symlink_to(combined)
    for out in (combined, link):
        message = cli_error("predict", "--run", run, "--images", images, "--out", out, "--overwrite", "--format", "2026")
        assert message == (
            f"error: {out}: is the run's train and valid concept file (recorded in {run / 'data.json'}); predict never "
            "replaces a run's input, even with --overwrite: choose another --out"
        )
    message = cli_error("predict", "--run", run, "--images", data / "train", "--out", elsewhere / "s.csv")
    assert message == (
        f"error: {data / 'train'}: is the run's training folder ({data / 'train'}); predict takes the test images: "
        f"give e.g. {data / 'test'}"
    )
    assert combined.read_text() == "ID,CUIs\n"


def test_out_in_a_folder_that_cannot_be_written_is_refused_first(empty_run: tuple[Path, Path]) -> None:
    run, images = empty_run
    message = cli_error("predict", "--run", run, "--images", images, "--out", "/proc/x.csv")
    assert message.startswith("error: /proc: folder of --out cannot be written: ")


# ---------------------------------------------------------------- with a trained run (slow)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("outputs")
    data = root / "DATA"
    make_demo_dataset(data, n_train=60, n_valid=30, n_test=12, seed=1, image_size=48)
    run = root / "run"
    train(data, run)
    return {"data": data, "run": run, "root": root}


@pytest.mark.slow
def test_ground_truth_and_run_files_survive_a_mistyped_out(trained: dict[str, Path], tmp_path: Path) -> None:
    data, run = trained["data"], trained["run"]
    truth, before_truth, before_run = data / "test_concepts.csv", digest(data / "test_concepts.csv"), snapshot(run)
    message = cli_error("predict", "--run", run, "--images", data / "test", "--out", truth)
    assert message.startswith(f"error: {truth}: is named like a concept or ground-truth file in the data folder")
    labels = data / "train_concepts.csv"
    before_labels = digest(labels)
    message = cli_error("predict", "--run", run, "--images", data / "test", "--out", labels, "--overwrite")
    assert message.startswith(f"error: {labels}: is the run's train concept file (recorded in {run / 'data.json'})")
    assert digest(labels) == before_labels
    message = cli_error("predict", "--run", run, "--images", data / "test", "--out", run / "manifest.json", "--overwrite")
    assert message.startswith(f"error: {run / 'manifest.json'}: is inside the run directory")
    assert digest(truth) == before_truth and snapshot(run) == before_run
    assert not (data / "test_concepts.csv.probabilities.npz").exists()


@pytest.mark.slow
def test_predict_replaces_its_own_submission_and_a_user_file_only_when_asked(trained: dict[str, Path], tmp_path: Path) -> None:
    data, run = trained["data"], trained["run"]
    out = tmp_path / "submission.csv"
    predict(run, data / "test", out)
    first = out.read_text()
    predict(run, data / "test", out)  # its own file: replaced without --overwrite
    assert out.read_text() == first
    mine = tmp_path / "mine.csv"
    mine.write_text("my notes\n")
    cli_error("predict", "--run", run, "--images", data / "test", "--out", mine)
    assert mine.read_text() == "my notes\n"
    predict(run, data / "test", mine, "--overwrite")
    assert mine.read_text() == first and (tmp_path / "mine.csv.probabilities.npz").is_file()


@pytest.mark.slow
def test_predict_covers_test_images_in_every_format_pillow_reads(
    trained: dict[str, Path], real_radiology_images: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "test"
    shutil.copytree(trained["data"] / "test", folder)
    scans = write_real_scans_in_formats(real_radiology_images, folder)
    (folder / "notes.txt").write_text("not an image\n")
    out = tmp_path / "submission.csv"
    summary = predict(trained["run"], folder, out)
    expected = len(list((trained["data"] / "test").iterdir())) + len(scans)
    assert f'"images": {expected}' in summary
    predicted = {line.split("\t")[0] for line in out.read_text().splitlines()}
    assert {path.stem for path in scans.values()} <= predicted and len(predicted) == expected
    assert invoke("validate", out, "--images", folder).strip().endswith(f"valid ({expected} images)")


@pytest.mark.slow
def test_bad_weights_on_an_existing_run_fail_in_one_line_and_the_run_still_predicts_identically(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    before_out = tmp_path / "before.csv"
    predict(run, trained["data"] / "test", before_out)
    before = {name: entry for name, entry in snapshot(run).items() if not name.startswith("cache/")}
    config = tmp_path / "weights.toml"
    config.write_text(TEST_CONFIG.read_text().replace('weights = "none"', f'weights = "{tmp_path / "missing.pth"}"'))
    message = cli_error("train-all", "--data", trained["data"], "--out", run, "--config", config)
    assert message.startswith(f"error: {run / 'config.toml'}: --config {config} differs from the config this run was started with")
    assert {name: entry for name, entry in snapshot(run).items() if not name.startswith("cache/")} == before
    after_out = tmp_path / "after.csv"
    predict(run, trained["data"] / "test", after_out)
    assert after_out.read_text() == before_out.read_text()


@pytest.mark.slow
def test_a_moved_weight_file_blocks_only_the_resume_that_must_train_a_network(trained: dict[str, Path], tmp_path: Path) -> None:
    """As if the run had been trained from a weight file that was moved since: re-fitting needs no weights."""
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    config = run / "config.toml"
    text = config.read_text()
    section = text.index("[global_model]")
    moved = tmp_path / "moved.pth"
    config.write_text(text[:section] + text[section:].replace('weights = "none"', f'weights = "{moved}"', 1))
    line = text[: text.index('weights = "none"', section)].count("\n") + 1
    # A run trained from that file recorded it as the global model's weights (settings.json);
    # without this, the edit is a settings change and train-all retrains the global model.
    record = run / "global" / "settings.json"
    recorded = json.loads(record.read_text())
    recorded["training"]["weights"] = str(moved)
    record.write_text(json.dumps(recorded))
    before = {name: entry for name, entry in snapshot(run).items() if not name.startswith("cache/")}
    invoke("train-all", "--data", trained["data"], "--out", run)  # everything trained: a no-op resume
    assert {name: entry for name, entry in snapshot(run).items() if not name.startswith("cache/")} == before
    (run / "global" / "valid_predictions.npz").unlink()  # as if interrupted before the global model finished
    before = {name: entry for name, entry in snapshot(run).items() if not name.startswith("cache/")}
    message = cli_error("train-all", "--data", trained["data"], "--out", run)
    assert message == f"error: {config}:{line}: global_model.weights = '{moved}': weight file not found"
    assert {name: entry for name, entry in snapshot(run).items() if not name.startswith("cache/")} == before


def test_upload_zip_beside_a_foreign_file_is_refused_before_work(tmp_path):
    """`--zip` must not replace an existing zip unless predict wrote the submission beside it."""
    from conceptclef.pipeline.run.output_paths import OutputPathError, check_upload_zip_path, probabilities_path_for

    submission, upload = tmp_path / "submission.csv", tmp_path / "submission.zip"
    upload.write_bytes(b"someone else's upload")
    with pytest.raises(OutputPathError, match="submission.zip: already exists and submission.csv beside it was not written"):
        check_upload_zip_path(upload, submission)
    check_upload_zip_path(upload, submission, overwrite=True)
    submission.write_text("ID,CUIs\n")
    probabilities_path_for(submission).write_bytes(b"")
    check_upload_zip_path(upload, submission)  # predict's own earlier output may be replaced
    upload.unlink()
    upload.mkdir()
    with pytest.raises(OutputPathError, match="is a directory"):
        check_upload_zip_path(upload, submission, overwrite=True)


@pytest.mark.slow
def test_predict_reads_only_the_test_folder_and_never_writes_inside_the_run(trained: dict[str, Path], tmp_path: Path) -> None:
    data, run = trained["data"], trained["run"]
    before_run = snapshot(run)
    message = cli_error("predict", "--run", run, "--images", data, "--out", tmp_path / "all.csv")
    assert message == f"error: {data}: this is a data folder (it holds test, train, valid), not an image folder: give one split, e.g. {data / 'test'}"
    message = cli_error("validate", tmp_path / "all.csv", "--images", data)
    assert message.startswith(f"error: {data}: this is a data folder")
    message = cli_error("predict", "--run", run, "--images", data / "valid", "--out", tmp_path / "valid.csv")
    assert message.startswith(f"error: {data / 'valid'}: is the run's validation folder")
    out = tmp_path / "submission.csv"
    predict(run, data / "test", out)
    assert snapshot(run) == before_run and not (run / "cache").exists()
    assert not (data / "test" / ".cache").exists()
    assert len(list((data / ".cache").glob("images-*.npy"))) == 3  # train and valid (train-all), then test
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(data / "test", elsewhere)
    predict(run, elsewhere, tmp_path / "elsewhere.csv")
    assert snapshot(run) == before_run and sorted(path.name for path in elsewhere.iterdir()) == sorted(
        path.name for path in (data / "test").iterdir()
    )
    assert (tmp_path / "elsewhere.csv").read_text() == out.read_text()
