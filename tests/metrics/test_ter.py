"""TER (deltatune.metrics.ter) against a plain independent implementation, known values and tercom's rules."""

from __future__ import annotations

import itertools
import random

import pytest

from deltatune.errors import DeltaConfigError, DeltaConfigTypeError
from deltatune.metrics import TEXT_METRICS, e2e_scores, ter, ter_statistics


def _levenshtein(a: list[str], b: list[str]) -> int:
    """Word edit distance (insert, delete, substitute; cost 1 each): the plain dynamic programme."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        cur = [i]
        for j, y in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def _shifted(words: list[str]) -> list[list[str]]:
    """Every sequence reachable from ``words`` by moving one contiguous block elsewhere."""
    out = []
    n = len(words)
    for i, j in itertools.combinations(range(n + 1), 2):
        block, rest = words[i:j], words[:i] + words[j:]
        for k in range(len(rest) + 1):
            if k != i:
                out.append(rest[:k] + block + rest[k:])
    return out


def _plain_edits(hyp: str, ref: str) -> int:
    """Fewest edits with at most one block shift (a shift costs 1), found exhaustively; the TER
    definition's number of edits on inputs where one shift is the best reordering."""
    h, r = hyp.lower().split(), ref.lower().split()
    best = _levenshtein(h, r)
    for s in _shifted(h):
        best = min(best, 1 + _levenshtein(s, r))
    return best


# (hypothesis, reference): each needs no shift or exactly one, which tercom's greedy search finds
SMALL_CASES = [
    ("the cat sat on the mat", "the cat sat on the mat"),
    ("the cat sat on mat", "the cat sat on the mat"),
    ("a cat sat on the mat", "the cat sat on the mat"),
    ("on the mat the cat sat", "the cat sat on the mat"),
    ("the mat sat on", "the cat sat on the mat"),
    ("Blue Spice is a pub near the river", "Blue Spice is a pub by the riverside"),
    ("is a pub Blue Spice", "Blue Spice is a pub"),
    ("", "a b c"),
    ("x y z w", "a b"),
]


@pytest.mark.parametrize("hyp,ref", SMALL_CASES)
def test_edits_equal_the_plain_exhaustive_implementation(hyp, ref):
    s = ter_statistics([hyp], [[ref]])
    assert s.edits == _plain_edits(hyp, ref)
    assert s.ref_length == len(ref.split())
    assert ter([hyp], [[ref]]) == pytest.approx(_plain_edits(hyp, ref) / len(ref.split()))


def test_known_value_from_the_ter_paper():
    # Snover et al. (2006), section 2: 1 shift (THIS WEEK), 2 substitutions and 1 deletion over 13 words
    hyp = "THIS WEEK THE SAUDIS denied information published in the new york times"
    ref = "SAUDI ARABIA denied THIS WEEK information published in the AMERICAN new york times"
    s = ter_statistics([hyp], [[ref]])
    assert (s.edits, s.ref_length) == (4.0, 13.0)
    assert s.score == pytest.approx(4 / 13)  # 0.3077


def test_multiple_references_closest_edits_over_average_length():
    hyp = "the cat sat"
    refs = ["the cat sat on the mat", "a cat sat", "dogs bark"]  # edits 3, 1, 3; lengths 6, 3, 2
    s = ter_statistics([hyp], [refs])
    assert s.edits == min(_plain_edits(hyp, r) for r in refs) == 1
    assert s.ref_length == pytest.approx((6 + 3 + 2) / 3)


def test_corpus_sums_edits_and_average_lengths_with_varying_reference_counts():
    preds = ["a b c", "on the mat the cat sat", "x"]
    refs = [["a b c d"], ["the cat sat on the mat", "the cat is on the mat"], ["y", "x y", "z z z"]]
    s = ter_statistics(preds, refs)
    edits = [min(_plain_edits(p, r) for r in g) for p, g in zip(preds, refs)]
    lengths = [sum(len(r.split()) for r in g) / len(g) for g in refs]
    assert s.edits == sum(edits) == 1 + 1 + 1
    assert s.ref_length == pytest.approx(sum(lengths))
    assert ter(preds, refs) == pytest.approx(sum(edits) / sum(lengths))


def test_case_insensitive_by_default_as_tercom():
    assert ter(["The Cat"], [["the cat"]]) == 0.0
    assert ter(["The Cat"], [["the cat"]], case_sensitive=True) == pytest.approx(1.0)


def test_shifts_never_cost_more_than_plain_edit_distance():
    rng = random.Random(0)
    for _ in range(150):
        hyp = [rng.choice("abcde") for _ in range(rng.randint(0, 7))]
        ref = [rng.choice("abcde") for _ in range(rng.randint(1, 7))]
        s = ter_statistics([" ".join(hyp)], [[" ".join(ref)]])
        assert s.edits <= _levenshtein(hyp, ref), (hyp, ref)
        assert s.edits >= abs(len(hyp) - len(ref)), (hyp, ref)  # a shift never changes the length
        assert (s.edits == 0) == (hyp == ref), (hyp, ref)
        assert s.ref_length == len(ref)


def test_ter_through_e2e_scores():
    preds, refs = ["on the mat the cat sat", "a b"], [["the cat sat on the mat"], ["a b", "a c"]]
    out = e2e_scores(preds, refs, ["BLEU", "TER"])
    assert list(out) == ["BLEU", "TER"]
    assert out["TER"] == pytest.approx((1 + 0) / (6 + 2))
    assert TEXT_METRICS[-1] == "TER"


def test_errors():
    with pytest.raises(DeltaConfigError, match="same length .* got 2 predictions and 1 reference groups"):
        ter(["a", "b"], [["a"]])
    with pytest.raises(DeltaConfigError, match=r"predictions must be a non-empty list of str, got \[\]"):
        ter([], [])
    with pytest.raises(DeltaConfigError, match=r"references\[1\] must be a non-empty list of str, got \[\]"):
        ter(["a", "b"], [["a"], []])
    with pytest.raises(DeltaConfigTypeError, match=r"predictions\[0\] must be a str, got 3 \(int\)"):
        ter([3], [["a"]])
    with pytest.raises(DeltaConfigTypeError, match=r"references\[0\]\[1\] must be a str, got None"):
        ter(["a"], [["a", None]])
    with pytest.raises(DeltaConfigTypeError, match="predictions must be a list of str, got str"):
        ter("abc", [["a"]])
    with pytest.raises(DeltaConfigError, match="metrics must be one of .*'TER'.*got 'TERR'"):
        e2e_scores(["a"], [["a"]], ["TERR"])


def test_missing_sacrebleu_is_named(monkeypatch):
    import sys

    from deltatune.errors import MissingPackageError

    monkeypatch.setitem(sys.modules, "sacrebleu.metrics", None)  # import fails as if not installed
    with pytest.raises(MissingPackageError, match=r"^TER need\(s\) the package 'sacrebleu', which is not installed; install it with: "
                       r"pip install 'deltatune\[eval\]' \(or: pip install sacrebleu\)$"):
        ter(["a"], [["a"]])
