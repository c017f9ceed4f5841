"""Loading method configs: from a dict (:func:`config_from_dict`) or a YAML/JSON file (:func:`load_config`).

The config classes themselves are dataclasses under :class:`DeltaConfig` (defined in
:mod:`deltatune.methods.base`, re-exported here), built and validated by the method registry
(:func:`deltatune.methods.make_config`). This module adds the input forms around it: files, recipe
files whose method config sits under ``delta``, and MindFormers ``pet_config`` mappings
(:mod:`deltatune.compat.pet_config`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .compat.pet_config import from_pet_config, is_pet_config
from .errors import DeltaConfigError, DeltaConfigTypeError
from .io_utils import load_json_file, load_yaml_file
from .methods import make_config
from .methods.base import DeltaConfig
from .validation import check_type

__all__ = ["DeltaConfig", "config_from_dict", "load_config", "make_config"]


def config_from_dict(data: Mapping[str, Any]) -> DeltaConfig:
    """Build the right config class from a dict with a ``method`` key (e.g. ``{"method": "lora", "r": 8}``).

    A MindFormers ``pet_config`` (a ``pet_type`` key, a ``pet_config`` mapping or a whole MindFormers model
    YAML) is accepted too and mapped by :mod:`deltatune.compat.pet_config`.
    """
    if not isinstance(data, Mapping):
        raise DeltaConfigTypeError(f"config must be a mapping with a 'method' key, got {type(data).__name__}")
    if is_pet_config(data):  # MindFormers: pet_type / pet_config / model.model_config.pet_config
        return from_pet_config(data)
    return make_config(data)


def load_config(source: str | os.PathLike | Mapping[str, Any]) -> DeltaConfig:
    """Load a method config from a YAML/JSON file path or a dict (its ``method`` key picks the class).

    A recipe file whose method config sits under a ``delta`` (or ``method_config``) key is accepted too,
    and so is a MindFormers ``pet_config`` (or a whole MindFormers model YAML holding one under
    ``model.model_config.pet_config``; see :mod:`deltatune.compat.pet_config`).
    """
    if isinstance(source, Mapping):
        return config_from_dict(source)
    check_type("config path", source, (str, os.PathLike), "a path or a mapping")
    path = Path(source)
    if not path.is_file():
        raise DeltaConfigError(f"config path must be an existing file, got {str(path)!r}")
    if path.suffix in (".yaml", ".yml"):
        data = load_yaml_file(path, "config")
    elif path.suffix == ".json":
        data = load_json_file(path, "config")
    else:
        raise DeltaConfigError(f"config file must end in .yaml, .yml or .json, got {str(path)!r}")
    if isinstance(data, Mapping) and "method" not in data:
        for key in ("delta", "method_config"):
            if isinstance(data.get(key), Mapping):
                data = data[key]
                break
    return config_from_dict(data)
