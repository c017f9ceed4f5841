"""Learning-rate schedules with linear warmup.

Optimiser step ``s`` (0-based) of ``total`` uses ``lr * lr_factor(kind, s, warmup, total)``::

    s < warmup:              (s + 1) / warmup                     (never a wasted lr=0 step)
    constant, s >= warmup:   1
    linear,   s >= warmup:   (total - s) / (total - warmup)       (1 at the end of warmup, 1/(total-warmup) at the last step)
    cosine,   s >= warmup:   0.5 * (1 + cos(pi * (s - warmup) / (total - warmup)))
"""

from __future__ import annotations

import math

import torch

from ..errors import DeltaConfigError
from ..validation import check_choice, check_int

__all__ = ["lr_factor", "build_scheduler", "resolve_warmup_steps"]


def lr_factor(kind: str, step: int, warmup_steps: int, total_steps: int) -> float:
    """The multiplier of the base learning rate at 0-based optimiser ``step`` (formulas above)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise DeltaConfigError(f"scheduler must be one of 'linear', 'cosine', 'constant', got {kind!r}")


def resolve_warmup_steps(warmup_steps: int, warmup_ratio: float, total_steps: int) -> int:
    """``warmup_steps`` if given, else ``ceil(warmup_ratio * total_steps)``; capped at ``total_steps``."""
    steps = warmup_steps if warmup_steps > 0 else math.ceil(warmup_ratio * total_steps)
    return min(steps, total_steps)


def build_scheduler(
    optimizer: torch.optim.Optimizer, kind: str, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` that follows :func:`lr_factor`; call ``.step()`` once per optimiser step."""
    check_choice("scheduler", kind, ("linear", "cosine", "constant"))
    check_int("warmup_steps", warmup_steps, minimum=0)
    check_int("total_steps", total_steps, minimum=1)

    def factor(step: int) -> float:
        return lr_factor(kind, step, warmup_steps, total_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
