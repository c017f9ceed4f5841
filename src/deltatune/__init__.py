"""deltatune: parameter-efficient (delta) fine-tuning for PyTorch."""

from __future__ import annotations

from .errors import (
    AdapterNotFoundError,
    CheckpointError,
    DataFormatError,
    DeltaConfigError,
    DeltaConfigTypeError,
    DeltaError,
    MissingPackageError,
    TargetNotFoundError,
    UnsupportedModuleError,
)

__version__ = "0.1.0"

__all__ = [
    "AdapterNotFoundError",
    "CheckpointError",
    "DataFormatError",
    "DeltaConfigError",
    "DeltaConfigTypeError",
    "DeltaError",
    "MissingPackageError",
    "TargetNotFoundError",
    "UnsupportedModuleError",
    "__version__",
]
