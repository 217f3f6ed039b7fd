"""Data-parallel training: 2 gloo processes on CPU (torchrun) end like one process; shards never duplicate rows.

This file is also the torchrun worker: `python -m torch.distributed.run ... tests/test_training_distributed.py OUT`
runs every scenario below on each rank and saves what each rank got in OUT; the tests then run the
same scenarios in this single process and compare.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import conceptclef.training.checkpoints  # noqa: E402
from conceptclef.category_models import ConceptModel  # noqa: E402
from conceptclef.core.config import AugmentConfig, load_config  # noqa: E402
from conceptclef.router import ModalityRouter  # noqa: E402
from conceptclef.training import distributed  # noqa: E402
from conceptclef.training.backbones import create_network  # noqa: E402
from conceptclef.training.batches import ImageBatches, batch_loader, batch_sampler, training_batch_sizes  # noqa: E402
from conceptclef.training.distributed import Shard, SyncBatchNormSwap, shard_indices  # noqa: E402
from conceptclef.training.inference import DeviceSettings, assemble, run_forward  # noqa: E402
from conceptclef.training.replay import StepReplay  # noqa: E402
from synthetic_images import class_concepts, colour_coded_images  # noqa: E402

CONFIG = load_config(ROOT / "configs" / "test.toml")
SIZE = CONFIG.data.image_size
CUIS = [f"C{index}" for index in range(7)]
NO_AUGMENT = AugmentConfig(horizontal_flip=False, rotation_degrees=0.0, zoom=0.0, shear_degrees=0.0)
HEAD = dataclasses.replace(CONFIG.global_model, finetune="head", epochs=4, early_stopping_patience=10, batch_size=16)
FULL = dataclasses.replace(
    CONFIG.router, finetune="full", epochs=2, early_stopping_patience=5, batch_size=16, drop_rate=0.0, augment=NO_AUGMENT
)
VALID_ROWS = 21  # odd: the two ranks validate 11 and 10 rows
GATHER_ROWS = 7
# Full fine-tuning of a batch-norm network on CPU: each rank normalises its half-batch (8 images)
# with its own statistics (SyncBatchNorm is GPU-only), so the runs differ by that alone. Measured
# here: mean |probability difference| 0.049, loss within 4.5 %, same predicted class everywhere.
BATCH_NORM_TOLERANCE = 0.1


class Interrupted(Exception):
    """Stands for a killed job: raised on every rank after an epoch's files are on disk."""


# -- scenarios: run identically by each torchrun rank and by the single-process reference --------------
def _concept_data() -> tuple[np.ndarray, Any, np.ndarray, Any]:
    images, classes = colour_coded_images(48, SIZE, 3, seed=0)
    valid_images, valid_classes = colour_coded_images(VALID_ROWS, SIZE, 3, seed=1)
    return images, class_concepts(classes, 3), valid_images, class_concepts(valid_classes, 3)


def _router_data() -> tuple[np.ndarray, list[str], np.ndarray, list[str]]:
    images, classes = colour_coded_images(48, SIZE, 3, seed=2)
    valid_images, valid_classes = colour_coded_images(VALID_ROWS, SIZE, 3, seed=3)
    return images, [f"cat{c}" for c in classes], valid_images, [f"cat{c}" for c in valid_classes]


def _result(model: Any, probabilities: np.ndarray, **extra: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "probabilities": probabilities,
        "valid_metric": np.array([row["valid_metric"] for row in model.history_]),
        "train_loss": np.array([row["train_loss"] for row in model.history_]),
        **extra,
    }


def head_scenario(work_dir: Path) -> dict[str, np.ndarray]:
    images, labels, valid_images, valid_labels = _concept_data()
    model = ConceptModel(HEAD, SIZE, "cpu", seed=1).fit(images, labels, CUIS, valid_images, valid_labels, work_dir)
    probabilities, embeddings = model.predict_proba_and_embed(valid_images)
    return _result(model, probabilities, embeddings=embeddings)


