"""Tests of the E2E NLG metrics (deltatune.metrics.e2e)."""

from __future__ import annotations

import math
import shutil

import pytest

from deltatune.errors import DataFormatError, DeltaConfigError, DeltaConfigTypeError, MissingPackageError
from deltatune.metrics import e2e
from deltatune.metrics.e2e import (
    e2e_scores,
    mteval_tokenize,
    read_predictions_file,
    read_references_file,
    score_files,
)

HAS_JAVA = shutil.which("java") is not None
needs_java = pytest.mark.skipif(not HAS_JAVA, reason="java is not on PATH")

# Small E2E-like corpus (written for these tests).
PREDS = [
    "The Eagle is a coffee shop near Burger King, it has a price range of £20-25.",
    "Alimentum is a family-friendly restaurant in the city centre.",
    "Zizzi serves Italian food. It's cheap and near the river!",
    "The Phoenix is a pub with a 5 out of 5 rating.",
]
REFS_2 = [
    ["The Eagle is a coffee shop near Burger King with a price range of £20-25.",
     "Near Burger King, The Eagle coffee shop has prices of £20-25."],
    ["Alimentum is a restaurant in the city centre that is family friendly.",
     "In the city centre there is a family-friendly restaurant called Alimentum."],
    ["Zizzi is a cheap Italian place by the riverside.",
     "Cheap Italian food is served at Zizzi near the river."],
    ["The Phoenix pub has a customer rating of 5 out of 5.",
     "The Phoenix is a pub rated 5 out of 5 by customers."],
]


def _ngrams(words, n):
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def _clipped(hyp, refs, n):
    from collections import Counter

    h = Counter(_ngrams(hyp, n))
    best = Counter()
    for r in refs:
        best |= Counter(_ngrams(r, n))
    return sum(min(c, best[g]) for g, c in h.items())


# ----------------------------------------------------------------------------------- BLEU


def test_mteval_tokenize_lowercases_and_splits_punctuation():
    # v13a splits ASCII punctuation except the apostrophe and "-" (a dash only after a digit)
    assert mteval_tokenize("It's £20-25, near THE river.") == [
        "it's", "£20", "-", "25", ",", "near", "the", "river", ".",
    ]
    assert mteval_tokenize("family-friendly (yes)") == ["family-friendly", "(", "yes", ")"]
    # a period or comma between digits stays, MT-Eval style
    assert mteval_tokenize("Rated 4.5, 1,000 times") == ["rated", "4.5", ",", "1,000", "times"]
    # only ASCII letters are lowercased (Perl tr/A-Z/a-z/)
    assert mteval_tokenize("CAFÉ") == ["cafÉ"]


def test_bleu_by_hand_single_reference():
    hyp = "the cat sat on the mat"
    ref = "the cat sat on a mat"
    h, r = hyp.split(), ref.split()
    precisions = [_clipped(h, [r], n) / (len(h) - n + 1) for n in range(1, 5)]
    assert precisions == [5 / 6, 3 / 5, 2 / 4, 1 / 3]
    expected = math.exp(sum(math.log(p) for p in precisions) / 4)  # equal lengths: no brevity penalty
    assert e2e_scores([hyp], [[ref]], metrics=["BLEU"])["BLEU"] == pytest.approx(expected, abs=1e-12)


def test_bleu_smoothing_and_brevity_penalty_by_hand():
    # no 4-gram matches: MT-Eval counts 1/2 match (first zero order -> 1 / 2**1)
    hyp, ref = "a b c d", "a b c e f"
    p = [3 / 4, 2 / 3, 1 / 2, (1 / 2) / 1]
    bp = math.exp(1 - 5 / 4)
    expected = bp * math.exp(sum(math.log(x) for x in p) / 4)
    assert e2e_scores([hyp], [[ref]], metrics="BLEU")["BLEU"] == pytest.approx(expected, abs=1e-12)


def test_bleu_closest_reference_length_ties_go_to_the_shorter():
    hyp = "x1 x2 x3 x4 x5 x6 x7"
    refs = ["x1 x2 x3 x4 x5 x6 x7 x8", "x1 x2 x3 x4 x5 x6"]  # lengths 8 and 6, both 1 away
    # closest = 6 (shorter of the tie) -> hypothesis longer -> no brevity penalty
    h = hyp.split()
    rs = [r.split() for r in refs]
    p = [_clipped(h, rs, n) / (len(h) - n + 1) for n in range(1, 5)]
    expected = math.exp(sum(math.log(x) for x in p) / 4)
    assert e2e_scores([hyp], [refs], metrics="BLEU")["BLEU"] == pytest.approx(expected, abs=1e-12)
    # swapping the order of the references changes nothing
    assert e2e_scores([hyp], [refs[::-1]], metrics="BLEU")["BLEU"] == pytest.approx(expected, abs=1e-12)


