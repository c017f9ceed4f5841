"""Understanding tasks: GLUE / CSV sequence classification and regression, WikiText-2 perplexity."""

from .classification import (
    DEFAULT_LR,
    DEFAULT_METHOD_CONFIGS,
    FULL,
    ClassificationConfig,
    TaskData,
    classification_loss,
    load_task_data,
    predict,
    run_classification,
    subset_examples,
    sweep_method_names,
)
from .heads import (
    POOLINGS,
    ClassifierBundle,
    PooledClassifier,
    build_classifier,
    last_token_index,
    masked_mean,
)

__all__ = [
    "DEFAULT_LR",
    "DEFAULT_METHOD_CONFIGS",
    "FULL",
    "POOLINGS",
    "ClassificationConfig",
    "ClassifierBundle",
    "PooledClassifier",
    "TaskData",
    "build_classifier",
    "classification_loss",
    "last_token_index",
    "load_task_data",
    "masked_mean",
    "predict",
    "run_classification",
    "subset_examples",
    "sweep_method_names",
]
