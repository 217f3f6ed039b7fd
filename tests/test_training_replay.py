"""The final fit's step budget: the usual run's steps at its best round, and its learning rates and
unfreezing replayed step by step (training.replay), then the loop's fixed-budget mode on a tiny network."""

from __future__ import annotations

import dataclasses
import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from conceptclef.core.config import TrainingConfig, load_config
from conceptclef.router import ModalityRouter
from conceptclef.training.checkpoints import RunFiles
from conceptclef.training.replay import ReplayError, StepReplay, steps_at_rounds
from conceptclef.training.schedule import learning_rate_factor
from synthetic_images import colour_coded_images

ROOT = Path(__file__).resolve().parents[1]
CONFIG = load_config(ROOT / "configs" / "test.toml")
SIZE = CONFIG.data.image_size

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _state(history: list[dict], best_epoch: int, steps_per_pass: int = 10, total_steps: int = 100) -> dict:
    return {
        "finished": True, "fingerprint": "usual-job", "history": history, "best_epoch": best_epoch,
        "steps_per_pass": steps_per_pass, "total_steps": total_steps,
    }


def test_budget_is_the_steps_at_the_best_round():
    history = [{"epoch": epoch, "lr": 1e-3} for epoch in range(1, 8)]
    replay = StepReplay.from_state(_state(history, best_epoch=4), TrainingConfig(learning_rate=1e-3))
    assert replay.steps == 40
    assert replay.round_ends == (10, 20, 30, 40, 50, 60, 70)


def test_recorded_steps_win_over_passes():
    """Rounds of several passes (validate_every_steps) or with skipped float16 steps record their steps."""
    history = [{"epoch": 3, "steps": 29, "lr": 1.0}, {"epoch": 6, "steps": 60, "lr": 1.0}]
    assert steps_at_rounds(history, 10) == [29, 60]
    assert StepReplay.from_state(_state(history, best_epoch=3), TrainingConfig(learning_rate=1.0)).steps == 29


def test_cosine_spans_the_usual_runs_planned_steps():
    training = TrainingConfig(learning_rate=1e-3, schedule="cosine", warmup_steps=5)
    history = [{"epoch": epoch, "lr": 0.0} for epoch in range(1, 5)]
    replay = StepReplay.from_state(_state(history, best_epoch=3, total_steps=100), training)
    assert replay.steps == 30
    for step in (0, 4, 5, 17, 29, 60):
        assert replay.learning_rate_factor(step) == learning_rate_factor(step, 5, 100, "cosine")


def test_plateau_cuts_are_replayed_at_the_usual_steps():
    """Rates recorded per round: two cuts by 0.3 after rounds 2 and 4; the warm-up's first round runs below the base rate."""
    base = 1e-2
    training = TrainingConfig(learning_rate=base, schedule="plateau", lr_reduce_factor=0.3, warmup_steps=15)
    lrs = [base * 11 / 15, base, base * 0.3, base * 0.3, base * 0.09, base * 0.09]  # round 1 ends at step 10, mid warm-up
    history = [{"epoch": epoch, "lr": lr} for epoch, lr in zip(range(1, 7), lrs)]
    replay = StepReplay.from_state(_state(history, best_epoch=5), training)
    assert replay.steps == 50
    assert replay.round_scales == pytest.approx((1.0, 1.0, 0.3, 0.3, 0.09, 0.09))
    assert replay.learning_rate_factor(3) == pytest.approx(4 / 15)  # warm-up, as the usual run
    assert replay.learning_rate_factor(19) == pytest.approx(1.0)  # round 2 (steps 10-19)
    assert replay.learning_rate_factor(20) == pytest.approx(0.3)  # the first cut, from round 3's first step
    assert replay.learning_rate_factor(40) == pytest.approx(0.09)
    assert replay.round_at(0) == 0 and replay.round_at(9) == 0 and replay.round_at(10) == 1 and replay.round_at(999) == 5


def test_unfinished_or_old_usual_runs_give_no_budget():
    history = [{"epoch": 1, "lr": 1.0}]
    with pytest.raises(ReplayError, match="not finished"):
        StepReplay.from_state({**_state(history, 1), "finished": False}, TrainingConfig())
    old = _state(history, 1)
    del old["steps_per_pass"]
    with pytest.raises(ReplayError, match="older version"):
        StepReplay.from_state(old, TrainingConfig())


def test_replay_identity_follows_the_usual_run():
    history = [{"epoch": epoch, "lr": 1.0} for epoch in range(1, 4)]
    first = StepReplay.from_state(_state(history, 2), TrainingConfig(learning_rate=1.0))
    assert first.fingerprint == StepReplay.from_state(_state(history, 2), TrainingConfig(learning_rate=1.0)).fingerprint
    assert first.fingerprint != StepReplay.from_state({**_state(history, 2), "fingerprint": "retrained"}, TrainingConfig(learning_rate=1.0)).fingerprint
    assert first.fingerprint != StepReplay.from_state(_state(history, 3), TrainingConfig(learning_rate=1.0)).fingerprint


# -- the loop in fixed-budget mode ------------------------------------------------------------------
ROUTER = dataclasses.replace(CONFIG.router, epochs=4, early_stopping_patience=0, batch_size=16)


