"""The fine-tuning recipe's arithmetic: step budgets, learning-rate schedule, discriminative rates.

Pure functions of the config, so each choice can be tested without training anything.

- Budgets count optimizer steps, not passes: a category of 40 images makes 2 steps an epoch, so
  the same epoch count that suits the global model leaves it untrained (`min_steps`), and a
  large model's epochs can be capped (`max_steps`).
- The learning rate ramps up linearly for `warmup_steps` (a pretrained backbone hit at full rate
  by a random head's gradients forgets what it knew), then follows the schedule: held and cut on
  a validation plateau, or a cosine down to 0 at the end of the budget.
- Discriminative rates: the head learns at `learning_rate`, the top backbone group at
  `learning_rate * backbone_lr_factor`, each group below at `layer_lr_decay` times the one above
  (low layers hold generic edges and textures that small data should barely move).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from conceptclef.core.config import TrainingConfig


def steps_per_epoch(num_train: int, batch_size: int) -> int:
    """Optimizer steps in one pass over `num_train` images (the last batch may be short)."""
    return max(1, math.ceil(num_train / max(1, batch_size)))


def planned_epochs(training: TrainingConfig, num_train: int) -> int:
    """Epochs to run: `training.epochs`, raised to reach `min_steps`, lowered to stay within `max_steps`."""
    per_epoch = steps_per_epoch(num_train, training.batch_size)
    epochs = training.epochs
    if training.min_steps > 0:
        epochs = max(epochs, math.ceil(training.min_steps / per_epoch))
    if training.max_steps > 0:
        epochs = min(epochs, max(1, training.max_steps // per_epoch))
    return epochs


def passes_per_validation(training: TrainingConfig, num_train: int) -> int:
    """Passes between two validations: 1, or the fewest holding `validate_every_steps` optimizer steps.

    Validation (with its checkpoint and resume.pt) at the end of passes keeps resume exact; for a
    category of 50 images at batch 64 with min_steps = 1500, validate_every_steps = 100 turns
    1,500 validations into 15.
    """
    if training.validate_every_steps <= 0:
        return 1
    return max(1, math.ceil(training.validate_every_steps / steps_per_epoch(num_train, training.batch_size)))


def learning_rate_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of every group's base rate at optimizer step `step` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule != "cosine":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def group_learning_rates(training: TrainingConfig, num_groups: int) -> list[float]:
    """Base rate of each backbone group, bottom to top (index -1 is the top group)."""
    top = training.learning_rate * training.backbone_lr_factor
    return [top * training.layer_lr_decay ** (num_groups - 1 - index) for index in range(num_groups)]


def parameter_groups(
    head: nn.Module, backbone: nn.Module | None, groups: Sequence[Sequence[str]], training: TrainingConfig
) -> list[dict]:
    """Optimizer parameter groups: the head first (its rate is the one logged), then the backbone top-down.

    Frozen parameters are included too: they get no gradient (the optimizer skips them) until a
    layer-wise schedule unfreezes them, and the groups never change across resumes.
    """
    result = [{"params": list(head.parameters()), "lr": training.learning_rate, "name": "head"}]
    if backbone is None:
        return result
    named = dict(backbone.named_parameters())
    rates = group_learning_rates(training, len(groups))
    grouped: set[str] = set()
    for index in reversed(range(len(groups))):
        names = [name for name in groups[index] if name in named]
        grouped.update(names)
        result.append({"params": [named[name] for name in names], "lr": rates[index], "name": f"backbone-{index}"})
    leftover = [parameter for name, parameter in named.items() if name not in grouped]
    if leftover:  # parameters the backbone's matcher misses learn at the lowest backbone rate
        lowest = rates[0] if rates else training.learning_rate * training.backbone_lr_factor
        result.append({"params": leftover, "lr": lowest, "name": "backbone-other"})
    return [group for group in result if group["params"]]
