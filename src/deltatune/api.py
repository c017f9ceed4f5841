"""Model-level operations: apply a method, manage named adapters, merge and unload.

``apply`` changes the model in place and returns it; everything the model needs to know about its
adapters lives on it (``AdapterRecord`` per name), so these functions take the model alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch.nn as nn

from .config import DeltaConfig, config_from_dict
from .delta_layer import (
    ACTIVE_ATTR,
    RECORDS_ATTR,
    DeltaLayer,
    ModulesToSaveWrapper,
    delta_layers,
    get_records,
    unwrap,
)
from .errors import AdapterNotFoundError, DeltaConfigError
from .freeze import freeze_delta
from .inject import replace_module, select_targets
from .methods import get_method, make_config
from .methods.base import AdapterRecord
from .validation import check_type

__all__ = [
    "active_adapters",
    "adapter_names",
    "adapter_record",
    "apply",
    "delete_adapter",
    "disable_adapters",
    "get_config",
    "merge",
    "merge_and_unload",
    "set_active_adapter",
    "targeted_modules",
    "unload",
    "unmerge",
]


def _check_model(model: Any) -> nn.Module:
    return check_type("model", model, nn.Module, "a torch.nn.Module")


def apply(
    model: nn.Module,
    config: DeltaConfig | Mapping[str, Any],
    name: str = "default",
    *,
    freeze_base: bool = True,
    activate: bool = True,
) -> nn.Module:
    """Add a delta method to ``model`` in place and return it.

    Args:
        model: any ``torch.nn.Module`` (a Hugging Face model above all).
        config: a method config (e.g. :class:`~deltatune.LoraConfig`) or a dict with a ``method`` key.
        name: the adapter's name; several named adapters can live on one model.
        freeze_base: freeze every parameter except this adapter's delta parameters (and its
            ``modules_to_save`` and bias choice), as :func:`freeze_delta` would.
        activate: make this adapter the active one.

    Every check (config, target names, module types) runs before the model is changed.
    """
    _check_model(model)
    # a dict is built and validated here once; a config object is re-validated only if changed since built
    config = config_from_dict(config) if isinstance(config, Mapping) else make_config(config)
    check_type("name", name, str, "a non-empty str")
    if not name or "." in name:
        raise DeltaConfigError(f"name must be a non-empty str without '.', got {name!r}")
    records = get_records(model)
    if name in records:
        raise DeltaConfigError(f"adapter name {name!r} is already used on this model; existing: {sorted(records)}")
    if any(layer.merged for _, layer in delta_layers(model)):
        raise DeltaConfigError("cannot add an adapter while others are merged; call unmerge(model) first")
    method = get_method(config.method)
    save_slots = []
    if config.modules_to_save:
        save_slots = select_targets(model, config.modules_to_save, what="modules_to_save")
    if save_slots:
        probe = {s.name for s in method.resolve_targets(model, config)} if config.target_modules is not None else set()
        both = sorted(probe & {s.name for s in save_slots})
        if both:
            raise DeltaConfigError(
                f"modules {both} are both targets of the method and in modules_to_save; a module is either "
                f"adapted or trained in full, not both"
            )
    try:
        targets = method.apply(model, config, name)
        saved = _wrap_modules_to_save(model, save_slots, name)
    except BaseException:
        _rollback(model, method, name)
        raise
    current = active_adapters(model)
    records[name] = AdapterRecord(config.method, config, list(targets), saved)
    # re-assert the model's active set on every layer (new wrappers start with their own adapter active)
    set_active_adapter(model, name if (activate or not current) else current, _freeze=freeze_base)
    return model


def _wrap_modules_to_save(model: nn.Module, slots: list, name: str) -> list[str]:
    """Give each ``modules_to_save`` module a trainable copy for adapter ``name``."""
    saved = []
    for slot in slots:
        path = _real_path(model, slot.name)
        module = model.get_submodule(path) if slot.name else model
        if isinstance(module, ModulesToSaveWrapper):
            module.add_adapter(name)
        else:
            wrapper = ModulesToSaveWrapper(module)
            wrapper.add_adapter(name)
            replace_module(model, path, wrapper)
        saved.append(slot.name)
    return saved


def _rollback(model: nn.Module, method: Any, name: str) -> None:
    """Undo a partly applied adapter ``name`` (wrappers created or extended before an error)."""
    for path, layer in list(delta_layers(model)):
        if name in layer.adapter_names:
            layer.delete_adapter(name)
            if not layer.adapter_names:
                replace_module(model, path, layer.base_layer)
    if method.layer_cls is None:
        try:
            method.remove(model, name)
        except Exception:  # noqa: BLE001 - best effort: the original error is what the caller sees
            pass


def _real_path(model: nn.Module, logical: str) -> str:
    """Map a logical module name to its real path (inserting ``base_layer`` hops through wrappers)."""
    parts = logical.split(".") if logical else []
    module = model
    real: list[str] = []
    for part in parts:
        while isinstance(module, DeltaLayer):
            module = module.base_layer
            real.append("base_layer")
        module = getattr(module, part)
        real.append(part)
    return ".".join(real)


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters on the model, in the order they were added."""
    return list(get_records(_check_model(model)))


def get_config(model: nn.Module, name: str = "default") -> DeltaConfig:
    """The config adapter ``name`` was applied with."""
    return adapter_record(model, name).config


