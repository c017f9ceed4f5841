"""Training checkpoints for resuming (delta-only, written atomically): the directory format of the Trainer.

Layout of ``<output_dir>/checkpoint-<step>/``::

    delta.safetensors        trainable parameters by name (default save_fn; a custom save_fn
                             may write anything else instead)
    optimizer.pt             optimizer state dict
    trainer_state.pt         step, epoch, position in epoch, scheduler / GradScaler state, ...
    trainer_state.json       the same counters, human-readable
    rng_state_rank<R>.pt     python / numpy / torch CPU / CUDA / data-sampler RNG states of rank R
    COMPLETE                 written last: JSON with the step and the SHA-256 of every other file

Everything is written into ``<output_dir>/.tmp-checkpoint-<step>-<random>/`` and fsynced, the
``COMPLETE`` marker is written, and only then is the directory renamed to ``checkpoint-<step>``.
A crash or Ctrl-C mid-save therefore leaves at most a ``.tmp-*`` directory, which
:func:`find_latest_checkpoint` never returns (and the next training run deletes). All ``.pt``
files load with ``torch.load(..., weights_only=True)``. :func:`verify_checkpoint` checks every file
against the hashes in ``COMPLETE`` before a resume reads anything (checkpoints of older versions,
whose ``COMPLETE`` holds only the step, are read without that check).

Only directories deltatune itself names (``.tmp-checkpoint-*``) are ever deleted as leftovers; a
``checkpoint-<step>`` directory without ``COMPLETE`` was not written by deltatune and makes
:func:`cleanup_stale_checkpoints` raise :class:`~deltatune.errors.ForeignFileError` instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, ForeignFileError
from ..io_utils import atomic_write, atomic_write_bytes, atomic_write_text, fsync_dir

__all__ = [
    "COMPLETE_MARKER",
    "DELTA_FILE",
    "abort_checkpoint",
    "begin_checkpoint",
    "capture_rng_state",
    "cleanup_stale_checkpoints",
    "finalize_checkpoint",
    "find_latest_checkpoint",
    "is_complete_checkpoint",
    "list_checkpoints",
    "load_trainable_params",
    "remove_checkpoint",
    "restore_rng_state",
    "rotate_checkpoints",
    "save_json_atomic",
    "save_trainable_params",
    "torch_load",
    "torch_save_atomic",
    "verify_checkpoint",
]

COMPLETE_MARKER = "COMPLETE"
DELTA_FILE = "delta.safetensors"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
_TMP_PREFIX = ".tmp-checkpoint-"
_MARKER_FORMAT = "deltatune.train_checkpoint"


# ---------------------------------------------------------------------------- atomic file helpers
def torch_save_atomic(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temp file in the same directory, fsync, then ``os.replace``."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


def save_json_atomic(obj: Any, path: str | os.PathLike[str]) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def torch_load(path: str | os.PathLike[str]) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with a :class:`CheckpointError` on failure."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint file {os.fspath(path)!r} is missing") from exc
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a corrupt checkpoint
        raise CheckpointError(f"cannot load checkpoint file {os.fspath(path)!r}: {exc}") from exc


# ---------------------------------------------------------------------------- trainable parameters
def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _check_full_tensor(name: str, t: torch.Tensor) -> None:
    """A checkpoint only ever holds full tensors: never a DTensor shard, never an empty tensor."""
    from .fsdp import is_dtensor

    if is_dtensor(t):
        raise CheckpointError(
            f"parameter {name!r} is a sharded DTensor; gather it first (deltatune.train.fsdp.full_parameters)"
        )
    if t.numel() == 0:
        raise CheckpointError(f"parameter {name!r} is empty (shape {tuple(t.shape)}); refusing to write it")


def save_trainable_params(model: nn.Module, directory: str | os.PathLike[str]) -> None:
    """Default ``save_fn``: the ``requires_grad`` parameters of ``model`` as ``{name: tensor}`` in
    ``<directory>/delta.safetensors``. A sharded (``DTensor``) or empty parameter raises
    :class:`~deltatune.errors.CheckpointError` before anything is written."""
    from safetensors.torch import save

    tensors = {}
    for n, p in _trainable(model).items():
        _check_full_tensor(n, p)
        tensors[n] = p.detach().to("cpu", copy=True).contiguous()
    if not tensors:
        raise CheckpointError("the model has no trainable parameters; refusing to write an empty checkpoint")
    data = save(tensors, metadata={"format": "pt", "content": "deltatune-trainable-params"})
    atomic_write_bytes(Path(directory) / DELTA_FILE, data)


def load_trainable_params(model: nn.Module, directory: str | os.PathLike[str]) -> None:
    """Default ``load_fn``: copy ``<directory>/delta.safetensors`` into the ``requires_grad``
    parameters of ``model``; names, shapes and the set of parameters must match exactly."""
    from safetensors.torch import load_file

    path = Path(directory) / DELTA_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {os.fspath(directory)!r} has no {DELTA_FILE}")
    try:
        saved = load_file(os.fspath(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for a malformed file
        raise CheckpointError(f"{os.fspath(path)!r} is not a valid safetensors file: {exc}") from None
    params = _trainable(model)
    missing = sorted(set(params) - set(saved))
    unexpected = sorted(set(saved) - set(params))
    if missing or unexpected:
        raise CheckpointError(
            f"trainable parameters of the model do not match {os.fspath(path)!r}: "
            f"missing {missing[:10]}{'...' if len(missing) > 10 else ''}, "
            f"unexpected {unexpected[:10]}{'...' if len(unexpected) > 10 else ''}"
        )
    with torch.no_grad():
        for name, param in params.items():
            if tuple(saved[name].shape) != tuple(param.shape):
                raise CheckpointError(
                    f"parameter {name!r} has shape {tuple(param.shape)} but the checkpoint holds "
                    f"{tuple(saved[name].shape)}"
                )
            param.copy_(saved[name])


# ---------------------------------------------------------------------------- RNG states
def capture_rng_state(device: torch.device | None = None, sampler_state: torch.Tensor | None = None) -> dict[str, Any]:
    """All RNG states as tensors / plain values (loadable with ``weights_only=True``)."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python_version": int(py_version),
        "python_state": torch.tensor(py_state, dtype=torch.int64),
        "python_gauss": py_gauss,
        "numpy_kind": str(np_kind),
        "numpy_keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_cached_gaussian": float(np_gauss),
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": None,
        "sampler": sampler_state,
    }
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Undo :func:`capture_rng_state` (the sampler state is returned to the caller separately)."""
    try:
        random.setstate((state["python_version"], tuple(int(x) for x in state["python_state"].tolist()), state["python_gauss"]))
        np.random.set_state(
            (
                state["numpy_kind"],
                state["numpy_keys"].numpy().astype(np.uint32),
                state["numpy_pos"],
                state["numpy_has_gauss"],
                state["numpy_cached_gaussian"],
            )
        )
        torch.set_rng_state(state["torch_cpu"])
    except KeyError as exc:
        raise CheckpointError(f"RNG state is missing the entry {exc}") from exc
    if state.get("torch_cuda") is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["torch_cuda"], device)


# ---------------------------------------------------------------------------- directories
def checkpoint_step(path: str | os.PathLike[str]) -> int | None:
    """The step of a ``checkpoint-<step>`` directory name, else None."""
    m = _CKPT_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def is_complete_checkpoint(path: str | os.PathLike[str]) -> bool:
    """A ``checkpoint-<step>`` directory whose ``COMPLETE`` marker exists."""
    p = Path(path)
    return p.is_dir() and checkpoint_step(p) is not None and (p / COMPLETE_MARKER).is_file()


def list_checkpoints(output_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest (lowest step) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if is_complete_checkpoint(p)]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def find_latest_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    """The complete checkpoint with the highest step in ``output_dir``, or None."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def begin_checkpoint(output_dir: str | os.PathLike[str], step: int) -> Path:
    """Create and return the temporary directory a checkpoint of ``step`` is written into."""
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{_TMP_PREFIX}{step}-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    return tmp


