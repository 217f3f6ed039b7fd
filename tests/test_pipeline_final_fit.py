"""The final fit end to end on tiny data: every network retrained on train + valid for its split
network's step budget, predict/evaluate/ablation on those networks, a split run switched to the
final fit (and back) without retraining, a SIGKILL mid-final-fit resumed to the same bytes, a
changed split network making its final fit stale, both layouts, and --devices."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import REPO, TEST_CONFIG, invoke, train
from conceptclef.core.runfiles import load_arrays
from conceptclef.training.replay import steps_at_rounds

# The sequential reference runs with a --devices worker's threads (conftest.device_worker_threads).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("device_worker_threads")]

FINAL_FIT = ("--set", "development.scheme=final_fit")
SPLIT = ("--set", "development.scheme=split")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    from conceptclef.data.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("ff-data")
    make_demo_dataset(root / "data", n_train=140, n_valid=70, n_test=30, seed=0, image_size=64)
    return root / "data"


@pytest.fixture(scope="module")
def run(demo, tmp_path_factory, device_worker_threads) -> Path:
    run_dir = tmp_path_factory.mktemp("ff-run") / "run"
    train(demo, run_dir, *FINAL_FIT)
    return run_dir


@pytest.fixture(scope="module")
def submission(run, demo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ff-sub") / "submission.tsv"
    invoke("predict", "--run", run, "--images", demo / "test", "--out", out)
    return out


def _network_folders(run: Path) -> list[str]:
    manifest = json.loads((run / "manifest.json").read_text())
    return ["router", "global"] + [f"category-{c}" for c in manifest["categories"] if c not in manifest["fallback_categories"]]


def _state(folder: Path) -> dict:
    return json.loads((folder / "state.json").read_text())


def _checkpoints(run: Path, folders: list[str]) -> dict[str, bytes]:
    return {folder: (run / folder / "checkpoint.pt").read_bytes() for folder in folders}


def _same_weights(left: Path, right: Path) -> bool:
    """The two work folders' checkpoints hold identical weights (the files also hold timings)."""
    first = torch.load(left / "checkpoint.pt", weights_only=True)["model"]
    second = torch.load(right / "checkpoint.pt", weights_only=True)["model"]
    return first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)


def test_every_network_is_final_fitted_for_exactly_its_split_networks_steps(run):
    for folder in _network_folders(run):
        split, final = _state(run / folder), _state(run / "final-fit" / folder)
        rounds = [record["epoch"] for record in split["history"]]
        budget = steps_at_rounds(split["history"], split["steps_per_pass"])[rounds.index(split["best_epoch"])]
        assert final["finished"] and final["history"][-1]["steps"] == budget, folder
        assert all("valid_metric" not in record for record in final["history"])  # nothing held out, nothing validated
        record = json.loads((run / "final-fit" / folder / "replay.json").read_text())
        assert record == {"split_run": {"fingerprint": split["fingerprint"], "best_epoch": split["best_epoch"]}, "steps": budget}
        assert not (run / "final-fit" / folder / "valid_predictions.npz").exists()


def test_the_test_knn_index_holds_the_final_fit_global_models_train_plus_valid_embeddings(run, demo):
    development = sorted(path.stem for split in ("train", "valid") for path in (demo / split).rglob("*.jpg"))
    index = load_arrays(run / "final-fit" / "global" / "knn_index.npz")
    assert index["embeddings"].shape[0] == len(development)
    split_index = load_arrays(run / "ensemble" / "knn_index.npz")
    assert split_index["embeddings"].shape[0] == len(list((demo / "train").rglob("*.jpg")))


def test_predict_evaluate_and_ablation_work_with_the_final_fit(run, demo, submission, tmp_path):
    invoke("validate", submission, "--images", demo / "test")
    report = json.loads(invoke("evaluate", submission, demo / "test_concepts.csv", "--json"))
    assert report["n_images"] == 30 and report["score"] > 0.2
    invoke("ablation", "--run", run, "--images", demo / "test", "--gt", demo / "test_concepts.csv", "--out", tmp_path / "test")
    assert "final fit" in (tmp_path / "test" / "ablation.md").read_text()
    invoke("ablation", "--run", run, "--out", tmp_path / "validation")
    assert "stacked ensemble" in (tmp_path / "validation" / "ablation.md").read_text()


