"""deltatune: parameter-efficient (delta) fine-tuning for PyTorch.

Quick start::

    import deltatune as dt
    model = dt.apply(model, dt.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    dt.trainable_summary(model).print()
    ...  # train
    dt.save_delta(model, "out/delta")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__
from .api import (
    active_adapters,
    adapter_names,
    apply,
    delete_adapter,
    disable_adapters,
    get_config,
    merge,
    merge_and_unload,
    set_active_adapter,
    targeted_modules,
    unload,
    unmerge,
)
from .checkpoint import delta_state_dict, load_delta, save_delta
from .config import DeltaConfig, config_from_dict, load_config
from .errors import (
    AdapterNotFoundError,
    CheckpointError,
    DataFormatError,
    DeltaConfigError,
    DeltaConfigTypeError,
    DeltaError,
    FileFormatError,
    ForeignFileError,
    MissingPackageError,
    TargetNotFoundError,
    UnsupportedModuleError,
)
from .export_gguf import export_gguf
from .freeze import TrainableSummary, freeze_delta, trainable_summary
from .generate import GenerationConfig, generate, generate_text
from .methods import get_method, make_config, method_names
from .methods.adapter import AdapterConfig
from .methods.bitfit import BitFitConfig
from .methods.ia3 import IA3Config
from .methods.lora import LoraConfig
from .methods.low_rank_adapter import LowRankAdapterConfig
from .methods.prefix import PrefixConfig, fold_prefix
from .methods.ptuning_v2 import PTuningV2Config
from .methods.rdrop import RDropLoss, rdrop_repeat
from .peft_io import export_peft, import_peft
from .train import CapturedStep, TrainConfig, Trainer, TrainerCallback, read_log

if TYPE_CHECKING:  # bound on first use at run time (``__getattr__`` below); imported here for type checkers
    from .report import compare_runs, plot_run, write_report
    from .sweep import load_sweep, run_sweep
    from .tasks.classification import ClassificationConfig, run_classification
    from .tasks.data_to_text import run_recipe
    from .tasks.lm import PerplexityConfig, run_perplexity
    from .tasks.loader import load_recipe
    from .tasks.spec import Recipe

#: the pipeline layer (recipes, tasks, sweeps, reports) is imported on first use, so that
#: ``import deltatune`` stays light; ``from deltatune import *`` and attribute access bind these names.
_LAZY = {
    "ClassificationConfig": "tasks.classification",
    "run_classification": "tasks.classification",
    "PerplexityConfig": "tasks.lm",
    "run_perplexity": "tasks.lm",
    "Recipe": "tasks.spec",
    "load_recipe": "tasks.loader",
    "run_recipe": "tasks.data_to_text",
    "load_sweep": "sweep",
    "run_sweep": "sweep",
    "compare_runs": "report",
    "plot_run": "report",
    "write_report": "report",
}


def __getattr__(name: str) -> object:
    """Bind a pipeline-layer name of ``__all__`` on first use (PEP 562)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'deltatune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CapturedStep",
    "ClassificationConfig",
    "PerplexityConfig",
    "Recipe",
    "compare_runs",
    "load_recipe",
    "load_sweep",
    "plot_run",
    "run_classification",
    "run_perplexity",
    "run_recipe",
    "run_sweep",
    "write_report",
    "AdapterConfig",
    "BitFitConfig",
    "GenerationConfig",
    "IA3Config",
    "LowRankAdapterConfig",
    "PTuningV2Config",
    "PrefixConfig",
    "RDropLoss",
    "TrainConfig",
    "Trainer",
    "TrainerCallback",
    "fold_prefix",
    "generate",
    "generate_text",
    "rdrop_repeat",
    "read_log",
    "AdapterNotFoundError",
    "CheckpointError",
    "DataFormatError",
    "DeltaConfig",
    "DeltaConfigError",
    "DeltaConfigTypeError",
    "DeltaError",
    "FileFormatError",
    "ForeignFileError",
    "LoraConfig",
    "MissingPackageError",
    "TargetNotFoundError",
    "TrainableSummary",
    "UnsupportedModuleError",
    "__version__",
    "active_adapters",
    "adapter_names",
    "apply",
    "config_from_dict",
    "delete_adapter",
    "delta_state_dict",
    "disable_adapters",
    "export_gguf",
    "export_peft",
    "freeze_delta",
    "get_config",
    "get_method",
    "import_peft",
    "load_config",
    "load_delta",
    "make_config",
    "merge",
    "merge_and_unload",
    "method_names",
    "save_delta",
    "set_active_adapter",
    "targeted_modules",
    "trainable_summary",
    "unload",
    "unmerge",
]
