"""Old import path of the data-to-text recipe API, kept for users and tests: a thin re-export.

The code lives in :mod:`deltatune.tasks`: the schema in :mod:`deltatune.tasks.spec`, loading in
:mod:`deltatune.tasks.loader`, ``--set`` in :mod:`deltatune.tasks.overrides`, the run directory in
:mod:`deltatune.tasks.rundir`, the pipeline in :mod:`deltatune.tasks.data_to_text` and scoring in
:mod:`deltatune.tasks.evaluate`. New code imports from there.
"""

from __future__ import annotations

from .tasks.data_to_text import (
    CUDA_GRAPH_PAD_MULTIPLE,
    RunData,
    export_run_gguf,
    finetune,
    generate_predictions,
    prepare_data,
    run_recipe,
    train_collator,
)
from .tasks.evaluate import evaluate_run, format_scores
from .tasks.loader import load_recipe
from .tasks.overrides import apply_overrides, parse_override
from .tasks.rundir import (
    CONFIG_FILE,
    GENERATION_INFO_FILE,
    PREDICTIONS_FILE,
    REFERENCES_FILE,
    SOURCES_FILE,
    prepare_run_dir,
    write_references,
)
from .tasks.spec import DATA_DIR_ENV_VAR, DataSpec, EvalSpec, ModelSpec, Recipe

__all__ = [
    "CONFIG_FILE",
    "CUDA_GRAPH_PAD_MULTIPLE",
    "DATA_DIR_ENV_VAR",
    "GENERATION_INFO_FILE",
    "PREDICTIONS_FILE",
    "REFERENCES_FILE",
    "SOURCES_FILE",
    "DataSpec",
    "EvalSpec",
    "ModelSpec",
    "Recipe",
    "RunData",
    "apply_overrides",
    "evaluate_run",
    "export_run_gguf",
    "finetune",
    "format_scores",
    "generate_predictions",
    "load_recipe",
    "parse_override",
    "prepare_data",
    "run_recipe",
    "train_collator",
    "write_references",
]


def _prepare_run_dir(recipe: Recipe, overwrite: bool) -> object:
    """The old private helper (tests/test_file_inputs.py): :func:`deltatune.tasks.rundir.prepare_run_dir`."""
    return prepare_run_dir(recipe.run_dir, overwrite=overwrite, resuming=recipe.train.resume_from is not None)