def test_predict_runs_the_final_fit_networks_not_the_split_ones(run, demo, submission, tmp_path):
    """Damaged split-run checkpoints change nothing under final_fit; switched back to split, predict
    uses the split networks again and its probabilities differ."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for folder in _network_folders(copy):
        (copy / folder / "checkpoint.pt").write_bytes(b"not a checkpoint")
    out = tmp_path / "final.tsv"
    invoke("predict", "--run", copy, "--images", demo / "test", "--out", out)
    assert out.read_bytes() == submission.read_bytes()

    switched = tmp_path / "switched"
    shutil.copytree(run, switched)
    train(demo, switched, *SPLIT)  # nothing to train: only the scheme changes
    split_out = tmp_path / "split.tsv"
    invoke("predict", "--run", switched, "--images", demo / "test", "--out", split_out)
    final_probs = load_arrays(submission.with_name(submission.name + ".probabilities.npz"))
    split_probs = load_arrays(split_out.with_name(split_out.name + ".probabilities.npz"))
    assert not np.array_equal(final_probs["router_probs"], split_probs["router_probs"])


def test_a_split_run_switched_to_the_final_fit_retrains_nothing_and_matches_a_final_fit_run(run, demo, submission, tmp_path):
    split_run = tmp_path / "run"
    train(demo, split_run)
    folders = _network_folders(split_run)
    before = _checkpoints(split_run, folders)
    ensemble_before = {path.name: path.read_bytes() for path in (split_run / "ensemble").iterdir()}
    train(demo, split_run, *FINAL_FIT)
    assert _checkpoints(split_run, folders) == before
    assert {path.name: path.read_bytes() for path in (split_run / "ensemble").iterdir()} == ensemble_before
    for folder in folders:
        assert _same_weights(split_run / "final-fit" / folder, run / "final-fit" / folder), folder
    out = tmp_path / "submission.tsv"
    invoke("predict", "--run", split_run, "--images", demo / "test", "--out", out)
    assert out.read_bytes() == submission.read_bytes()


def test_a_run_killed_mid_final_fit_resumes_to_the_same_bytes(run, demo, submission, tmp_path):
    """SIGKILL after the final-fit router's first pass (the split run finished), then the same command again."""
    killed = tmp_path / "run"
    command = [sys.executable, str(REPO / "cli.py"), "train-all", "--data", str(demo), "--out", str(killed), "--config", str(TEST_CONFIG), *FINAL_FIT]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same float reductions as this process
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resume_file = killed / "final-fit" / "router" / "resume.pt"
    try:
        deadline = time.monotonic() + 600
        while not resume_file.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert resume_file.exists(), "the final-fit router never saved a mid-training checkpoint"
    finally:
        process.kill()
        process.wait()
    assert not (killed / "final-fit" / "global" / "knn_index.npz").exists()
    train(demo, killed, *FINAL_FIT)
    out = tmp_path / "submission.tsv"
    invoke("predict", "--run", killed, "--images", demo / "test", "--out", out)
    assert out.read_bytes() == submission.read_bytes()
    for folder in _network_folders(run):
        assert _same_weights(killed / "final-fit" / folder, run / "final-fit" / folder), folder


