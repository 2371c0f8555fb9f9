"""Learning-rate schedules, as a factor of the base rate at each optimizer step (counted from 0).

A factor depends on the step alone, so a resumed run needs no scheduler state: it sets the
rate of step n from n.
"""

from __future__ import annotations

import math
from collections.abc import Callable


def lr_factor(schedule: str, steps: int, warmup_steps: int = 0, min_ratio: float = 0.1) -> Callable[[int], float]:
    """step -> factor: a linear warmup over `warmup_steps` ((step + 1) / warmup_steps), then 1
    (`constant`) or a half cosine from 1 down to `min_ratio` at `steps` (`cosine`), and
    `min_ratio` after."""
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"unknown learning-rate schedule {schedule!r} (allowed: constant, cosine)")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min((step - warmup_steps) / max(1, steps - warmup_steps), 1.0)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
