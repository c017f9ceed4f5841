"""GLUE / classification metrics: accuracy, binary F1, Matthews correlation, Pearson, Spearman.

Conventions (the same as scikit-learn and the GLUE reference code, except where noted):

* ``mcc`` is 0.0 when its denominator is 0 (constant predictions or constant labels).
* ``f1`` treats class 1 as positive and is 0.0 when there is no true positive.
* ``pearson`` and ``spearman`` are 0.0 (not NaN, unlike ``scipy``) when the predictions or the
  labels are constant, because a correlation is undefined there and a NaN would poison averages
  and "best checkpoint" comparisons. Spearman ranks ties by their average rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .._optional import require
from ..errors import DeltaConfigError, DeltaConfigTypeError
from ..validation import check_type

__all__ = [
    "GLUE_TASK_METRICS",
    "accuracy",
    "f1_binary",
    "glue_metrics",
    "matthews_corrcoef",
    "pearson",
    "spearman",
]


def _as_array(name: str, values: Any, *, numeric_kind: str) -> np.ndarray:
    if hasattr(values, "detach"):  # torch tensor
        values = values.detach().cpu().numpy()
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)):
        raise DeltaConfigTypeError(
            f"{name} must be a sequence or array of numbers, got {type(values).__name__}"
        )
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise DeltaConfigError(f"{name} must be one-dimensional, got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise DeltaConfigError(f"{name} must be non-empty, got 0 values")
    if numeric_kind == "int":
        if arr.dtype.kind == "b":
            arr = arr.astype(np.int64)
        elif arr.dtype.kind == "f":
            if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
                raise DeltaConfigError(f"{name} must hold integer class labels, got non-integer values")
            arr = arr.astype(np.int64)
        elif arr.dtype.kind not in "iu":
            raise DeltaConfigTypeError(f"{name} must hold integer class labels, got dtype {arr.dtype}")
    else:
        if arr.dtype.kind not in "iufb":
            raise DeltaConfigTypeError(f"{name} must hold numbers, got dtype {arr.dtype}")
        arr = arr.astype(np.float64)
        if not np.all(np.isfinite(arr)):
            raise DeltaConfigError(f"{name} must hold finite numbers, got NaN or inf")
    return arr


def _pair(predictions: Any, labels: Any, kind: str) -> tuple[np.ndarray, np.ndarray]:
    p = _as_array("predictions", predictions, numeric_kind=kind)
    y = _as_array("labels", labels, numeric_kind=kind)
    if p.shape != y.shape:
        raise DeltaConfigError(
            f"predictions and labels must have the same length, got {p.size} predictions and {y.size} labels"
        )
    return p, y


def accuracy(predictions: Any, labels: Any) -> float:
    """Fraction of predictions equal to the labels (integer class ids)."""
    p, y = _pair(predictions, labels, "int")
    return float(np.mean(p == y))


def _binary(p: np.ndarray, y: np.ndarray) -> None:
    for name, arr in (("predictions", p), ("labels", y)):
        bad = ~np.isin(arr, (0, 1))
        if bad.any():
            raise DeltaConfigError(f"{name} must hold binary labels 0/1, got {int(arr[bad][0])}")


def f1_binary(predictions: Any, labels: Any) -> float:
    """F1 of the positive class 1 (labels 0/1); 0.0 when there is no true positive."""
    p, y = _pair(predictions, labels, "int")
    _binary(p, y)
    tp = int(np.sum((p == 1) & (y == 1)))
    fp = int(np.sum((p == 1) & (y == 0)))
    fn = int(np.sum((p == 0) & (y == 1)))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews_corrcoef(predictions: Any, labels: Any) -> float:
    """Matthews correlation coefficient (multi-class form of Gorodkin 2004; binary MCC for 2 classes).

    0.0 when the predictions or the labels are constant (the denominator vanishes).
    """
    p, y = _pair(predictions, labels, "int")
    classes, inv = np.unique(np.concatenate([y, p]), return_inverse=True)
    k = len(classes)
    yi, pi = inv[: y.size], inv[y.size :]
    conf = np.zeros((k, k), dtype=np.float64)
    np.add.at(conf, (yi, pi), 1.0)
    t = conf.sum(axis=1)  # true counts per class
    q = conf.sum(axis=0)  # predicted counts per class
    c = np.trace(conf)
    s = float(y.size)
    cov_yp = c * s - float(t @ q)
    cov_pp = s * s - float(q @ q)
    cov_yy = s * s - float(t @ t)
    if cov_pp == 0 or cov_yy == 0:
        return 0.0
    return float(cov_yp / math.sqrt(cov_pp * cov_yy))


def pearson(predictions: Any, labels: Any) -> float:
    """Pearson correlation; 0.0 when either side is constant (scipy would return NaN)."""
    pearsonr = require("scipy.stats", "the pearson metric").pearsonr

    p, y = _pair(predictions, labels, "float")
    if p.size < 2:
        raise DeltaConfigError(f"pearson needs at least 2 values, got {p.size}")
    if np.all(p == p[0]) or np.all(y == y[0]):
        return 0.0
    return float(pearsonr(p, y)[0])


def spearman(predictions: Any, labels: Any) -> float:
    """Spearman rank correlation (ties get average ranks); 0.0 when either side is constant."""
    spearmanr = require("scipy.stats", "the spearman metric").spearmanr

    p, y = _pair(predictions, labels, "float")
    if p.size < 2:
        raise DeltaConfigError(f"spearman needs at least 2 values, got {p.size}")
    if np.all(p == p[0]) or np.all(y == y[0]):
        return 0.0
    return float(spearmanr(p, y)[0])


_METRIC_FUNCS: dict[str, Callable[[Any, Any], float]] = {
    "accuracy": accuracy,
    "f1": f1_binary,
    "mcc": matthews_corrcoef,
    "pearson": pearson,
    "spearman": spearman,
}

#: Metrics reported per task (canonical lower-case names without dashes).
GLUE_TASK_METRICS: dict[str, tuple[str, ...]] = {
    "cola": ("mcc",),
    "sst2": ("accuracy",),
    "mrpc": ("accuracy", "f1"),
    "stsb": ("pearson", "spearman"),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
    "qnli": ("accuracy",),
    "mnli": ("accuracy",),
    "qqp": ("accuracy", "f1"),
    "ag_news": ("accuracy",),
    "classification": ("accuracy",),
}


def _canonical_task(task: str) -> str:
    key = task.strip().lower().replace("-", "").replace(" ", "")
    if key == "agnews":
        key = "ag_news"
    return key


def glue_metrics(task: str, predictions: Any, labels: Any) -> dict[str, float]:
    """The metrics GLUE reports for ``task``.

    ``task`` is case-insensitive and may contain dashes: ``"CoLA"``, ``"sst-2"``, ``"SST-2"``,
    ``"mrpc"``, ``"sts-b"``, ``"rte"``, ``"wnli"``, ``"qnli"``, ``"mnli"``, ``"qqp"``, ``"ag_news"``
    or ``"classification"`` (any other single-label classification: accuracy).
    cola -> ``{"mcc"}``, sst2/rte/wnli/qnli/mnli/ag_news/classification -> ``{"accuracy"}``,
    mrpc/qqp -> ``{"accuracy", "f1"}``, stsb -> ``{"pearson", "spearman"}`` (regression scores).
    """
    check_type("task", task, str, "a str")
    key = _canonical_task(task)
    if key not in GLUE_TASK_METRICS:
        listed = ", ".join(repr(t) for t in GLUE_TASK_METRICS)
        raise DeltaConfigError(f"task must be one of {listed} (case and dashes ignored), got {task!r}")
    return {name: _METRIC_FUNCS[name](predictions, labels) for name in GLUE_TASK_METRICS[key]}
