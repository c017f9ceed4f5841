"""The registry of delta methods, and the one place method configs are built.

One line per method in :data:`REGISTRY`, each naming a module that exposes ``METHOD`` (a
:class:`DeltaMethod`). Adding a method is one file under ``deltatune/methods/``, one line here, and
its tests. :func:`make_config` turns a dict with a ``method`` key (or a config object) into the
validated config object; everything that builds configs from data goes through it.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from ..errors import DeltaConfigError, DeltaConfigTypeError
from .base import DeltaConfig, DeltaMethod

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

__all__ = ["REGISTRY", "DeltaConfig", "DeltaMethod", "get_method", "make_config", "method_names"]


def method_names() -> list[str]:
    """The registered method names, sorted."""
    return sorted(REGISTRY)


def get_method(name: str) -> DeltaMethod:
    """The :class:`DeltaMethod` registered under ``name``."""
    if not isinstance(name, str) or name not in REGISTRY:
        raise DeltaConfigError(f"method must be one of {method_names()}, got {name!r}")
    module = importlib.import_module(REGISTRY[name])
    return module.METHOD


def make_config(spec: DeltaConfig | Mapping[str, Any]) -> DeltaConfig:
    """The validated config object for ``spec``: a dict with a ``method`` key (``{"method": "lora", "r": 8}``)
    or a config object.

    A dict is validated once, while its config class is built; a config object is returned as it is,
    validated again only if a field changed since it was built (:meth:`DeltaConfig.ensure_valid`).
    So ``apply(model, make_config(d))`` checks ``d`` exactly once. (MindFormers ``pet_config`` dicts
    are mapped first by :func:`deltatune.config.config_from_dict`.)

    Raises:
        DeltaConfigTypeError: ``spec`` is neither a mapping nor a config.
        DeltaConfigError: no or an unknown ``method``, unknown fields, or a bad value (the message names
            the field, the value and what is expected).
    """
    if isinstance(spec, DeltaConfig):
        spec.ensure_valid()
        return spec
    if not isinstance(spec, Mapping):
        raise DeltaConfigTypeError(
            f"config must be a DeltaConfig (e.g. LoraConfig) or a mapping with a 'method' key, got {type(spec).__name__}"
        )
    if "method" not in spec:
        raise DeltaConfigError(f"config needs a 'method' key, one of {method_names()}; got keys {sorted(spec)}")
    return get_method(spec["method"]).config_cls.from_dict(spec)