def resumed_head_scenario(work_dir: Path) -> dict[str, np.ndarray]:
    """The head job killed after epoch 2 (on every rank), then run again: it resumes at epoch 3."""
    images, labels, valid_images, valid_labels = _concept_data()

    def interrupt(record: dict) -> None:
        if record["epoch"] == 2:
            raise Interrupted

    try:
        ConceptModel(HEAD, SIZE, "cpu", seed=1).fit(images, labels, CUIS, valid_images, valid_labels, work_dir, on_epoch_end=interrupt)
    except Interrupted:
        pass
    epochs_run: list[int] = []
    model = ConceptModel(HEAD, SIZE, "cpu", seed=1).fit(
        images, labels, CUIS, valid_images, valid_labels, work_dir, on_epoch_end=lambda record: epochs_run.append(record["epoch"])
    )
    return _result(model, model.predict_proba(valid_images), epochs_run=np.array(epochs_run))


def _router_scenario(backbone: str, work_dir: Path, **changes: Any) -> dict[str, np.ndarray]:
    images, categories, valid_images, valid_categories = _router_data()
    training = dataclasses.replace(FULL, backbone=backbone, **changes)
    router = ModalityRouter(training, SIZE, "cpu", seed=2).fit(images, categories, valid_images, valid_categories, work_dir)
    return _result(router, router.predict_proba(valid_images))


def full_group_norm_scenario(work_dir: Path) -> dict[str, np.ndarray]:
    return _router_scenario("test_efficientnet_gn", work_dir)


def layerwise_group_norm_scenario(work_dir: Path) -> dict[str, np.ndarray]:
    """One more stage trains each epoch: DDP must take the newly unfrozen weights into its gradient sync."""
    return _router_scenario("test_efficientnet_gn", work_dir, finetune="layerwise", unfreeze_every_epochs=1, epochs=3)


def full_batch_norm_scenario(work_dir: Path) -> dict[str, np.ndarray]:
    return _router_scenario("test_resnet", work_dir)


# The final fit's fixed budget: 7 steps at batch 16 over 69 train + valid images (5 steps a pass,
# the second pass cut short), plateau cuts replayed at steps 3 and 6, no validation images at all.
BUDGET = StepReplay(
    steps=7, total_steps=9, warmup_steps=0, schedule="plateau", round_ends=(3, 6, 9), round_scales=(1.0, 0.5, 0.25), source="usual"
)


def fixed_budget_scenario(work_dir: Path) -> dict[str, np.ndarray]:
    """A fine-tuned group-norm router trained for a fixed step budget on train + valid (the final fit)."""
    images, categories, valid_images, valid_categories = _router_data()
    training = dataclasses.replace(FULL, backbone="test_efficientnet_gn")
    both = np.concatenate([images, valid_images])
    router = ModalityRouter(training, SIZE, "cpu", seed=2, replay=BUDGET).fit(both, categories + valid_categories, both[:0], [], work_dir)
    return {
        "probabilities": router.predict_proba(valid_images),
        "train_loss": np.array([row["train_loss"] for row in router.history_]),
        "steps": np.array([row["steps"] for row in router.history_]),
        "lr": np.array([row["lr"] for row in router.history_]),
    }


