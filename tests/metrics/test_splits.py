"""Per-subset scores (deltatune.metrics.splits): WebNLG's seen / unseen / all split."""

from __future__ import annotations

import pytest

from deltatune.data import WEBNLG_SEEN_CATEGORIES
from deltatune.errors import DeltaConfigError, DeltaConfigTypeError
from deltatune.metrics import e2e_scores, seen_unseen_labels, split_scores, ter

PREDS = ["the airport is in texas", "he was an astronaut", "the planet is large", "she is a politician"]
REFS = [
    ["the airport is located in texas", "texas has the airport"],
    ["he was an american astronaut"],
    ["the planet is very large"],
    ["she is a politician from ohio", "she works as a politician"],
]
CATS = ["Airport", "Astronaut", "CelestialBody", "Politician"]


def test_seen_unseen_labels_from_the_training_categories():
    assert seen_unseen_labels(CATS, WEBNLG_SEEN_CATEGORIES) == ["seen", "seen", "unseen", "unseen"]
    assert len(WEBNLG_SEEN_CATEGORIES) == 10
    with pytest.raises(DeltaConfigError, match="seen_categories must be a non-empty list of category names, got"):
        seen_unseen_labels(CATS, [])
    with pytest.raises(DeltaConfigTypeError, match=r"categories\[1\] must be a str, got None"):
        seen_unseen_labels(["Airport", None], WEBNLG_SEEN_CATEGORIES)


def test_each_split_is_scored_as_its_own_corpus():
    labels = seen_unseen_labels(CATS, WEBNLG_SEEN_CATEGORIES)
    out = split_scores(PREDS, REFS, labels, ["BLEU", "TER"], order=("seen", "unseen"))
    assert list(out) == ["seen", "unseen", "all"]
    assert out["seen"] == {"num_inputs": 2, **e2e_scores(PREDS[:2], REFS[:2], ["BLEU", "TER"])}
    assert out["unseen"] == {"num_inputs": 2, **e2e_scores(PREDS[2:], REFS[2:], ["BLEU", "TER"])}
    assert out["all"] == {"num_inputs": 4, **e2e_scores(PREDS, REFS, ["BLEU", "TER"])}
    # corpus TER of "all" is not the mean of the two splits' TERs (pooled edits over pooled lengths)
    assert out["all"]["TER"] == pytest.approx(ter(PREDS, REFS))
    assert out["seen"]["TER"] == pytest.approx(1 / 5)  # one deletion ("located") over 5 words


def test_absent_subset_is_reported_empty_and_default_order_is_first_seen():
    out = split_scores(PREDS[:2], REFS[:2], ["seen", "seen"], ["BLEU"], order=("seen", "unseen"))
    assert out["unseen"] == {"num_inputs": 0}
    assert out["seen"]["BLEU"] == out["all"]["BLEU"]
    out = split_scores(PREDS, REFS, ["b", "a", "b", "a"], ["BLEU"])
    assert list(out) == ["b", "a", "all"]


def test_errors():
    with pytest.raises(DeltaConfigError, match="one subset name per prediction, got 1 labels and 4 predictions"):
        split_scores(PREDS, REFS, ["seen"], ["BLEU"])
    with pytest.raises(DeltaConfigError, match=r"labels\[0\] is 'all', which names the whole set"):
        split_scores(PREDS, REFS, ["all", "seen", "seen", "seen"], ["BLEU"])
    with pytest.raises(DeltaConfigError, match=r"labels \['x'\] are not in order=\['seen', 'unseen'\]"):
        split_scores(PREDS, REFS, ["x", "seen", "seen", "seen"], ["BLEU"], order=("seen", "unseen"))
    with pytest.raises(DeltaConfigTypeError, match=r"labels\[2\] must be a str, got 3 \(int\)"):
        split_scores(PREDS, REFS, ["seen", "seen", 3, "seen"], ["BLEU"])
    with pytest.raises(DeltaConfigTypeError, match="labels must be a list of str, got str"):
        split_scores(PREDS, REFS, "seen", ["BLEU"])
