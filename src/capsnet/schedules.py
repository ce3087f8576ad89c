"""Training schedules: the spread-loss margin and the learning-rate factor.

Plain functions of the epoch or step, with their settings as arguments (the trainer passes
them from the run config). Nothing here imports the rest of capsnet, so
:mod:`capsnet.functional` can re-export :func:`spread_margin`.

>>> spread_margin(3)
0.5
>>> lr = lr_factor("exponential", total_steps=10_000, decay_rate=0.96, decay_steps=2000)
>>> round(lr(4000), 4)
0.9216
"""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["LR_SCHEDULES", "spread_margin", "lr_factor"]

LR_SCHEDULES = ("constant", "exponential", "cosine")


def spread_margin(
    epoch: float, start: float = 0.2, stop: float = 0.9, step_per_epoch: float = 0.1
) -> float:
    """Spread-loss margin schedule: ``min(stop, start + step_per_epoch * epoch)``.

    [H18] states only that m grows from 0.2 to 0.9; +0.1 per epoch is the common choice.
    ``epoch`` may be fractional (``step / steps_per_epoch``).
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    return float(min(stop, start + step_per_epoch * epoch))


def lr_factor(
    schedule: str,
    total_steps: int,
    *,
    decay_rate: float = 0.96,
    decay_steps: int = 2000,
    staircase: bool = False,
) -> Callable[[int], float]:
    """The learning-rate multiplier as a function of the step (for ``LambdaLR``).

    Args:
        schedule: ``"exponential"`` (``decay_rate ** (step / decay_steps)``, as
            ``tf.train.exponential_decay`` in both papers), ``"cosine"`` (half a cosine from
            1 to 0 over ``total_steps``, then 0) or ``"constant"`` (1).
        total_steps: steps of the whole run (cosine).
        decay_rate, decay_steps: exponential decay: the factor per ``decay_steps`` steps.
        staircase: exponential decay in whole multiples of ``decay_steps``.
    """
    if schedule not in LR_SCHEDULES:
        valid = ", ".join(map(repr, LR_SCHEDULES))
        raise ValueError(f"lr_schedule must be one of {valid}, got {schedule!r}")
    if schedule == "cosine" and total_steps < 1:
        raise ValueError(f"total_steps must be >= 1 for the cosine schedule, got {total_steps}")

    def factor(step: int) -> float:
        if schedule == "exponential":
            exponent = step / decay_steps
            return decay_rate ** (math.floor(exponent) if staircase else exponent)
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
        return 1.0

    return factor
