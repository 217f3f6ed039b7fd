"""What the CUDA path does differently, shown on the CPU: step-based validation, persistent loaders,
finiteness checks, float16 loss scaling (GradScaler on the CPU), resume across devices, device
augmentation, memory layouts, shared memory."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import conceptclef.training.loop as loop
from conceptclef.core.config import AugmentConfig, load_config
from conceptclef.router import ModalityRouter
from conceptclef.training.augment import DeviceAugmenter
from conceptclef.training.batches import ImageBatches, ShuffledPasses, batch_loader
from conceptclef.training.inference import DeviceSettings, autocast_dtype
from conceptclef.training.schedule import passes_per_validation
from conceptclef.training.shared_memory import SharedMemoryError, check_shared_memory, shared_memory_problem
from synthetic_images import colour_coded_images

ROOT = Path(__file__).resolve().parents[1]
CONFIG = load_config(ROOT / "configs" / "test.toml")
SIZE = CONFIG.data.image_size
ROUTER = dataclasses.replace(CONFIG.router, epochs=3, early_stopping_patience=5)  # full fine-tuning, augmented

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Interrupted(Exception):
    pass


def _data(count: int = 48):
    images, classes = colour_coded_images(count, SIZE, 3, seed=0)
    valid_images, valid_classes = colour_coded_images(24, SIZE, 3, seed=100)
    return images, [f"cat{c}" for c in classes], valid_images, [f"cat{c}" for c in valid_classes]


def _fit(training, work_dir: Path, on_epoch_end=None, count: int = 48) -> ModalityRouter:
    images, categories, valid_images, valid_categories = _data(count)
    return ModalityRouter(training, SIZE, "cpu", seed=3).fit(images, categories, valid_images, valid_categories, work_dir, on_epoch_end)


def _weights(router: ModalityRouter) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in router.network_.state_dict().items()}


def _same_weights(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)


def _without_time(history: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if key != "seconds"} for row in history]


# -- one loader for every pass ---------------------------------------------------------------------
def test_one_persistent_sampler_draws_the_batches_each_epoch_drew_with_its_own_loader():
    images = np.zeros((37, SIZE, SIZE, 3), dtype=np.uint8)
    sampler = ShuffledPasses(len(images), 8)
    for value in (11, 12, 987654321):
        old = batch_loader(ImageBatches(images), 8, shuffle=True, generator=torch.Generator().manual_seed(value))
        sampler.set_pass(value)
        assert [sorted(batch.indices) for batch in sampler] == [rows.tolist() for _, _, rows in old]  # loaders sort rows
    assert len(sampler) == 5


def test_loader_batches_are_a_channels_last_view_made_contiguous_on_the_device_only_when_needed():
    pixels = np.arange(2 * SIZE * SIZE * 3, dtype=np.int64).astype(np.uint8).reshape(2, SIZE, SIZE, 3)
    batch, _, _ = ImageBatches(pixels)[[0, 1]]
    assert batch.shape == (2, 3, SIZE, SIZE) and batch.is_contiguous(memory_format=torch.channels_last)
    cpu = DeviceSettings(torch.device("cpu")).inputs(batch)
    assert cpu.is_contiguous() and torch.equal(cpu, batch)  # CPU numerics: the contiguous NCHW of before
    as_cuda_would = DeviceSettings(torch.device("cpu"), channels_last=True).inputs(batch)
    assert as_cuda_would.is_contiguous(memory_format=torch.channels_last) and as_cuda_would.data_ptr() == batch.data_ptr()


# -- validation, checkpoints and budgets in optimizer steps ----------------------------------------
def test_validation_every_n_steps_groups_whole_passes():
    training = dataclasses.replace(ROUTER, batch_size=64, validate_every_steps=10)
    assert passes_per_validation(training, 50) == 10  # one step a pass
    assert passes_per_validation(dataclasses.replace(training, validate_every_steps=0), 50) == 1
    assert passes_per_validation(training, 6400) == 1  # 100 steps a pass: every pass, as before


def test_a_small_category_validates_every_n_steps_and_resumes_exactly(tmp_path):
    training = dataclasses.replace(ROUTER, epochs=1, min_steps=12, validate_every_steps=4, early_stopping_patience=0)
    uninterrupted = _fit(training, tmp_path / "whole")  # 48 images at 16: 3 steps a pass, 4 passes
    history = uninterrupted.history_
    assert [row["epoch"] for row in history] == [2, 4] and [row["steps"] for row in history] == [6, 12]
    state = (tmp_path / "whole" / "metrics.csv").read_text().splitlines()
    assert len(state) == 3  # one row per validation, not per pass

    def stop_after_first(record: dict) -> None:
        if record["epoch"] == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        _fit(training, tmp_path / "resumed", stop_after_first)
    resumed = _fit(training, tmp_path / "resumed")
    assert _same_weights(_weights(resumed), _weights(uninterrupted))
    assert _without_time(resumed.history_) == _without_time(history)


def test_the_default_still_validates_every_pass(tmp_path):
    router = _fit(dataclasses.replace(ROUTER, epochs=2), tmp_path)
    assert [row["epoch"] for row in router.history_] == [1, 2] and "steps" not in router.history_[0]


def test_loader_workers_persist_across_passes_and_a_resumed_run_draws_the_same_augmentations(tmp_path, monkeypatch):
    started: list[int] = []
    original = torch.utils.data.DataLoader.__iter__

    def counting(self):
        if self.num_workers and (self._iterator is None or not self.persistent_workers):
            started.append(self.num_workers)
        return original(self)

    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", counting)
    training = dataclasses.replace(ROUTER, epochs=3)
    images, categories, valid_images, valid_categories = _data()
    whole = ModalityRouter(training, SIZE, "cpu", seed=3, num_workers=1)
    whole.fit(images, categories, valid_images, valid_categories, tmp_path / "whole")
    assert len(started) == 1 + 3  # one training loader for 3 passes (+ one validation loader a pass)

    def stop_after_two(record: dict) -> None:
        if record["epoch"] == 2:
            raise Interrupted

    resumed = ModalityRouter(training, SIZE, "cpu", seed=3, num_workers=1)
    with pytest.raises(Interrupted):
        resumed.fit(images, categories, valid_images, valid_categories, tmp_path / "resumed", stop_after_two)
    resumed.fit(images, categories, valid_images, valid_categories, tmp_path / "resumed")
    assert _same_weights(_weights(resumed), _weights(whole))


# -- finiteness: on the device, checked every N steps; float16 overflow skipped, not fatal ----------
class _LossWithOverflow(torch.nn.Module):
    """Cross-entropy whose first `bad` calls return inf (as a float16 overflow would)."""

    def __init__(self, bad: int) -> None:
        super().__init__()
        self.calls, self.bad = 0, bad

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        loss = torch.nn.functional.cross_entropy(logits, targets)
        return loss * float("inf") if self.calls <= self.bad else loss


def _with_loss(monkeypatch, loss: torch.nn.Module) -> None:
    original = ModalityRouter._objective

    def objective(self, targets, num_classes):
        return dataclasses.replace(original(self, targets, num_classes), loss=loss)

    monkeypatch.setattr(ModalityRouter, "_objective", objective)


def test_a_non_finite_loss_without_loss_scaling_stops_the_run_before_its_checkpoint(tmp_path, monkeypatch):
    _with_loss(monkeypatch, _LossWithOverflow(bad=1))
    with pytest.raises(FloatingPointError, match=r"non-finite in epoch 1 \(\d+ steps\); lower learning_rate of training settings$"):
        _fit(dataclasses.replace(ROUTER, epochs=1), tmp_path)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_a_skipped_float16_step_neither_stops_the_run_nor_advances_the_learning_rate_schedule(tmp_path, monkeypatch):
    _with_loss(monkeypatch, _LossWithOverflow(bad=2))
    monkeypatch.setattr(loop, "grad_scaler", lambda settings: torch.amp.GradScaler("cpu", enabled=True))
    training = dataclasses.replace(ROUTER, epochs=2, warmup_steps=100)
    router = _fit(training, tmp_path)  # 2 passes of 3 steps, the first 2 overflow
    assert router.history_[-1]["skipped_steps"] == 2 and router.history_[-1]["steps"] == 4
    assert router.history_[-1]["lr"] == pytest.approx(training.learning_rate * (4 + 1) / 100)  # 4 real steps, not 6
    assert np.isfinite(router.history_[0]["train_loss"])  # the skipped steps are left out of the mean


def test_a_float16_run_that_only_skips_stops_with_one_clear_error(tmp_path, monkeypatch):
    _with_loss(monkeypatch, _LossWithOverflow(bad=10**6))
    monkeypatch.setattr(loop, "grad_scaler", lambda settings: torch.amp.GradScaler("cpu", enabled=True))
    monkeypatch.setattr(loop, "MAX_CONSECUTIVE_SKIPS", 5)
    with pytest.raises(FloatingPointError, match="skipped 5 steps in a row"):
        _fit(dataclasses.replace(ROUTER, epochs=3), tmp_path)


# -- resume across devices, and all-or-nothing ---------------------------------------------------
def test_a_run_started_without_loss_scaling_resumes_with_it(tmp_path, monkeypatch, caplog):
    """CPU (scaler disabled, empty state) resumed on a float16 GPU (scaler enabled): resume, fresh scale."""
    training = dataclasses.replace(ROUTER, epochs=3)
    with pytest.raises(Interrupted):
        _fit(training, tmp_path, lambda record: (_ for _ in ()).throw(Interrupted) if record["epoch"] == 1 else None)
    monkeypatch.setattr(loop, "grad_scaler", lambda settings: torch.amp.GradScaler("cpu", enabled=True))
    resumed_from: list[int] = []
    with caplog.at_level(logging.WARNING, logger="conceptclef"):
        router = _fit(training, tmp_path, lambda record: resumed_from.append(record["epoch"]))
    assert "training from scratch" not in caplog.text
    assert resumed_from == [2, 3] and len(router.history_) == 3


def test_a_resume_that_fails_half_way_restarts_optimizer_and_schedules_too(tmp_path, caplog):
    training = dataclasses.replace(ROUTER, epochs=2)
    uninterrupted = _fit(training, tmp_path / "whole")
    with pytest.raises(Interrupted):
        _fit(training, tmp_path / "broken", lambda record: (_ for _ in ()).throw(Interrupted) if record["epoch"] == 1 else None)
    resume = torch.load(tmp_path / "broken" / "resume.pt", weights_only=True)
    resume["step_scheduler"] = {"not": "a scheduler state"}  # applied after the model and the optimizer
    torch.save(resume, tmp_path / "broken" / "resume.pt")
    with caplog.at_level(logging.WARNING, logger="conceptclef"):
        restarted = _fit(training, tmp_path / "broken")
    assert "training from scratch" in caplog.text
    assert _same_weights(_weights(restarted), _weights(uninterrupted))  # no stale optimizer moments


# -- precision ------------------------------------------------------------------------------------
def test_bfloat16_is_preferred_where_the_gpu_has_it_and_needs_no_loss_scaling():
    assert autocast_dtype("auto", (9, 0)) == torch.bfloat16 and autocast_dtype("auto", (7, 5)) == torch.float16
    assert autocast_dtype("auto", None) == torch.float16 and autocast_dtype("float16", (9, 0)) == torch.float16
    assert autocast_dtype("bfloat16", (7, 0)) == torch.bfloat16
    assert not DeviceSettings(torch.device("cpu"), amp=True, amp_dtype=torch.bfloat16).scales_loss
    assert DeviceSettings(torch.device("cpu"), amp=True, amp_dtype=torch.float16).scales_loss
    cpu = DeviceSettings.for_device(torch.device("cpu"), amp=True, channels_last=True)
    assert not cpu.amp and not cpu.channels_last and not cpu.pin_memory and not loop.grad_scaler(cpu).is_enabled()


# -- device augmentation ---------------------------------------------------------------------------
def _asymmetric(count: int = 2) -> torch.Tensor:
    image = torch.zeros(count, 3, 16, 16, dtype=torch.uint8)
    image[:, :, 2:6, 3:12] = 200
    image[:, 1, 10:14, 1:4] = 90
    return image


def test_device_augmentation_flips_exactly_and_rotates_like_torch():
    images = _asymmetric()
    torch.manual_seed(0)
    flips = DeviceAugmenter(AugmentConfig(horizontal_flip=True, rotation_degrees=0, zoom=0, shear_degrees=0))
    out = flips(images)
    for image, result in zip(images, out):
        assert torch.allclose(result, image.float(), atol=1e-3) or torch.allclose(result, image.flip(-1).float(), atol=1e-3)
    rotate = DeviceAugmenter(AugmentConfig(horizontal_flip=False, rotation_degrees=90, zoom=0, shear_degrees=0))
    rotate.matrices = lambda count, device: torch.tensor([[[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]]]).repeat(count, 1, 1)
    turned = rotate(images)[0]
    assert any(torch.allclose(turned, torch.rot90(images[0].float(), k, dims=(1, 2)), atol=1e-3) for k in (1, 3))


def test_device_augmentation_draws_a_transform_per_image_within_the_configured_ranges():
    augmenter = DeviceAugmenter(AugmentConfig(horizontal_flip=False, rotation_degrees=10, zoom=0.1, shear_degrees=5))
    torch.manual_seed(1)
    matrices = augmenter.matrices(256, torch.device("cpu"))
    linear = torch.linalg.inv(matrices[:, :, :2])
    scales = torch.sqrt(torch.linalg.det(linear).abs())
    assert scales.min() > 0.9 - 1e-4 and scales.max() < 1.1 + 1e-4 and scales.std() > 0.01
    assert len({tuple(row.flatten().tolist()) for row in matrices}) == 256
    out = augmenter(_asymmetric(4))
    assert out.dtype == torch.float32 and out.shape == (4, 3, 16, 16) and 0 <= out.min() and out.max() <= 255


def test_training_with_device_augmentation(tmp_path):
    router = _fit(dataclasses.replace(ROUTER, epochs=1, augment_on_device=True), tmp_path)
    assert len(router.history_) == 1 and np.isfinite(router.history_[0]["train_loss"])


# -- layouts of loaded models ------------------------------------------------------------------------
def test_a_loaded_model_is_channels_last_when_its_inputs_are(tmp_path, monkeypatch):
    _fit(dataclasses.replace(ROUTER, epochs=1), tmp_path)
    monkeypatch.setattr(
        ModalityRouter, "_device_settings", lambda self: DeviceSettings(self.device_, channels_last=True)
    )
    loaded = ModalityRouter.load(tmp_path, "cpu")
    convolutions = [m.weight for m in loaded.network_.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convolutions and all(weight.is_contiguous(memory_format=torch.channels_last) for weight in convolutions)


# -- shared memory ---------------------------------------------------------------------------------
def test_too_little_shared_memory_is_refused_in_one_line_naming_the_fixes(monkeypatch):
    batch = 64 * 384 * 384 * 3
    problem = shared_memory_problem(64 * 2**20, workers=8, batch_bytes=batch)
    assert problem is not None and "\n" not in problem
    assert "64 MiB free" in problem and "432 MiB" in problem and "--shm-size=1g" in problem and "data.num_workers <= 1" in problem
    assert shared_memory_problem(2**30, workers=8, batch_bytes=batch) is None
    assert shared_memory_problem(0, workers=0, batch_bytes=batch) is None
    monkeypatch.setattr("conceptclef.training.shared_memory.free_shared_memory", lambda path=None: 64 * 2**20)
    with pytest.raises(SharedMemoryError, match="--shm-size"):
        check_shared_memory(8, batch)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(SharedMemoryError, match="x 4 process"):
        check_shared_memory(1, batch)


def test_loader_augmentation_of_the_permuted_view_equals_that_of_a_contiguous_batch():
    """The CPU path's numerics: augmenting the NHWC view gives the bytes the old .contiguous() batch gave."""
    from conceptclef.training.augment import BatchAugmenter

    pixels = torch.randint(0, 256, (3, 24, 24, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    augmenter = BatchAugmenter(AugmentConfig(horizontal_flip=True, rotation_degrees=10, zoom=0.1, shear_degrees=5))
    torch.manual_seed(9)
    from_view = augmenter(pixels.permute(0, 3, 1, 2))
    torch.manual_seed(9)
    from_copy = augmenter(pixels.permute(0, 3, 1, 2).contiguous())
    assert torch.equal(from_view, from_copy)


def test_training_and_prediction_take_the_networks_amp_dtype(tmp_path, monkeypatch):
    """amp_dtype reaches the training loop too (it once built its settings without it: "auto" always)."""
    asked: list[str] = []
    original = DeviceSettings.for_device.__func__

    def recording(cls, device, amp, channels_last, amp_dtype="auto"):
        asked.append(amp_dtype)
        return original(cls, device, amp, channels_last, amp_dtype)

    monkeypatch.setattr(DeviceSettings, "for_device", classmethod(recording))
    router = _fit(dataclasses.replace(ROUTER, epochs=1, amp_dtype="float16"), tmp_path, count=16)
    router.predict_proba(_data(16)[2])
    assert asked and set(asked) == {"float16"}
    assert DeviceSettings.for_training(torch.device("cpu"), dataclasses.replace(ROUTER, amp_dtype="bfloat16")).amp_dtype == torch.bfloat16
