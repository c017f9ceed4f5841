"""The registry of delta methods: one line per method, each a module exposing ``METHOD``.

Adding a method is one file under ``deltatune/methods/``, one line here, and its tests.
"""

from __future__ import annotations

import importlib

from ..errors import DeltaConfigError
from .base import DeltaMethod

# name -> module that defines ``METHOD: DeltaMethod``
REGISTRY: dict[str, str] = {
    "lora": "deltatune.methods.lora",
    "adapter": "deltatune.methods.adapter",
    "low_rank_adapter": "deltatune.methods.low_rank_adapter",
    "bitfit": "deltatune.methods.bitfit",
    "ia3": "deltatune.methods.ia3",
    "prefix": "deltatune.methods.prefix",
    "ptuning_v2": "deltatune.methods.ptuning_v2",
}

__all__ = ["REGISTRY", "DeltaMethod", "get_method", "method_names"]


def method_names() -> list[str]:
    """The registered method names, sorted."""
    return sorted(REGISTRY)


def get_method(name: str) -> DeltaMethod:
    """The :class:`DeltaMethod` registered under ``name``."""
    if not isinstance(name, str) or name not in REGISTRY:
        raise DeltaConfigError(f"method must be one of {method_names()}, got {name!r}")
    module = importlib.import_module(REGISTRY[name])
    return module.METHOD
