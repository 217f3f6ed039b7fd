"""Training curves: a picture of each model's per-epoch loss, validation metric and learning rate.

metrics.csv (training.checkpoints) already holds the numbers epoch by epoch; the PNG beside it
shows at a glance whether a model was still learning when it stopped (the metric still rising),
overfitting (loss falling, metric falling) or never learned (a flat metric). It is drawn once,
when the model finishes, so a run pays for one small figure per model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from conceptclef.core.runfiles import atomic_output  # noqa: E402

CURVES_FILE = "curves.png"


def write_training_curves(path: Path, history: list[dict[str, Any]], metric_name: str, title: str) -> None:
    """Draw train loss, validation metric (best epoch marked) and learning rate against the epoch."""
    epochs = [int(record["epoch"]) for record in history]
    figure, (loss_axis, metric_axis, rate_axis) = plt.subplots(1, 3, figsize=(12, 3.4))
    try:
        loss_axis.plot(epochs, [record["train_loss"] for record in history], marker=".")
        loss_axis.set(title="training loss", xlabel="epoch")
        validated = [(epoch, record["valid_metric"]) for epoch, record in zip(epochs, history) if "valid_metric" in record]
        metrics = [metric for _, metric in validated]  # none in a fixed-budget run (training.replay)
        metric_axis.plot([epoch for epoch, _ in validated], metrics, marker=".", color="tab:green")
        if metrics:
            best = max(range(len(metrics)), key=metrics.__getitem__)
            metric_axis.scatter([validated[best][0]], [metrics[best]], color="tab:red", zorder=3, label=f"best: epoch {validated[best][0]}")
            metric_axis.legend(loc="lower right", fontsize="small")
        metric_axis.set(title=f"validation {metric_name}", xlabel="epoch")
        rates = [record["lr"] for record in history]
        rate_axis.plot(epochs, rates, marker=".", color="tab:purple")
        # log scale shows plateau cuts best, but a cosine ends at 0, which a log axis would drop
        rate_axis.set(title="head learning rate (epoch end)", xlabel="epoch", yscale="log" if min(rates, default=0) > 0 else "linear")
        for axis in (loss_axis, metric_axis, rate_axis):
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        figure.suptitle(title)
        figure.tight_layout()
        with atomic_output(path, "wb") as stream:
            figure.savefig(stream, format="png", dpi=80)
    finally:
        plt.close(figure)
