"""Tests of the GLUE / classification metrics (deltatune.metrics.glue)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deltatune.errors import DeltaConfigError, DeltaConfigTypeError
from deltatune.metrics.glue import (
    accuracy,
    f1_binary,
    glue_metrics,
    matthews_corrcoef,
    pearson,
    spearman,
)

P = [1, 0, 1, 1, 0, 1, 0, 0, 1, 1]
Y = [1, 0, 0, 1, 0, 1, 1, 0, 0, 1]


def _confusion(p, y):
    tp = sum(a == 1 and b == 1 for a, b in zip(p, y))
    tn = sum(a == 0 and b == 0 for a, b in zip(p, y))
    fp = sum(a == 1 and b == 0 for a, b in zip(p, y))
    fn = sum(a == 0 and b == 1 for a, b in zip(p, y))
    return tp, tn, fp, fn


def test_accuracy_f1_mcc_by_hand():
    tp, tn, fp, fn = _confusion(P, Y)
    assert (tp, tn, fp, fn) == (4, 3, 2, 1)
    assert accuracy(P, Y) == pytest.approx(7 / 10)
    assert f1_binary(P, Y) == pytest.approx(2 * tp / (2 * tp + fp + fn))
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert matthews_corrcoef(P, Y) == pytest.approx(mcc, abs=1e-12)
    # numpy arrays and torch tensors are accepted
    assert matthews_corrcoef(np.array(P), torch.tensor(Y)) == pytest.approx(mcc, abs=1e-12)


def test_all_correct_and_all_wrong():
    assert accuracy(Y, Y) == 1.0
    assert f1_binary(Y, Y) == 1.0
    assert matthews_corrcoef(Y, Y) == pytest.approx(1.0)
    flipped = [1 - v for v in Y]
    assert matthews_corrcoef(flipped, Y) == pytest.approx(-1.0)
    assert f1_binary(flipped, Y) == 0.0


def test_constant_predictions_or_labels_give_zero_mcc():
    assert matthews_corrcoef([1] * 6, [0, 1, 0, 1, 1, 0]) == 0.0
    assert matthews_corrcoef([0, 1, 0, 1, 1, 0], [1] * 6) == 0.0
    assert f1_binary([0] * 4, [0, 1, 1, 0]) == 0.0  # no true positive


def test_multiclass_mcc_matches_covariance_formula():
    p = np.array([0, 1, 2, 2, 1, 0, 2, 1])
    y = np.array([0, 2, 2, 1, 1, 0, 2, 0])
    # MCC = cov(X, Y) / sqrt(cov(X, X) cov(Y, Y)) on one-hot encodings
    X = np.eye(3)[p]
    Yh = np.eye(3)[y]
    cov = lambda a, b: float(np.sum((a - a.mean(0)) * (b - b.mean(0))))  # noqa: E731
    expected = cov(X, Yh) / math.sqrt(cov(X, X) * cov(Yh, Yh))
    assert matthews_corrcoef(p, y) == pytest.approx(expected, abs=1e-12)


def test_pearson_and_spearman_by_hand_with_ties():
    x = np.array([1.0, 2.0, 2.0, 4.0, 5.0])
    y = np.array([2.0, 1.0, 3.0, 3.0, 6.0])
    r = np.corrcoef(x, y)[0, 1]
    assert pearson(x, y) == pytest.approx(r, abs=1e-12)
    rx = np.array([1.0, 2.5, 2.5, 4.0, 5.0])  # average ranks for the tie
    ry = np.array([2.0, 1.0, 3.5, 3.5, 5.0])
    assert spearman(x, y) == pytest.approx(np.corrcoef(rx, ry)[0, 1], abs=1e-12)


def test_constant_inputs_give_zero_correlation():
    assert pearson([3.0, 3.0, 3.0], [1.0, 2.0, 3.0]) == 0.0
    assert spearman([1.0, 2.0, 3.0], [2.0, 2.0, 2.0]) == 0.0


@pytest.mark.parametrize(
    ("task", "keys"),
    [
        ("cola", {"mcc"}),
        ("CoLA", {"mcc"}),
        ("sst2", {"accuracy"}),
        ("SST-2", {"accuracy"}),
        ("sst-2", {"accuracy"}),
        ("mrpc", {"accuracy", "f1"}),
        ("rte", {"accuracy"}),
        ("wnli", {"accuracy"}),
        ("ag_news", {"accuracy"}),
        ("classification", {"accuracy"}),
    ],
)
def test_glue_metrics_task_mapping(task, keys):
    out = glue_metrics(task, P, Y)
    assert set(out) == keys
    for k in keys:
        ref = {"mcc": matthews_corrcoef, "accuracy": accuracy, "f1": f1_binary}[k](P, Y)
        assert out[k] == ref


@pytest.mark.parametrize("task", ["stsb", "sts-b", "STS-B"])
def test_glue_metrics_stsb(task):
    x, y = [0.5, 2.0, 3.5, 4.0], [1.0, 2.5, 3.0, 5.0]
    assert glue_metrics(task, x, y) == {"pearson": pearson(x, y), "spearman": spearman(x, y)}


def test_validation_errors():
    with pytest.raises(DeltaConfigError, match="got 3 predictions and 2 labels"):
        accuracy([1, 0, 1], [1, 0])
    with pytest.raises(DeltaConfigError, match="task must be one of .* got 'squad'"):
        glue_metrics("squad", [1], [1])
    with pytest.raises(DeltaConfigError, match="predictions must hold binary labels 0/1, got 2"):
        f1_binary([2, 0], [1, 0])
    with pytest.raises(DeltaConfigError, match="predictions must be non-empty, got 0 values"):
        accuracy([], [])
    with pytest.raises(DeltaConfigTypeError, match="predictions must be a sequence or array"):
        accuracy("10", [1, 0])
    with pytest.raises(DeltaConfigError, match="predictions must hold integer class labels"):
        accuracy([0.5, 1.0], [0, 1])
