"""The whole chain through the CLI on a small demo dataset: train-all, predict, validate,
evaluate, ablation; resuming, re-fitting the ensemble alone, and refusing foreign run files."""

from __future__ import annotations

import re

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from cli_helpers import REPO, TEST_CONFIG, invoke, run_cli, train
from conceptclef.data.demo import make_demo_dataset
from conceptclef.data.submission import natural_key
from conceptclef.router import ModalityRouter

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("e2e-data")
    make_demo_dataset(root / "data", n_train=210, n_valid=140, n_test=60, seed=0, image_size=64)
    return root / "data"


@pytest.fixture(scope="module")
def run(demo, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("e2e-run") / "run"
    train(demo, run_dir)
    return run_dir


@pytest.fixture(scope="module")
def submission(run, demo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("e2e-sub") / "submission.tsv"
    invoke("predict", "--run", run, "--images", demo / "test", "--out", out)
    return out


def test_train_all_leaves_every_stage_on_disk(run):
    manifest = json.loads((run / "manifest.json").read_text())
    assert "ensemble" in manifest["finished_stages"]
    assert manifest["categories"] == ["DRAN", "DRCO", "DRCT", "DRMR", "DRPE", "DRUS", "DRXR"]
    assert (run / "config.toml").is_file()
    trained = [run / "router", run / "global"] + [
        run / f"category-{c}" for c in manifest["categories"] if c not in manifest["fallback_categories"]
    ]
    assert len(trained) >= 5
    for work_dir in trained:
        payload = torch.load(work_dir / "checkpoint.pt", weights_only=True)
        assert isinstance(payload, dict)
        assert (work_dir / "metrics.csv").read_text().count("\n") >= 2
        assert (work_dir / "valid_predictions.npz").is_file()
        baseline = json.loads((work_dir / "baseline.json").read_text())
        assert 0.0 <= baseline["baseline_score"] <= 1.0 and baseline["beats_baseline"] == (baseline["model"] > baseline["baseline_score"])
    assert json.loads((run / "router" / "baseline.json").read_text())["beats_baseline"]
    for category in manifest["fallback_categories"]:
        assert "min_category_images" in (run / f"category-{category}" / "fallback.json").read_text()
    for name in ("stacker.txt", "decision.json", "ensemble.json", "oof_predictions.npz", "knn_index.npz"):
        assert (run / "ensemble" / name).is_file(), name


def test_predict_writes_a_valid_submission_that_scores(run, demo, submission):
    invoke("validate", submission, "--images", demo / "test")
    lines = submission.read_text().splitlines()
    assert len(lines) == 60
    assert all(len(line.split("\t")[1].split(";")) >= 1 for line in lines)
    assert Path(str(submission) + ".probabilities.npz").is_file()
    report = json.loads(invoke("evaluate", submission, demo / "test_concepts.csv", "--json", "--categories", demo / "test_categories.csv"))
    assert report["n_images"] == 60
    assert 0.2 < report["score"] <= 1.0
    assert set(report["per_category"]) <= {"DRAN", "DRCO", "DRCT", "DRMR", "DRPE", "DRUS", "DRXR"}


def test_predict_2025_format(run, demo, tmp_path):
    out = tmp_path / "submission.csv"
    invoke("predict", "--run", run, "--images", demo / "test", "--out", out, "--format", "2025")
    assert out.read_text().splitlines()[0] == "ID,CUIs"
    invoke("validate", out, "--images", demo / "test", "--format", "2025")


def test_ablation_on_test_images_writes_tables_and_plots(run, demo, tmp_path):
    output = invoke(
        "ablation", "--run", run, "--images", demo / "test", "--gt", demo / "test_concepts.csv",
        "--categories", demo / "test_categories.csv", "--out", tmp_path,
    )
    table = pd.read_csv(tmp_path / "ablation.csv")
    systems = list(table["system"])
    assert systems[:2] == ["most frequent training concepts (trivial floor)", "global @ 0.5 (published baseline)"]
    assert any(name.startswith("stacked ensemble") for name in systems)
    assert "per-category, oracle routing + tuned thresholds" in systems
    assert table["overall"].between(0, 1).all()
    assert (table["n_images"] == 60).all()
    assert "| system | overall |" in output
    for plot in ("per_category_f1.png", "router_confusion.png", "threshold_vs_f1.png"):
        with Image.open(tmp_path / plot) as image:
            assert image.size[0] > 200


def test_ablation_without_images_reports_out_of_fold_validation(run, tmp_path):
    output = invoke("ablation", "--run", run, "--out", tmp_path)
    assert "validation (out-of-fold)" in output
    table = pd.read_csv(tmp_path / "ablation.csv")
    assert (table["n_images"] == 140).all()


def test_predict_2025_zip_is_the_upload_and_scores_like_the_2020_file(run, demo, submission, tmp_path):
    out = tmp_path / "submission.csv"
    summary = json.loads(invoke("predict", "--run", run, "--images", demo / "test", "--out", out, "--format", "2025", "--zip"))
    assert summary["upload_zip"] == str(tmp_path / "submission.zip")
    with zipfile.ZipFile(tmp_path / "submission.zip") as archive:
        assert archive.namelist() == ["submission.csv"] and archive.read("submission.csv") == out.read_bytes()
    assert "valid (60 images)" in invoke("validate", tmp_path / "submission.zip", "--images", demo / "test")
    rows = [line.split(",") for line in out.read_text().splitlines()[1:]]
    assert [image_id for image_id, _ in rows] == sorted((image_id for image_id, _ in rows), key=natural_key)
    assert all(cuis for _, cuis in rows)  # the checker rejects an empty CUIs field
    scores = [json.loads(invoke("evaluate", path, demo / "test_concepts.csv", "--json")) for path in (out, submission)]
    assert scores[0]["score"] == scores[1]["score"] and scores[0]["secondary"]["score"] == scores[1]["secondary"]["score"]
    assert 0.2 < scores[0]["secondary"]["score"] <= 1.0


def test_zip_is_refused_before_any_work_without_the_2025_format(run, demo, tmp_path):
    result = run_cli("predict", "--run", run, "--images", demo / "test", "--out", tmp_path / "run.tsv", "--zip")
    assert result.exit_code == 2 and "--zip makes the 2025/2026 upload" in result.output
    assert list(tmp_path.iterdir()) == []


def test_train_all_records_the_validation_secondary_score(run):
    scores = json.loads((run / "ensemble" / "ensemble.json").read_text())["validation_scores"]
    assert 0.2 < scores["primary_f1"] <= 1.0 and 0.2 < scores["secondary_f1"] <= 1.0
    assert scores["n_images"] == 140 and 0 < scores["n_secondary_images"] <= 140


def test_ablation_has_a_secondary_column_and_a_named_per_concept_report(run, demo, tmp_path):
    (demo / "cui_mapping.csv").write_text("CUI,Canonical name\nC0040405,X-Ray Computed Tomography\n")
    try:
        output = invoke(
            "ablation", "--run", run, "--images", demo / "test", "--gt", demo / "test_concepts.csv", "--out", tmp_path
        )
    finally:
        (demo / "cui_mapping.csv").unlink()
    table = pd.read_csv(tmp_path / "ablation.csv")
    assert list(table.columns[:4]) == ["system", "overall", "secondary", "n_images"]
    assert table["secondary"].between(0, 1).all()
    stacked = table[table["system"].str.startswith("stacked ensemble")].iloc[0]
    invoke("predict", "--run", run, "--images", demo / "test", "--out", tmp_path / "s.csv", "--format", "2025")
    report = json.loads(invoke("evaluate", tmp_path / "s.csv", demo / "test_concepts.csv", "--json"))
    # the ablation's stacked row is exactly what predict writes
    assert stacked["overall"] == pytest.approx(report["score"], abs=1e-4)
    assert stacked["secondary"] == pytest.approx(report["secondary"]["score"], abs=1e-4)
    concepts = pd.read_csv(tmp_path / "per_concept.csv", keep_default_na=False)
    vocabulary = json.loads((run / "global" / "vocabulary.json").read_text())
    assert len(concepts) == len(vocabulary["cuis"]) and set(concepts["band"]) == {"head", "body", "tail"}
    assert concepts.set_index("cui").loc["C0040405", "name"] == "X-Ray Computed Tomography"
    assert "| band | concepts |" in output and 0 < stacked["secondary"] <= 1


def test_rerun_resumes_and_skips_finished_models(run, demo):
    watched = sorted(run.glob("*/checkpoint.pt")) + [run / "ensemble" / "stacker.txt"]
    before = {path: path.stat().st_mtime_ns for path in watched}
    train(demo, run)
    assert {path: path.stat().st_mtime_ns for path in watched} == before


def refit_ensemble_in_a_copy(run: Path, demo: Path, tmp_path: Path, *extra: str) -> Path:
    """Train a copy of the run with `extra`; the networks must stay as they were, the stacker re-fitted."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    checkpoints = {path: path.stat().st_mtime_ns for path in copy.glob("*/checkpoint.pt")}
    stacker_before = (copy / "ensemble" / "stacker.txt").stat().st_mtime_ns
    train(demo, copy, *extra)
    assert {path: path.stat().st_mtime_ns for path in copy.glob("*/checkpoint.pt")} == checkpoints
    assert (copy / "ensemble" / "stacker.txt").stat().st_mtime_ns != stacker_before
    return copy


def test_ensemble_refits_alone_from_saved_predictions(run, demo, submission, tmp_path):
    copy = refit_ensemble_in_a_copy(run, demo, tmp_path, "--only", "ensemble")
    again = tmp_path / "again.tsv"
    invoke("predict", "--run", copy, "--images", demo / "test", "--out", again)
    assert again.read_text() == submission.read_text()


def test_run_directory_from_other_vocabulary_is_refused(run, demo, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    vocabulary = json.loads((copy / "global" / "vocabulary.json").read_text())
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["global_vocabulary"] = "0" * len(manifest["global_vocabulary"])
    (copy / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("predict", "--run", copy, "--images", demo / "test", "--out", tmp_path / "s.tsv")
    assert result.exit_code == 2
    assert "vocabulary" in result.output
    assert not (tmp_path / "s.tsv").exists()
    assert vocabulary  # the files themselves were left as they were


def test_run_directory_for_other_categories_is_refused(run, demo, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(demo, other, ignore=shutil.ignore_patterns(".cache"))
    shutil.rmtree(other / "train" / "DRUS")
    kept = {path.stem for path in (other / "train").rglob("*.jpg")}
    lines = (other / "train_concepts.csv").read_text().splitlines()
    (other / "train_concepts.csv").write_text("\n".join(line for line in lines if line.split("\t")[0] in kept) + "\n")
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    result = run_cli("train-all", "--data", other, "--out", copy)
    assert result.exit_code == 2
    assert "categories" in result.output


def test_same_seed_gives_identical_submission(run, demo, submission, tmp_path):
    second = tmp_path / "run"
    train(demo, second)
    out = tmp_path / "submission.tsv"
    invoke("predict", "--run", second, "--images", demo / "test", "--out", out)
    assert out.read_bytes() == submission.read_bytes()


def test_truncated_checkpoint_is_retrained_not_loaded(run, demo, submission, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    checkpoint = copy / "global" / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 3])
    train(demo, copy)
    assert isinstance(torch.load(checkpoint, weights_only=True), dict)
    out = tmp_path / "submission.tsv"
    invoke("predict", "--run", copy, "--images", demo / "test", "--out", out)
    assert out.read_text() == submission.read_text()


def test_killed_run_resumes_to_the_same_result(run, demo, submission, tmp_path):
    """SIGKILL in the middle of the router's training, then the same command again."""
    killed = tmp_path / "run"
    command = [sys.executable, str(REPO / "cli.py"), "train-all", "--data", str(demo), "--out", str(killed), "--config", str(TEST_CONFIG)]
    # The same torch thread count as this process: float reductions differ in the last bits across counts.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resume_file = killed / "router" / "resume.pt"
    try:
        import time

        deadline = time.monotonic() + 300
        while not resume_file.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert resume_file.exists(), "the router never saved a mid-training checkpoint"
    finally:
        process.kill()
        process.wait()
    assert not ModalityRouter.is_trained(killed / "router")
    train(demo, killed)
    out = tmp_path / "submission.tsv"
    invoke("predict", "--run", killed, "--images", demo / "test", "--out", out)
    assert out.read_text() == submission.read_text()


def test_changed_ensemble_settings_refit_the_ensemble_alone(run, demo, tmp_path):
    copy = refit_ensemble_in_a_copy(run, demo, tmp_path, "--set", "ensemble.folds=3")
    assert "folds = 3" in (copy / "config.toml").read_text()
    assert "ensemble" in json.loads((copy / "manifest.json").read_text())["finished_stages"]


def test_changed_network_settings_are_refused_on_resume(run, demo, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    config_before = (copy / "config.toml").read_text()
    result = run_cli("train-all", "--data", demo, "--out", copy, "--config", TEST_CONFIG, "--set", "router.epochs=1")
    assert result.exit_code == 2
    assert "differs from the config this run was started with" in result.output
    assert (copy / "config.toml").read_text() == config_before


def _resume_on(data: Path, run: Path, tmp_path: Path):
    """train-all on a copy of the run with `data`; the copy's trained files must be left as they were."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)

    def trained_files() -> dict[Path, bytes]:
        return {path: path.read_bytes() for path in copy.rglob("*") if path.is_file() and path.name not in (".lock", "data.json")}

    files = trained_files()
    result = run_cli("train-all", "--data", data, "--out", copy)
    assert trained_files() == files
    return result


def _copy_of(demo: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(demo, copy, ignore=shutil.ignore_patterns(".cache"))  # copy2: the same files, moved
    return copy


def test_resume_with_relabelled_validation_images_is_refused(run, demo, tmp_path):
    """Same vocabulary, other validation labels: the old ensemble must not come back as the result."""
    data = _copy_of(demo, tmp_path)
    concepts = data / "valid_concepts.csv"
    lines = concepts.read_text().splitlines()
    image_id, first_cuis = lines[0].split("\t")
    _, second_cuis = lines[1].split("\t")
    lines[0] = f"{image_id}\t{second_cuis}"
    assert second_cuis != first_cuis
    concepts.write_text("\n".join(lines) + "\n")
    result = _resume_on(data, run, tmp_path)
    assert result.exit_code == 2, result.output
    message = result.output.strip().splitlines()[-1]
    assert f"valid: 1 image(s) relabelled ({image_id})" in message
    assert re.search(r"valid concept file \S*valid_concepts.csv (\(was \S*\) )?changed: the labels of 1 image\(s\)", message) and "use a new --out directory" in message


def test_resume_with_an_added_image_is_refused(run, demo, tmp_path):
    data = _copy_of(demo, tmp_path)
    source = sorted((data / "train" / "DRCT").glob("*.jpg"))[0]
    shutil.copy(source, source.with_name("added_image.jpg"))
    row = next(line for line in (data / "train_concepts.csv").read_text().splitlines() if line.startswith(source.stem + "\t"))
    with open(data / "train_concepts.csv", "a") as stream:
        stream.write(row.replace(source.stem, "added_image", 1) + "\n")
    result = _resume_on(data, run, tmp_path)
    assert result.exit_code == 2, result.output
    assert "train: 1 image(s) added (added_image)" in result.output


def test_resume_with_data_from_another_folder_is_refused_unless_the_same_files(run, demo, tmp_path):
    moved = _copy_of(demo, tmp_path)
    assert _resume_on(moved, run, tmp_path / "moved").exit_code == 0  # the same data in another place
    assert json.loads((tmp_path / "moved" / "run" / "data.json").read_text())["data_dir"] == str(moved.resolve())
    other = tmp_path / "other"
    make_demo_dataset(other, n_train=210, n_valid=140, n_test=60, seed=1, image_size=64)
    result = _resume_on(other, run, tmp_path / "other-run")
    assert result.exit_code == 2, result.output
    assert f"data folder was {demo.resolve()}, now {other.resolve()}" in result.output
