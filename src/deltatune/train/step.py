"""One optimiser step of :class:`~deltatune.train.Trainer`: the loss, the eager step and the captured step.

:class:`StepMixin` holds the Trainer's methods that turn a list of CPU micro-batches into one optimiser
step: the default causal-LM loss (or a ``loss_fn``) with its unit counts taken from the CPU batches, the
gradient accumulation and normalisation, clipping, the AdamW and scheduler steps, and the same step
captured once per batch shape in a CUDA graph (:class:`~deltatune.train.CapturedStep`) and replayed.
Also here: the batch helpers the other Trainer modules share (:func:`_to_device`, :func:`_input_tokens`)
and the once-only log line (:func:`_say_once`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import DeltaConfigError
from .config import TrainConfig
from .cuda_graph import CapturedStep
from .distributed import all_reduce_sum
from .losses import (
    check_label_range,
    chunked_head,
    count_loss_tokens,
    lm_loss_sum,
)

__all__ = ["LossFn", "StepMixin", "capturable_loss", "capture_is_faster"]

LossFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, int | torch.Tensor]"]
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


#: ``cuda_graph="auto"`` times this many eager steps (after the first, which pays one-time costs) and this
#: many replays (after the one inside the capture call) of the first batch shape, then keeps the faster
AUTO_EAGER_SAMPLES = 2
AUTO_REPLAY_SAMPLES = 3


def capture_is_faster(eager_s: list[float], replay_s: list[float]) -> bool:
    """Whether the captured step is the faster one: its best replay time against the best eager step time
    (best, not mean: one-time costs and other processes only ever add time). Ties keep the capture."""
    if not eager_s or not replay_s:
        raise ValueError(f"need eager and replay times, got {len(eager_s)} and {len(replay_s)}")
    return min(replay_s) <= min(eager_s)


def _timed_call(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """``fn()`` and its wall time in seconds with the device synchronised before and after."""
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


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


class StepMixin:
    """The Trainer's step methods (mixed into :class:`~deltatune.train.Trainer`, which sets the attributes
    they read: ``config``, ``model``, ``device``, ``dist``, ``optimizer``, ``scheduler``, ...)."""

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


    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        mp = self.config.mixed_precision
        if mp == "no":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if mp == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)


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
            measure = self.config.cuda_graph == "auto" and self._auto_times is None
            captured = self._graphs[sig] = CapturedStep(
                functools.partial(self._captured_body, len(micro)), self.optimizer,
                warmup=1 + AUTO_EAGER_SAMPLES if measure else 2,
            )
            if measure:  # the first batch shape decides, by measurement, whether capturing pays
                self._auto_times = {"sig": sig, "eager": [], "replay": []}
        flat = {f"{i}/{k}": v for i, b in enumerate(micro) for k, v in _to_device(b, self.device).items()}
        flat["__scale"] = torch.full((), 1.0 / n_units if n_units > 0 else 0.0, dtype=torch.float32, device=self.device)
        if self.loss_fn is not None:  # the units of each micro-batch, to turn its mean loss into a sum
            flat["__n"] = torch.tensor(counts, dtype=torch.float32).to(self.device, non_blocking=True)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.sync_lr()
        captures_now = captured.graph is None and captured.calls >= captured.warmup
        times = self._auto_times
        kind = None
        if times is not None and times.get("sig") == sig:
            if captured.graph is None and 1 <= captured.calls < captured.warmup:
                kind = "eager"  # an eager warm-up call after the first
            elif captured.graph is not None:
                kind = "replay"
        try:
            if kind is None:
                out = captured(flat)
            else:
                out, seconds = _timed_call(lambda: captured(flat), self.device)
                times[kind].append(seconds)
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
        if kind == "replay" and len(times["replay"]) >= AUTO_REPLAY_SAMPLES:
            self._decide_capture(times)
        return {"loss_sum": out[0], "n": n_units, "tokens": in_tokens, "grad_norm": out[1], "lr": lr}

    def _decide_capture(self, times: dict[str, Any]) -> None:
        """``cuda_graph="auto"``: keep the captured steps if they measured faster, else run eagerly from the
        next step on, saying so once (a large model can be faster eager: the 1B shape of issue 18 ran 14%
        faster eager than captured on an H100; why is not known)."""
        eager, replay = times["eager"], times["replay"]
        self._auto_times = {"eager": eager, "replay": replay, "captured": capture_is_faster(eager, replay)}
        if self._auto_times["captured"]:
            return
        self._graphs.clear()
        self.optimizer.zero_grad(set_to_none=True)  # gradients may still point at a graph's buffers
        self.capture = False
        self.eager_reason = (
            f"eager steps measured faster than captured ones ({min(eager) * 1e3:.1f} ms against "
            f"{min(replay) * 1e3:.1f} ms per step)"
        )
        _say_once(f"Trainer: steps run eagerly (not captured as CUDA graphs): {self.eager_reason}",
                  level=logging.INFO)

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