def _file_hashes(directory: Path) -> dict[str, str]:
    """``{relative posix path: sha256}`` of every file under ``directory`` except ``COMPLETE``."""
    from ..io_utils import file_sha256

    return {
        f.relative_to(directory).as_posix(): file_sha256(f)
        for f in sorted(directory.rglob("*"))
        if f.is_file() and f.relative_to(directory).as_posix() != COMPLETE_MARKER
    }


def finalize_checkpoint(tmp: Path, step: int) -> Path:
    """fsync every file, write ``COMPLETE`` (the step and every file's SHA-256), and rename ``tmp`` to
    ``checkpoint-<step>`` (replacing an old one)."""
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    marker = {"format": _MARKER_FORMAT, "step": step, "sha256": _file_hashes(tmp)}
    atomic_write_text(tmp / COMPLETE_MARKER, json.dumps(marker, indent=2, sort_keys=True) + "\n")
    fsync_dir(tmp)
    final = tmp.parent / f"checkpoint-{step}"
    old = None
    if final.exists():  # re-saving a step: move the old one aside (one rename) before replacing it
        old = tmp.parent / f"{_TMP_PREFIX}replaced-{step}-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify_checkpoint(path: str | os.PathLike[str]) -> None:
    """Check every file of a complete checkpoint against the SHA-256 recorded in its ``COMPLETE``.

    Raises :class:`~deltatune.errors.CheckpointError` naming the first file that is missing or
    changed. A ``COMPLETE`` of an older version (only the step) carries no hashes and passes."""
    p = Path(path)
    marker_path = p / COMPLETE_MARKER
    try:
        text = marker_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read {os.fspath(marker_path)!r}: {exc}") from None
    if text.strip().isdigit():
        return  # written by an older deltatune: no hashes to check
    try:
        marker = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{os.fspath(marker_path)!r} is not valid JSON ({exc}); the checkpoint is corrupt") from None
    if not isinstance(marker, dict) or marker.get("format") != _MARKER_FORMAT or not isinstance(marker.get("sha256"), dict):
        raise CheckpointError(
            f"{os.fspath(marker_path)!r} is not a deltatune checkpoint marker (expected a JSON object with "
            f"format {_MARKER_FORMAT!r} and sha256)"
        )
    step = checkpoint_step(p)
    if step is not None and marker.get("step") != step:
        raise CheckpointError(f"{os.fspath(marker_path)!r} records step {marker.get('step')!r}, but the directory is step {step}")
    for rel, want in marker["sha256"].items():
        f = p / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint {os.fspath(p)!r} is missing {rel!r} (recorded in {COMPLETE_MARKER})")
        with open(f, "rb") as fh:
            have = hashlib.file_digest(fh, "sha256").hexdigest()
        if have != want:
            raise CheckpointError(
                f"{os.fspath(f)!r} has SHA-256 {have[:16]}..., but {COMPLETE_MARKER} records {str(want)[:16]}...: "
                f"the file was changed or corrupted after the checkpoint was written"
            )


