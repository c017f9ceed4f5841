"""Evaluation metrics: E2E NLG (BLEU, NIST, METEOR, ROUGE-L, CIDEr), TER, per-subset (WebNLG seen/unseen)
scores, GLUE classification, perplexity."""

from .e2e import (
    E2E_METRICS,
    TEXT_METRICS,
    e2e_scores,
    mteval_tokenize,
    read_predictions_file,
    read_references_file,
    read_scored_files,
    score_files,
)
from .glue import (
    GLUE_TASK_METRICS,
    accuracy,
    f1_binary,
    glue_metrics,
    matthews_corrcoef,
    pearson,
    spearman,
)
from .perplexity import perplexity, sliding_windows
from .splits import ALL_SPLIT, seen_unseen_labels, split_scores
from .ter import TerStatistics, ter, ter_statistics

__all__ = [
    "ALL_SPLIT",
    "E2E_METRICS",
    "GLUE_TASK_METRICS",
    "TEXT_METRICS",
    "TerStatistics",
    "accuracy",
    "e2e_scores",
    "f1_binary",
    "glue_metrics",
    "matthews_corrcoef",
    "mteval_tokenize",
    "pearson",
    "perplexity",
    "read_predictions_file",
    "read_references_file",
    "read_scored_files",
    "score_files",
    "seen_unseen_labels",
    "sliding_windows",
    "spearman",
    "split_scores",
    "ter",
    "ter_statistics",
]
