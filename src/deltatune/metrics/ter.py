"""Translation Edit Rate (TER; Snover et al., 2006), as the WebNLG and DART evaluations report it.

TER is the number of word edits (insertions, deletions, substitutions and shifts of word sequences)
that turn an output into its closest reference, divided by the average reference length; lower is
better. The corpus score sums the edits of every input (each against its closest reference) and
divides by the sum of the inputs' average reference lengths -- what ``tercom`` 0.7.25 (the Java
program of the WebNLG 2017 and DART evaluation scripts) prints as the total TER with several
references. The edit search is ``sacrebleu``'s port of tercom (greedy shifts of at most 10 words
over at most 50 positions, tercom's tokenisation, case-insensitive by default as tercom's defaults).

The score is a fraction (0.46, as the LoRA paper's tables print TER), not a percentage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .._optional import require
from ..errors import DeltaConfigError, DeltaConfigTypeError
from ..validation import check_bool

__all__ = ["TerStatistics", "ter", "ter_statistics"]


@dataclass(frozen=True)
class TerStatistics:
    """Corpus TER with its parts: ``edits`` (summed over inputs) / ``ref_length`` (summed average
    reference lengths)."""

    edits: float
    ref_length: float

    @property
    def score(self) -> float:
        """``edits / ref_length`` (1.0 when every reference is empty but some output is not, 0.0 when
        both are empty, as tercom)."""
        if self.ref_length > 0:
            return self.edits / self.ref_length
        return 1.0 if self.edits > 0 else 0.0


def _check(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if isinstance(predictions, str) or not isinstance(predictions, Sequence):
        raise DeltaConfigTypeError(f"predictions must be a list of str, got {type(predictions).__name__}")
    if isinstance(references, str) or not isinstance(references, Sequence):
        raise DeltaConfigTypeError(f"references must be a list of lists of str, got {type(references).__name__}")
    if len(predictions) != len(references):
        raise DeltaConfigError(
            f"predictions and references must have the same length (one group of references per prediction), "
            f"got {len(predictions)} predictions and {len(references)} reference groups"
        )
    if not predictions:
        raise DeltaConfigError("predictions must be a non-empty list of str, got []")
    for i, pred in enumerate(predictions):
        if not isinstance(pred, str):
            raise DeltaConfigTypeError(f"predictions[{i}] must be a str, got {pred!r} ({type(pred).__name__})")
    for i, group in enumerate(references):
        if isinstance(group, str) or not isinstance(group, Sequence) or not group:
            raise DeltaConfigError(f"references[{i}] must be a non-empty list of str, got {group!r}")
        for j, ref in enumerate(group):
            if not isinstance(ref, str):
                raise DeltaConfigTypeError(f"references[{i}][{j}] must be a str, got {ref!r} ({type(ref).__name__})")


def ter_statistics(
    predictions: Sequence[str], references: Sequence[Sequence[str]], *, case_sensitive: bool = False
) -> TerStatistics:
    """Corpus TER statistics of ``predictions`` (one str per input) against ``references`` (a
    non-empty list of str per input; inputs may have different numbers of references).

    Raises:
        DeltaConfigError: lengths differ, no input, or an input without references.
        DeltaConfigTypeError: a prediction or reference that is not a str.
        MissingPackageError: ``sacrebleu`` is not installed.
    """
    _check(predictions, references)
    check_bool("case_sensitive", case_sensitive)
    TER = require("sacrebleu.metrics", "TER").TER

    most = max(len(g) for g in references)
    # sacrebleu takes reference *streams*; None pads the inputs that have fewer references
    streams = [[g[k] if k < len(g) else None for g in references] for k in range(most)]
    score = TER(case_sensitive=case_sensitive).corpus_score(list(predictions), streams)
    return TerStatistics(edits=float(score.num_edits), ref_length=float(score.ref_length))


def ter(predictions: Sequence[str], references: Sequence[Sequence[str]], *, case_sensitive: bool = False) -> float:
    """Corpus TER as a fraction (see :func:`ter_statistics`); lower is better."""
    return ter_statistics(predictions, references, case_sensitive=case_sensitive).score
