"""benchmarks/gpu_check.sh on a machine without CUDA: its refusal, and its parsing of the loop's own logs."""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conceptclef.core.config import load_config
from conceptclef.router import ModalityRouter
from synthetic_images import colour_coded_images

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402

CONFIG = load_config(ROOT / "configs" / "test.toml")
BARE = {
    "backbone": "tf_efficientnet_lite0", "image_size": 384, "batch_size": 64, "dtype": "bfloat16",
    "train_images_per_second": 2000.0, "forward_images_per_second": 6000.0, "peak_memory_mib": 9000,
}


def test_the_script_refuses_in_one_line_without_a_cuda_gpu(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    environment = {**os.environ, "PATH": f"{fake_bin}:/usr/bin:/bin"}  # no nvidia-smi
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "work")], capture_output=True, text=True, env=environment, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "no CUDA GPU" in result.stderr
    assert not (tmp_path / "work").exists()  # refused before any work

    (fake_bin / "nvidia-smi").write_text("#!/bin/sh\necho 'No devices were found'\nexit 6\n")
    (fake_bin / "nvidia-smi").chmod(0o755)
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True, env=environment, timeout=60)
    assert result.returncode == 2 and "no CUDA GPU" in result.stderr


def test_the_helper_refuses_a_torch_without_cuda_in_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(["require-cuda"])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "sees no CUDA GPU" in error


def test_the_report_reads_the_training_loops_own_log_lines(tmp_path, caplog, one_torch_thread):
    """The parser must match what the loop really logs: train a tiny router on the CPU and parse its log."""
    images, classes = colour_coded_images(48, CONFIG.data.image_size, 3, seed=0)
    valid, valid_classes = colour_coded_images(24, CONFIG.data.image_size, 3, seed=1)
    training = dataclasses.replace(CONFIG.router, epochs=3, early_stopping_patience=0)
    with caplog.at_level(logging.INFO, logger="conceptclef"):
        ModalityRouter(training, CONFIG.data.image_size, "cpu").fit(
            images, [f"c{c}" for c in classes], valid, [f"c{c}" for c in valid_classes], tmp_path
        )
    log = "\n".join(f"00:00:00 {record.getMessage()}" for record in caplog.records)
    rates = gpu_check.training_rates(log)
    assert list(rates) == [f"router {tmp_path.name}"] and len(rates[f"router {tmp_path.name}"]) == 3
    assert all(rate > 0 for rate in rates[f"router {tmp_path.name}"])
    assert gpu_check.autocast_settings(log) == {f"router {tmp_path.name}": "cpu, float32"}

    lines = gpu_check.report_lines(log, BARE, predict_seconds=4.0, predict_images=1000, memory_samples="512\n10240\n9000\n")
    assert lines[0] == "autocast: cpu, float32"
    assert "train 2000 images/s" in lines[1] and "bfloat16" in lines[1]
    assert f"train-all router {tmp_path.name}:" in lines[2] and "of the bare loop" in lines[2]
    assert "predict: 250 images/s end to end" in lines[3] and "2000 images/s" in lines[3]  # 6000 / 3 networks
    assert lines[4].endswith(": 10240 MiB")


def test_rates_skip_head_warmups_and_the_first_round():
    log = "\n".join(
        [
            "10:00:01 concepts global head-warmup epoch 1/2: loss 0.1, valid sample_f1 0.1, lr 0.001, 0.1s (training 90000 images/s)",
            "10:00:02 concepts global: training on cuda:0, autocast bfloat16, channels_last",
            "10:00:05 concepts global epoch 1/3: loss 0.1, valid sample_f1 0.2, lr 0.001, 3.0s (training 800 images/s)",
            "10:00:08 concepts global epoch 2/3: loss 0.1, valid sample_f1 0.3, lr 0.001, 2.0s (training 1900 images/s)",
            "10:00:10 concepts global epoch 3/3: loss 0.1, valid sample_f1 0.3, lr 0.001, 2.0s (training 2100 images/s)",
        ]
    )
    rates = gpu_check.training_rates(log)
    assert rates == {"concepts global": [800.0, 1900.0, 2100.0]}
    assert gpu_check.steady_rate(rates["concepts global"]) == 2000.0
    assert gpu_check.autocast_settings(log) == {"concepts global": "cuda:0, autocast bfloat16, channels_last"}
    ddp = log.replace("1900", "3700").replace("2100", "3900")
    small = {"images": 50, "steps": 1500, "validate_every_steps": 100, "seconds": 75.0}
    lines = gpu_check.report_lines(log, BARE, 10.0, 1000, "100\n", small=small, ddp_log=ddp)
    assert "1500 steps (validate_every_steps 100): 75.0 s (50 ms a step)" in lines[-2]
    assert lines[-1] == "torchrun 2 GPUs concepts global: 3800 images/s training = 1.90x one GPU"


def test_bad_inputs_to_the_report_are_named():
    with pytest.raises(ValueError, match="no nvidia-smi memory samples"):
        gpu_check.peak_memory_mib("")
    with pytest.raises(ValueError, match="did training run"):
        gpu_check.report_lines("nothing here", BARE, 1.0, 1, "1\n")


def test_hours_at_2026_scale_follow_from_the_measured_rates():
    assert gpu_check.gpu_hours(1000, 3000) == pytest.approx((6_206_000 / 1000 + 1_354_120 / 3000) / 3600)
    assert gpu_check.gpu_hours(1000, 3000, gpus=8) == pytest.approx(gpu_check.gpu_hours(1000, 3000) / (8 * 0.85))
    log = "10:00:05 concepts global epoch 2/3: loss 0.1, valid sample_f1 0.2, lr 0.001, 3.0s (training 1000 images/s)"
    full = {**BARE, "backbone": "tf_efficientnetv2_s.in21k_ft_in1k", "train_images_per_second": 1400.0, "forward_images_per_second": 3000.0}
    line = gpu_check.report_lines(log, BARE, 1.0, 1, "1\n", full=full)[-1]
    expected = gpu_check.gpu_hours(1400 * 0.5, 3000)  # the loop ran at half its bare loop on Lite0
    assert line.startswith(f"configs/gpu.toml at 2026 scale, full epoch budgets: {expected:.1f} h on 1 GPU") and "at 50% of the bare" in line