def test_identical_prediction_gives_bleu_one():
    refs = [[r[0]] for r in REFS_2]
    preds = [r[0] for r in refs]
    assert e2e_scores(preds, refs, metrics=["BLEU"])["BLEU"] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("nrefs", [1, 2])
def test_bleu_matches_sacrebleu_with_mteval_tokenisation(nrefs):
    sacrebleu = pytest.importorskip("sacrebleu")
    refs = [g[:nrefs] for g in REFS_2]
    ours = e2e_scores(PREDS, refs, metrics=["BLEU"])["BLEU"]
    ref_streams = [[g[k] for g in refs] for k in range(nrefs)]
    theirs = sacrebleu.corpus_bleu(PREDS, ref_streams, tokenize="13a", lowercase=True, smooth_method="exp")
    assert ours == pytest.approx(theirs.score / 100, abs=1e-10)


def test_nist_matches_nltk_single_reference():
    nist_score = pytest.importorskip("nltk.translate.nist_score")
    refs = [[g[0]] for g in REFS_2]
    ours = e2e_scores(PREDS, refs, metrics=["NIST"])["NIST"]
    theirs = nist_score.corpus_nist(
        [[mteval_tokenize(g[0])] for g in refs], [mteval_tokenize(p) for p in PREDS], n=5
    )
    assert ours == pytest.approx(theirs, abs=1e-10)


def test_nist_multi_reference_by_hand():
    # one segment, two references; info weights from all reference n-grams, clipped by the max
    # count over references, length penalty against the average reference length (3 words)
    hyp, refs = "a b", ["a b c", "a c d"]
    from collections import Counter

    rw = [r.split() for r in refs]
    counts = Counter(g for r in rw for n in range(1, 6) for g in _ngrams(r, n))
    total = sum(len(r) for r in rw)

    def info(g):
        denom = counts[g[:-1]] if len(g) > 1 else total
        return math.log2(denom / counts[g])

    prec = (info(("a",)) + info(("b",))) / 2 + info(("a", "b")) / 1
    ratio = 2 / 3
    beta = -math.log(0.5) / math.log(1.5) ** 2
    expected = prec * math.exp(-beta * math.log(ratio) ** 2)
    assert e2e_scores([hyp], [refs], metrics=["NIST"])["NIST"] == pytest.approx(expected, abs=1e-12)


def test_empty_prediction_scores_zero_bleu_and_nist():
    scores = e2e_scores([""], [["a b c"]], metrics=["BLEU", "NIST"])
    assert scores == {"BLEU": 0.0, "NIST": 0.0}


# ----------------------------------------------------------------------------------- validation


def test_length_mismatch_names_the_counts():
    with pytest.raises(DeltaConfigError, match="got 2 predictions and 3 reference groups"):
        e2e_scores(["a", "b"], [["a"], ["b"], ["c"]], metrics=["BLEU"])


def test_empty_reference_group_and_reference_rejected():
    with pytest.raises(DeltaConfigError, match=r"references\[1\] must be a non-empty list of references, got \[\]"):
        e2e_scores(["a", "b"], [["a"], []], metrics=["BLEU"])
    with pytest.raises(DeltaConfigError, match=r"references\[0\]\[1\] must be a non-empty reference, got ' '"):
        e2e_scores(["a"], [["a", " "]], metrics=["BLEU"])
    with pytest.raises(DeltaConfigTypeError, match=r"references\[0\] must be a list of str, got 'a'"):
        e2e_scores(["a"], ["a"], metrics=["BLEU"])
    with pytest.raises(DeltaConfigTypeError, match=r"predictions\[0\] must be a str, got 3"):
        e2e_scores([3], [["a"]], metrics=["BLEU"])
    with pytest.raises(DeltaConfigError, match="predictions must be a non-empty list"):
        e2e_scores([], [], metrics=["BLEU"])


def test_unknown_metric_rejected():
    with pytest.raises(DeltaConfigError, match="metrics must be one of 'BLEU', 'NIST', .* got 'SPICE'"):
        e2e_scores(["a"], [["a"]], metrics=["BLEU", "SPICE"])


