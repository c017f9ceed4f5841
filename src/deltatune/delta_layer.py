"""The module wrapper every delta method builds on, and what a model carries about its adapters.

* :class:`DeltaLayer` wraps one module (``base_layer``) and holds any number of named adapters of
  one method; it knows which are active, whether they are disabled or merged.
* :class:`ModulesToSaveWrapper` keeps a fully trainable copy of a module per adapter (``modules_to_save``).
* :func:`get_records` / ``ACTIVE_ATTR``: where the model keeps its adapter records and active names.
* :func:`unwrap`, :func:`delta_layers`, :func:`logical_param_name`: walking through wrappers.

This module imports only :mod:`deltatune.errors` and torch, so that target selection
(:mod:`deltatune.inject`), configs and methods can all stand on it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any, ClassVar

import torch.nn as nn

from .errors import AdapterNotFoundError, DeltaConfigError

__all__ = [
    "ACTIVE_ATTR",
    "RECORDS_ATTR",
    "DeltaLayer",
    "ModulesToSaveWrapper",
    "delta_layers",
    "get_records",
    "logical_param_name",
    "unwrap",
]

RECORDS_ATTR = "_deltatune_adapters"
ACTIVE_ATTR = "_deltatune_active"


def get_records(model: nn.Module) -> dict[str, Any]:
    """The model's adapters by name, each a :class:`~deltatune.methods.base.AdapterRecord` (empty dict when
    none was applied)."""
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
    def add_adapter(self, name: str, config: Any, **kwargs: Any) -> None:  # pragma: no cover - abstract
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

    def add_adapter(self, name: str, config: Any | None = None, **kwargs: Any) -> None:
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