def gather_scenario(work_dir: Path) -> dict[str, np.ndarray]:
    """7 rows on 2 ranks: raw all_gather_rows of the shards, and a sharded forward pass over them."""
    shard = distributed.shard_for(GATHER_ROWS)
    rows = shard_indices(GATHER_ROWS, shard.rank, shard.world)
    gathered = distributed.all_gather_rows(torch.from_numpy(np.stack([rows, rows * 10], axis=1)))
    images = np.arange(GATHER_ROWS, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    loader = batch_loader(ImageBatches(images), 2, shuffle=False, shard=shard)
    (means,) = run_forward(lambda x: x.float().mean(dim=(1, 2, 3)).unsqueeze(1), loader, GATHER_ROWS, DeviceSettings(torch.device("cpu")), shard=shard)
    return {"gathered": gathered.numpy(), "forward": means, "own_rows": rows}


SCENARIOS: dict[str, Callable[[Path], dict[str, np.ndarray]]] = {
    "gather": gather_scenario,
    "head": head_scenario,
    "resumed_head": resumed_head_scenario,
    "full_group_norm": full_group_norm_scenario,
    "layerwise_group_norm": layerwise_group_norm_scenario,
    "full_batch_norm": full_batch_norm_scenario,
    "fixed_budget": fixed_budget_scenario,
}


# -- the torchrun worker -------------------------------------------------------------------------------
def _count_file_writes(counts: dict[str, int]) -> None:
    """Count every run-file write of this process (the loop writes only through these three)."""
    for name in ("atomic_output", "atomic_write_json", "atomic_write_text"):
        original = getattr(conceptclef.training.checkpoints, name)

        def counted(*args: Any, _original: Callable = original, **kwargs: Any) -> Any:
            counts["writes"] += 1
            return _original(*args, **kwargs)

        setattr(conceptclef.training.checkpoints, name, counted)


def worker_main(out: Path) -> None:
    torch.set_num_threads(1)
    assert distributed.init_if_launched() and distributed.world_size() == 2
    rank = distributed.rank()
    counts = {"writes": 0}
    _count_file_writes(counts)
    for name, scenario in SCENARIOS.items():
        started = time.perf_counter()
        result = scenario(out / name)
        np.savez(out / f"{name}.rank{rank}.npz", **result)
        if rank == 0:
            print(f"{name}: {time.perf_counter() - started:.1f}s", flush=True)
    (out / f"writes.rank{rank}.json").write_text(json.dumps(counts))
    distributed.destroy()


# -- the tests -----------------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """Run every scenario under torchrun with 2 gloo processes on 127.0.0.1; the directory of their results."""
    out = tmp_path_factory.mktemp("torchrun")
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), GLOO_SOCKET_IFNAME="lo", CONCEPTCLEF_PROGRESS="0", CUDA_VISIBLE_DEVICES="")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={_free_loopback_port()}", __file__, str(out),
    ]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert finished.returncode == 0, f"torchrun failed:\n{finished.stdout[-3000:]}\n{finished.stderr[-6000:]}"
    return out


def _ranks(out: Path, name: str) -> list[dict[str, np.ndarray]]:
    return [dict(np.load(out / f"{name}.rank{rank}.npz")) for rank in (0, 1)]


def _single(name: str, tmp_path: Path) -> dict[str, np.ndarray]:
    assert distributed.world_size() == 1
    return SCENARIOS[name](tmp_path / name)


def _assert_every_rank_has_the_same_result(ranks: list[dict[str, np.ndarray]]) -> None:
    for key in ranks[0]:
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key], err_msg=key)


def test_outside_torchrun_nothing_is_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.init_if_launched()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main_process()) == (0, 1, True)
    assert distributed.current_shard() == Shard() and distributed.shard_for(0) == Shard()
    rows = torch.arange(6).reshape(3, 2)
    assert distributed.all_gather_rows(rows) is rows
    distributed.barrier()


def test_shards_are_contiguous_unequal_and_never_padded():
    assert [shard_indices(7, rank, 2).tolist() for rank in (0, 1)] == [[0, 1, 2, 3], [4, 5, 6]]
    for size in (0, 1, 5, 16, 37):
        for world in (1, 2, 3, 4):
            shards = [shard_indices(size, rank, world) for rank in range(world)]
            np.testing.assert_array_equal(np.concatenate(shards), np.arange(size))
            assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert distributed.Shard(0, 4) != distributed.SINGLE


def test_each_rank_takes_its_slice_of_the_single_process_batches():
    for size, world in ((37, 2), (37, 3), (48, 2), (20, 4)):
        single = list(batch_sampler(size, 8, shuffle=True, generator=torch.Generator().manual_seed(4)))
        per_rank = [
            list(batch_sampler(size, 8, shuffle=True, generator=torch.Generator().manual_seed(4), shard=Shard(rank, world)))
            for rank in range(world)
        ]
        sizes = training_batch_sizes(size, 8, world)
        assert all(len(batches) == len(sizes) for batches in per_rank)
        for step, global_size in enumerate(sizes):
            joined = [index for batches in per_rank for index in batches[step]]
            assert joined == single[step][:global_size] and len(joined) == global_size
            assert min(len(batches[step]) for batches in per_rank) >= 2  # batch norm gets 2+ images per rank
    assert training_batch_sizes(37, 8, 1) == [8, 8, 8, 8, 5] and training_batch_sizes(37, 8, 3) == [8, 8, 8, 8]
    with pytest.raises(ValueError, match="at least one image per process"):
        batch_sampler(37, 2, shuffle=True, shard=Shard(0, 3))


