"""Delta-only checkpoints: save and load just the trainable delta tensors (safetensors, atomic).

A delta directory holds ``delta.safetensors`` (the tensors) and ``delta_config.json`` (method
config, adapter name, tensor shapes and dtypes, the SHA-256 of the tensor file, and the SHA-256 of
the config itself). Both are written through a temporary file and ``os.replace``; the JSON is
written last and carries the hashes, so a crash between the two, or an edit of either file, is
detected on load instead of loading mismatched tensors. While an existing delta is overwritten its
tensors are kept as ``.delta.safetensors.prev``, so an interrupted overwrite still loads the old delta.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load as load_bytes
from safetensors.torch import save

from ._version import __version__
from .api import adapter_record, apply, delete_adapter
from .config import config_from_dict
from .delta_layer import get_records, logical_param_name
from .errors import AdapterNotFoundError, CheckpointError, DeltaConfigError, DeltaError, FileFormatError
from .io_utils import (
    atomic_write_bytes,
    atomic_write_text,
    check_output_dir,
    fsync_dir,
    json_loads_strict,
    read_text_file,
)
from .methods import get_method
from .methods.base import param_adapter_name
from .validation import check_type

__all__ = ["DELTA_CONFIG_NAME", "DELTA_WEIGHTS_NAME", "delta_state_dict", "load_delta", "save_delta"]

DELTA_WEIGHTS_NAME = "delta.safetensors"
DELTA_CONFIG_NAME = "delta_config.json"
FORMAT = "deltatune.delta"
FORMAT_VERSION = 2
_PREV_WEIGHTS_NAME = ".delta.safetensors.prev"
#: temporary files of a save (atomic_write's ``.<name>.<random>.tmp`` and the kept-weights link)
_TEMP_RE = re.compile(r"^\.(delta\.safetensors|delta_config\.json|delta\.safetensors\.prev)\.[A-Za-z0-9_]+\.tmp$")


def _default_adapter(model: nn.Module, adapter_name: str | None) -> str:
    records = get_records(model)
    if adapter_name is not None:
        adapter_record(model, adapter_name)
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
    record = adapter_record(model, adapter_name)
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


def _meta_digest(meta: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``meta`` without its ``meta_sha256`` field (config, metadata and,
    through ``sha256``, the tensor file)."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def _clean_temporaries(directory: Path) -> list[Path]:
    """Delete what a killed save left in ``directory``: only temporary files whose names deltatune creates."""
    gone = []
    if directory.is_dir():
        for f in directory.iterdir():
            if _TEMP_RE.match(f.name) and f.is_file():
                f.unlink(missing_ok=True)
                gone.append(f)
    return gone


def _sha256_file(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _keep_previous_weights(directory: Path) -> None:
    """Before overwriting: keep the weights the current ``delta_config.json`` describes as
    ``.delta.safetensors.prev`` (a hard link where possible), so that a crash between replacing the
    tensor file and replacing the config leaves the previous delta loadable."""
    cfg_path, w_path, prev = directory / DELTA_CONFIG_NAME, directory / DELTA_WEIGHTS_NAME, directory / _PREV_WEIGHTS_NAME
    try:
        old_hash = json.loads(cfg_path.read_text(encoding="utf-8")).get("sha256")
    except (OSError, ValueError, AttributeError):
        old_hash = None  # no readable previous delta: nothing to keep
    if old_hash is not None and _sha256_file(w_path) == old_hash:
        # the tensor file matches: any older kept copy is not needed (and rename() onto a hard link of
        # the same file would do nothing, leaving the temporary link behind)
        prev.unlink(missing_ok=True)
        tmp = directory / f"{_PREV_WEIGHTS_NAME}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            os.link(w_path, tmp)
        except OSError:  # no hard links here: copy
            atomic_write_bytes(prev, w_path.read_bytes())
        else:
            try:
                os.replace(tmp, prev)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            fsync_dir(directory)
    elif old_hash is not None and _sha256_file(prev) == old_hash:
        return  # an interrupted save already kept the good weights there
    else:
        prev.unlink(missing_ok=True)


def save_delta(model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Write adapter ``adapter_name``'s delta tensors and config into ``directory`` atomically.

    The config (``delta_config.json``, written last) records the SHA-256 of the tensor file and of
    itself (``meta_sha256``), so an edited config or tensor file is detected on load. Overwriting an
    existing delta keeps its tensors as ``.delta.safetensors.prev`` until the new config is in place:
    a save killed at any point leaves either the previous delta or the new one loadable. Temporary
    files of an earlier killed save are deleted first (only files whose names deltatune creates).

    Returns the directory path. Raises when the adapter owns no tensor (an empty checkpoint is
    never written), or when ``directory`` (or a member) is a file where a directory is needed or vice versa.
    """
    check_type("model", model, nn.Module, "a torch.nn.Module")
    check_type("directory", directory, (str, os.PathLike), "a path")
    directory = Path(directory)
    check_output_dir(directory, (DELTA_WEIGHTS_NAME, DELTA_CONFIG_NAME, _PREV_WEIGHTS_NAME))
    adapter_name = _default_adapter(model, adapter_name)
    record = adapter_record(model, adapter_name)
    state = delta_state_dict(model, adapter_name)
    if not state:
        raise CheckpointError(f"adapter {adapter_name!r} owns no tensors; refusing to write an empty checkpoint")
    for key, t in state.items():
        if t.numel() == 0:
            raise CheckpointError(f"tensor {key!r} of adapter {adapter_name!r} is empty (shape {tuple(t.shape)})")
    tensors = {k: v.contiguous().cpu() for k, v in state.items()}
    return write_delta_files(
        directory,
        save(tensors),
        adapter_name=adapter_name,
        config=record.config.to_dict(),
        targets=record.targets,
        modules_to_save=record.modules_to_save,
        tensors={k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in tensors.items()},
    )


