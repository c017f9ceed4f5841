"""MindPet's ``mindpet.graph`` API: :func:`freeze_delta` by MindPet mode and the
:class:`TrainableParamsCheckPoint` callback (with :class:`CheckpointConfig`), over deltatune's freezing
and Trainer. Re-exported by :mod:`deltatune.compat.mindpet`, which is where users import them from.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save as st_save

from ..errors import DeltaConfigError, DeltaConfigTypeError
from ..freeze import _matches
from ..freeze import freeze_delta as _freeze_delta
from ..io_utils import atomic_write_bytes
from ..methods.base import get_records, logical_param_name
from ..train.trainer import TrainerCallback
from ..validation import check_positive_int, check_type

__all__ = ["DELTA_LIST", "CheckpointConfig", "TrainableParamsCheckPoint", "freeze_delta"]

#: MindPet's ``freeze_delta`` modes -> deltatune method names.
_MODES = {
    "lora": "lora",
    "prefixtuning": "prefix",
    "adapter": "adapter",
    "low_rank_adapter": "low_rank_adapter",
    "bitfit": "bitfit",
    "ptuning2": "ptuning_v2",
}
#: the modes MindPet's ``freeze_delta`` accepts.
DELTA_LIST = list(_MODES)


def freeze_delta(
    model: nn.Module,
    mode: str,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
) -> None:
    """MindPet's ``freeze_delta``: freeze everything except the delta parameters of ``mode`` (one of
    :data:`DELTA_LIST`), then freeze the parameters matching ``include`` and unfreeze those matching
    ``exclude`` (shell wildcards over parameter names).

    ``mode="bitfit"`` on a model without deltatune's BitFit applied trains every parameter whose name ends
    in ``bias``, as MindPet does (with BitFit applied, its selected biases). Patterns must each match a
    parameter and not both lists (deltatune is stricter than MindPet, which ignores such patterns).
    """
    check_type("model", model, nn.Module, "a torch.nn.Module")
    if not isinstance(mode, str) or mode.lower() not in _MODES:
        raise DeltaConfigError(f"mode must be a str from {DELTA_LIST}, got {mode!r}")
    for label, pats in (("include", include), ("exclude", exclude)):
        if pats is not None and (not isinstance(pats, list) or not all(isinstance(p, str) for p in pats)):
            raise DeltaConfigTypeError(f"{label} must be a list of str, got {pats!r}")
    method = _MODES[mode.lower()]
    include, exclude = include or None, exclude or None
    has_bitfit = any(r.method == "bitfit" for r in get_records(model).values())
    if method != "bitfit" or has_bitfit:
        _freeze_delta(model, method, include=include, exclude=exclude)
        return
    params = dict(model.named_parameters())
    biases = [n for n in params if re.fullmatch(r".*bias", logical_param_name(n))]
    if not biases:
        raise DeltaConfigError(
            f"mode 'bitfit' trains every bias, but {type(model).__name__} has no parameter named '*bias'"
        )
    # check the patterns before anything changes (as the core freeze_delta does)
    for label, pats in (("include", include or []), ("exclude", exclude or [])):
        for p in pats:
            if not any(_matches(n, p) for n in params):
                raise DeltaConfigError(f"{label} pattern {p!r} matches no parameter of {type(model).__name__}")
    both = [n for n in params if any(_matches(n, p) for p in include or []) and any(_matches(n, p) for p in exclude or [])]
    if both:
        raise DeltaConfigError(f"parameters {both[:5]} match both include and exclude; a parameter can only be in one")
    for n, p in params.items():
        if any(_matches(n, pat) for pat in include or []):
            p.requires_grad_(False)
        elif any(_matches(n, pat) for pat in exclude or []):
            p.requires_grad_(True)
        else:
            p.requires_grad_(n in biases)


class CheckpointConfig:
    """The options of MindSpore's ``CheckpointConfig`` that :class:`TrainableParamsCheckPoint` honours.

    Args:
        save_checkpoint_steps: save every this many optimiser steps (positive int; MindSpore's default 1).
        keep_checkpoint_max: keep at most this many files written by the callback (positive int, default 5);
            older ones it wrote are deleted.
    """

    def __init__(self, save_checkpoint_steps: int = 1, keep_checkpoint_max: int = 5) -> None:
        self.save_checkpoint_steps = check_positive_int("CheckpointConfig.save_checkpoint_steps", save_checkpoint_steps)
        self.keep_checkpoint_max = check_positive_int("CheckpointConfig.keep_checkpoint_max", keep_checkpoint_max)


class TrainableParamsCheckPoint(TrainerCallback):
    """MindPet's ``TrainableParamsCheckPoint(directory, prefix="DELTA_CKP", config=None)`` as a
    :class:`deltatune.TrainerCallback`: every ``config.save_checkpoint_steps`` steps it writes the model's
    trainable parameters only (logical names, safetensors) to ``<directory>/<prefix>-<epoch>_<step>.safetensors``
    (``epoch`` 1-based, ``step`` the global optimiser step), atomically, and keeps the newest
    ``config.keep_checkpoint_max`` of the files it wrote.

    ``directory`` must be a non-empty absolute path that is not a symbolic link (MindPet's rules).
    """

    def __init__(self, directory: str | os.PathLike, prefix: str = "DELTA_CKP", config: CheckpointConfig | None = None) -> None:
        if directory is None or directory == "":
            raise DeltaConfigError("TrainableParamsCheckPoint.directory is required, got " + repr(directory))
        check_type("TrainableParamsCheckPoint.directory", directory, (str, os.PathLike), "a path")
        path = Path(directory)
        if path.is_symlink():
            raise DeltaConfigError(f"TrainableParamsCheckPoint.directory must not be a link path, got {str(path)!r}")
        if not path.is_absolute():
            raise DeltaConfigError(f"TrainableParamsCheckPoint.directory must be an absolute path, got {str(path)!r}")
        check_type("TrainableParamsCheckPoint.prefix", prefix, str, "a non-empty str without '/'")
        if not prefix or "/" in prefix or os.sep in prefix:
            raise DeltaConfigError(f"TrainableParamsCheckPoint.prefix must be a non-empty str without '/', got {prefix!r}")
        if config is not None:
            check_type("TrainableParamsCheckPoint.config", config, CheckpointConfig, "a CheckpointConfig")
        self.directory, self.prefix = path, prefix
        self.config = config or CheckpointConfig()
        self.written: list[Path] = []

    def state_dict_of(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The trainable parameters of ``model`` by logical name (shared ones once)."""
        out: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for name, p in model.named_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out[logical_param_name(name)] = p.detach().to("cpu").contiguous().clone()
        return out

    def save(self, model: nn.Module, epoch: int, step: int) -> Path:
        """Write the trainable parameters now; returns the file."""
        state = self.state_dict_of(model)
        if not state:
            raise DeltaConfigError("TrainableParamsCheckPoint: the model has no trainable parameter to save")
        path = self.directory / f"{self.prefix}-{epoch}_{step}.safetensors"
        atomic_write_bytes(path, st_save(state, metadata={"format": "pt", "epoch": str(epoch), "step": str(step)}))
        if path in self.written:
            self.written.remove(path)
        self.written.append(path)
        while len(self.written) > self.config.keep_checkpoint_max:
            old = self.written.pop(0)
            old.unlink(missing_ok=True)
        return path

    def on_step_end(self, trainer: Any) -> None:
        st = trainer.state
        if st.step % self.config.save_checkpoint_steps == 0 and getattr(trainer, "is_main", True):
            # the 1-based epoch the step belongs to (the last step of an epoch has already moved the counter on)
            epoch = st.epoch if st.batches_in_epoch == 0 and st.epoch > 0 else st.epoch + 1
            self.save(trainer.model, epoch, st.step)