def targeted_modules(model: nn.Module, name: str = "default") -> list[str]:
    """The logical names of the modules adapter ``name`` adapted."""
    return list(adapter_record(model, name).targets)


def adapter_record(model: nn.Module, name: str = "default") -> AdapterRecord:
    """What the model remembers about adapter ``name`` (method, config, targets); raises
    :class:`AdapterNotFoundError` naming the adapters the model has."""
    records = get_records(_check_model(model))
    if name not in records:
        raise AdapterNotFoundError(f"adapter {name!r} not found on the model; adapters: {sorted(records)}")
    return records[name]


def active_adapters(model: nn.Module) -> list[str]:
    """The active adapter names."""
    return list(model.__dict__.get(ACTIVE_ATTR, []))


def set_active_adapter(model: nn.Module, name: str | list[str], *, _freeze: bool = True) -> None:
    """Make ``name`` (or several names) the active adapter(s) on every layer; the base is not reloaded.

    The active adapters' delta parameters become trainable and every other adapter's are frozen.
    """
    names = [name] if isinstance(name, str) else list(name)
    if not names:
        raise DeltaConfigError("name must name at least one adapter, got []")
    for n in names:
        adapter_record(model, n)
    _refuse_if_merged(model, "switch adapters")
    for _, layer in delta_layers(model):
        layer.set_active(names)
    model.__dict__[ACTIVE_ATTR] = names
    if _freeze:
        methods = {get_records(model)[n].method for n in names}
        for i, method in enumerate(sorted(methods)):
            freeze_delta(model, method, adapter_name=[n for n in names if get_records(model)[n].method == method],
                         _reset=(i == 0))


def _refuse_if_merged(model: nn.Module, what: str) -> None:
    merged = sorted({a for _, layer in delta_layers(model) for a in layer.merged_adapters})
    if merged:
        raise DeltaConfigError(f"cannot {what} while adapters {merged} are merged; call unmerge(model) first")


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: inside it the model computes as the base model (merged adapters are
    unmerged for the duration and merged back afterwards)."""
    layers = [layer for _, layer in delta_layers(_check_model(model))]
    merged = {id(layer): list(layer.merged_adapters) for layer in layers}
    for layer in layers:
        layer.unmerge()
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in reversed(layers):  # innermost wrappers first, as merge() does
            layer.disabled = False
            if merged[id(layer)]:
                layer.merge(merged[id(layer)])


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` and every parameter it owns; wrappers left empty are removed."""
    record = adapter_record(model, name)
    _refuse_if_merged(model, f"delete adapter {name!r}")
    get_method(record.method).remove(model, name)
    for path, layer in list(delta_layers(model)):
        if isinstance(layer, ModulesToSaveWrapper) and name in layer.adapter_names:
            layer.delete_adapter(name)
            if not layer.adapter_names:
                replace_module(model, path, layer.base_layer)
    del get_records(model)[name]
    active = [a for a in active_adapters(model) if a != name]
    remaining = list(get_records(model))
    if not active and remaining:
        set_active_adapter(model, remaining[0])
    else:
        model.__dict__[ACTIVE_ATTR] = active


def _mergeable_layers(model: nn.Module) -> list[DeltaLayer]:
    layers = []
    for path, layer in delta_layers(_check_model(model)):
        if isinstance(layer, ModulesToSaveWrapper) or not layer.active_adapters:
            continue
        if not layer.mergeable:
            raise DeltaConfigError(
                f"method {layer.method_name!r} (at {path!r}) cannot be merged into the base weights"
            )
        layers.append(layer)
    return layers


def merge(model: nn.Module, *, safe: bool = False) -> nn.Module:
    """Fold the active adapters into the base weights (zero extra inference latency).

    ``safe=True`` checks for non-finite results before writing.
    """
    for layer in reversed(_mergeable_layers(model)):  # innermost wrappers first
        layer.merge(safe=safe)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge` (exact up to floating-point rounding)."""
    for _, layer in delta_layers(_check_model(model)):
        if layer.merged:
            layer.unmerge()
    return model


def merge_and_unload(model: nn.Module, *, safe: bool = False) -> nn.Module:
    """Merge the active adapters and replace every wrapper by the plain module; returns the model.

    Model-level methods that train the model's own tensors (BitFit) keep their trained values and drop
    their bookkeeping; a method that cannot be merged (prefix tuning) raises before anything changes."""
    merge(model, safe=safe)
    for name, record in list(get_records(model).items()):
        get_method(record.method).keep(model, name)
    for path, layer in reversed(list(delta_layers(model))):
        if isinstance(layer, ModulesToSaveWrapper) and layer.active_adapters:
            replace_module(model, path, layer.modules_to_save[layer.active_adapters[0]])
        else:
            replace_module(model, path, layer.base_layer)
    _clear_state(model)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging: the base model comes back bit for bit (a merged model
    is unmerged first, which is exact only up to rounding)."""
    unmerge(model)
    for name, record in list(get_records(model).items()):
        method = get_method(record.method)
        if method.layer_cls is None:  # model-level methods (BitFit biases, prefix hooks) undo themselves
            method.remove(model, name)
    for path, layer in reversed(list(delta_layers(model))):
        replace_module(model, path, unwrap(layer) if not isinstance(layer, ModulesToSaveWrapper) else layer.base_layer)
    _clear_state(model)
    return model


def _clear_state(model: nn.Module) -> None:
    model.__dict__.pop(ACTIVE_ATTR, None)
    model.__dict__.pop(RECORDS_ATTR, None)