def write_delta_files(
    directory: str | os.PathLike,
    data: bytes,
    *,
    adapter_name: str,
    config: Mapping[str, Any],
    targets: list[str],
    modules_to_save: list[str],
    tensors: Mapping[str, tuple[list[int], str]],
) -> Path:
    """Write a delta directory from serialized safetensors bytes (any framework's: :func:`save_delta`
    and ``deltatune.jittor`` both write through here, so the format has one writer).

    ``tensors`` maps each tensor name to its ``(shape, dtype name)``. The config (``delta_config.json``,
    written last) records the SHA-256 of ``data`` and of itself; an existing delta's tensors are kept
    as ``.delta.safetensors.prev`` until the new config is in place (see :func:`save_delta`).
    """
    directory = Path(directory)
    check_output_dir(directory, (DELTA_WEIGHTS_NAME, DELTA_CONFIG_NAME, _PREV_WEIGHTS_NAME))
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "deltatune_version": __version__,
        "adapter_name": adapter_name,
        "config": dict(config),
        "targets": list(targets),
        "modules_to_save": list(modules_to_save),
        "tensors": {k: {"shape": list(shape), "dtype": dtype} for k, (shape, dtype) in tensors.items()},
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    meta["meta_sha256"] = _meta_digest(meta)
    directory.mkdir(parents=True, exist_ok=True)
    _clean_temporaries(directory)
    _keep_previous_weights(directory)
    atomic_write_bytes(directory / DELTA_WEIGHTS_NAME, data)
    atomic_write_text(directory / DELTA_CONFIG_NAME, json.dumps(meta, indent=2) + "\n")
    (directory / _PREV_WEIGHTS_NAME).unlink(missing_ok=True)
    return directory


def _check_meta(meta: Any, cfg_path: Path) -> dict[str, Any]:
    """The shape of a ``delta_config.json``: every field the loader reads, with its type, and its own hash."""
    where = repr(str(cfg_path))
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where} must hold a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{where} has format {meta.get('format')!r}, expected {FORMAT!r}")
    version = meta.get("format_version")
    if version not in (1, FORMAT_VERSION):
        raise CheckpointError(f"{where} has format_version {version!r}; this deltatune reads 1 and {FORMAT_VERSION}")
    fields = {"config": dict, "sha256": str, "tensors": dict}
    for key, typ in fields.items():
        if key not in meta:
            raise CheckpointError(f"{where} has no {key!r} field")
        if not isinstance(meta[key], typ):
            raise CheckpointError(f"{where}: field {key!r} must be a JSON {'object' if typ is dict else 'string'}, "
                                  f"got {type(meta[key]).__name__}")
    if meta.get("adapter_name") is not None and not isinstance(meta["adapter_name"], str):
        raise CheckpointError(f"{where}: field 'adapter_name' must be a string, got {meta['adapter_name']!r}")
    for key, rec in meta["tensors"].items():
        ok = (isinstance(rec, dict) and isinstance(rec.get("shape"), list)
              and all(isinstance(d, int) and not isinstance(d, bool) for d in rec["shape"])
              and isinstance(rec.get("dtype"), str))
        if not ok:
            raise CheckpointError(f"{where}: tensors[{key!r}] must be {{'shape': [int, ...], 'dtype': str}}, got {rec!r}")
    if version >= 2:
        recorded = meta.get("meta_sha256")
        if recorded != _meta_digest(meta):
            raise CheckpointError(
                f"{where} was changed after it was written: its meta_sha256 {str(recorded)[:16]}... does not match "
                f"its content (config, metadata or recorded tensor hash edited, or the file is corrupt)"
            )
    return meta


