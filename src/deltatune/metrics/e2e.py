"""E2E NLG Challenge metrics: BLEU, NIST, METEOR, ROUGE-L and CIDEr.

The numbers agree with the official scorer of the challenge (``measure_scores.py`` of
tuetschek/e2e-metrics, default mode) on the same inputs:

* **BLEU** and **NIST** follow NIST MT-Eval v13a as that scorer runs it: the v13a tokenisation
  (with ASCII lowercasing, the script's default), corpus-level statistics, BLEU-4 with the
  "closest reference length" brevity penalty (ties go to the shorter reference) and MT-Eval's
  smoothing (a zero n-gram match count ``k``-th in a row counts as ``1 / 2**k`` matches), NIST-5
  with information weights estimated from all references of the corpus and the average reference
  length in the length penalty. Only the tokeniser is borrowed (``sacrebleu``'s 13a tokeniser is
  the same regular expressions); the statistics are computed here because no package reproduces
  MT-Eval's multi-reference NIST (``nltk``'s NIST picks one best reference per segment instead).
* **METEOR**, **ROUGE-L** and **CIDEr** are the MS-COCO caption implementations shipped by
  ``pycocoevalcap`` (the same METEOR 1.5 jar, paraphrase table, ROUGE-L with ``beta = 1.2`` and
  CIDEr -- not CIDEr-D -- with document frequencies from the evaluated references), applied after
  the Stanford PTB tokeniser (``stanford-corenlp-3.4.1.jar`` from ``pycocoevalcap``, run with
  ``-preserveLines -lowerCase``) and removal of the same punctuation tokens. These three metrics
  therefore need Java; BLEU and NIST do not.

Input files use the official scorer's plain-text formats: :func:`read_references_file` (one
reference per line, groups of references of one instance separated by a blank line; a file without
blank lines holds one reference per instance) and :func:`read_predictions_file` (one output per
line).
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Sequence
from typing import Any

from .._optional import require
from ..errors import DataFormatError, DeltaConfigError, DeltaConfigTypeError, MissingPackageError
from ..io_utils import read_text_file
from ..validation import check_choice, check_path_exists, check_str_list
from .ter import ter

__all__ = [
    "E2E_METRICS",
    "JAVA_INSTALL_HINT",
    "TEXT_METRICS",
    "e2e_scores",
    "mteval_tokenize",
    "read_predictions_file",
    "read_references_file",
    "read_scored_files",
    "score_files",
]

#: The five metrics of the E2E NLG Challenge, in the order the official scorer prints them.
E2E_METRICS: tuple[str, ...] = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
#: Every data-to-text metric :func:`e2e_scores` computes: the E2E five and TER (WebNLG, DART; lower is better).
TEXT_METRICS: tuple[str, ...] = (*E2E_METRICS, "TER")
#: How to get Java on Debian/Ubuntu (METEOR, ROUGE_L and CIDEr run Java programs).
JAVA_INSTALL_HINT = "apt-get install -y default-jre-headless"

_JAVA_METRICS = ("METEOR", "ROUGE_L", "CIDEr")
# Tokens that the COCO caption evaluation drops after PTB tokenisation.
_COCO_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
_BLEU_ORDER = 4
_NIST_ORDER = 5
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


# --------------------------------------------------------------------------------------------
# files


def _read_lines(path: str) -> list[str]:
    text = read_text_file(path, "text file").removeprefix("\ufeff")  # bad UTF-8: FileFormatError with the line
    return [line.strip() for line in text.splitlines()]


def read_predictions_file(path: str | os.PathLike[str]) -> list[str]:
    """Read system outputs: one per line, stripped; a blank line is an empty output."""
    path = check_path_exists("pred_path", path, kind="file")
    return _read_lines(path)


def read_references_file(path: str | os.PathLike[str]) -> list[list[str]]:
    """Read references in the official scorer's plain-text format.

    One reference per line; the references of one instance are consecutive lines and instances are
    separated by one blank line. A file without any blank line is a single-reference file (one
    instance per line). Two blank lines in a row (an instance without references) raise
    :class:`~deltatune.errors.DataFormatError` naming the file and line.
    """
    path = check_path_exists("ref_path", path, kind="file")
    lines = _read_lines(path)
    groups: list[list[str]] = [[]]
    group_start: list[int] = [1]
    for lineno, line in enumerate(lines, start=1):
        if line:
            groups[-1].append(line)
            continue
        if not groups[-1]:
            raise DataFormatError(
                f"{path}, line {lineno}: blank line where a reference was expected "
                "(instances are separated by exactly one blank line and must have at least one reference)"
            )
        groups.append([])
        group_start.append(lineno + 1)
    if not groups[-1]:
        groups.pop()
    if not groups:
        raise DataFormatError(f"{path}, line 1: the references file holds no reference")
    if len(groups) == 1:  # no blank line at all: one reference per instance
        groups = [[ref] for ref in groups[0]]
    return groups


# --------------------------------------------------------------------------------------------
# validation


def _check_inputs(
    predictions: Any, references: Any, metrics: Any
) -> tuple[list[str], list[list[str]], list[str]]:
    if not isinstance(predictions, (list, tuple)):
        raise DeltaConfigTypeError(
            f"predictions must be a list of str, got {type(predictions).__name__}"
        )
    for i, pred in enumerate(predictions):
        if not isinstance(pred, str):
            raise DeltaConfigTypeError(f"predictions[{i}] must be a str, got {pred!r} ({type(pred).__name__})")
    if not isinstance(references, (list, tuple)):
        raise DeltaConfigTypeError(
            f"references must be a list of lists of str, got {type(references).__name__}"
        )
    if len(predictions) != len(references):
        raise DeltaConfigError(
            "predictions and references must have the same length (one group of references per "
            f"prediction), got {len(predictions)} predictions and {len(references)} reference groups"
        )
    if not predictions:
        raise DeltaConfigError("predictions must be a non-empty list of str, got []")
    refs: list[list[str]] = []
    for i, group in enumerate(references):
        if isinstance(group, str) or not isinstance(group, (list, tuple)):
            raise DeltaConfigTypeError(
                f"references[{i}] must be a list of str, got {group!r} ({type(group).__name__})"
            )
        if not group:
            raise DeltaConfigError(f"references[{i}] must be a non-empty list of references, got []")
        for j, ref in enumerate(group):
            if not isinstance(ref, str):
                raise DeltaConfigTypeError(
                    f"references[{i}][{j}] must be a str, got {ref!r} ({type(ref).__name__})"
                )
            if not ref.strip():
                raise DeltaConfigError(f"references[{i}][{j}] must be a non-empty reference, got {ref!r}")
        refs.append(list(group))
    names = check_str_list("metrics", metrics)
    assert names is not None
    for name in names:
        check_choice("metrics", name, TEXT_METRICS)
    if len(set(names)) != len(names):
        raise DeltaConfigError(f"metrics must not repeat a metric, got {metrics!r}")
    return list(predictions), refs, names


def _require_java(names: Sequence[str]) -> str:
    java = shutil.which("java")
    if java is None:
        raise MissingPackageError(
            f"metric(s) {', '.join(names)} need Java (the Stanford PTB tokeniser and METEOR 1.5 are Java "
            f"programs) but no `java` is on PATH; install one, e.g. `{JAVA_INSTALL_HINT}`, or ask only "
            "for BLEU and NIST"
        )
    return java


def _pycocoevalcap_dir() -> str:
    ptbtokenizer = require("pycocoevalcap.tokenizer.ptbtokenizer", "METEOR, ROUGE_L and CIDEr")
    return os.path.dirname(os.path.abspath(ptbtokenizer.__file__))


# --------------------------------------------------------------------------------------------
# MT-Eval v13a BLEU and NIST


def mteval_tokenize(text: str, *, lowercase: bool = True) -> list[str]:
    """Tokenise ``text`` as NIST MT-Eval v13a does (ASCII lowercasing first unless ``lowercase=False``)."""
    if lowercase:
        text = text.translate(_ASCII_LOWER)
    # MT-Eval reads segments from SGML with every run of whitespace collapsed to one space.
    return _tokenizer13a()(" ".join(text.split())).split()


@functools.lru_cache(maxsize=1)
def _tokenizer13a() -> Any:
    return require("sacrebleu.tokenizers.tokenizer_13a", "BLEU and NIST").Tokenizer13a()


def _ngrams(words: Sequence[str], max_n: int) -> Counter[tuple[str, ...]]:
    counts: Counter[tuple[str, ...]] = Counter()
    for n in range(1, max_n + 1):
        for i in range(len(words) - n + 1):
            counts[tuple(words[i : i + n])] += 1
    return counts


def _closest_ref_length(ref_lengths: Sequence[int], hyp_length: int) -> int:
    # Closest to the hypothesis length, ties to the shorter one; empty references are ignored.
    nonempty = [n for n in ref_lengths if n > 0]
    if not nonempty:
        return ref_lengths[0]
    return min(nonempty, key=lambda n: (abs(hyp_length - n), n))


def _mteval_scores(predictions: list[str], references: list[list[str]], names: Sequence[str]) -> dict[str, float]:
    max_n = _NIST_ORDER if "NIST" in names else _BLEU_ORDER
    hyps = [mteval_tokenize(p) for p in predictions]
    refs = [[mteval_tokenize(r) for r in group] for group in references]

    # NIST information weights from n-gram counts over all references of the corpus.
    ref_counts_all: Counter[tuple[str, ...]] = Counter()
    total_ref_words = 0
    for group in refs:
        for ref in group:
            ref_counts_all.update(_ngrams(ref, max_n))
            total_ref_words += len(ref)

    def info(ngram: tuple[str, ...]) -> float:
        prefix = ngram[:-1]
        # MT-Eval joins n-grams with spaces and tests the (n-1)-gram prefix for Perl truth, so the
        # prefix "0" (a lone token "0") falls back to the total word count like a unigram does.
        if prefix and prefix != ("0",):
            denom = ref_counts_all[prefix]
        else:
            denom = total_ref_words
        return -math.log(ref_counts_all[ngram] / denom) / math.log(2)

    match = [0] * (max_n + 1)
    tst_count = [0] * (max_n + 1)
    tst_info = [0.0] * (max_n + 1)
    ref_words = 0
    ref_count = 0  # number of non-empty references
    ref_length = 0  # sum of the closest reference lengths (BLEU brevity penalty)
    info_cache: dict[tuple[str, ...], float] = {}
    for hyp, group in zip(hyps, refs):
        hyp_ngrams = _ngrams(hyp, max_n)
        max_ref: Counter[tuple[str, ...]] = Counter()
        for ref in group:
            max_ref |= _ngrams(ref, max_n)
            ref_words += len(ref)
            ref_count += 1 if ref else 0
        for n in range(1, max_n + 1):
            tst_count[n] += max(len(hyp) - n + 1, 0)
        for ngram, count in hyp_ngrams.items():
            ref_max = max_ref.get(ngram, 0)
            if ref_max == 0:
                continue
            clipped = min(count, ref_max)
            n = len(ngram)
            match[n] += clipped
            if "NIST" in names:
                weight = info_cache.get(ngram)
                if weight is None:
                    weight = info_cache[ngram] = info(ngram)
                tst_info[n] += weight * clipped
        ref_length += _closest_ref_length([len(r) for r in group], len(hyp))

    scores: dict[str, float] = {}
    if "BLEU" in names:
        bp = math.exp(min(0.0, 1.0 - ref_length / tst_count[1])) if tst_count[1] > 0 else 0.0
        log_sum = 0.0
        smooth = 1
        for n in range(1, _BLEU_ORDER + 1):
            if tst_count[n] == 0:
                continue
            if match[n] == 0:
                smooth *= 2
                log_sum += math.log(1.0 / (smooth * tst_count[n]))
            else:
                log_sum += math.log(match[n] / tst_count[n])
        scores["BLEU"] = math.exp(log_sum / _BLEU_ORDER) * bp
    if "NIST" in names:
        precision = sum(tst_info[n] / max(tst_count[n], 1) for n in range(1, _NIST_ORDER + 1))
        avg_refs = ref_count / len(hyps)
        ratio = tst_count[1] / (ref_words / avg_refs)
        scores["NIST"] = precision * _nist_length_penalty(ratio)
    return scores


def _nist_length_penalty(ratio: float) -> float:
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    beta = -math.log(0.5) / math.log(1.5) ** 2  # penalty 0.5 at 2/3 of the reference length
    return math.exp(-beta * math.log(ratio) ** 2)


# --------------------------------------------------------------------------------------------
# COCO caption metrics


def _ptb_tokenize(texts: list[str], java: str, package_dir: str) -> list[str]:
    """Stanford PTB tokenisation as the COCO caption evaluation runs it (lowercased, punctuation dropped)."""
    jar = os.path.join(package_dir, "stanford-corenlp-3.4.1.jar")
    if not os.path.isfile(jar):
        raise MissingPackageError(f"pycocoevalcap is installed without {jar}; reinstall it: `pip install pycocoevalcap`")
    fd, tmp_path = tempfile.mkstemp(prefix="deltatune-ptb-", suffix=".txt")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write("\n".join(t.replace("\n", " ") for t in texts).encode("utf-8"))
        proc = subprocess.run(
            [java, "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", tmp_path],
            capture_output=True,
            check=False,
        )
    finally:
        os.remove(tmp_path)
    if proc.returncode != 0:
        raise RuntimeError(
            f"the Stanford PTB tokeniser failed (exit {proc.returncode}): {proc.stderr.decode('utf-8', 'replace')[-2000:]}"
        )
    lines = proc.stdout.decode("utf-8").split("\n")
    if len(lines) < len(texts):
        raise RuntimeError(
            f"the Stanford PTB tokeniser returned {len(lines)} lines for {len(texts)} texts "
            "(a text contains a line separator other than '\\n'?)"
        )
    return [" ".join(w for w in line.rstrip().split(" ") if w not in _COCO_PUNCTUATION) for line in lines[: len(texts)]]


def _coco_scores(
    predictions: list[str], references: list[list[str]], names: Sequence[str], java: str
) -> dict[str, float]:
    tok_dir = _pycocoevalcap_dir()
    flat_refs = [ref for group in references for ref in group]
    tok_refs = _ptb_tokenize(flat_refs, java, tok_dir)
    tok_preds = _ptb_tokenize(predictions, java, tok_dir)
    gts: dict[int, list[str]] = {}
    pos = 0
    for i, group in enumerate(references):
        gts[i] = tok_refs[pos : pos + len(group)]
        pos += len(group)
    res = {i: [p] for i, p in enumerate(tok_preds)}

    scores: dict[str, float] = {}
    if "METEOR" in names:
        meteor = require("pycocoevalcap.meteor.meteor", "METEOR").Meteor()
        try:
            score, _ = meteor.compute_score(gts, res)
        finally:
            del meteor  # its __del__ ends the Java process
        scores["METEOR"] = float(score)
    if "ROUGE_L" in names:
        rouge = require("pycocoevalcap.rouge.rouge", "ROUGE_L").Rouge()
        scores["ROUGE_L"] = float(rouge.compute_score(gts, res)[0])
    if "CIDEr" in names:
        cider = require("pycocoevalcap.cider.cider", "CIDEr").Cider()
        scores["CIDEr"] = float(cider.compute_score(gts, res)[0])
    return scores


# --------------------------------------------------------------------------------------------
# public entry points


def e2e_scores(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    metrics: Sequence[str] | str = E2E_METRICS,
) -> dict[str, float]:
    """Corpus-level E2E NLG Challenge scores of ``predictions`` against ``references``.

    Args:
        predictions: one system output per instance (an empty string is allowed).
        references: for each instance, a non-empty list of non-empty references.
        metrics: any of ``"BLEU"``, ``"NIST"``, ``"METEOR"``, ``"ROUGE_L"``, ``"CIDEr"`` and ``"TER"``
            (tercom's corpus TER, see :mod:`deltatune.metrics.ter`; not an E2E Challenge metric).

    Returns:
        ``{metric: score}`` in the order of :data:`TEXT_METRICS`; BLEU, METEOR, ROUGE_L and TER are
        fractions (the official scorers print them unscaled), NIST and CIDEr are unbounded.

    Raises:
        DeltaConfigError: lengths differ, a reference group or reference is empty, or an unknown
            metric is asked for.
        MissingPackageError: METEOR, ROUGE_L or CIDEr was asked for and ``java`` (or
            ``pycocoevalcap``) is missing.
    """
    preds, refs, names = _check_inputs(predictions, references, metrics)
    coco_names = [m for m in names if m in _JAVA_METRICS]
    java = None
    if coco_names:
        java = _require_java(coco_names)
        _pycocoevalcap_dir()
    scores: dict[str, float] = {}
    if "BLEU" in names or "NIST" in names:
        scores.update(_mteval_scores(preds, refs, names))
    if coco_names:
        assert java is not None
        scores.update(_coco_scores(preds, refs, coco_names, java))
    if "TER" in names:
        scores["TER"] = ter(preds, refs)
    return {m: scores[m] for m in TEXT_METRICS if m in scores}


def score_files(
    ref_path: str | os.PathLike[str],
    pred_path: str | os.PathLike[str],
    metrics: Sequence[str] | str = E2E_METRICS,
) -> dict[str, float]:
    """Score a predictions file against a references file (the official scorer's text formats).

    Equivalent to ``measure_scores.py REF_FILE PRED_FILE`` of the E2E NLG Challenge; a count
    mismatch raises :class:`~deltatune.errors.DeltaConfigError` naming both files and counts.
    """
    preds, refs = read_scored_files(ref_path, pred_path)
    return e2e_scores(preds, refs, metrics)


def read_scored_files(
    ref_path: str | os.PathLike[str], pred_path: str | os.PathLike[str]
) -> tuple[list[str], list[list[str]]]:
    """``(predictions, references)`` of a predictions file and its references file; a count mismatch
    raises :class:`~deltatune.errors.DeltaConfigError` naming both files and counts."""
    refs = read_references_file(ref_path)
    preds = read_predictions_file(pred_path)
    if len(refs) != len(preds):
        raise DeltaConfigError(
            f"{os.fspath(pred_path)} holds {len(preds)} predictions but {os.fspath(ref_path)} holds "
            f"{len(refs)} reference groups; they must be equal"
        )
    return preds, refs
