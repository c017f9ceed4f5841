"""The tasks layer: one run specification, loader, override parser and run directory for every task.

Modules (each one's docstring says what it owns):

* :mod:`~deltatune.tasks.spec`: the shared run fields, :data:`FULL`, the one YAML reader and the
  kind of a YAML file (which subcommand runs it); the data-to-text recipe schema;
* :mod:`~deltatune.tasks.layout`: the sections of the classification and perplexity configs (the
  recipe's layout) and the one mapping of the old flat files onto them;
* :mod:`~deltatune.tasks.overrides`: the one ``--set section.key=value`` parser;
* :mod:`~deltatune.tasks.rundir`: run-directory file names, prepare / overwrite rules, writers;
* :mod:`~deltatune.tasks.loader`: YAML -> validated data-to-text :class:`Recipe`;
* :mod:`~deltatune.tasks.data_to_text` and :mod:`~deltatune.tasks.evaluate`: the E2E / WebNLG / DART
  pipeline (train -> generate -> score -> report);
* :mod:`~deltatune.tasks.classification` (with :mod:`~deltatune.tasks.heads`): GLUE / CSV
  classification and regression;
* :mod:`~deltatune.tasks.lm`: WikiText-2 perplexity before and after tuning;
* :mod:`~deltatune.tasks.setups`: what ``deltatune info --config`` shows (the method setups of any config).

:mod:`deltatune.sweep` (above this layer) runs any of these tasks for several methods and seeds.
"""

from .classification import (
    DEFAULT_LR,
    DEFAULT_METHOD_CONFIGS,
    ClassificationConfig,
    TaskData,
    classification_config,
    classification_loss,
    load_task_data,
    predict,
    run_classification,
    subset_examples,
    sweep_method_names,
)
from .data_to_text import finetune, generate_predictions, run_recipe
from .evaluate import evaluate_run
from .heads import (
    POOLINGS,
    ClassifierBundle,
    PooledClassifier,
    build_classifier,
    last_token_index,
    masked_mean,
)
from .lm import PerplexityConfig, load_perplexity_config, run_perplexity
from .loader import load_recipe
from .overrides import apply_overrides, parse_override
from .spec import FULL, Recipe, WrongCommandError

__all__ = [
    "DEFAULT_LR",
    "DEFAULT_METHOD_CONFIGS",
    "FULL",
    "POOLINGS",
    "ClassificationConfig",
    "ClassifierBundle",
    "PerplexityConfig",
    "PooledClassifier",
    "Recipe",
    "TaskData",
    "WrongCommandError",
    "apply_overrides",
    "build_classifier",
    "classification_config",
    "classification_loss",
    "evaluate_run",
    "finetune",
    "generate_predictions",
    "last_token_index",
    "load_perplexity_config",
    "load_recipe",
    "load_task_data",
    "masked_mean",
    "parse_override",
    "predict",
    "run_classification",
    "run_perplexity",
    "run_recipe",
    "subset_examples",
    "sweep_method_names",
]