def read_delta_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and check a delta directory's ``delta_config.json`` (not the tensors).

    Format 2 (written by this version) carries ``meta_sha256``, the hash of its own content, which is
    checked; format 1 (older deltas) is read without it."""
    check_type("directory", directory, (str, os.PathLike), "a path")
    directory = Path(directory)
    if not directory.is_dir():
        raise DeltaConfigError(f"directory must be an existing delta checkpoint directory, got {str(directory)!r}")
    cfg_path, w_path = directory / DELTA_CONFIG_NAME, directory / DELTA_WEIGHTS_NAME
    missing = [p.name for p in (cfg_path, w_path) if not p.is_file()]
    if missing:
        raise CheckpointError(f"{str(directory)!r} is not a complete delta checkpoint: missing {missing}")
    try:
        meta = json_loads_strict(read_text_file(cfg_path, DELTA_CONFIG_NAME), repr(str(cfg_path)))
    except FileFormatError as e:
        raise CheckpointError(str(e)) from None
    return _check_meta(meta, cfg_path)


def read_delta_bytes(directory: str | os.PathLike, meta: Mapping[str, Any]) -> bytes:
    """The bytes of a delta directory's tensor file whose SHA-256 matches ``meta`` (from
    :func:`read_delta_meta`): ``delta.safetensors``, or the kept previous tensor file of an interrupted
    overwrite if that is the one that matches. Framework-neutral (``deltatune.jittor`` reads through it).

    Raises:
        CheckpointError: neither file matches the recorded hash.
    """
    directory = Path(directory)
    w_path = directory / DELTA_WEIGHTS_NAME
    data = w_path.read_bytes()  # hashed and parsed from the same bytes
    digest = hashlib.sha256(data).hexdigest()
    if digest != meta["sha256"]:
        prev = directory / _PREV_WEIGHTS_NAME
        prev_data = prev.read_bytes() if prev.is_file() else b""
        if prev_data and hashlib.sha256(prev_data).hexdigest() == meta["sha256"]:
            return prev_data  # an overwrite was interrupted before its new config landed: the previous delta
        raise CheckpointError(
            f"{str(w_path)!r} has SHA-256 {digest[:16]}..., but {DELTA_CONFIG_NAME} records "
            f"{str(meta['sha256'])[:16]}...: the file is corrupt or was only partly written"
        )
    return data


def _read_weights(directory: Path, meta: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a delta directory whose hash matches ``meta`` (see :func:`read_delta_bytes`); names,
    shapes and dtypes must match the record."""
    w_path = directory / DELTA_WEIGHTS_NAME
    data = read_delta_bytes(directory, meta)
    try:
        tensors = load_bytes(data)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for a malformed file
        raise CheckpointError(f"{str(w_path)!r} is not a valid safetensors file: {exc}") from None
    recorded = meta["tensors"]
    if set(recorded) != set(tensors):
        raise CheckpointError(
            f"{str(w_path)!r} holds tensors {sorted(tensors)[:10]} but {DELTA_CONFIG_NAME} records {sorted(recorded)[:10]}"
        )
    for key, t in tensors.items():
        want_shape, want_dtype = recorded[key]["shape"], recorded[key]["dtype"]
        have_dtype = str(t.dtype).removeprefix("torch.")
        if list(t.shape) != want_shape or have_dtype != want_dtype:
            raise CheckpointError(
                f"tensor {key!r} in {str(w_path)!r} is {have_dtype}{list(t.shape)}, but {DELTA_CONFIG_NAME} "
                f"records {want_dtype}{want_shape}"
            )
    return tensors


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
    model works). The hashes of the tensor file and of the config, the recorded tensor names,
    shapes and dtypes, the config and every tensor's name and shape against the model are checked,
    and the error says exactly what does not match. Nothing on the model changes when a check fails.
    """
    check_type("model", model, nn.Module, "a torch.nn.Module")
    meta = read_delta_meta(directory)
    directory = Path(directory)
    tensors = _read_weights(directory, meta)
    try:
        saved_config = config_from_dict(meta["config"])
    except DeltaError as exc:
        raise CheckpointError(f"{str(directory / DELTA_CONFIG_NAME)!r}: invalid 'config': {exc}") from None
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
        load_delta_state_dict(model, tensors, name)
        return model
    apply(model, saved_config, name, freeze_base=freeze_base, activate=activate)
    try:
        load_delta_state_dict(model, tensors, name)
    except BaseException:
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
