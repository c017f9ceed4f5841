"""Base configuration for every delta method: validation, dict/YAML/JSON round trips, and loading.

Every method's config is a dataclass subclass of :class:`DeltaConfig` with a ``method`` class
attribute naming it in the registry (:mod:`deltatune.methods`). ``load_config`` reads a YAML or
JSON file (or a dict) whose ``method`` key picks the class.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from .errors import DeltaConfigError, DeltaConfigTypeError
from .io_utils import load_json_file, load_yaml_file
from .validation import check_optional_int_list, check_str_list, check_type

__all__ = ["DeltaConfig", "load_config", "config_from_dict"]


@dataclasses.dataclass
class DeltaConfig:
    """Fields shared by all methods that attach to modules.

    Attributes:
        target_modules: which modules to adapt. A list of entries, each an exact module name or
            name suffix (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``), a shell-style
            wildcard (``"*.attn.c_attn"``), or a regex written ``"re:<pattern>"`` (matched in full
            against the module name). A single string is a regex matched in full, as PEFT does,
            unless it is ``"all-linear"`` (every linear layer except the output head) or contains
            no regex syntax (then it is an exact name or suffix). ``None`` uses the method's
            default for known architectures.
        exclude_modules: modules never adapted, same syntax as ``target_modules``.
        layers_to_transform: only adapt modules inside these layer indices.
        layers_pattern: the name of the layer list (``"layers"``, ``"h"``, ``"layer"``...);
            ``None`` tries the common ones.
        modules_to_save: modules (same syntax) trained in full and saved with the delta, e.g. a
            classification head.
    """

    method: ClassVar[str] = ""

    target_modules: str | list[str] | None = None
    exclude_modules: str | list[str] | None = None
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    modules_to_save: str | list[str] | None = None

    def __post_init__(self) -> None:
        self.validate()

    # -- validation -----------------------------------------------------------------------
    def validate(self) -> None:
        """Check every field; raise ``DeltaConfigError`` naming the field, the value and what is expected."""
        from .inject import check_patterns

        name = type(self).__name__
        for field_name in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, field_name)
            if value is not None:
                check_str_list(f"{name}.{field_name}", value)
                check_patterns(f"{name}.{field_name}", value)
        if self.layers_pattern is not None:
            check_str_list(f"{name}.layers_pattern", self.layers_pattern)
        self.layers_to_transform = check_optional_int_list(
            f"{name}.layers_to_transform", self.layers_to_transform, minimum=0
        )
        if self.layers_to_transform is not None and not self.layers_to_transform:
            raise DeltaConfigError(f"{name}.layers_to_transform must be a non-empty list of int, got []")

    # -- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict including the ``method`` key."""
        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            out[f.name] = _jsonable(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeltaConfig:
        """Build from a dict; unknown keys raise ``DeltaConfigError`` listing the known ones."""
        check_type(f"{cls.__name__} config", data, Mapping, "a mapping")
        data = dict(data)
        method = data.pop("method", cls.method)
        if method != cls.method:
            raise DeltaConfigError(f"method must be {cls.method!r} for {cls.__name__}, got {method!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DeltaConfigError(
                f"unknown {cls.__name__} field(s) {unknown}; expected some of {sorted(known)}"
            )
        return cls(**data)

    def save(self, path: str | os.PathLike) -> None:
        """Write the config as JSON (``.json``) or YAML (``.yaml``/``.yml``)."""
        path = Path(path)
        text = _dump(self.to_dict(), path)
        from .io_utils import atomic_write_text

        atomic_write_text(path, text)

    def replace(self, **changes: Any) -> DeltaConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _dump(data: dict[str, Any], path: Path) -> str:
    if path.suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_dump(data, sort_keys=False)
    return json.dumps(data, indent=2, sort_keys=False) + "\n"


def config_from_dict(data: Mapping[str, Any]) -> DeltaConfig:
    """Build the right config class from a dict with a ``method`` key (e.g. ``{"method": "lora", "r": 8}``).

    A MindFormers ``pet_config`` (a ``pet_type`` key, a ``pet_config`` mapping or a whole MindFormers model
    YAML) is accepted too and mapped by :mod:`deltatune.compat.pet_config`.
    """
    from .methods import get_method, method_names

    if not isinstance(data, Mapping):
        raise DeltaConfigTypeError(f"config must be a mapping with a 'method' key, got {type(data).__name__}")
    if "method" not in data:
        from .compat.pet_config import from_pet_config, is_pet_config

        if is_pet_config(data):  # MindFormers: pet_type / pet_config / model.model_config.pet_config
            return from_pet_config(data)
        raise DeltaConfigError(f"config needs a 'method' key, one of {method_names()}; got keys {sorted(data)}")
    return get_method(data["method"]).config_cls.from_dict(data)


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