def test_a_changed_split_network_makes_its_final_fit_stale(run, demo, tmp_path):
    """The split router retrained (its settings edited in RUN/config.toml): its final fit follows with the new budget."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    final_global = (copy / "final-fit" / "global" / "checkpoint.pt").read_bytes()
    config = copy / "config.toml"
    text = config.read_text()
    section = text.index("[router]")
    epochs = text.index("epochs = 2", section)
    config.write_text(text[:epochs] + "epochs = 3" + text[epochs + len("epochs = 2"):])
    invoke("train-all", "--data", demo, "--out", copy)
    split = _state(copy / "router")
    record = json.loads((copy / "final-fit" / "router" / "replay.json").read_text())
    assert record["split_run"]["fingerprint"] == split["fingerprint"] != _state(run / "router")["fingerprint"]
    assert _state(copy / "final-fit" / "router")["history"][-1]["steps"] == record["steps"]
    assert (copy / "final-fit" / "global" / "checkpoint.pt").read_bytes() == final_global  # unchanged split global: kept


def test_a_final_fit_network_is_stale_when_its_split_run_changed_under_it(run, tmp_path):
    """Only the split run's record changed (another job or best epoch): the final fit is out of date."""
    from conceptclef.core.config import load_config
    from conceptclef.pipeline.run.layout import RunLayout
    from conceptclef.pipeline.run.networks import run_networks

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    layout = RunLayout(copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    config = load_config(copy / "config.toml")
    final = {network.name: network for network in run_networks(layout, config, manifest["categories"], manifest["fallback_categories"], final_fit=True)}
    assert final["global"].stale_reason(layout) is None
    state = _state(copy / "global")
    (copy / "global" / "state.json").write_text(json.dumps({**state, "best_epoch": state["best_epoch"] + 1}))
    assert "changed since" in str(final["global"].stale_reason(layout))
    assert final["router"].stale_reason(layout) is None


def test_final_fit_on_flat_2026_data(tmp_path):
    from conceptclef.data.demo import make_demo_dataset

    data = tmp_path / "flat"
    make_demo_dataset(data, n_train=140, n_valid=70, n_test=30, seed=1, image_size=64, layout="flat2026")
    run_dir = tmp_path / "run"
    train(data, run_dir, *FINAL_FIT)
    assert len(json.loads((run_dir / "manifest.json").read_text())["categories"]) > 1
    split_router = torch.load(run_dir / "router" / "checkpoint.pt", weights_only=True)
    final_router = torch.load(run_dir / "final-fit" / "router" / "checkpoint.pt", weights_only=True)
    assert final_router.get("router_head") == split_router.get("router_head")  # the same router class (one sigmoid per modality CUI)
    out = tmp_path / "submission.csv"
    invoke("predict", "--run", run_dir, "--images", data / "test", "--out", out, "--format", "2025")
    invoke("validate", out, "--images", data / "test")


def test_devices_spread_the_final_fit_and_give_the_sequential_outputs(run, demo, tmp_path):
    parallel = tmp_path / "run"
    train(demo, parallel, *FINAL_FIT, "--devices", "cpu,cpu")
    for folder in _network_folders(run):
        assert _state(parallel / "final-fit" / folder)["history"][-1]["steps"] == _state(run / "final-fit" / folder)["history"][-1]["steps"]
    expected = load_arrays(run / "final-fit" / "global" / "knn_index.npz")["embeddings"]
    np.testing.assert_allclose(load_arrays(parallel / "final-fit" / "global" / "knn_index.npz")["embeddings"], expected, rtol=0, atol=1e-4)


def test_a_fine_tuned_network_with_a_head_warm_up_replays_both_budgets(demo, tmp_path):
    """The head warm-up early-stops on valid in the split run, so the final fit replays it too (MODEL/head-warmup/)."""
    run_dir = tmp_path / "run"
    train(demo, run_dir, *FINAL_FIT, "--set", "global_model.finetune=full", "--set", "global_model.head_warmup_epochs=2",
          "--set", "global_model.epochs=3")
    for folder in ("global", "global/head-warmup"):
        split, final = _state(run_dir / folder), _state(run_dir / "final-fit" / folder)
        rounds = [record["epoch"] for record in split["history"]]
        budget = steps_at_rounds(split["history"], split["steps_per_pass"])[rounds.index(split["best_epoch"])]
        assert final["finished"] and final["history"][-1]["steps"] == budget, folder
