"""The generic training loop: :class:`Trainer`, its callbacks (:class:`TrainerCallback`) and :func:`set_seed`.

It trains the ``requires_grad`` parameters of any ``torch.nn.Module`` (a delta method froze the
rest) on a map-style dataset. See :class:`Trainer` for the loss, accumulation, checkpoint and
resume semantics. This module owns the Trainer's construction (argument checks, distributed set-up,
fused kernels, optimiser and schedule), the training loop with its logging and summary, and
``close``; the Trainer's other methods live in its parts, mixed into the class: one optimiser step
(:mod:`.step`), evaluation (:mod:`.evaluation`) and checkpoints (:mod:`.trainer_checkpoints`).
"""

from __future__ import annotations

import gc
import logging
import os
import random
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..errors import DeltaConfigError, DeltaConfigTypeError, DeltaError
from .config import TrainConfig
from .cuda_graph import CapturedStep
from .distributed import (
    DistContext,
    EpochBatchSampler,
    all_reduce_sum,
    barrier,
    init_distributed,
)
from .evaluation import EvalMixin
from .fsdp import is_dtensor
from .fused import apply_fused_kernels
from .logging import MetricsLogger, peak_memory_mb, reset_peak_memory
from .losses import PadCollator, check_lm_examples
from .optim import AdamW, param_groups
from .resume import (
    cleanup_stale_checkpoints,
    load_trainable_params,
    save_json_atomic,
    save_trainable_params,
)
from .schedules import build_scheduler, resolve_warmup_steps
from .state import TrainState
from .step import LossFn, StepMixin, _say_once, capturable_loss
from .trainer_checkpoints import CheckpointMixin

__all__ = ["LossFn", "TrainState", "Trainer", "TrainerCallback", "set_seed"]

logger = logging.getLogger("deltatune.train")


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


class Trainer(StepMixin, EvalMixin, CheckpointMixin):
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
            checkpoint; default :func:`~deltatune.train.resume.save_trainable_params` /
            :func:`~deltatune.train.resume.load_trainable_params` (``delta.safetensors``).

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
        #: ``cuda_graph="auto"``: the step times measured on the first batch shape, then the decision
        self._auto_times: dict[str, Any] | None = None

        probe = self._train_sampler(0, 0)
        self.batches_per_epoch = probe.batches_per_epoch
        self.steps_per_epoch = -(-self.batches_per_epoch // config.grad_accum_steps)
        self.total_steps = config.max_steps if config.max_steps is not None else config.epochs * self.steps_per_epoch
        self.warmup_steps = resolve_warmup_steps(config.warmup_steps, config.warmup_ratio, self.total_steps)
        self.scheduler = build_scheduler(self.optimizer, config.scheduler, self.warmup_steps, self.total_steps)
        self.scaler = torch.amp.GradScaler("cuda") if config.mixed_precision == "fp16" else None

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
