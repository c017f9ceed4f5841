"""Delta-only checkpoints: save and load just the trainable delta tensors (safetensors, atomic).

A delta directory holds ``delta.safetensors`` (the tensors) and ``delta_config.json`` (method
config, adapter name, tensor shapes and dtypes, and the SHA-256 of the tensor file). Both are
written through a temporary file and ``os.replace``; the JSON is written last and carries the hash,
so a crash between the two is detected on load instead of loading mismatched tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ._version import __version__
from .api import _record, apply
from .config import config_from_dict
from .errors import AdapterNotFoundError, CheckpointError, DeltaConfigError
from .io_utils import atomic_write_bytes, atomic_write_text
from .methods import get_method
from .methods.base import get_records, logical_param_name, param_adapter_name
from .validation import check_type

__all__ = ["DELTA_CONFIG_NAME", "DELTA_WEIGHTS_NAME", "delta_state_dict", "load_delta", "save_delta"]

DELTA_WEIGHTS_NAME = "delta.safetensors"
DELTA_CONFIG_NAME = "delta_config.json"
FORMAT = "deltatune.delta"
FORMAT_VERSION = 1


def _default_adapter(model: nn.Module, adapter_name: str | None) -> str:
    records = get_records(model)
    if adapter_name is not None:
        _record(model, adapter_name)
        return adapter_name
    if "default" in records:
        return "default"
    if len(records) == 1:
        return next(iter(records))
    raise AdapterNotFoundError(
        f"adapter_name must be given when the model has several adapters or none; adapters: {sorted(records)}"
    )


def _key_for(name: str, adapter: str, prefixes: tuple[str, ...]) -> str:
    """The file key of a parameter: its logical name without the adapter component."""
    parts = logical_param_name(name).split(".")
    out: list[str] = []
    skip_next = False
    for i, part in enumerate(parts):
        if skip_next:
            skip_next = False
            continue
        out.append(part)
        is_container = (prefixes and part.startswith(prefixes)) or part == "modules_to_save"
        if is_container and i + 1 < len(parts) and parts[i + 1] == adapter:
            skip_next = True
    return ".".join(out)


def delta_parameter_names(model: nn.Module, adapter_name: str) -> dict[str, str]:
    """``{file key: real parameter/buffer name}`` of everything adapter ``adapter_name`` owns."""
    record = _record(model, adapter_name)
    method = get_method(record.method)
    prefixes = method.delta_prefixes
    extra = set(method.extra_trainable(model, record.config, adapter_name))
    out: dict[str, str] = {}
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, _ in tensors:
        own = prefixes and method.is_delta_param(name) and param_adapter_name(name, prefixes) == adapter_name
        saved_module = f".modules_to_save.{adapter_name}." in f".{name}"
        if own or saved_module or name in extra:
            out[_key_for(name, adapter_name, prefixes)] = name
    return out


def delta_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The adapter's delta tensors keyed as in the checkpoint file (adapter name removed)."""
    adapter_name = _default_adapter(model, adapter_name)
    lookup = dict(model.named_parameters(remove_duplicate=False))
    lookup.update(dict(model.named_buffers(remove_duplicate=False)))
    return {k: lookup[n].detach() for k, n in delta_parameter_names(model, adapter_name).items()}


