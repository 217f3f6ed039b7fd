"""Cross-fitted networks end to end on tiny data: both layouts, predict/evaluate/ablation, a
SIGKILL mid-fold resumed to the same bytes; and train-all retraining a network whose settings
were edited in RUN/config.toml."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import REPO, TEST_CONFIG, invoke, train
from conceptclef.core.runfiles import map_arrays
from conceptclef.data.demo import make_demo_dataset

# The sequential reference runs with a --devices worker's threads (conftest.device_worker_threads).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("device_worker_threads")]

CROSS_FIT = ("--set", "development.scheme=cross_fit", "--set", "development.folds=2")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cf-data")
    make_demo_dataset(root / "data", n_train=140, n_valid=70, n_test=30, seed=0, image_size=64)
    return root / "data"


@pytest.fixture(scope="module")
def run(demo, tmp_path_factory, device_worker_threads) -> Path:
    run_dir = tmp_path_factory.mktemp("cf-run") / "run"
    train(demo, run_dir, *CROSS_FIT)
    return run_dir


@pytest.fixture(scope="module")
def submission(run, demo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cf-sub") / "submission.tsv"
    invoke("predict", "--run", run, "--images", demo / "test", "--out", out)
    return out


def _development_ids(demo: Path) -> list[str]:
    return sorted(path.stem for split in ("train", "valid") for path in (demo / split).rglob("*") if path.suffix in (".jpg", ".png"))


def test_every_network_kind_trains_once_per_fold(run):
    manifest = json.loads((run / "manifest.json").read_text())
    kinds = ["router", "global"] + [f"category-{c}" for c in manifest["categories"] if c not in manifest["fallback_categories"]]
    for fold in (0, 1):
        for kind in kinds:
            work_dir = run / "folds" / f"fold-{fold}" / kind
            assert (work_dir / "checkpoint.pt").is_file() and (work_dir / "valid_predictions.npz").is_file(), work_dir
            assert (work_dir / "settings.json").is_file()
        assert (run / "folds" / f"fold-{fold}" / "ensemble" / "knn_index.npz").is_file()
    assert not (run / "global").exists()  # no network on the train/valid split


def test_held_out_folds_are_disjoint_and_out_of_fold_outputs_cover_every_development_image(run, demo):
    held = [set(map(str, map_arrays(run / "folds" / f"fold-{fold}" / "global" / "valid_predictions.npz")["image_ids"])) for fold in (0, 1)]
    assert not held[0] & held[1]
    development = _development_ids(demo)
    assert sorted(held[0] | held[1]) == development
    gathered = map_arrays(run / "out-of-fold" / "global" / "valid_predictions.npz")
    assert sorted(map(str, gathered["image_ids"])) == development
    assert gathered["probs"].dtype == np.float16  # 116,000 x 2,646 out-of-fold probabilities are 0.6 GB, not 1.2
    record = json.loads((run / "ensemble" / "ensemble.json").read_text())
    assert record["validation_scores"]["n_images"] == len(development)  # the stacker learned from every development image


def test_a_fold_network_never_saw_its_held_out_images(run):
    """The fold's global model embedded its training part (its kNN index): none of its held-out images."""
    for fold in (0, 1):
        folder = run / "folds" / f"fold-{fold}" / "global"
        index = set(map(str, map_arrays(folder / "train_embeddings.npz")["image_ids"]))
        held = set(map(str, map_arrays(folder / "valid_predictions.npz")["image_ids"]))
        assert index and held and not index & held


def test_predict_evaluate_and_ablation_work_on_a_cross_fitted_run(run, demo, submission, tmp_path):
    invoke("validate", submission, "--images", demo / "test")
    report = json.loads(invoke("evaluate", submission, demo / "test_concepts.csv", "--json"))
    assert report["n_images"] == 30 and report["score"] > 0.2
    invoke("ablation", "--run", run, "--images", demo / "test", "--gt", demo / "test_concepts.csv", "--out", tmp_path / "test")
    invoke("ablation", "--run", run, "--out", tmp_path / "validation")
    assert "stacked ensemble" in (tmp_path / "validation" / "ablation.md").read_text()


