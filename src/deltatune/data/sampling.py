"""Stratified subsampling that keeps every category's share of the data."""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

from ..errors import DeltaConfigTypeError
from ..validation import check_float, check_int

__all__ = ["stratified_sample"]

T = TypeVar("T")


def _category(e: Any) -> Hashable:
    return e.category


def stratified_sample(
    examples: Sequence[T],
    fraction: float,
    *,
    key: Callable[[T], Hashable] = _category,
    seed: int = 0,
) -> list[T]:
    """Draw a subsample that keeps each category's share.

    Every category (the value of ``key(example)``, ``None`` included) keeps
    ``max(1, round(fraction * n_cat))`` of its ``n_cat`` examples (Python's ``round``: halves go to the
    even number), drawn without replacement by ``random.Random(seed)`` visiting the categories in
    first-seen order. The result keeps the input order. The same seed gives the same sample.

    Args:
        examples: the examples (any sequence).
        fraction: share to keep, in ``(0, 1]``; ``1`` returns a copy of ``examples``.
        key: the category of an example; defaults to its ``category`` attribute.
        seed: random seed.

    Raises:
        DeltaConfigError: ``fraction`` outside ``(0, 1]``.
        DeltaConfigTypeError: ``key`` not callable, ``seed`` not an int, ``examples`` not a sequence.
    """
    check_float("fraction", fraction, low=0.0, high=1.0, low_inclusive=False)
    check_int("seed", seed)
    if not callable(key):
        raise DeltaConfigTypeError(f"key must be a callable, got {key!r} ({type(key).__name__})")
    if not isinstance(examples, Sequence) or isinstance(examples, (str, bytes)):
        raise DeltaConfigTypeError(
            f"examples must be a sequence of examples, got {type(examples).__name__}"
        )
    groups: dict[Hashable, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(key(ex), []).append(i)
    rng = random.Random(seed)
    chosen: list[int] = []
    for idx in groups.values():
        k = min(len(idx), max(1, round(fraction * len(idx))))
        chosen.extend(rng.sample(idx, k))
    chosen.sort()
    return [examples[i] for i in chosen]