def test_assembled_outputs_refuse_duplicated_or_missing_rows():
    part = (torch.tensor([0, 1, 2]), torch.ones(3, 2))
    assert assemble([part], 3).shape == (3, 2)
    with pytest.raises(RuntimeError, match="distinct"):
        assemble([part, (torch.tensor([2]), torch.ones(1, 2))], 3)  # a padded duplicate of row 2
    with pytest.raises(RuntimeError, match="distinct"):
        assemble([part], 4)


def test_sync_batch_norm_is_swapped_in_and_back_with_the_trained_statistics():
    network = create_network("test_efficientnet", "none", 3, 0.0)
    kinds = {type(module).__name__ for module in network.modules()}
    swap = SyncBatchNormSwap(network)
    assert {type(module).__name__ for module in network.modules()} & {"SyncBatchNorm", "SyncBatchNormAct"}
    assert "BatchNormAct2d" not in {type(module).__name__ for module in network.modules()}
    with torch.no_grad():
        network.backbone.bn1.running_mean.fill_(0.25)
    swap.restore()
    assert {type(module).__name__ for module in network.modules()} == kinds
    assert torch.all(network.backbone.bn1.running_mean == 0.25)
    network.eval()(torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8))


def test_buffer_averaging_skips_the_constant_pixel_mean_and_std_and_frozen_batch_norms():
    network = create_network("test_efficientnet", "none", 3, 0.0).train()
    averaged = {id(buffer) for buffer in distributed.buffers_to_average(network)}
    assert id(network.pixel_mean) not in averaged and id(network.pixel_std) not in averaged  # summed over 3 ranks: drift
    assert id(network.backbone.bn1.running_mean) in averaged and id(network.backbone.bn1.running_var) in averaged
    assert all(buffer.is_floating_point() for buffer in distributed.buffers_to_average(network))
    network.backbone.bn1.eval()  # frozen statistics keep their pretrained values
    assert id(network.backbone.bn1.running_mean) not in {id(b) for b in distributed.buffers_to_average(network)}


@pytest.mark.slow
def test_two_ranks_gather_exactly_the_rows_in_their_original_order(two_ranks):
    ranks = _ranks(two_ranks, "gather")
    assert [len(result["own_rows"]) for result in ranks] == [4, 3]
    for result in ranks:  # every rank has all 7 rows, no padding duplicate, in order
        np.testing.assert_array_equal(result["gathered"], np.stack([np.arange(7), np.arange(7) * 10], axis=1))
        np.testing.assert_array_equal(result["forward"][:, 0], np.arange(7, dtype=np.float32))


@pytest.mark.slow
def test_head_training_on_two_ranks_matches_one_process(two_ranks, tmp_path):
    ranks = _ranks(two_ranks, "head")
    _assert_every_rank_has_the_same_result(ranks)
    single = _single("head", tmp_path)
    assert ranks[0]["probabilities"].shape == (VALID_ROWS, len(CUIS))
    np.testing.assert_allclose(ranks[0]["valid_metric"], single["valid_metric"], atol=1e-6)
    np.testing.assert_allclose(ranks[0]["train_loss"], single["train_loss"], atol=1e-5)
    np.testing.assert_allclose(ranks[0]["probabilities"], single["probabilities"], atol=1e-5)
    np.testing.assert_allclose(ranks[0]["embeddings"], single["embeddings"], atol=1e-5)
    assert max(single["valid_metric"]) > 0.5  # the comparison is about a model that learned something