def test_a_run_killed_mid_fold_resumes_to_the_same_bytes(run, demo, submission, tmp_path):
    """SIGKILL while fold 1's global model trains (fold 0 finished), then the same command again."""
    killed = tmp_path / "run"
    command = [sys.executable, str(REPO / "cli.py"), "train-all", "--data", str(demo), "--out", str(killed), "--config", str(TEST_CONFIG), *CROSS_FIT]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same float reductions as this process
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resume_file = killed / "folds" / "fold-1" / "global" / "resume.pt"
    try:
        deadline = time.monotonic() + 600
        while not resume_file.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert resume_file.exists(), "fold 1's global model never saved a mid-training checkpoint"
    finally:
        process.kill()
        process.wait()
    assert not (killed / "folds" / "fold-1" / "global" / "valid_predictions.npz").exists()
    train(demo, killed, *CROSS_FIT)
    out = tmp_path / "submission.tsv"
    invoke("predict", "--run", killed, "--images", demo / "test", "--out", out)
    assert out.read_bytes() == submission.read_bytes()
    for name in ("global", "router"):
        resumed = map_arrays(killed / "out-of-fold" / name / "valid_predictions.npz")["probs"]
        assert np.array_equal(resumed, map_arrays(run / "out-of-fold" / name / "valid_predictions.npz")["probs"])


def test_cross_fitted_networks_on_flat_2026_data(tmp_path):
    """Flat folders, one combined concepts file: categories derived from the modality CUIs stratify the folds."""
    data = tmp_path / "flat"
    make_demo_dataset(data, n_train=140, n_valid=70, n_test=30, seed=1, image_size=64, layout="flat2026")
    run_dir = tmp_path / "run"
    train(data, run_dir, *CROSS_FIT)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert len(manifest["categories"]) > 1  # derived, not one flat category
    for fold in (0, 1):  # the configured router (one sigmoid per modality CUI), as without folds
        router = torch.load(run_dir / "folds" / f"fold-{fold}" / "router" / "checkpoint.pt", weights_only=True)
        assert router.get("router_head") == "modality_cuis"
    out = tmp_path / "submission.csv"
    invoke("predict", "--run", run_dir, "--images", data / "test", "--out", out, "--format", "2025")
    invoke("validate", out, "--images", data / "test")


def test_a_network_whose_settings_were_edited_in_the_run_config_is_retrained(demo, tmp_path):
    """train-all used to skip a finished network without looking at its settings, so a hand-edited
    RUN/config.toml silently kept the model trained with the old ones."""
    run_dir = tmp_path / "run"
    train(demo, run_dir, "--set", "global_model.epochs=2")
    checkpoint = run_dir / "global" / "checkpoint.pt"
    router_before = (run_dir / "router" / "checkpoint.pt").read_bytes()
    before = torch.load(checkpoint, weights_only=True)["training"]["epochs"]
    config = run_dir / "config.toml"
    text = config.read_text()
    section = text.index("[global_model]")
    epochs = text.index("epochs = 2", section)
    config.write_text(text[:epochs] + "epochs = 3" + text[epochs + len("epochs = 2"):])
    invoke("train-all", "--data", demo, "--out", run_dir)  # resume: takes the (edited) run config
    assert before == 2
    assert torch.load(checkpoint, weights_only=True)["training"]["epochs"] == 3
    assert json.loads((run_dir / "global" / "settings.json").read_text())["training"]["epochs"] == 3
    assert (run_dir / "router" / "checkpoint.pt").read_bytes() == router_before  # unchanged settings: kept
    assert "ensemble" in json.loads((run_dir / "manifest.json").read_text())["finished_stages"]


def test_devices_spread_the_fold_networks_and_give_the_sequential_outputs(run, demo, tmp_path):
    parallel = tmp_path / "run"
    train(demo, parallel, *CROSS_FIT, "--devices", "cpu,cpu")
    for fold in (0, 1):
        for name in ("router", "global"):
            expected = map_arrays(run / "folds" / f"fold-{fold}" / name / "valid_predictions.npz")
            got = map_arrays(parallel / "folds" / f"fold-{fold}" / name / "valid_predictions.npz")
            assert np.array_equal(got["image_ids"], expected["image_ids"])
            np.testing.assert_allclose(got["probs"], expected["probs"], rtol=0, atol=1e-4)
    assert "ensemble" in json.loads((parallel / "manifest.json").read_text())["finished_stages"]
