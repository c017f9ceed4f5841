"""A whole training step (forward, backward, optimiser step) captured once in a CUDA graph and replayed.

At small and medium model sizes a LoRA step is bound by the host: Python, operator dispatch and
autograd bookkeeping of thousands of small operations per step, while the GPU waits. Capturing the
step once and replaying it removes all of that: one ``cudaGraphLaunch`` per step. What a captured
step needs, and what :class:`CapturedStep` checks or arranges:

* **static shapes and addresses**: every call passes tensors of the shapes, dtypes and devices it was
  captured with; they are copied into static buffers before each replay (a batch of another shape
  raises :class:`~deltatune.errors.DeltaConfigError`; keep one ``CapturedStep`` per shape);
* **no host reads** of device values inside the step (``.item()``, ``bool(tensor)``, data-dependent
  shapes): capture fails on them with the CUDA error naming the operation;
* **randomness from the default CUDA generator** (``torch.nn.functional.dropout``, deltatune's LoRA
  dropout): every replay draws fresh numbers, as eager steps do;
* **a capturable optimiser** (``torch.optim.Adam``/``AdamW`` with ``capturable=True``, fused or not);
  refused with an error otherwise, because a non-capturable optimiser keeps its step count on the
  host and every replay would apply the first step's bias correction;
* **gradients assigned, not accumulated**: gradients are set to None before the capture, so the
  captured backward writes fresh gradients on every replay.

The first ``warmup`` calls run eagerly on a side stream (they are real training steps on the batches
passed in: cuBLAS, autograd and the optimiser state are initialised there); the next call captures and
then replays. Like eager steps, replays are asynchronous: the returned loss is a device tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..errors import DeltaConfigError
from ..validation import check_int, check_type

__all__ = ["CapturedStep", "optimizer_is_capturable"]


def optimizer_is_capturable(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every parameter group of ``optimizer`` declares ``capturable=True``."""
    return bool(optimizer.param_groups) and all(g.get("capturable", False) for g in optimizer.param_groups)


