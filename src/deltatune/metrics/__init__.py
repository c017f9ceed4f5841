"""Evaluation metrics: E2E NLG (BLEU, NIST, METEOR, ROUGE-L, CIDEr), GLUE classification, perplexity."""

from .e2e import (
    E2E_METRICS,
    e2e_scores,
    mteval_tokenize,
    read_predictions_file,
    read_references_file,
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

__all__ = [
    "E2E_METRICS",
    "GLUE_TASK_METRICS",
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
    "score_files",
    "sliding_windows",
    "spearman",
]
