"""A fixed step budget that replays an early-stopped run's schedule (the final fit on train + valid).

The final fit (`[development] scheme = "final_fit"`) retrains a network on train + valid, where
nothing is held out to stop on: it takes the number of optimizer steps the usual run had taken
at its best (restored) round, and the learning rate and the layer-wise unfreezing those steps had
in the usual run, read from that run's history (`state.json`):

- warm-up and cosine: the usual run's arithmetic (`schedule.learning_rate_factor`) over the usual
  run's planned steps, so the final fit stops where the usual run's cosine had reached at its best
  round, not at a cosine of its own;
- plateau: each usual round's recorded head rate divided by what the warm-up gave at its end is
  the plateau's cut in force during that round; the final fit applies it over the same steps;
- unfreezing: the usual round that held a step decides how many backbone groups train at it.

Pure functions of the history and the config, so the budget can be tested without training.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from conceptclef.core.config import TrainingConfig
from conceptclef.training.schedule import learning_rate_factor

__all__ = ["ReplayError", "StepReplay", "steps_at_rounds"]


class ReplayError(ValueError):
    """The usual run's record cannot give a budget (not finished, or written before the budget existed)."""


def steps_at_rounds(history: list[dict[str, Any]], steps_per_pass: int) -> list[int]:
    """Cumulative optimizer steps at the end of each round of `history`.

    A round records its steps when it holds several passes or the float16 scaler skipped steps;
    otherwise it ended after `epoch` passes of `steps_per_pass` steps each.
    """
    return [int(record["steps"]) if "steps" in record else int(record["epoch"]) * steps_per_pass for record in history]


@dataclass(frozen=True)
class StepReplay:
    """The optimizer steps to take and the schedule they follow (see the module docstring).

    `round_ends[r]` is the usual run's step count at the end of its round r and `round_scales[r]`
    the plateau's factor in force during it (1.0 for a cosine); `source` identifies the usual run
    (its job fingerprint), so a retrained usual network changes the replay's identity too.
    """

    steps: int
    total_steps: int
    warmup_steps: int
    schedule: str
    round_ends: tuple[int, ...]
    round_scales: tuple[float, ...]
    source: str
    warmup: "StepReplay | None" = None  # the head warm-up's own replay (fine-tuning with head_warmup_epochs)

    @classmethod
    def from_state(cls, state: dict[str, Any], training: TrainingConfig) -> "StepReplay":
        """The budget of a finished usual run from its `state.json` and the settings it trained with."""
        if not state.get("finished"):
            raise ReplayError("the usual run has not finished")
        if "steps_per_pass" not in state or "total_steps" not in state:
            raise ReplayError("the usual run's record holds no step counts (trained by an older version); retrain it")
        history = list(state["history"])
        best_epoch = int(state["best_epoch"])
        rounds = [int(record["epoch"]) for record in history]
        if best_epoch not in rounds:
            raise ReplayError(f"the best epoch {best_epoch} is not a round of the usual run's history")
        ends = steps_at_rounds(history, int(state["steps_per_pass"]))
        scales = [
            _plateau_scale(float(record["lr"]), end, training) if training.schedule == "plateau" else 1.0
            for record, end in zip(history, ends)
        ]
        return cls(
            steps=ends[rounds.index(best_epoch)],
            total_steps=int(state["total_steps"]),
            warmup_steps=training.warmup_steps,
            schedule=training.schedule,
            round_ends=tuple(ends),
            round_scales=tuple(scales),
            source=str(state["fingerprint"]),
        )

    def round_at(self, step: int) -> int:
        """The usual run's round that held 0-based optimizer step `step` (the last one beyond them)."""
        return min(bisect.bisect_right(self.round_ends, step), max(len(self.round_ends) - 1, 0))

    def learning_rate_factor(self, step: int) -> float:
        """Multiplier of every group's base rate at 0-based optimizer step `step`, as in the usual run."""
        factor = learning_rate_factor(step, self.warmup_steps, self.total_steps, self.schedule)
        if self.schedule == "plateau" and self.round_scales:
            factor *= self.round_scales[self.round_at(step)]
        return factor

    @property
    def fingerprint(self) -> str:
        """Identity of the replay (a part of the final-fit job's fingerprint)."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:24]


def _plateau_scale(recorded_rate: float, steps_done: int, training: TrainingConfig) -> float:
    """The plateau's factor in a round: its recorded head rate over the base rate times the warm-up's factor.

    Under the plateau rule the warm-up schedule is stepped only while warming up, so after
    `steps_done` steps its factor is the one of step min(steps_done, warmup_steps); a cut made
    during the warm-up is overwritten by the next warm-up step, which this ratio shows as 1.
    """
    base = training.learning_rate * learning_rate_factor(min(steps_done, training.warmup_steps), training.warmup_steps, 1, "plateau")
    if base <= 0:
        return 1.0
    scale = recorded_rate / base
    return 1.0 if math.isclose(scale, 1.0, rel_tol=1e-9) else scale