def save_delta(model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Write adapter ``adapter_name``'s delta tensors and config into ``directory`` atomically.

    Returns the directory path. Raises when the adapter owns no tensor (an empty checkpoint is
    never written).
    """
    from safetensors.torch import save

    check_type("model", model, nn.Module, "a torch.nn.Module")
    check_type("directory", directory, (str, os.PathLike), "a path")
    adapter_name = _default_adapter(model, adapter_name)
    record = _record(model, adapter_name)
    state = delta_state_dict(model, adapter_name)
    if not state:
        raise CheckpointError(f"adapter {adapter_name!r} owns no tensors; refusing to write an empty checkpoint")
    for key, t in state.items():
        if t.numel() == 0:
            raise CheckpointError(f"tensor {key!r} of adapter {adapter_name!r} is empty (shape {tuple(t.shape)})")
    tensors = {k: v.contiguous().cpu() for k, v in state.items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights_path = directory / DELTA_WEIGHTS_NAME
    data = save(tensors)
    atomic_write_bytes(weights_path, data)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "deltatune_version": __version__,
        "adapter_name": adapter_name,
        "config": record.config.to_dict(),
        "targets": record.targets,
        "modules_to_save": record.modules_to_save,
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in tensors.items()},
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    atomic_write_text(directory / DELTA_CONFIG_NAME, json.dumps(meta, indent=2) + "\n")
    return directory


def read_delta_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and check a delta directory's ``delta_config.json`` (not the tensors)."""
    check_type("directory", directory, (str, os.PathLike), "a path")
    directory = Path(directory)
    if not directory.is_dir():
        raise DeltaConfigError(f"directory must be an existing delta checkpoint directory, got {str(directory)!r}")
    cfg_path, w_path = directory / DELTA_CONFIG_NAME, directory / DELTA_WEIGHTS_NAME
    missing = [p.name for p in (cfg_path, w_path) if not p.is_file()]
    if missing:
        raise CheckpointError(f"{str(directory)!r} is not a complete delta checkpoint: missing {missing}")
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{str(cfg_path)!r} is not valid JSON: {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{str(cfg_path)!r} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def load_delta(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str | None = None,
    *,
    activate: bool = True,
    freeze_base: bool = True,
) -> nn.Module:
    """Load a delta checkpoint into ``model`` (in place; returns it).

    If the model has no adapter of that name, the saved config is applied first (so a fresh base
    model works). The file's hash, the config and every tensor's name and shape are checked, and
    the error says exactly what does not match.
    """
    from safetensors.torch import load as load_bytes

    check_type("model", model, nn.Module, "a torch.nn.Module")
    meta = read_delta_meta(directory)
    directory = Path(directory)
    w_path = directory / DELTA_WEIGHTS_NAME
    data = w_path.read_bytes()  # hashed and parsed from the same bytes
    digest = hashlib.sha256(data).hexdigest()
    if digest != meta.get("sha256"):
        raise CheckpointError(
            f"{str(w_path)!r} has SHA-256 {digest[:16]}..., but {DELTA_CONFIG_NAME} records "
            f"{str(meta.get('sha256'))[:16]}...: the file is corrupt or was only partly written"
        )
    saved_config = config_from_dict(meta["config"])
    name = adapter_name or meta.get("adapter_name") or "default"
    records = get_records(model)
    if name in records:
        have = records[name].config.to_dict()
        want = saved_config.to_dict()
        diff = {k: (have.get(k), want.get(k)) for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)}
        if diff:
            raise CheckpointError(
                f"adapter {name!r} on the model has a different config than the checkpoint "
                f"(field: model value, checkpoint value): {diff}"
            )
        load_delta_state_dict(model, load_bytes(data), name)
        return model
    apply(model, saved_config, name, freeze_base=freeze_base, activate=activate)
    try:
        load_delta_state_dict(model, load_bytes(data), name)
    except BaseException:
        from .api import delete_adapter

        delete_adapter(model, name)  # leave no randomly initialised adapter behind
        raise
    return model


def load_delta_state_dict(model: nn.Module, tensors: Mapping[str, torch.Tensor], adapter_name: str) -> None:
    """Copy ``tensors`` (checkpoint keys) into adapter ``adapter_name``; all mismatches are listed."""
    names = delta_parameter_names(model, adapter_name)
    lookup = dict(model.named_parameters(remove_duplicate=False))
    lookup.update(dict(model.named_buffers(remove_duplicate=False)))
    missing = sorted(set(names) - set(tensors))
    unexpected = sorted(set(tensors) - set(names))
    shapes = [
        f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(lookup[names[k]].shape)}"
        for k in sorted(set(names) & set(tensors))
        if tuple(tensors[k].shape) != tuple(lookup[names[k]].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing in checkpoint: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if unexpected:
        problems.append(f"not in the model: {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    if shapes:
        problems.append(f"shape mismatches: {shapes[:10]}")
    if problems:
        raise CheckpointError(f"checkpoint does not fit adapter {adapter_name!r}: " + "; ".join(problems))
    with torch.no_grad():
        for key, real in names.items():
            target = lookup[real]
            target.copy_(tensors[key].to(device=target.device, dtype=target.dtype))
