"""What every delta method provides: its config base class, the method interface, adapter records.

* :class:`DeltaConfig` is the base of every method's config (a dataclass validated when built, with
  dict/JSON/YAML round trips); the registry (:func:`deltatune.methods.make_config`) builds them.
* :class:`DeltaMethod` turns a config into wrapped modules (``apply``) and says which parameter
  names are its delta parameters.
* :class:`AdapterRecord` is what the model remembers about each named adapter.

The module wrappers themselves (:class:`DeltaLayer` and friends) live in :mod:`deltatune.delta_layer`
and are re-exported here. A method that needs no wrapper per module (prefix-tuning hooks the whole
model) overrides :meth:`DeltaMethod.apply` and :meth:`DeltaMethod.remove`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch.nn as nn
import yaml

from ..delta_layer import (
    DeltaLayer,
    ModulesToSaveWrapper,
    delta_layers,
    get_records,
    logical_param_name,
    unwrap,
)
from ..errors import DeltaConfigError, UnsupportedModuleError
from ..inject import ModuleSlot, check_patterns, replace_module, select_targets
from ..io_utils import atomic_write_text
from ..validation import check_optional_int_list, check_str_list, check_type

__all__ = [
    "AdapterRecord",
    "DeltaConfig",
    "DeltaLayer",
    "DeltaMethod",
    "ModulesToSaveWrapper",
    "delta_layers",
    "get_records",
    "logical_param_name",
    "param_adapter_name",
    "unwrap",
]

#: where a config keeps the field values it was last validated with (not a dataclass field)
_VALIDATED_ATTR = "_deltatune_validated"


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
        self._validate_and_mark()

    def ensure_valid(self) -> None:
        """Validate unless no field changed since the last validation.

        A config is validated when it is built; :func:`deltatune.methods.make_config` and
        :func:`deltatune.apply` call this, so a config is checked once on its way to the model and again
        only when a field was changed (or a list/dict field edited in place) after it was built."""
        if self.__dict__.get(_VALIDATED_ATTR) != self.to_dict():
            self._validate_and_mark()

    def _validate_and_mark(self) -> None:
        self.validate()
        self.__dict__[_VALIDATED_ATTR] = self.to_dict()

    # -- validation -----------------------------------------------------------------------
    def validate(self) -> None:
        """Check every field; raise ``DeltaConfigError`` naming the field, the value and what is expected.

        Subclasses extend it (calling ``super().validate()`` first)."""
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
        atomic_write_text(path, _dump(self.to_dict(), path))

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
        return yaml.safe_dump(data, sort_keys=False)
    return json.dumps(data, indent=2, sort_keys=False) + "\n"


@dataclass
class AdapterRecord:
    """What the model remembers about one named adapter."""

    method: str
    config: DeltaConfig
    targets: list[str] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)


class DeltaMethod:
    """A delta method: its config class, how it wraps modules, and what its delta parameters are.

    Subclasses set ``name``, ``config_cls``, ``layer_cls`` and ``delta_prefixes`` and implement
    :meth:`wrap`/:meth:`check_module` (or override :meth:`apply` entirely).
    """

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[DeltaConfig]] = DeltaConfig
    layer_cls: ClassVar[type[DeltaLayer] | None] = None
    delta_prefixes: ClassVar[tuple[str, ...]] = ()
    mergeable: ClassVar[bool] = False

    # -- targets --------------------------------------------------------------------------
    def default_target_modules(self, model: nn.Module) -> list[str] | None:
        """Targets used when the config gives none (None: the config must give them)."""
        return None

    def resolve_targets(self, model: nn.Module, config: DeltaConfig) -> list[ModuleSlot]:
        """The module slots the config selects, raising when it selects nothing."""
        targets = config.target_modules
        if targets is None:
            targets = self.default_target_modules(model)
            if targets is None:
                raise DeltaConfigError(
                    f"{type(config).__name__}.target_modules must be given for {type(model).__name__} "
                    f"(no default is known for this architecture), got None"
                )
        return select_targets(
            model,
            targets,
            exclude_modules=config.exclude_modules,
            layers_to_transform=config.layers_to_transform,
            layers_pattern=config.layers_pattern,
        )

    def check_module(self, slot: ModuleSlot, config: DeltaConfig) -> None:
        """Raise :class:`UnsupportedModuleError` when the method cannot wrap this module."""
        raise UnsupportedModuleError(
            f"method {self.name!r} cannot wrap module {slot.name!r} of type {type(unwrap(slot.module)).__name__}"
        )

    def wrap(self, module: nn.Module, config: DeltaConfig, adapter_name: str, module_name: str) -> DeltaLayer:
        """A new wrapper around ``module`` holding adapter ``adapter_name``."""
        assert self.layer_cls is not None
        layer = self.layer_cls(module)
        layer.add_adapter(adapter_name, config, module_name=module_name)
        return layer

    # -- apply / remove -------------------------------------------------------------------
    def apply(self, model: nn.Module, config: DeltaConfig, adapter_name: str) -> list[str]:
        """Wrap every selected module; all checks run before the model is touched. Returns the targets."""
        slots = self.resolve_targets(model, config)
        for slot in slots:
            if not (self.layer_cls is not None and isinstance(slot.module, self.layer_cls)):
                self.check_module(slot, config)
            else:
                self.check_module(ModuleSlot(slot.name, unwrap(slot.module), slot.parent, slot.attr), config)
        for slot in slots:
            if self.layer_cls is not None and isinstance(slot.module, self.layer_cls):
                slot.module.add_adapter(adapter_name, config, module_name=slot.name)
            else:
                setattr(slot.parent, slot.attr, self.wrap(slot.module, config, adapter_name, slot.name))
        return [s.name for s in slots]

    def remove(self, model: nn.Module, adapter_name: str) -> None:
        """Delete adapter ``adapter_name`` of this method from every wrapper; drop empty wrappers."""
        for name, layer in list(delta_layers(model)):
            if self.layer_cls is not None and type(layer) is self.layer_cls and adapter_name in layer.adapter_names:
                layer.delete_adapter(adapter_name)
                if not layer.adapter_names:
                    replace_module(model, name, layer.base_layer)

    def keep(self, model: nn.Module, adapter_name: str) -> None:
        """Make adapter ``adapter_name``'s trained values a permanent part of ``model`` and drop this
        method's bookkeeping for it (:func:`~deltatune.api.merge_and_unload`). Wrapper methods have
        nothing to do here (merging and unwrapping is done by the API); model-level methods that train
        the model's own tensors (BitFit) forget what :meth:`remove` would restore."""

    # -- parameters -----------------------------------------------------------------------
    def is_delta_param(self, name: str) -> bool:
        """Is ``name`` (a parameter name) one of this method's delta parameters?"""
        return any(part.startswith(self.delta_prefixes) for part in name.split(".")) if self.delta_prefixes else False

    def extra_trainable(self, model: nn.Module, config: DeltaConfig, adapter_name: str) -> list[str]:
        """Names of non-delta parameters this adapter also trains (e.g. biases for LoRA ``bias='all'``)."""
        return []


def param_adapter_name(name: str, prefixes: tuple[str, ...]) -> str | None:
    """The adapter name in a delta parameter name (the part right after the delta attribute)."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.startswith(prefixes):
            return parts[i + 1]
    return None