def test_missing_java_raises_with_install_hint_but_bleu_nist_work(monkeypatch):
    monkeypatch.setattr(e2e.shutil, "which", lambda name: None)
    with pytest.raises(MissingPackageError, match="apt-get install -y default-jre-headless"):
        e2e_scores(["a b"], [["a b"]], metrics=["BLEU", "METEOR"])
    with pytest.raises(MissingPackageError, match="ROUGE_L, CIDEr need Java"):
        e2e_scores(["a b"], [["a b"]], metrics=["ROUGE_L", "CIDEr"])
    scores = e2e_scores(["a b c d"], [["a b c d"]], metrics=["BLEU", "NIST"])
    assert scores["BLEU"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------------- files


def test_reference_and_prediction_files_round_trip(tmp_path):
    ref_file = tmp_path / "refs.txt"
    ref_file.write_text("r1 a\nr1 b\n\nr2 a\n\nr3 a\nr3 b\nr3 c\n", encoding="utf-8")
    pred_file = tmp_path / "preds.txt"
    pred_file.write_text("p1\n\n  p3  \n", encoding="utf-8")
    assert read_references_file(ref_file) == [["r1 a", "r1 b"], ["r2 a"], ["r3 a", "r3 b", "r3 c"]]
    assert read_predictions_file(pred_file) == ["p1", "", "p3"]
    single = tmp_path / "single.txt"
    single.write_text("one\ntwo\n", encoding="utf-8")
    assert read_references_file(single) == [["one"], ["two"]]


def test_reference_file_with_empty_group_names_file_and_line(tmp_path):
    ref_file = tmp_path / "refs.txt"
    ref_file.write_text("r1\n\n\nr2\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"refs\.txt, line 3: blank line"):
        read_references_file(ref_file)


def test_score_files_count_mismatch_and_bleu(tmp_path):
    ref_file = tmp_path / "refs.txt"
    ref_file.write_text("a b c d\nx y\n\ne f g h\n", encoding="utf-8")
    pred_file = tmp_path / "preds.txt"
    pred_file.write_text("a b c d\ne f g h\n", encoding="utf-8")
    assert score_files(ref_file, pred_file, metrics=["BLEU"])["BLEU"] == pytest.approx(1.0)
    bad = tmp_path / "bad.txt"
    bad.write_text("a b c d\n", encoding="utf-8")
    with pytest.raises(DeltaConfigError, match=r"bad\.txt holds 1 predictions but .*refs\.txt holds 2 reference groups"):
        score_files(ref_file, bad, metrics=["BLEU"])
    with pytest.raises(DeltaConfigError, match="ref_path must be an existing file"):
        score_files(tmp_path / "nope.txt", pred_file)


# ----------------------------------------------------------------------------------- COCO metrics (Java)


@needs_java
def test_rouge_l_by_hand_and_identity():
    # PTB tokenisation lowercases and drops punctuation: "Cat dog, Fish bird Cow." -> "cat dog fish bird cow"
    scores = e2e_scores(["Cat dog, Fish bird Cow."], [["cat fish cow pig", "sheep"]], metrics=["ROUGE_L"])
    lcs, n_c, n_r = 3, 5, 4  # LCS(cat dog fish bird cow, cat fish cow pig) = cat fish cow
    p, r, beta = lcs / n_c, lcs / n_r, 1.2  # the second reference has LCS 0
    expected = (1 + beta**2) * p * r / (r + beta**2 * p)
    assert scores["ROUGE_L"] == pytest.approx(expected, abs=1e-12)
    same = e2e_scores([g[0] for g in REFS_2], REFS_2, metrics=["ROUGE_L", "BLEU"])
    assert same["ROUGE_L"] == pytest.approx(1.0)


@needs_java
def test_cider_matches_pycocoevalcap_on_pretokenised_text():
    from pycocoevalcap.cider.cider import Cider

    # already lower-case and punctuation-free, so PTB tokenisation is the identity
    preds = ["the eagle is a coffee shop near burger king", "zizzi is cheap", "a pub in the city centre"]
    refs = [
        ["the eagle coffee shop is near burger king", "near burger king is the eagle"],
        ["zizzi is a cheap place", "cheap food at zizzi"],
        ["there is a pub in the city centre", "a city centre pub"],
    ]
    expected, _ = Cider().compute_score({i: r for i, r in enumerate(refs)}, {i: [p] for i, p in enumerate(preds)})
    ours = e2e_scores(preds, refs, metrics=["CIDEr"])["CIDEr"]
    assert ours == pytest.approx(float(expected), abs=1e-12)
    assert ours > 0


@needs_java
@pytest.mark.slow
def test_meteor_identical_outputs_score_one():
    # METEOR takes the best reference of each group, and an exact match scores 1.0 in METEOR 1.5;
    # a misaligned grouping of the references would score below 1.
    preds = ["The Eagle is a coffee shop near Burger King.", "Zizzi is cheap."]
    refs = [["Burger King is near The Eagle.", preds[0]], [preds[1], "Zizzi is a cheap place."]]
    scores = e2e_scores(preds, refs, metrics=["METEOR"])
    assert set(scores) == {"METEOR"}
    assert scores["METEOR"] == pytest.approx(1.0, abs=1e-12)