@pytest.mark.slow
def test_only_rank_zero_writes_the_run_files(two_ranks):
    writes = [json.loads((two_ranks / f"writes.rank{rank}.json").read_text())["writes"] for rank in (0, 1)]
    assert writes[0] > 0 and writes[1] == 0
    state = json.loads((two_ranks / "head" / "state.json").read_text())
    assert state["finished"] and state["epochs_completed"] == HEAD.epochs
    assert len((two_ranks / "head" / "metrics.csv").read_text().splitlines()) == HEAD.epochs + 1
    assert not list((two_ranks / "head").glob("*.partial")) and not (two_ranks / "head" / "resume.pt").exists()
    assert ConceptModel.is_trained(two_ranks / "head")


@pytest.mark.slow
def test_an_interrupted_two_rank_run_resumes_on_both_ranks_and_ends_the_same(two_ranks):
    resumed, uninterrupted = _ranks(two_ranks, "resumed_head"), _ranks(two_ranks, "head")
    _assert_every_rank_has_the_same_result(resumed)
    assert resumed[0]["epochs_run"].tolist() == [3, 4]
    np.testing.assert_array_equal(resumed[0]["valid_metric"], uninterrupted[0]["valid_metric"])
    np.testing.assert_allclose(resumed[0]["probabilities"], uninterrupted[0]["probabilities"], atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["full_group_norm", "layerwise_group_norm"])
def test_fine_tuning_without_batch_norm_matches_one_process(two_ranks, tmp_path, name):
    ranks = _ranks(two_ranks, name)
    _assert_every_rank_has_the_same_result(ranks)
    single = _single(name, tmp_path)
    np.testing.assert_allclose(ranks[0]["train_loss"], single["train_loss"], atol=1e-4)
    np.testing.assert_allclose(ranks[0]["probabilities"], single["probabilities"], atol=1e-4)
    np.testing.assert_allclose(ranks[0]["valid_metric"], single["valid_metric"], atol=1e-6)


@pytest.mark.slow
def test_full_fine_tuning_with_per_rank_batch_norm_stays_close_to_one_process(two_ranks, tmp_path):
    ranks = _ranks(two_ranks, "full_batch_norm")
    _assert_every_rank_has_the_same_result(ranks)  # buffers are averaged, so ranks still agree exactly
    single = _single("full_batch_norm", tmp_path)
    distributed_probabilities, single_probabilities = ranks[0]["probabilities"], single["probabilities"]
    assert not np.array_equal(distributed_probabilities, single_probabilities)  # half-batch statistics
    assert np.abs(distributed_probabilities - single_probabilities).mean() < BATCH_NORM_TOLERANCE
    assert np.mean(distributed_probabilities.argmax(1) == single_probabilities.argmax(1)) >= 1 - BATCH_NORM_TOLERANCE
    np.testing.assert_allclose(ranks[0]["train_loss"], single["train_loss"], rtol=BATCH_NORM_TOLERANCE)
    assert abs(ranks[0]["valid_metric"][-1] - single["valid_metric"][-1]) <= BATCH_NORM_TOLERANCE


@pytest.mark.slow
def test_a_fixed_budget_on_two_ranks_takes_the_same_steps_and_weights_as_one_process(two_ranks, tmp_path):
    """The final fit under torchrun: both ranks stop at the same step, with no validation set to shard."""
    ranks = _ranks(two_ranks, "fixed_budget")
    _assert_every_rank_has_the_same_result(ranks)
    single = _single("fixed_budget", tmp_path)
    assert ranks[0]["steps"].tolist() == single["steps"].tolist() == [5, 7]
    np.testing.assert_allclose(ranks[0]["lr"], [FULL.learning_rate * 0.5, FULL.learning_rate * 0.25])
    np.testing.assert_allclose(ranks[0]["train_loss"], single["train_loss"], atol=1e-4)
    np.testing.assert_allclose(ranks[0]["probabilities"], single["probabilities"], atol=1e-4)
    state = json.loads((two_ranks / "fixed_budget" / "state.json").read_text())
    assert state["finished"] and state["history"][-1]["steps"] == BUDGET.steps


if __name__ == "__main__":
    worker_main(Path(sys.argv[1]))