def _data(seed: int = 0):
    images, classes = colour_coded_images(40, SIZE, 3, seed=seed)
    valid_images, valid_classes = colour_coded_images(20, SIZE, 3, seed=seed + 100)
    return images, [f"cat{c}" for c in classes], valid_images, [f"cat{c}" for c in valid_classes]


@pytest.fixture(scope="module")
def usual_run(tmp_path_factory) -> tuple[Path, dict]:
    work_dir = tmp_path_factory.mktemp("usual") / "router"
    images, categories, valid_images, valid_categories = _data()
    ModalityRouter(ROUTER, SIZE, "cpu", seed=1).fit(images, categories, valid_images, valid_categories, work_dir)
    return work_dir, RunFiles(work_dir).read_state()


def test_usual_run_records_its_step_counts(usual_run):
    _, state = usual_run
    assert state["steps_per_pass"] == 3 and state["total_steps"] == 12  # 40 images at batch 16, 4 epochs


def test_fixed_budget_takes_exactly_the_budgeted_steps_on_train_plus_valid(tmp_path, usual_run):
    _, state = usual_run
    replay = dataclasses.replace(StepReplay.from_state(state, ROUTER), steps=7)  # 7 steps: a last pass cut short
    images, categories, valid_images, valid_categories = _data()
    both = np.concatenate([images, valid_images])
    empty = both[:0]
    router = ModalityRouter(ROUTER, SIZE, "cpu", seed=1, replay=replay)
    router.fit(both, categories + valid_categories, empty, [], tmp_path)
    final_state = RunFiles(tmp_path).read_state()
    assert final_state["finished"] and final_state["history"][-1]["steps"] == 7
    assert [record["epoch"] for record in final_state["history"]] == [1, 2]  # 60 images at batch 16: 4 steps a pass
    assert "valid_metric" not in final_state["history"][0]
    loaded = ModalityRouter.load(tmp_path, "cpu")
    assert loaded.predict_proba(valid_images).shape == (20, 3)


def test_fixed_budget_learning_rates_follow_the_replay(tmp_path, usual_run):
    _, state = usual_run
    replay = dataclasses.replace(
        StepReplay.from_state(state, ROUTER), steps=8, schedule="plateau", round_ends=(3, 6, 9), round_scales=(1.0, 0.5, 0.25)
    )
    images, categories, valid_images, valid_categories = _data()
    router = ModalityRouter(ROUTER, SIZE, "cpu", seed=1, replay=replay)
    router.fit(np.concatenate([images, valid_images]), categories + valid_categories, images[:0], [], tmp_path)
    history = RunFiles(tmp_path).read_state()["history"]
    # the rate after 4 steps (round 2 of the usual run) and after all 8 (round 3)
    assert [record["lr"] for record in history] == pytest.approx([ROUTER.learning_rate * 0.5, ROUTER.learning_rate * 0.25])


def test_fixed_budget_resumes_to_the_same_weights(tmp_path, usual_run):
    _, state = usual_run
    replay = dataclasses.replace(StepReplay.from_state(state, ROUTER), steps=10)
    images, categories, valid_images, valid_categories = _data()
    both, labels = np.concatenate([images, valid_images]), categories + valid_categories

    class Killed(Exception):
        pass

    def kill_after_first(record: dict) -> None:
        if record["epoch"] == 1:
            raise Killed

    with pytest.raises(Killed):
        ModalityRouter(ROUTER, SIZE, "cpu", seed=1, replay=replay).fit(both, labels, both[:0], [], tmp_path / "a", on_epoch_end=kill_after_first)
    resumed = ModalityRouter(ROUTER, SIZE, "cpu", seed=1, replay=replay).fit(both, labels, both[:0], [], tmp_path / "a")
    straight = ModalityRouter(ROUTER, SIZE, "cpu", seed=1, replay=replay).fit(both, labels, both[:0], [], tmp_path / "b")
    for left, right in zip(resumed.network_.state_dict().values(), straight.network_.state_dict().values()):
        assert torch.equal(left, right)
    assert RunFiles(tmp_path / "a").read_state()["history"][-1]["steps"] == 10


def test_layerwise_unfreezing_follows_the_usual_rounds(monkeypatch):
    """The Trainer unfreezes by the replayed run's round holding the next step, not by its own passes."""
    from conceptclef.training import loop

    training = TrainingConfig(finetune="layerwise", unfreeze_every_epochs=1, max_unfrozen_groups=0)
    replay = StepReplay(steps=9, total_steps=9, warmup_steps=0, schedule="plateau", round_ends=(3, 6, 9), round_scales=(1.0, 1.0, 1.0), source="x")
    trainer = loop.Trainer.__new__(loop.Trainer)
    trainer.training, trainer.replay, trainer.unfrozen, trainer.groups = training, replay, -2, [["a"], ["b"], ["c"]]
    calls: list[int] = []
    monkeypatch.setattr(loop, "unfreeze_top_groups", lambda network, groups, count: calls.append(count))
    monkeypatch.setattr(loop, "train_mode_except_frozen", lambda *args, **kwargs: None)
    trainer.network, trainer.phase = None, types.SimpleNamespace(module=None)
    unfrozen = []
    for step in range(9):
        trainer.optimizer_steps = step
        trainer._unfreeze(0)
        unfrozen.append(trainer.unfrozen)
    assert unfrozen == [0, 0, 0, 1, 1, 1, 2, 2, 2] and calls == [0, 1, 2]
    assert not math.isnan(replay.learning_rate_factor(5))
