"""What every delta method provides, and the machinery they share.

* :class:`DeltaLayer` wraps one module (``base_layer``) and holds any number of named adapters of
  one method; it knows which are active, whether they are disabled or merged.
* :class:`DeltaMethod` turns a config into wrapped modules (``apply``) and says which parameter
  names are its delta parameters.
* :class:`AdapterRecord` is what the model remembers about each named adapter.

A method that needs no wrapper per module (prefix-tuning hooks the whole model) overrides
:meth:`DeltaMethod.apply` and :meth:`DeltaMethod.remove`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch.nn as nn

from ..config import DeltaConfig
from ..errors import AdapterNotFoundError, DeltaConfigError, UnsupportedModuleError
from ..inject import ModuleSlot, select_targets

__all__ = [
    "AdapterRecord",
    "DeltaLayer",
    "DeltaMethod",
    "ModulesToSaveWrapper",
    "delta_layers",
    "get_records",
    "logical_param_name",
    "unwrap",
]

RECORDS_ATTR = "_deltatune_adapters"
ACTIVE_ATTR = "_deltatune_active"


@dataclass
class AdapterRecord:
    """What the model remembers about one named adapter."""

    method: str
    config: DeltaConfig
    targets: list[str] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)


def get_records(model: nn.Module) -> dict[str, AdapterRecord]:
    """The model's adapters by name (empty dict when none was applied)."""
    return model.__dict__.setdefault(RECORDS_ATTR, {})


def unwrap(module: nn.Module) -> nn.Module:
    """The original module inside any number of delta wrappers."""
    while isinstance(module, DeltaLayer):
        module = module.base_layer
    return module


def logical_param_name(name: str) -> str:
    """A parameter name with the ``base_layer`` hops of delta wrappers removed."""
    return ".".join(p for p in name.split(".") if p != "base_layer")


class DeltaLayer(nn.Module):
    """A module wrapper that holds named adapters of one method around ``base_layer``.

    Subclasses set ``method_name`` and ``delta_attrs`` (names of their ``ModuleDict`` /
    ``ParameterDict`` attributes keyed by adapter name) and implement :meth:`add_adapter` and
    :meth:`delta_forward`; mergeable ones implement :meth:`get_delta_weight`-style merging through
    :meth:`_merge_one` / :meth:`_unmerge_one`.
    """

    method_name: ClassVar[str] = ""
    delta_attrs: ClassVar[tuple[str, ...]] = ()
    mergeable: ClassVar[bool] = False

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter_names: list[str] = []
        self.active_adapters: list[str] = []
        self.disabled: bool = False
        self.merged_adapters: list[str] = []

    # -- adapters -------------------------------------------------------------------------
    def add_adapter(self, name: str, config: DeltaConfig, **kwargs: Any) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _register_adapter(self, name: str) -> None:
        if name in self.adapter_names:
            raise DeltaConfigError(f"adapter name {name!r} already exists on this {type(self).__name__}")
        self.adapter_names.append(name)
        self.active_adapters = [name] if not self.active_adapters else self.active_adapters

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (it must not be merged)."""
        if name not in self.adapter_names:
            raise AdapterNotFoundError(f"adapter {name!r} not found; this layer has {self.adapter_names}")
        if name in self.merged_adapters:
            raise DeltaConfigError(f"adapter {name!r} is merged; unmerge before deleting it")
        for attr in self.delta_attrs:
            container = getattr(self, attr)
            if name in container:
                del container[name]
        self._delete_extra(name)
        self.adapter_names.remove(name)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def _delete_extra(self, name: str) -> None:
        """Hook for per-adapter non-parameter state."""

    def set_active(self, names: list[str]) -> None:
        """Make ``names`` (those this layer has) the active adapters."""
        if self.merged_adapters:
            raise DeltaConfigError(
                f"cannot switch adapters while {self.merged_adapters} are merged; call unmerge() first"
            )
        self.active_adapters = [n for n in names if n in self.adapter_names]

    @property
    def merged(self) -> bool:
        """True when some adapter's delta is folded into the base weights."""
        return bool(self.merged_adapters)

    # -- merging --------------------------------------------------------------------------
    def merge(self, names: list[str] | None = None, *, safe: bool = False) -> None:
        """Fold the deltas of ``names`` (default: the active adapters) into the base weights."""
        if not self.mergeable:
            raise DeltaConfigError(f"method {self.method_name!r} cannot be merged into the base weights")
        for name in names if names is not None else self.active_adapters:
            if name in self.merged_adapters:
                continue
            self._merge_one(name, safe=safe)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Undo :meth:`merge` (in reverse order)."""
        while self.merged_adapters:
            self._unmerge_one(self.merged_adapters.pop())

    def _merge_one(self, name: str, *, safe: bool) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _unmerge_one(self, name: str) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- forward --------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Base output, plus the active adapters' deltas unless disabled or merged."""
        if self.disabled:
            return self.base_layer(*args, **kwargs)
        active = [a for a in self.active_adapters if a not in self.merged_adapters]
        if not active:
            return self.base_layer(*args, **kwargs)
        return self.delta_forward(active, *args, **kwargs)

    def delta_forward(self, active: list[str], *args: Any, **kwargs: Any) -> Any:  # pragma: no cover
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={self.active_adapters}, merged={self.merged_adapters}"

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)


class ModulesToSaveWrapper(DeltaLayer):
    """Keeps the original module and one fully trainable copy per adapter (e.g. a classifier head)."""

    method_name = "modules_to_save"
    delta_attrs = ("modules_to_save",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.modules_to_save = nn.ModuleDict()

    def add_adapter(self, name: str, config: DeltaConfig | None = None, **kwargs: Any) -> None:
        """Add a trainable copy of the original module for adapter ``name``."""
        self._register_adapter(name)
        clone = copy.deepcopy(self.base_layer)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = clone

    def delta_forward(self, active: list[str], *args: Any, **kwargs: Any) -> Any:
        return self.modules_to_save[active[0]](*args, **kwargs)


def delta_layers(model: nn.Module) -> Iterator[tuple[str, DeltaLayer]]:
    """Every delta wrapper in the model with its real module path."""
    for name, module in model.named_modules():
        if isinstance(module, DeltaLayer):
            yield name, module


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
                    _replace_module(model, name, layer.base_layer)

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


def _replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, new)