def abort_checkpoint(tmp: Path) -> None:
    """Delete a temporary checkpoint directory (after a failed save)."""
    shutil.rmtree(tmp, ignore_errors=True)


def remove_checkpoint(path: str | os.PathLike[str]) -> None:
    """Delete a checkpoint: first rename it to a ``.tmp-checkpoint-removed-*`` name (one atomic step
    after which it no longer counts), then delete that. A crash in between leaves only a name the
    next :func:`cleanup_stale_checkpoints` deletes, never a ``checkpoint-<step>`` without ``COMPLETE``."""
    p = Path(path)
    graveyard = p.with_name(f"{_TMP_PREFIX}removed-{p.name}-{uuid.uuid4().hex[:8]}")
    os.rename(p, graveyard)
    fsync_dir(p.parent)
    shutil.rmtree(graveyard, ignore_errors=True)


def rotate_checkpoints(output_dir: str | os.PathLike[str], keep_last: int | None) -> list[Path]:
    """Delete all but the ``keep_last`` newest complete checkpoints; returns the deleted paths."""
    if keep_last is None:
        return []
    found = list_checkpoints(output_dir)
    doomed = found[:-keep_last] if len(found) > keep_last else []
    for p in doomed:
        remove_checkpoint(p)
    return doomed


def cleanup_stale_checkpoints(output_dir: str | os.PathLike[str]) -> list[Path]:
    """Delete leftovers of interrupted saves (``.tmp-checkpoint-*`` directories, names only deltatune
    creates) and return them.

    Raises:
        ForeignFileError: ``output_dir`` holds a ``checkpoint-<step>`` directory without ``COMPLETE``
            (deltatune never leaves one: it was written by something else). Checked before anything
            is deleted; nothing is deleted then.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return []
    foreign = sorted(p.name for p in root.iterdir() if checkpoint_step(p) is not None and not is_complete_checkpoint(p))
    if foreign:
        raise ForeignFileError(
            f"output_dir {os.fspath(root)!r} holds {foreign[:10]}, checkpoint directories deltatune did not write "
            f"(no {COMPLETE_MARKER} marker); deltatune neither uses nor deletes them: move them away or choose "
            f"another output_dir"
        )
    gone = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(_TMP_PREFIX):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    return gone
