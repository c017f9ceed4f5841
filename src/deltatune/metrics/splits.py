"""Data-to-text scores per subset of the inputs: WebNLG 2017's seen / unseen / all split.

The WebNLG 2017 test set mixes inputs from the ten DBpedia categories of the training data ("seen")
with inputs from five categories never trained on ("unseen": Athlete, Artist, CelestialBody,
MeanOfTransportation, Politician). Papers (the LoRA paper's WebNLG table among them) report every
metric three times: on the seen inputs, on the unseen ones and on all. Each subset is scored as a
corpus of its own (corpus BLEU of the subset, not an average of per-input scores).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import DeltaConfigError, DeltaConfigTypeError
from .e2e import E2E_METRICS, e2e_scores

__all__ = ["ALL_SPLIT", "seen_unseen_labels", "split_scores"]

#: Name of the subset holding every input.
ALL_SPLIT = "all"


def seen_unseen_labels(categories: Sequence[str], seen_categories: Sequence[str]) -> list[str]:
    """``"seen"`` for each category in ``seen_categories``, ``"unseen"`` for the others.

    Raises:
        DeltaConfigTypeError: a category that is not a str.
        DeltaConfigError: ``seen_categories`` is empty.
    """
    if isinstance(seen_categories, str) or not seen_categories:
        raise DeltaConfigError(f"seen_categories must be a non-empty list of category names, got {seen_categories!r}")
    seen = set(seen_categories)
    out = []
    for i, c in enumerate(categories):
        if not isinstance(c, str):
            raise DeltaConfigTypeError(f"categories[{i}] must be a str, got {c!r} ({type(c).__name__})")
        out.append("seen" if c in seen else "unseen")
    return out


def split_scores(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    labels: Sequence[str],
    metrics: Sequence[str] | str = E2E_METRICS,
    *,
    order: Sequence[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Score each subset of inputs sharing a label, and all inputs (:data:`ALL_SPLIT`).

    Args:
        predictions / references / metrics: as :func:`~deltatune.metrics.e2e_scores` (TER included).
        labels: one subset name per input (e.g. from :func:`seen_unseen_labels`); ``"all"`` is reserved.
        order: the subsets to report, in this order (each may be absent from ``labels``: it is then
            reported with ``num_inputs`` 0 and no scores); default: the labels in first-seen order.

    Returns:
        ``{subset: {"num_inputs": n, metric: score, ...}}`` for the subsets, then ``"all"``.

    Raises:
        DeltaConfigError: ``labels`` not one per prediction, a label named ``"all"``, a label missing
            from ``order``; and whatever :func:`~deltatune.metrics.e2e_scores` raises.
        DeltaConfigTypeError: a label that is not a str.
    """
    if isinstance(labels, str) or not isinstance(labels, Sequence):
        raise DeltaConfigTypeError(f"labels must be a list of str, got {type(labels).__name__}")
    if len(labels) != len(predictions):
        raise DeltaConfigError(
            f"labels must hold one subset name per prediction, got {len(labels)} labels and {len(predictions)} predictions"
        )
    for i, lab in enumerate(labels):
        if not isinstance(lab, str):
            raise DeltaConfigTypeError(f"labels[{i}] must be a str, got {lab!r} ({type(lab).__name__})")
        if lab == ALL_SPLIT:
            raise DeltaConfigError(f"labels[{i}] is {ALL_SPLIT!r}, which names the whole set; use another subset name")
    names = list(dict.fromkeys(labels)) if order is None else list(order)
    stray = sorted(set(labels) - set(names))
    if stray:
        raise DeltaConfigError(f"labels {stray} are not in order={names}")
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        idx = [i for i, lab in enumerate(labels) if lab == name]
        out[name] = {"num_inputs": len(idx)}
        if idx:
            out[name].update(e2e_scores([predictions[i] for i in idx], [references[i] for i in idx], metrics))
    out[ALL_SPLIT] = {"num_inputs": len(predictions), **e2e_scores(predictions, references, metrics)}
    return out