class CapturedStep:
    """Run ``step_fn(batch)`` as a CUDA graph: eager for ``warmup`` calls, then captured once and replayed.

    ``step_fn`` performs one complete training step on the mapping of tensors it is given (forward,
    ``loss.backward()``, optional gradient clipping, ``optimizer.step()``) and returns the loss as a
    tensor. It must not zero or read the gradients itself.

    Example::

        opt = torch.optim.AdamW(params, lr=1e-4, fused=True, capturable=True)

        def step(batch):
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            return loss.detach()

        graphed = CapturedStep(step, opt)
        for batch in loader:            # every batch with the same shapes
            loss = graphed(batch)       # a device tensor; read it when you log

    Args:
        step_fn: the training step.
        optimizer: the optimiser ``step_fn`` steps (must be capturable; its parameters' gradients are set
            to None before the capture).
        warmup: eager calls before the capture (at least 1; the optimiser state must exist).
    """

    def __init__(
        self,
        step_fn: Callable[[Mapping[str, Tensor]], Tensor],
        optimizer: torch.optim.Optimizer,
        *,
        warmup: int = 3,
    ) -> None:
        if not callable(step_fn):
            raise DeltaConfigError(f"step_fn must be callable, got {type(step_fn).__name__}")
        check_type("optimizer", optimizer, torch.optim.Optimizer, "a torch.optim.Optimizer")
        self.warmup = check_int("warmup", warmup, minimum=1)
        if not optimizer_is_capturable(optimizer):
            raise DeltaConfigError(
                f"optimizer {type(optimizer).__name__} must be built with capturable=True to be captured in a "
                "CUDA graph (a non-capturable optimiser keeps its step count on the host, so every replay "
                "would repeat the first step's update)"
            )
        self.step_fn = step_fn
        self.optimizer = optimizer
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self._static: dict[str, Tensor] = {}
        self._signature: dict[str, tuple] = {}
        self._loss: Tensor | None = None
        self._stream: torch.cuda.Stream | None = None

    @staticmethod
    def _sig(t: Tensor) -> tuple:
        return (tuple(t.shape), t.dtype, t.device)

    def _check_batch(self, batch: Mapping[str, Tensor]) -> None:
        if not isinstance(batch, Mapping):
            raise DeltaConfigError(f"batch must be a mapping of name -> tensor, got {type(batch).__name__}")
        for k, v in batch.items():
            if not isinstance(v, Tensor):
                raise DeltaConfigError(f"batch[{k!r}] must be a tensor, got {type(v).__name__}")
            if not v.is_cuda:
                raise DeltaConfigError(f"batch[{k!r}] must be a CUDA tensor to be captured, got device {v.device}")
        if self._signature:
            sig = {k: self._sig(v) for k, v in batch.items()}
            if sig != self._signature:
                raise DeltaConfigError(
                    f"batch shapes {_describe(sig)} differ from the captured ones {_describe(self._signature)}; "
                    "a CUDA graph replays fixed shapes (pad batches to one shape, or keep one CapturedStep per shape)"
                )

    def __call__(self, batch: Mapping[str, Tensor]) -> Tensor:
        """One training step on ``batch``; returns the loss (a device tensor owned by the caller)."""
        self._check_batch(batch)
        self.calls += 1
        if self.graph is not None:
            for k, v in batch.items():
                self._static[k].copy_(v, non_blocking=True)
            self.graph.replay()
            assert self._loss is not None
            return self._loss.clone()
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        stream = self._stream
        if self.calls <= self.warmup:  # eager, on a side stream (what capture requires of warm-up work)
            stream.wait_stream(torch.cuda.current_stream())
            self.optimizer.zero_grad(set_to_none=True)  # another graph's replay may have left gradients
            with torch.cuda.stream(stream):
                loss = self.step_fn(batch)
                self.optimizer.zero_grad(set_to_none=True)
            torch.cuda.current_stream().wait_stream(stream)
            return loss
        self._signature = {k: self._sig(v) for k, v in batch.items()}
        self._static = {k: v.clone() for k, v in batch.items()}
        self.optimizer.zero_grad(set_to_none=True)  # the captured backward assigns fresh gradients
        torch.cuda.current_stream().synchronize()
        graph = torch.cuda.CUDAGraph()
        rng = _cuda_rng_states()
        try:
            with torch.cuda.graph(graph, stream=stream):
                loss = self.step_fn(self._static)
        except BaseException:
            # A capture that fails leaves the device's random generator in capture mode (CUDA's end of
            # capture raised before the generator was told the capture ended), so every later random
            # op (dropout, randint) would raise "Offset increment outside graph capture": give the
            # generator back the state it had before the capture.
            _restore_cuda_rng_states(rng)
            self._signature = {}
            self._static = {}
            raise
        if not isinstance(loss, Tensor):
            raise DeltaConfigError(f"step_fn must return the loss as a tensor, got {type(loss).__name__}")
        self._loss = loss.detach()
        self.graph = graph
        graph.replay()  # capture records the work without running it
        return self._loss.clone()


def _cuda_rng_states() -> list[tuple[torch.Generator, Any]]:
    """A detached copy of each CUDA default generator's state (``Generator.clone_state``)."""
    gens = getattr(torch.cuda, "default_generators", ())
    return [(g, g.clone_state()) for g in gens if hasattr(g, "clone_state")]


def _restore_cuda_rng_states(states: list[tuple[torch.Generator, Any]]) -> None:
    for gen, state in states:
        gen.graphsafe_set_state(state)


def _describe(sig: dict[str, tuple]) -> str:
    return "{" + ", ".join(f"{k}: {tuple(s[0])} {str(s[1]).removeprefix('torch.')}" for k, s in sig.items()) + "}"
