"""The generic training loop: :class:`Trainer`.

It trains the ``requires_grad`` parameters of any ``torch.nn.Module`` (a delta method froze the
rest) on a map-style dataset. See :class:`Trainer` for the loss, accumulation, checkpoint and
resume semantics.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..errors import CheckpointError, DeltaConfigError, DeltaConfigTypeError, DeltaError
from .checkpoint import (
    abort_checkpoint,
    begin_checkpoint,
    capture_rng_state,
    cleanup_stale_checkpoints,
    finalize_checkpoint,
    find_latest_checkpoint,
    is_complete_checkpoint,
    load_trainable_params,
    restore_rng_state,
    rotate_checkpoints,
    save_json_atomic,
    save_trainable_params,
    torch_load,
    torch_save_atomic,
    verify_checkpoint,
)
from .config import TrainConfig
from .cuda_graph import CapturedStep
from .distributed import (
    DistContext,
    EpochBatchSampler,
    all_reduce_sum,
    barrier,
    broadcast_object,
    init_distributed,
)
from .fsdp import (
    checkpoint_param_names,
    full_optimizer_state_dict,
    full_parameters,
    is_dtensor,
    run_on_rank0,
    save_delta_sharded,
    shard_optimizer_state_dict,
)
from .fused import apply_fused_kernels
from .logging import MetricsLogger, peak_memory_mb, reset_peak_memory
from .losses import (
    PadCollator,
    check_label_range,
    check_lm_examples,
    chunked_head,
    count_loss_tokens,
    lm_loss_sum,
)
from .optim import AdamW, param_groups
from .schedules import build_scheduler, resolve_warmup_steps

__all__ = ["LossFn", "TrainState", "Trainer", "TrainerCallback", "set_seed"]

LossFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, int | torch.Tensor]"]
_STATE_VERSION = 1
logger = logging.getLogger("deltatune.train")
_SAID: set[str] = set()


def _say_once(message: str, level: int = logging.WARNING) -> None:
    """Log ``message`` on ``deltatune.train`` the first time this process sees it."""
    if message not in _SAID:
        _SAID.add(message)
        logger.log(level, message)


def capturable_loss(loss_fn: LossFn | None) -> bool:
    """Whether the Trainer can capture steps with ``loss_fn``: the default loss (None), or a ``loss_fn``
    with a ``unit_count(batch) -> int`` method giving, from the CPU batch, the ``n`` it returns."""
    return loss_fn is None or callable(getattr(loss_fn, "unit_count", None))


def set_seed(seed: int) -> None:
    """Seed ``random``, ``numpy`` and ``torch`` (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class TrainerCallback:
    """Hooks called by :meth:`Trainer.train` (all no-ops here; override what you need).

    Set ``trainer.should_stop = True`` in a hook to end training after the current step (under
    DDP, do it on every rank).
    """

    def on_train_begin(self, trainer: Trainer) -> None:
        """Before the first step (after a resume has been applied)."""

    def on_step_end(self, trainer: Trainer) -> None:
        """After each optimiser step, its logging, evaluation and checkpoint."""

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """After a record (``split`` "train" or "eval") was logged."""

    def on_evaluate(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        """After an evaluation inside :meth:`Trainer.train`."""

    def on_save(self, trainer: Trainer, path: Path) -> None:
        """After a checkpoint was completed (rank 0 only)."""

    def on_train_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        """With the summary :meth:`Trainer.train` returns."""


@dataclass
class TrainState:
    """Counters saved in every checkpoint.

    ``step``: optimiser steps done; ``epoch``: current epoch (0-based); ``batches_in_epoch``:
    micro-batches of that epoch already consumed (per rank); ``tokens``: input tokens seen (all
    ranks); ``loss_tokens``: loss units seen (all ranks); ``elapsed``: training seconds, summed
    over resumed runs.
    """

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    elapsed: float = 0.0


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=device.type == "cuda")
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _input_tokens(batch: Any, fallback: int) -> int:
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            return int(mask.sum())
        ids = batch.get("input_ids")
        if isinstance(ids, torch.Tensor):
            return ids.numel()
    return fallback


def _enable_checkpointing(model: nn.Module) -> None:
    """Turn on activation (gradient) checkpointing through the model's own switch, non-reentrant
    (so it works with a frozen embedding and under DDP)."""
    # transformers >= 5 renamed gradient_checkpointing_enable to activation_checkpointing_enable
    for method, kwarg in (
        ("activation_checkpointing_enable", "activation_checkpointing_kwargs"),
        ("gradient_checkpointing_enable", "gradient_checkpointing_kwargs"),
    ):
        enable = getattr(model, method, None)
        if enable is None:
            continue
        try:
            enable(**{kwarg: {"use_reentrant": False}})
        except TypeError:
            enable()
        return
    warnings.warn(
        f"gradient_checkpointing=True but {type(model).__name__} has no gradient_checkpointing_enable() "
        "(nor activation_checkpointing_enable()); training without it",
        stacklevel=3,
    )


class Trainer:
    """Train the trainable (``requires_grad``) parameters of ``model``.

    Args:
        model: any ``nn.Module``; only parameters with ``requires_grad=True`` are optimised.
        config: a :class:`TrainConfig` (or a dict for :meth:`TrainConfig.from_dict`).
        train_dataset: map-style dataset (``__len__`` + ``__getitem__``) or a list of feature dicts.
        eval_dataset: optional, for :meth:`evaluate` and ``eval_every``.
        collate_fn: builds a batch from a list of examples; default :class:`PadCollator` (right-pads
            ``input_ids``/``attention_mask``/``labels``).
        loss_fn: ``loss_fn(model, batch) -> (loss, n)`` where ``loss`` is the mean over ``n`` units;
            steps with it are captured as CUDA graphs only when it has a ``unit_count(batch) -> int``
            method (``n`` from the CPU batch). Default: the token cross-entropy against the (shifted)
            ``labels``, ignoring -100, with ``config.label_smoothing``
            (:func:`~deltatune.train.lm_loss_sum`): for Hugging Face causal LMs whose head allows it
            (:func:`~deltatune.train.chunked_head`; one process) the backbone is called and the
            chunked linear + cross-entropy applies the head without materialising the logits,
            otherwise the model is called with the batch minus ``labels`` and its ``.logits`` are
            used.
        callbacks: :class:`TrainerCallback` objects.
        save_fn / load_fn: ``fn(model, directory)`` writing / reading the trainable weights inside a
            checkpoint; default :func:`~deltatune.train.checkpoint.save_trainable_params` /
            :func:`~deltatune.train.checkpoint.load_trainable_params` (``delta.safetensors``).

    Loss weighting: each optimiser step minimises (sum of the loss over every unit of all its
    micro-batches on all ranks) / (number of those units). With the default loss the counts are
    known before the forward pass and the loss of each micro-batch is scaled by
    ``world_size / total_units`` (DDP averages gradients over ranks); with a custom ``loss_fn`` the
    micro-batch losses are weighted by ``n`` and the gradients rescaled once the total is known. So
    ``k`` accumulated micro-batches of ``b`` equal one batch of ``k*b``, and ``W`` processes with
    ``b`` equal one process with ``W*b``.

    Data order: epoch ``e`` is ``randperm`` under ``seed + e`` (see
    :class:`~deltatune.train.distributed.EpochBatchSampler`); a resumed run skips the micro-batches
    of the current epoch already consumed and restores every RNG, so killing at step ``k`` and
    resuming gives the same weights as an uninterrupted run.

    Under ``distributed="ddp"`` (launched by ``torchrun``) the process group is created here, the
    model is wrapped in ``DistributedDataParallel``; only rank 0 logs and writes checkpoints
    (every rank writes its own RNG state into the checkpoint, so ``output_dir`` must be shared).
    Call :meth:`close` (or use the trainer as a context manager) to destroy the process group.

    Under ``distributed="fsdp"`` (also ``torchrun``) the model is sharded in place with FSDP2 (see
    :func:`deltatune.train.fsdp.shard_model`): every transformer block, then the root, frozen base
    included; ``self.model`` is then the sharded model (its parameters are ``DTensor`` shards) and
    the optimizer holds shards. Gradients are reduce-scattered after every micro-batch. A
    checkpoint holds the *full* tensors: the parameters ``save_fn`` reads are gathered and
    swapped into the model on rank 0 while it runs (so ``delta.safetensors`` — or the
    ``save_delta`` directory of a recipe — is exactly what a single process writes and loads
    on one process), and ``optimizer.pt`` holds the gathered optimizer state; resuming
    re-shards both (same world size). Use :meth:`save_delta` for a final delta export.
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig | Mapping[str, Any],
        train_dataset: Any,
        *,
        eval_dataset: Any = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        loss_fn: LossFn | None = None,
        callbacks: Iterable[TrainerCallback] | None = None,
        save_fn: Callable[[nn.Module, Path], None] | None = None,
        load_fn: Callable[[nn.Module, Path], None] | None = None,
    ) -> None:
        if isinstance(config, Mapping):
            config = TrainConfig.from_dict(config)
        if not isinstance(config, TrainConfig):
            raise DeltaConfigTypeError(
                f"config must be a TrainConfig or a dict, got {config!r} ({type(config).__name__})"
            )
        if not isinstance(model, nn.Module):
            raise DeltaConfigTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        for name, ds in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            if ds is None and name == "eval_dataset":
                continue
            if not (hasattr(ds, "__len__") and hasattr(ds, "__getitem__")):
                raise DeltaConfigTypeError(
                    f"{name} must be a map-style dataset (with __len__ and __getitem__) or a list, "
                    f"got {type(ds).__name__}"
                )
        if len(train_dataset) == 0:
            raise DeltaConfigError("train_dataset must hold at least one example, got an empty dataset")
        for name, fn in (("collate_fn", collate_fn), ("loss_fn", loss_fn), ("save_fn", save_fn), ("load_fn", load_fn)):
            if fn is not None and not callable(fn):
                raise DeltaConfigTypeError(f"{name} must be callable or None, got {type(fn).__name__}")
        if loss_fn is None:
            check_lm_examples(train_dataset, model, "train_dataset")
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise DeltaConfigError(
                "model has no trainable parameters (requires_grad=True); apply a delta method or unfreeze some"
            )

        self.config = config
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.collate_fn = collate_fn if collate_fn is not None else PadCollator()
        self.loss_fn = loss_fn
        self.callbacks = list(callbacks or [])
        self.save_fn = save_fn if save_fn is not None else save_trainable_params
        self.load_fn = load_fn if load_fn is not None else load_trainable_params
        self.should_stop = False
        self.state = TrainState()
        self.log_history: list[dict[str, Any]] = []
        self._logger: MetricsLogger | None = None
        self._resume_sampler_state: tuple[int, torch.Tensor] | None = None

        self.dist: DistContext = init_distributed(config.distributed, config.device)
        self.device = self.dist.device
        if config.mixed_precision == "fp16" and self.device.type != "cuda":
            raise DeltaConfigError(
                f"mixed_precision='fp16' needs a CUDA device (it uses a GradScaler), got device "
                f"{str(self.device)!r}; use 'bf16' or 'no' on CPU"
            )
        if config.cuda_graph is True and not capturable_loss(loss_fn):
            raise DeltaConfigError(
                "cuda_graph=True needs the default causal-LM loss or a loss_fn with a unit_count(batch) method "
                "(otherwise a loss_fn hands its unit count to the host on every step); set cuda_graph to 'auto' "
                "or false"
            )
        config.check_cuda_graph_device()
        #: why steps run eagerly ("" when they are captured)
        self.eager_reason = self._eager_reason(config, loss_fn)
        self.capture = not self.eager_reason
        if self.eager_reason and config.cuda_graph == "auto":
            level = logging.WARNING if self.device.type == "cuda" else logging.INFO
            _say_once(f"Trainer: steps run eagerly (not captured as CUDA graphs): {self.eager_reason}", level)
        set_seed(config.seed)

        #: the fused-kernel backend applied to the model ("none" when none was)
        self.fused_kernels = apply_fused_kernels(model, config.fused_kernels, self.device)
        if config.gradient_checkpointing:
            _enable_checkpointing(model)

        self.model = model.to(self.device)
        self._ddp: nn.Module | None = None
        self._ddp_released = False
        self.fsdp_units: list[str] = []
        if config.distributed == "fsdp":
            from .fsdp import shard_model

            self.fsdp_units = shard_model(self.model, device=self.device, mixed_precision=config.mixed_precision)
        elif self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self._ddp = DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=False,
                # static_graph=True gave wrong first-step gradients in the 2-process gloo test on
                # torch 2.13 (with and without no_sync()); non-reentrant checkpointing does not need it.
                static_graph=False,
            )

        groups = param_groups(self.model, config.weight_decay)
        self._param_names = [g["names"] for g in groups]
        self.optimizer = AdamW(
            groups,
            lr=config.lr,
            betas=config.adam_betas,
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
            bias_correction=config.bias_correction,
            capturable=self.capture,
        )
        self._trainable = [p for g in groups for p in g["params"]]
        self._graphs: dict[tuple, CapturedStep] = {}

        probe = self._train_sampler(0, 0)
        self.batches_per_epoch = probe.batches_per_epoch
        self.steps_per_epoch = -(-self.batches_per_epoch // config.grad_accum_steps)
        self.total_steps = config.max_steps if config.max_steps is not None else config.epochs * self.steps_per_epoch
        self.warmup_steps = resolve_warmup_steps(config.warmup_steps, config.warmup_ratio, self.total_steps)
        self.scheduler = build_scheduler(self.optimizer, config.scheduler, self.warmup_steps, self.total_steps)
        self.scaler = torch.amp.GradScaler("cuda") if config.mixed_precision == "fp16" else None

    # ------------------------------------------------------------------ small helpers
    def _eager_reason(self, c: TrainConfig, loss_fn: LossFn | None) -> str:
        """Why steps cannot be captured ("" when they can; always "" unless ``cuda_graph`` is on)."""
        if c.cuda_graph is False:
            return "cuda_graph is false"
        if self.device.type != "cuda":
            return f"the device is {str(self.device)!r}, not CUDA"
        if c.distributed != "none":
            return f"distributed={c.distributed!r} (capture runs in one process)"
        if c.mixed_precision == "fp16":
            return "mixed_precision='fp16' (its GradScaler reads the gradients' finiteness on the host)"
        if not capturable_loss(loss_fn):
            return "a custom loss_fn without a unit_count(batch) method"
        if c.fused_kernels == "compile":
            return "fused_kernels='compile' (capturing compiled blocks fails)"
        return ""

    @property
    def is_main(self) -> bool:
        """True on the process that logs and saves (rank 0)."""
        return self.dist.is_main

    @property
    def is_fsdp(self) -> bool:
        """True when the model was sharded with FSDP2 (``distributed="fsdp"``)."""
        return bool(self.fsdp_units)

    @property
    def trainable_params(self) -> int:
        """Number of trainable parameter elements."""
        return sum(p.numel() for p in self._trainable)

    @property
    def total_params(self) -> int:
        """Number of parameter elements of the model (trainable and frozen)."""
        return sum(p.numel() for p in self.model.parameters())

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        mp = self.config.mixed_precision
        if mp == "no":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if mp == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _epoch_fraction(self) -> float:
        return self.state.epoch + self.state.batches_in_epoch / self.batches_per_epoch

    def _train_sampler(self, epoch: int, start_batch: int, generator_state: torch.Tensor | None = None) -> EpochBatchSampler:
        c = self.config
        return EpochBatchSampler(
            len(self.train_dataset),
            c.batch_size,
            seed=c.seed,
            epoch=epoch,
            shuffle=c.shuffle,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            start_batch=start_batch,
            generator_state=generator_state,
        )

    def _loader(self, dataset: Any, batch_sampler: Iterable[list[int]], seed: int) -> DataLoader:
        # A dedicated generator: creating the iterator must not consume the global torch RNG
        # (it would shift dropout masks after a mid-epoch resume).
        gen = torch.Generator()
        gen.manual_seed(seed)
        return DataLoader(
            dataset,
            batch_sampler=batch_sampler,
            collate_fn=self.collate_fn,
            num_workers=self.config.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=gen,
        )

    def _log(self, record: dict[str, Any]) -> None:
        rec = self._logger.log(record) if self._logger is not None else dict(record)
        self.log_history.append(rec)
        for cb in self.callbacks:
            cb.on_log(self, rec)

    def _open_logger(self, resume_step: int | None = None) -> None:
        if self._logger is None:
            c = self.config
            self._logger = MetricsLogger(
                c.output_dir, enabled=self.is_main, tensorboard=c.tensorboard, resume_step=resume_step
            )

    def close(self) -> None:
        """Close the log files, release the DDP wrapper and destroy the process group if this trainer
        created it. A DDP trainer cannot train or evaluate after this.

        The DDP wrapper is freed first, while the process group is still registered. Its C++ reducer
        holds a reference to the group; were that the last one, the group would be torn down from the
        reducer's destructor with the GIL held, and that deadlocks against a Gloo worker thread that
        needs the GIL to free the tensors of a collective it has just finished (a rank then never exits).
        """
        if self._logger is not None:
            self._logger.close()
            self._logger = None
        if self._ddp is not None:
            self._ddp = None
            self._ddp_released = True
            gc.collect()  # DDP sits in reference cycles (its hooks): free the reducer now, not later
        self.dist.close()

    def _check_open(self, what: str) -> None:
        if self._ddp_released:
            raise DeltaError(f"Trainer.{what}() after close(): this DDP trainer has released its process group")

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ loss
    def _compute_loss(self, model: nn.Module, batch: Any, label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor | int]:
        """(sum of the loss over the batch's units, number of units)."""
        if self.loss_fn is not None:
            loss, n = self.loss_fn(model, batch)
            n_val = int(n.item()) if isinstance(n, torch.Tensor) else int(n)
            return loss.float() * n_val, n_val
        if not isinstance(batch, Mapping) or "labels" not in batch:
            raise DeltaConfigError(
                "the default loss needs batches that are dicts with a 'labels' entry, got "
                f"{type(batch).__name__}{' with keys ' + str(sorted(batch)) if isinstance(batch, Mapping) else ''}; "
                "pass loss_fn=... to the Trainer"
            )
        return lm_loss_sum(
            model,
            batch,
            label_smoothing=label_smoothing,
            shift=self.config.shift_labels,
            chunked=self._ddp is None and not self.is_fsdp,
            check_labels=False,  # checked on the CPU copies (_loss_token_counts): no device read per step
        )

    @property
    def chunked_loss(self) -> bool:
        """Whether the default loss skips the logits (chunked linear + cross-entropy on the backbone's
        hidden states; see :func:`~deltatune.train.chunked_head`)."""
        return (
            self.loss_fn is None and self._ddp is None and not self.is_fsdp and chunked_head(self.model)[0] is not None
        )

    def _global_counts(self, n: int, tokens: int) -> tuple[float, float]:
        """(``n``, ``tokens``) summed over all ranks, as floats (float64 sums, like
        :func:`all_reduce_sum`). Both are host integers (counted on the CPU copy of the batch or
        returned by ``loss_fn``), so a single process needs no tensor at all."""
        if not self.dist.enabled:
            return float(n), float(tokens)
        tot = all_reduce_sum(self.dist, [n, tokens]).tolist()
        return float(tot[0]), float(tot[1])

    # ------------------------------------------------------------------ one optimiser step
    def _train_step(self, micro: list[Any], want_norm: bool) -> dict[str, Any]:
        """Forward/backward every micro-batch, then one optimiser step.

        Exactly one all-reduce per step (of the unit and input-token counts); returns the local
        loss sum (a device tensor, not synced) and the global counts.
        """
        c = self.config
        if self.capture:
            graphed = self._graphed_train_step(micro)
            if graphed is not None:
                return graphed
        world = self.dist.world_size
        fwd = self._ddp if self._ddp is not None else self.model
        default_loss = self.loss_fn is None
        scale = 1.0
        counts: list[int] = []
        if default_loss:
            counts, in_tokens = self._loss_token_counts(micro)
            global_n, global_tok = self._global_counts(sum(counts), in_tokens)
            scale = world / global_n if global_n > 0 else 0.0
        loss_sum: torch.Tensor | None = None
        for i, cpu_batch in enumerate(micro):
            batch = _to_device(cpu_batch, self.device)
            sync = self._ddp.no_sync() if self._ddp is not None and i < len(micro) - 1 else contextlib.nullcontext()
            with sync:
                with self._autocast():
                    total, n = self._compute_loss(fwd, batch, c.label_smoothing)
                objective = total * scale if default_loss else total
                if self.scaler is not None:
                    objective = self.scaler.scale(objective)
                objective.backward()
            # (0 + x == x: starting from the first micro-batch's loss instead of a zeros tensor
            # gives the same float32 sum, without a fill kernel per step)
            part = total.detach().float()
            loss_sum = part if loss_sum is None else loss_sum + part
            if not default_loss:
                counts.append(int(n))
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if not default_loss:
            in_tokens = sum(_input_tokens(b, n) for b, n in zip(micro, counts))
            global_n, global_tok = self._global_counts(sum(counts), in_tokens)
            factor = world / global_n if global_n > 0 else 0.0
            grads = [p.grad for p in self._trainable if p.grad is not None]
            if grads and factor != 1.0:
                torch._foreach_mul_(grads, factor)
        grad_norm = self._clip_and_norm(want_norm)
        lr = self.scheduler.get_last_lr()[0]
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {
            "loss_sum": loss_sum,
            "n": int(round(global_n)),
            "tokens": int(round(global_tok)),
            "grad_norm": grad_norm,
            "lr": lr,
        }

    def _loss_token_counts(self, micro: list[Any]) -> tuple[list[int], int]:
        """Default loss: the counted label tokens of each micro-batch and the input tokens of all of them,
        from the CPU copies (batches without ``labels`` raise the explanatory error)."""
        for b in micro:
            if not isinstance(b, Mapping) or "labels" not in b:
                self._compute_loss(self.model, b, 0.0)  # raises the explanatory error
        if self._ddp is None and not self.is_fsdp:
            for b in micro:
                check_label_range(self.model, b["labels"])
        counts = [count_loss_tokens(b["labels"], self.config.shift_labels) for b in micro]
        return counts, sum(_input_tokens(b, n) for b, n in zip(micro, counts))

    def _clip_and_norm(self, want_norm: bool) -> torch.Tensor | None:
        """Clip the gradients when clipping is on and return their total norm (before clipping); without
        clipping, the norm only when ``want_norm``."""
        clip = self.config.clip_grad_norm
        if clip is not None:
            return torch.nn.utils.clip_grad_norm_(self._trainable, clip)
        if not want_norm:
            return None
        grads = [p.grad for p in self._trainable if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())

    #: most batch-shape signatures captured as CUDA graphs (each keeps its own activation memory)
    MAX_CUDA_GRAPHS = 8

    def _graphed_train_step(self, micro: list[Any]) -> dict[str, Any] | None:
        """:meth:`_train_step` as a replayed CUDA graph (``cuda_graph=True``); None when this batch-shape
        signature is beyond :attr:`MAX_CUDA_GRAPHS` (the step then runs eagerly), or when the capture
        failed under ``cuda_graph="auto"`` (then every later step runs eagerly, and the Trainer says why).

        The loss normalisation ``1 / tokens`` (counted on the host) and the learning rate reach the graph
        through device tensors; everything else in the step is fixed by the shapes."""
        if self.loss_fn is None:
            counts, in_tokens = self._loss_token_counts(micro)
        else:
            counts = [int(self.loss_fn.unit_count(b)) for b in micro]  # type: ignore[attr-defined]
            in_tokens = sum(_input_tokens(b, n) for b, n in zip(micro, counts))
        n_units = sum(counts)
        # the signature from the CPU copies: a batch that runs eagerly is not moved to the device twice
        sig = tuple(
            (f"{i}/{k}", tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else (f"{i}/{k}", type(v))
            for i, b in enumerate(micro) for k, v in b.items()
        )
        captured = self._graphs.get(sig)
        if captured is None:
            if len(self._graphs) >= self.MAX_CUDA_GRAPHS:
                self.optimizer.zero_grad(set_to_none=True)  # gradients may still point at a graph's buffers
                return None
            captured = self._graphs[sig] = CapturedStep(
                functools.partial(self._captured_body, len(micro)), self.optimizer, warmup=2
            )
        flat = {f"{i}/{k}": v for i, b in enumerate(micro) for k, v in _to_device(b, self.device).items()}
        flat["__scale"] = torch.full((), 1.0 / n_units if n_units > 0 else 0.0, dtype=torch.float32, device=self.device)
        if self.loss_fn is not None:  # the units of each micro-batch, to turn its mean loss into a sum
            flat["__n"] = torch.tensor(counts, dtype=torch.float32).to(self.device, non_blocking=True)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.sync_lr()
        captures_now = captured.graph is None and captured.calls >= captured.warmup
        try:
            out = captured(flat)
        except Exception as err:  # noqa: BLE001 - re-raised unless "auto" can fall back
            if not (captures_now and self.config.cuda_graph == "auto"):
                raise
            # nothing of the captured step ran: train this step (and the rest) eagerly
            self._graphs.clear()
            self.optimizer.zero_grad(set_to_none=True)
            self.capture = False
            self.eager_reason = f"capturing the step failed ({type(err).__name__}: {str(err).splitlines()[0]})"
            _say_once(f"Trainer: steps run eagerly (not captured as CUDA graphs): {self.eager_reason}")
            return None
        self.scheduler.step()
        return {"loss_sum": out[0], "n": n_units, "tokens": in_tokens, "grad_norm": out[1], "lr": lr}

    def _captured_body(self, n_micro: int, flat: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One optimiser step on the static batch tensors (the function :class:`CapturedStep` captures):
        returns ``[loss sum, gradient norm]`` as one device tensor."""
        c = self.config
        loss_sum: torch.Tensor | None = None
        for i in range(n_micro):
            prefix = f"{i}/"
            batch = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
            with self._autocast():
                if self.loss_fn is None:
                    total, _ = self._compute_loss(self.model, batch, c.label_smoothing)
                else:  # no host read of n here: the units come in as a device tensor
                    total = self.loss_fn(self.model, batch)[0].float() * flat["__n"][i]
            (total * flat["__scale"]).backward()
            part = total.detach().float()
            loss_sum = part if loss_sum is None else loss_sum + part
        assert loss_sum is not None
        norm = self._clip_and_norm(True)
        assert norm is not None
        self.optimizer.step()
        return torch.stack([loss_sum, norm.float()])

    # ------------------------------------------------------------------ public API
    def train(self, resume_from: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """Run the training loop and return the summary dict.

        ``resume_from`` (default ``config.resume_from``): ``"latest"`` (the newest complete
        checkpoint in ``output_dir``; starts from scratch if there is none) or a checkpoint path.

        The summary holds ``steps``, ``epoch``, ``train_loss`` (token-weighted over this run),
        ``final_loss`` (last logged), ``eval_loss``/``eval_ppl`` (when an eval set is given),
        ``trainable_params``, ``total_params``, ``peak_mem_mb``, ``wall_time_s`` (this run),
        ``elapsed_s`` (all runs), ``tokens``, ``loss_tokens`` and ``tokens_per_s``.
        """
        self._check_open("train")
        try:
            return self._train(resume_from)
        finally:
            if self._logger is not None:
                self._logger.close()
                self._logger = None

    def _train(self, resume_from: str | os.PathLike[str] | None) -> dict[str, Any]:
        c = self.config
        resume_from = resume_from if resume_from is not None else c.resume_from
        if self.is_main and c.output_dir is not None:
            cleanup_stale_checkpoints(c.output_dir)
        barrier(self.dist)
        resumed = False
        if resume_from is not None:
            path = self._resolve_resume(resume_from)
            if path is not None:
                self.load_checkpoint(path)
                resumed = True
        self._open_logger(resume_step=self.state.step if resumed else None)
        first_step = self.state.step
        for cb in self.callbacks:
            cb.on_train_begin(self)

        from tqdm.auto import tqdm

        bar = tqdm(
            total=self.total_steps,
            initial=self.state.step,
            desc="train",
            disable=not (self.is_main and c.progress_bar),
            dynamic_ncols=True,
        )
        t_start = time.perf_counter()
        elapsed0 = self.state.elapsed
        win = {"loss": torch.zeros((), dtype=torch.float64, device=self.device), "n": 0, "tok": 0, "t": t_start}
        run = {"loss": 0.0, "n": 0, "tok": 0}
        peak = 0.0
        last_loss: float | None = None
        last_saved = last_eval = -1
        eval_metrics: dict[str, Any] = {}
        self.model.train()
        reset_peak_memory(self.device)
        try:
            while self.state.step < self.total_steps and not self.should_stop:
                epoch = self.state.epoch
                gen_state = None
                if self._resume_sampler_state is not None and self._resume_sampler_state[0] == epoch:
                    gen_state = self._resume_sampler_state[1]
                sampler = self._train_sampler(epoch, self.state.batches_in_epoch, gen_state)
                self._sampler_state = (epoch, sampler.initial_generator_state)
                iterator = iter(self._loader(self.train_dataset, sampler, c.seed + epoch))
                while self.state.step < self.total_steps and not self.should_stop:
                    micro = list(islice(iterator, c.grad_accum_steps))
                    if not micro:
                        break
                    step_no = self.state.step + 1
                    log_now = step_no % c.log_every == 0 or step_no == self.total_steps
                    out = self._train_step(micro, want_norm=log_now)
                    st = self.state
                    st.step = step_no
                    st.batches_in_epoch += len(micro)
                    epoch_done = st.batches_in_epoch >= self.batches_per_epoch
                    if epoch_done:
                        st.epoch += 1
                        st.batches_in_epoch = 0
                    st.elapsed = elapsed0 + (time.perf_counter() - t_start)
                    st.tokens += out["tokens"]
                    st.loss_tokens += out["n"]
                    # stays on the device (no host read before the next log step); the float32
                    # sum is widened to float64 inside the in-place add, as .double() did
                    win["loss"].add_(out["loss_sum"])
                    win["n"] += out["n"]
                    win["tok"] += out["tokens"]
                    run["n"] += out["n"]
                    run["tok"] += out["tokens"]
                    bar.update(1)
                    if log_now:
                        window_peak = peak_memory_mb(self.device)
                        peak = max(peak, window_peak)
                        last_loss = self._log_train(win, out, run, bar, window_peak)
                        reset_peak_memory(self.device)
                    if c.eval_every and self.eval_dataset is not None and step_no % c.eval_every == 0:
                        eval_metrics = self._evaluate_and_log()
                        last_eval = step_no
                    if c.save_every and step_no % c.save_every == 0:
                        self.save_checkpoint()
                        last_saved = step_no
                    for cb in self.callbacks:
                        cb.on_step_end(self)
                    if epoch_done:
                        break
            if win["n"] > 0:  # stopped early between two log steps: log the rest of the window
                window_peak = peak_memory_mb(self.device)
                peak = max(peak, window_peak)
                last_loss = self._log_train(win, out, run, bar, window_peak)
        finally:
            bar.close()
        if self.eval_dataset is not None and last_eval != self.state.step:
            eval_metrics = self._evaluate_and_log()
        if c.save_final and c.output_dir is not None and last_saved != self.state.step and self.state.step > first_step:
            self.save_checkpoint()
        summary = self._summary(run, t_start, peak, last_loss, eval_metrics)
        if self.is_main and c.output_dir is not None:
            save_json_atomic(summary, Path(c.output_dir) / "train_summary.json")
        for cb in self.callbacks:
            cb.on_train_end(self, summary)
        return summary

    def _log_train(self, win: dict[str, Any], out: dict[str, Any], run: dict[str, Any], bar: Any, peak: float) -> float:
        # the loss sums stay on each rank's device until a log step: one all-reduce here
        loss_sum = float(all_reduce_sum(self.dist, win["loss"].reshape(1))[0])
        run["loss"] += loss_sum
        n, tok = win["n"], win["tok"]
        run["logged_n"] = run.get("logged_n", 0) + n
        now = time.perf_counter()
        dt = max(now - win["t"], 1e-9)
        loss = loss_sum / n if n > 0 else float("nan")
        grad_norm = out["grad_norm"]
        if grad_norm is not None and is_dtensor(grad_norm):
            # FSDP: gathered here, once per log window (not after every step); every rank logs
            grad_norm = grad_norm.full_tensor()
        rec = {
            "split": "train",
            "step": self.state.step,
            "epoch": round(self._epoch_fraction(), 6),
            "loss": loss,
            "lr": out["lr"],
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens": self.state.tokens,
            "loss_tokens": self.state.loss_tokens,
            "tokens_per_s": tok / dt,
            "elapsed": round(self.state.elapsed, 4),
            "peak_mem_mb": round(peak, 2),
        }
        self._log(rec)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{out['lr']:.2e}", refresh=False)
        win["loss"].zero_()
        win["n"] = win["tok"] = 0
        win["t"] = now
        return loss

    def _summary(self, run: dict[str, Any], t_start: float, peak: float, last_loss: float | None, eval_metrics: dict[str, Any]) -> dict[str, Any]:
        wall = time.perf_counter() - t_start
        # train_loss covers the logged steps (the last step is always logged)
        run_loss = run["loss"] / run["logged_n"] if run.get("logged_n") else None
        summary = {
            "steps": self.state.step,
            "epoch": round(self._epoch_fraction(), 6),
            "train_loss": run_loss,
            "final_loss": last_loss,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "peak_mem_mb": round(max(peak, peak_memory_mb(self.device)), 2),
            "wall_time_s": round(wall, 4),
            "elapsed_s": round(self.state.elapsed, 4),
            "tokens": self.state.tokens,
            "loss_tokens": self.state.loss_tokens,
            "tokens_per_s": run["tok"] / wall if wall > 0 else 0.0,
        }
        summary.update(eval_metrics)
        return summary

    def _evaluate_and_log(self) -> dict[str, Any]:
        metrics = self.evaluate()
        self._log(
            {
                "split": "eval",
                "step": self.state.step,
                "epoch": round(self._epoch_fraction(), 6),
                "loss": metrics["eval_loss"],
                "ppl": metrics["eval_ppl"],
                "tokens": metrics["eval_tokens"],
                "elapsed": round(self.state.elapsed, 4),
            }
        )
        for cb in self.callbacks:
            cb.on_evaluate(self, metrics)
        return metrics

    @torch.no_grad()
    def evaluate(self, eval_dataset: Any = None) -> dict[str, Any]:
        """Mean token loss over ``eval_dataset`` (default: the trainer's) on all ranks.

        Returns ``{"eval_loss", "eval_ppl" (= exp(eval_loss)), "eval_tokens"}``. The default loss
        is plain cross-entropy here (no label smoothing). The model's train/eval mode is restored.
        """
        self._check_open("evaluate")
        ds = eval_dataset if eval_dataset is not None else self.eval_dataset
        if ds is None:
            raise DeltaConfigError("evaluate() needs an eval_dataset (given to the Trainer or to evaluate()), got None")
        c = self.config
        bs = c.eval_batch_size or c.batch_size
        own = list(range(self.dist.rank, len(ds), self.dist.world_size))
        batches = [own[i : i + bs] for i in range(0, len(own), bs)]
        n_real = len(batches)
        if self.is_fsdp:
            # every forward of a sharded model is collective: all ranks must run as many batches as
            # rank 0 (which holds the most examples); the extra ones repeat example 0 and are ignored
            most = -(-len(range(0, len(ds), self.dist.world_size)) // bs)
            batches += [[0]] * (most - n_real)
        was_training = self.model.training
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        # unit counts: device tensors (the default loss) are summed on the device and read once
        # after the loop instead of once per batch; host ints (a custom loss_fn) are added here
        n_dev = torch.zeros((), dtype=torch.int64, device=self.device)
        n_total = 0
        try:
            from tqdm.auto import tqdm

            loader = self._loader(ds, batches, c.seed)
            bar = tqdm(loader, desc="eval", leave=False, disable=not (self.is_main and c.progress_bar))
            for i, batch in enumerate(bar):
                if self.loss_fn is None and isinstance(batch, Mapping) and "labels" in batch and self._ddp is None:
                    if not self.is_fsdp:
                        check_label_range(self.model, batch["labels"])
                batch = _to_device(batch, self.device)
                with self._autocast():
                    loss_sum, n = self._compute_loss(self.model, batch, 0.0)
                if i < n_real:
                    total.add_(loss_sum.detach())
                    if isinstance(n, torch.Tensor):
                        n_dev.add_(n.detach().reshape(()).to(n_dev.device, torch.int64))
                    else:
                        n_total += int(n)
        finally:
            self.model.train(was_training)
        n_total += int(n_dev)
        tot = all_reduce_sum(self.dist, torch.stack([total.cpu(), torch.tensor(float(n_total), dtype=torch.float64)]))
        loss_sum, n = float(tot[0]), int(round(float(tot[1])))
        loss = loss_sum / n if n else float("nan")
        try:
            ppl = math.exp(loss)
        except OverflowError:
            ppl = float("inf")
        return {"eval_loss": loss, "eval_ppl": ppl, "eval_tokens": n}

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
