"""The counters of a training run: :class:`TrainState`, saved in every checkpoint of the Trainer."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TrainState"]


@dataclass
class TrainState:
    """Counters saved in every checkpoint.

    ``step``: optimiser steps done; ``epoch``: current epoch (0-based); ``batches_in_epoch``:
    micro-batches of that epoch already consumed (per rank); ``tokens``: input tokens seen (all
    ranks); ``loss_tokens``: loss units seen (all ranks); ``elapsed``: training seconds, summed
    over resumed runs.
    """

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    elapsed: float = 0.0
