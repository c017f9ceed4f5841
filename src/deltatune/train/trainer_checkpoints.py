"""Checkpoints of :class:`~deltatune.train.Trainer`: writing ``checkpoint-<step>``, loading one, resuming.

:class:`CheckpointMixin` holds the Trainer's methods that save and restore its whole state (trainable
weights through ``save_fn``/``load_fn``, optimiser, scheduler, scaler, counters, every RNG, the sampler
state; FSDP gathers full tensors) with the atomic directory format of :mod:`deltatune.train.resume`,
and the final delta export.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, DeltaConfigError
from .distributed import (
    barrier,
    broadcast_object,
)
from .fsdp import (
    checkpoint_param_names,
    full_optimizer_state_dict,
    full_parameters,
    run_on_rank0,
    save_delta_sharded,
    shard_optimizer_state_dict,
)
from .resume import (
    abort_checkpoint,
    begin_checkpoint,
    capture_rng_state,
    finalize_checkpoint,
    find_latest_checkpoint,
    is_complete_checkpoint,
    restore_rng_state,
    rotate_checkpoints,
    save_json_atomic,
    torch_load,
    torch_save_atomic,
    verify_checkpoint,
)
from .state import TrainState

__all__ = ["CheckpointMixin"]

_STATE_VERSION = 1


class CheckpointMixin:
    """The Trainer's checkpoint methods (mixed into :class:`~deltatune.train.Trainer`)."""

    # ------------------------------------------------------------------ checkpoints
    def _resolve_resume(self, resume_from: str | os.PathLike[str]) -> Path | None:
        if resume_from == "latest":
            if self.config.output_dir is None:
                raise DeltaConfigError("resume_from='latest' needs config.output_dir, got None")
            return find_latest_checkpoint(self.config.output_dir)
        path = Path(resume_from)
        if not is_complete_checkpoint(path):
            raise CheckpointError(
                f"resume_from must be 'latest' or a complete checkpoint-<step> directory (with a COMPLETE marker), "
                f"got {os.fspath(resume_from)!r}"
            )
        return path

    def _current_sampler_state(self) -> torch.Tensor:
        st = getattr(self, "_sampler_state", None)
        if st is not None and st[0] == self.state.epoch:
            return st[1]
        gen = torch.Generator()
        gen.manual_seed(self.config.seed + self.state.epoch)
        return gen.get_state()

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoint-<step>`` into ``output_dir`` atomically; returns its path on rank 0."""
        c = self.config
        if c.output_dir is None:
            raise DeltaConfigError("save_checkpoint() needs config.output_dir, got None")
        step = self.state.step
        tmp = begin_checkpoint(c.output_dir, step) if self.is_main else None
        tmp = broadcast_object(self.dist, os.fspath(tmp) if tmp is not None else None)
        tmp_path = Path(tmp)
        written: list[Path] = []

        def write_rank0(optim_state: dict[str, Any] | None) -> None:
            if optim_state is None:
                self.save_fn(self.model, tmp_path)
                optim_state = self.optimizer.state_dict()
            torch_save_atomic(optim_state, tmp_path / "optimizer.pt")
            state = {
                "format_version": _STATE_VERSION,
                **asdict(self.state),
                "total_steps": self.total_steps,
                "world_size": self.dist.world_size,
                "batch_size": c.batch_size,
                "grad_accum_steps": c.grad_accum_steps,
                "seed": c.seed,
                "param_names": self._param_names,
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "config_json": json.dumps(c.to_dict()),
            }
            torch_save_atomic(state, tmp_path / "trainer_state.pt")
            save_json_atomic({**asdict(self.state), "total_steps": self.total_steps}, tmp_path / "trainer_state.json")
            written.append(finalize_checkpoint(tmp_path, step))
            rotate_checkpoints(c.output_dir, c.keep_last_checkpoints)

        try:
            rng = capture_rng_state(self.device, self._current_sampler_state())
            torch_save_atomic(rng, tmp_path / f"rng_state_rank{self.dist.rank}.pt")
            barrier(self.dist)
            optim_state = None
            if self.is_fsdp:
                # full (gathered) tensors only: rank 0 writes them, as a single process would
                with full_parameters(self.model, checkpoint_param_names(self.model), rank0_only=True):
                    run_on_rank0(lambda: self.save_fn(self.model, tmp_path), distributed=True)
                optim_state = full_optimizer_state_dict(self.optimizer)
            # a failure on rank 0 is raised on every rank (no rank is left waiting in a collective)
            run_on_rank0(lambda: write_rank0(optim_state), distributed=self.dist.enabled)
        except BaseException:
            if self.is_main:
                abort_checkpoint(tmp_path)
            raise
        final = written[0] if written else None
        barrier(self.dist)
        if final is not None:
            for cb in self.callbacks:
                cb.on_save(self, final)
        return final

    def save_delta(self, directory: str | os.PathLike[str], adapter_name: str | None = None) -> Path | None:
        """Write the model's deltatune adapter with :func:`deltatune.checkpoint.save_delta`, the full
        tensors also under FSDP (then every rank must call it; rank 0 writes). Returns the
        directory on rank 0 and ``None`` on the other ranks."""
        return save_delta_sharded(self.model, directory, adapter_name)

    def load_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Restore trainable weights, optimizer, scheduler, scaler, counters and RNG states from ``path``."""
        path = Path(path)
        if not is_complete_checkpoint(path):
            raise CheckpointError(f"{os.fspath(path)!r} is not a complete checkpoint-<step> directory")
        verify_checkpoint(path)
        state = torch_load(path / "trainer_state.pt")
        if not isinstance(state, dict) or state.get("format_version") != _STATE_VERSION:
            raise CheckpointError(f"{os.fspath(path)!r}: unknown trainer_state format")
        c = self.config
        current = {
            "world_size": self.dist.world_size,
            "batch_size": c.batch_size,
            "grad_accum_steps": c.grad_accum_steps,
            "seed": c.seed,
        }
        diff = {k: (state.get(k), v) for k, v in current.items() if state.get(k) != v}
        if diff:
            listed = ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise CheckpointError(f"cannot resume exactly from {os.fspath(path)!r}: {listed}")
        if state.get("param_names") != self._param_names:
            raise CheckpointError(
                f"the trainable parameters of the model differ from those saved in {os.fspath(path)!r}"
            )
        if self.is_fsdp:
            with full_parameters(self.model, checkpoint_param_names(self.model), rank0_only=False, writeback=True):
                self.load_fn(self.model, path)
            self.optimizer.load_state_dict(shard_optimizer_state_dict(self.optimizer, torch_load(path / "optimizer.pt")))
        else:
            self.load_fn(self.model, path)
            self.optimizer.load_state_dict(torch_load(path / "optimizer.pt"))
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.state = TrainState(**{k: state[k] for k in asdict(TrainState())})
        rng = torch_load(path / f"rng_state_rank{self.dist.rank}.pt")
        restore_rng_state(rng, self.device)
        if rng.get("sampler") is not None:
            self._resume_sampler_state = (self.state.epoch, rng["sampler"])
