"""`train-all --devices`: the base models trained side by side in spawned worker processes give
the run a sequential train-all gives; bad --devices and --devices under torchrun are refused."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

# Spawned workers import this module to unpickle the toy jobs below: the pipeline (timm,
# LightGBM, ...) is imported inside the tests that use it, so that a toy worker starts quickly.
from cli_helpers import TEST_CONFIG, invoke, run_cli, train
from conceptclef.pipeline.devices.workers import ParallelTrainingError, run_on_devices, threads_per_worker

CATEGORIES = ["DRAN", "DRCO", "DRCT", "DRMR", "DRPE", "DRUS", "DRXR"]
# The sequential run uses a worker's thread count (conftest.device_worker_threads), so float
# reductions run in the same order: observed differences are ~1e-7; above 1e-4 is a real change.
TOLERANCE = 1e-4

# The sequential reference runs with a --devices worker's threads (conftest.device_worker_threads).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("device_worker_threads")]
@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    from conceptclef.data.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("parallel-data")
    make_demo_dataset(root / "data", n_train=140, n_valid=70, n_test=40, seed=0, image_size=48)
    return root / "data"


@pytest.fixture(scope="module")
def sequential_run(demo, tmp_path_factory, device_worker_threads) -> Path:
    run = tmp_path_factory.mktemp("sequential") / "run"
    train(demo, run)
    return run


@pytest.fixture(scope="module")
def parallel_run(demo, sequential_run, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("parallel") / "run"
    train(demo, run, "--devices", "cpu,cpu")
    return run


def base_models(run: Path) -> list[Path]:
    manifest = json.loads((run / "manifest.json").read_text())
    return [run / "router", run / "global"] + [
        run / f"category-{category}" for category in manifest["categories"] if category not in manifest["fallback_categories"]
    ]


def test_parallel_run_trains_every_model_and_keeps_a_consistent_manifest(parallel_run, sequential_run):
    from conceptclef.data.vocabulary import ConceptVocabulary

    manifest = json.loads((parallel_run / "manifest.json").read_text())
    assert manifest["categories"] == CATEGORIES
    assert manifest["fallback_categories"] == ["DRCO"]  # 4 training images < min_category_images = 10
    assert manifest["finished_stages"] == ["ensemble"]
    assert "min_category_images" in (parallel_run / "category-DRCO" / "fallback.json").read_text()
    assert not (parallel_run / "category-DRCO" / "checkpoint.pt").exists()
    trained = base_models(parallel_run)
    assert len(trained) == 8
    for work_dir in trained:
        assert isinstance(torch.load(work_dir / "checkpoint.pt", weights_only=True), dict), work_dir
        assert (work_dir / "valid_predictions.npz").is_file(), work_dir
        assert not (work_dir / "fallback.json").exists(), work_dir
    assert manifest["global_vocabulary"] == ConceptVocabulary.load(parallel_run / "global" / "vocabulary.json").fingerprint()
    assert set(manifest["category_vocabularies"]) == set(CATEGORIES) - {"DRCO"}
    for category, fingerprint in manifest["category_vocabularies"].items():
        assert ConceptVocabulary.load(parallel_run / f"category-{category}" / "vocabulary.json").fingerprint() == fingerprint
    assert manifest == json.loads((sequential_run / "manifest.json").read_text())
    # The device is an execution detail: the saved config is the one asked for.
    assert (parallel_run / "config.toml").read_text() == (sequential_run / "config.toml").read_text()
    assert not list(parallel_run.glob("**/*.tmp*"))


def test_parallel_models_match_the_sequential_ones(parallel_run, sequential_run):
    for work_dir in base_models(sequential_run):
        for file_name in ("valid_predictions.npz", "train_embeddings.npz"):
            if not (work_dir / file_name).is_file():
                continue
            expected = np.load(work_dir / file_name)
            got = np.load(parallel_run / work_dir.name / file_name)
            assert sorted(got.files) == sorted(expected.files), (work_dir.name, file_name)
            np.testing.assert_array_equal(got["image_ids"], expected["image_ids"])
            for key in set(expected.files) - {"image_ids"}:
                np.testing.assert_allclose(got[key], expected[key], rtol=0, atol=TOLERANCE, err_msg=f"{work_dir.name}/{file_name}:{key}")


def test_predict_on_the_parallel_run_writes_a_valid_submission(parallel_run, demo, tmp_path):
    out = tmp_path / "submission.tsv"
    invoke("predict", "--run", parallel_run, "--images", demo / "test", "--out", out)
    assert "valid (40 images)" in invoke("validate", out, "--images", demo / "test")


def test_rerun_with_devices_trains_nothing(parallel_run, demo):
    watched = sorted(parallel_run.glob("*/checkpoint.pt")) + [parallel_run / "ensemble" / "stacker.txt"]
    before = {path: path.stat().st_mtime_ns for path in watched}
    train(demo, parallel_run, "--devices", "cpu,cpu")
    assert {path: path.stat().st_mtime_ns for path in watched} == before


@pytest.mark.parametrize(("devices", "message"), [("gpu0", "unknown device 'gpu0'"), ("cpu,,cpu", "comma-separated"), ("cuda:99", "cuda:99")])
def test_bad_devices_are_refused(devices, message, demo, tmp_path):
    result = run_cli("train-all", "--data", demo, "--out", tmp_path / "run", "--config", TEST_CONFIG, "--devices", devices)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "run").exists()


def test_devices_under_torchrun_are_refused(demo, tmp_path, monkeypatch):
    # training.distributed.launched() reads WORLD_SIZE alone; no process group is ever created.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    result = run_cli("train-all", "--data", demo, "--out", tmp_path / "run", "--config", TEST_CONFIG, "--devices", "cpu,cpu")
    assert result.exit_code == 2, result.output
    assert "torchrun" in result.output and "--devices" in result.output
    assert not torch.distributed.is_initialized()
    assert not (tmp_path / "run").exists()


def test_jobs_start_largest_first():
    from conceptclef.core.config import Config
    from conceptclef.pipeline.run.networks import run_networks
    from conceptclef.pipeline.run.layout import RunLayout
    from conceptclef.pipeline.stages.train_all import ModelJob, largest_first

    networks = {network.name: network for network in run_networks(RunLayout(Path("run")), Config(), ["DRAN", "DRCT"])}
    jobs = [ModelJob(networks[name], None, size) for name, size in (("DRAN", 11), ("router", 140), ("DRCT", 39), ("global", 140))]
    assert [job.name for job in largest_first(jobs)] == ["global", "router", "DRCT", "DRAN"]


# -- the runner alone, on toy jobs (module level so that spawned workers can unpickle them) -----


@dataclass(frozen=True)
class ToyJob:
    name: str


def toy_prepare(out: Path, device: str) -> dict:
    return {"out": out, "device": device}


def toy_work(job: ToyJob, context: dict) -> None:
    if job.name == "bad":
        raise ValueError("this model cannot be trained")
    payload = {"device": context["device"], "threads": torch.get_num_threads(), "pid": os.getpid()}
    (context["out"] / f"{job.name}.json").write_text(json.dumps(payload))


def test_a_failed_job_is_named_and_the_others_finish(tmp_path):
    jobs = [ToyJob("bad"), ToyJob("first"), ToyJob("second")]
    with pytest.raises(ParallelTrainingError) as failure:
        run_on_devices(jobs, ["cpu", "cpu"], functools.partial(toy_prepare, tmp_path), toy_work)
    message = str(failure.value)
    assert "1 of 3 models failed" in message
    assert "bad: ValueError: this model cannot be trained" in message
    assert "first" in message and "second" in message  # listed as finished and kept
    outcomes = [json.loads((tmp_path / f"{name}.json").read_text()) for name in ("first", "second")]
    assert all(outcome["device"] == "cpu" for outcome in outcomes)
    assert all(outcome["threads"] == threads_per_worker(2) for outcome in outcomes)
    assert all(outcome["pid"] != os.getpid() for outcome in outcomes)
