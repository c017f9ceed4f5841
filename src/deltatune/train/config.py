"""Training configuration: :class:`TrainConfig`, validated strictly before any work starts."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import DeltaConfigError, DeltaConfigTypeError
from ..validation import check_bool, check_choice, check_float, check_int, check_known_keys, check_type

__all__ = ["TrainConfig", "SCHEDULERS", "MIXED_PRECISION", "DISTRIBUTED", "FUSED_KERNELS"]

SCHEDULERS = ("linear", "cosine", "constant")
MIXED_PRECISION = ("no", "bf16", "fp16")
DISTRIBUTED = ("none", "ddp", "fsdp")
FUSED_KERNELS = ("auto", "liger", "torch", "compile", "none")


def _optional_int(name: str, value: Any, minimum: int) -> int | None:
    return None if value is None else check_int(name, value, minimum=minimum)


@dataclass
class TrainConfig:
    """Everything the :class:`~deltatune.train.Trainer` needs to know, validated on construction.

    Optimiser: ``lr``, ``weight_decay`` (decoupled, AdamW-style; never applied to biases, 1-D
    parameters or parameters of normalisation layers), ``adam_betas``, ``adam_eps`` and
    ``bias_correction`` (``False`` drops Adam's ``1 - beta**t`` corrections).

    Schedule: ``scheduler`` in ``"linear"``, ``"cosine"``, ``"constant"`` with ``warmup_steps``
    *or* ``warmup_ratio`` (fraction of the total optimiser steps, rounded up); see
    :func:`deltatune.train.schedules.lr_factor` for the formulas.

    Length: ``epochs`` (default 1), or ``max_steps`` (optimiser steps) which, when given, wins.

    Batching: ``batch_size`` is per process and per micro-batch; one optimiser step consumes
    ``batch_size * grad_accum_steps * world_size`` examples. ``eval_batch_size`` defaults to
    ``batch_size``.

    Loss: ``label_smoothing`` (training only; evaluation reports plain cross-entropy so that
    perplexity means what it says) and ``shift_labels`` (causal LM: token ``t`` predicts label
    ``t+1``; set ``False`` when the labels are already aligned with the logits).

    Precision and placement: ``mixed_precision`` (``"no"``, ``"bf16"``, ``"fp16"``; fp16 needs CUDA
    and uses a ``GradScaler``; bf16 autocast also works on CPU), ``device`` (``"auto"``, ``"cpu"``,
    ``"cuda"``, ``"cuda:N"``), ``gradient_checkpointing`` (calls
    ``model.gradient_checkpointing_enable()`` when the model has it), ``distributed``
    (``"none"``; ``"ddp"``: DistributedDataParallel under ``torchrun``; ``"fsdp"``: the model,
    frozen base included, sharded with FSDP2 ``fully_shard`` per transformer block under
    ``torchrun``, see :mod:`deltatune.train.fsdp`; ``"fsdp"`` takes ``mixed_precision`` ``"no"``
    or ``"bf16"``).

    Cadence (in optimiser steps; 0 = never): ``eval_every``, ``save_every``; ``log_every`` >= 1.
    ``save_final`` writes a checkpoint at the end of training (needs ``output_dir``).

    Files: ``output_dir`` (None = nothing is written; logs stay in ``Trainer.log_history``),
    ``keep_last_checkpoints`` (None = keep all), ``resume_from`` (None, ``"latest"`` or a checkpoint
    directory), ``tensorboard`` (write TensorBoard events when the package is importable).

    Speed: ``cuda_graph`` (``"auto"``, the default, ``True`` or ``False``) captures each optimiser step
    (forward and backward of every micro-batch, clipping, the AdamW update) in a CUDA graph per
    batch-shape signature and replays it (:class:`~deltatune.train.CapturedStep`). ``True`` needs a CUDA
    device, one process, ``mixed_precision`` ``"no"`` or ``"bf16"`` and the default loss or a
    ``loss_fn`` with a ``unit_count(batch)`` method; ``"auto"`` captures when all of that holds and
    otherwise trains eagerly and says once why (log ``deltatune.train``); it also times two eager steps
    and three replays of the first batch shape and keeps the faster (``Trainer.eager_reason`` says when
    eager won: large models can be faster eager). Pad batches to few shapes (e.g.
    :class:`~deltatune.train.PadCollator` ``pad_to_multiple_of``): at most
    ``Trainer.MAX_CUDA_GRAPHS`` shapes are captured, others run eagerly. ``fused_kernels``
    (``"auto"``, ``"liger"``, ``"torch"``, ``"compile"``, ``"none"``) fuses the elementwise work of
    Llama-style blocks (RMSNorm, rotary embeddings, SwiGLU; :func:`deltatune.train.fuse_llama`):
    ``"liger"`` with liger-kernel's Triton kernels (CUDA), ``"torch"`` with the pure-PyTorch versions of
    the same functions, ``"compile"`` with :func:`~deltatune.train.compile_blocks` (not captured);
    ``"auto"`` fuses models with Llama blocks only: ``"liger"`` on CUDA where Triton and liger-kernel
    are there, the pure-torch SwiGLU alone on the CPU (``"torch-swiglu"``: bitwise the unfused
    training, one activation less kept per block), else ``"none"``.

    Other: ``seed``, ``shuffle`` (training data order; a deterministic function of seed and epoch),
    ``num_workers`` (DataLoader workers), ``progress_bar``.
    """

    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    bias_correction: bool = True
    scheduler: str = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8
    eval_batch_size: int | None = None
    grad_accum_steps: int = 1
    max_grad_norm: float | None = 1.0
    label_smoothing: float = 0.0
    shift_labels: bool = True
    mixed_precision: str = "no"
    device: str = "auto"
    eval_every: int = 0
    save_every: int = 0
    save_final: bool = True
    log_every: int = 10
    seed: int = 42
    shuffle: bool = True
    num_workers: int = 0
    output_dir: str | None = None
    keep_last_checkpoints: int | None = None
    gradient_checkpointing: bool = False
    distributed: str = "none"
    resume_from: str | None = None
    tensorboard: bool = True
    progress_bar: bool = True
    cuda_graph: bool | str = "auto"
    fused_kernels: str = "auto"

    def __post_init__(self) -> None:
        self.lr = check_float("lr", self.lr, low=0.0, low_inclusive=False)
        self.weight_decay = check_float("weight_decay", self.weight_decay, low=0.0)
        betas = self.adam_betas
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise DeltaConfigTypeError(
                f"adam_betas must be a pair (beta1, beta2) of numbers in [0, 1), got {betas!r}"
            )
        self.adam_betas = (
            check_float("adam_betas[0]", betas[0], low=0.0, high=1.0, high_inclusive=False),
            check_float("adam_betas[1]", betas[1], low=0.0, high=1.0, high_inclusive=False),
        )
        self.adam_eps = check_float("adam_eps", self.adam_eps, low=0.0, low_inclusive=False)
        check_bool("bias_correction", self.bias_correction)
        check_choice("scheduler", self.scheduler, SCHEDULERS)
        check_int("warmup_steps", self.warmup_steps, minimum=0)
        self.warmup_ratio = check_float("warmup_ratio", self.warmup_ratio, low=0.0, high=1.0, high_inclusive=False)
        if self.warmup_steps > 0 and self.warmup_ratio > 0:
            raise DeltaConfigError(
                f"warmup_steps and warmup_ratio are exclusive: give one of them, got "
                f"warmup_steps={self.warmup_steps} and warmup_ratio={self.warmup_ratio}"
            )
        check_int("epochs", self.epochs, minimum=1)
        _optional_int("max_steps", self.max_steps, 1)
        check_int("batch_size", self.batch_size, minimum=1)
        _optional_int("eval_batch_size", self.eval_batch_size, 1)
        check_int("grad_accum_steps", self.grad_accum_steps, minimum=1)
        if self.max_grad_norm is not None:
            self.max_grad_norm = check_float("max_grad_norm", self.max_grad_norm, low=0.0)
        self.label_smoothing = check_float(
            "label_smoothing", self.label_smoothing, low=0.0, high=1.0, high_inclusive=False
        )
        check_bool("shift_labels", self.shift_labels)
        if self.mixed_precision is False:  # YAML 1.1 reads an unquoted `no` as false
            self.mixed_precision = "no"
        check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        check_type("device", self.device, str, "a str ('auto', 'cpu', 'cuda' or 'cuda:N')")
        dev = self.device
        if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise DeltaConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {dev!r}")
        check_int("eval_every", self.eval_every, minimum=0)
        check_int("save_every", self.save_every, minimum=0)
        check_bool("save_final", self.save_final)
        check_int("log_every", self.log_every, minimum=1)
        check_int("seed", self.seed, minimum=0)
        check_bool("shuffle", self.shuffle)
        check_int("num_workers", self.num_workers, minimum=0)
        if self.output_dir is not None:
            check_type("output_dir", self.output_dir, (str, os.PathLike), "None or a directory path")
            self.output_dir = os.fspath(self.output_dir)
            if not self.output_dir:
                raise DeltaConfigError("output_dir must be None or a non-empty directory path, got ''")
        _optional_int("keep_last_checkpoints", self.keep_last_checkpoints, 1)
        check_bool("gradient_checkpointing", self.gradient_checkpointing)
        check_choice("distributed", self.distributed, DISTRIBUTED)
        if self.distributed == "fsdp" and self.mixed_precision == "fp16":
            raise DeltaConfigError(
                "mixed_precision='fp16' is not supported with distributed='fsdp' (its GradScaler is not "
                "shard-aware); use 'bf16' or 'no'"
            )
        if self.resume_from is not None:
            check_type("resume_from", self.resume_from, (str, os.PathLike), "None, 'latest' or a checkpoint path")
            self.resume_from = os.fspath(self.resume_from)
        check_bool("tensorboard", self.tensorboard)
        check_bool("progress_bar", self.progress_bar)
        if not (self.cuda_graph is True or self.cuda_graph is False or self.cuda_graph == "auto"):
            raise DeltaConfigTypeError(f"cuda_graph must be a bool or 'auto', got {self.cuda_graph!r}")
        check_choice("fused_kernels", self.fused_kernels, FUSED_KERNELS)
        if self.cuda_graph is True and self.fused_kernels == "compile":
            raise DeltaConfigError(
                "cuda_graph=True does not take fused_kernels='compile' (capturing compiled blocks fails with "
                "cudaErrorStreamCaptureInvalidated); use fused_kernels 'liger' or 'torch', or cuda_graph 'auto'"
            )
        if self.cuda_graph is True and self.distributed != "none":
            raise DeltaConfigError(
                f"cuda_graph=True runs in one process; got distributed={self.distributed!r} (use 'none')"
            )
        if self.cuda_graph is True and self.mixed_precision == "fp16":
            raise DeltaConfigError(
                "cuda_graph=True does not take mixed_precision='fp16' (its GradScaler reads the gradients' "
                "finiteness on the host every step); use 'bf16' or 'no'"
            )
        if self.output_dir is None:
            if self.save_every > 0:
                raise DeltaConfigError(
                    f"save_every={self.save_every} needs output_dir (a directory path), got output_dir=None"
                )
            if self.resume_from == "latest":
                raise DeltaConfigError("resume_from='latest' needs output_dir (a directory path), got None")

    # ------------------------------------------------------------------ helpers
    @property
    def clip_grad_norm(self) -> float | None:
        """The clipping threshold, or ``None`` when clipping is off (``max_grad_norm`` None or 0)."""
        return self.max_grad_norm if self.max_grad_norm else None

    def check_cuda_graph_device(self) -> None:
        """Raise :class:`DeltaConfigError` when ``cuda_graph`` is on and ``device`` does not resolve to a CUDA
        device (callers run this before any work; the Trainer runs it too)."""
        if self.cuda_graph is not True:
            return
        from .distributed import resolve_device

        device = resolve_device(self.device)
        if device.type != "cuda":
            raise DeltaConfigError(
                f"cuda_graph=True needs a CUDA device, got device {str(device)!r}; set cuda_graph to false"
            )

    def may_capture(self) -> bool:
        """Whether steps may be captured as CUDA graphs: ``cuda_graph`` True, or ``"auto"`` on a CUDA device
        in one process without fp16 (then batches should come in few shapes)."""
        if self.cuda_graph != "auto":
            return bool(self.cuda_graph)
        from .distributed import resolve_device

        return (
            resolve_device(self.device).type == "cuda"
            and self.distributed == "none"
            and self.mixed_precision != "fp16"
            and self.fused_kernels != "compile"
        )

    @classmethod
    def known_keys(cls) -> list[str]:
        """Names accepted by :meth:`from_dict`."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """Build from a mapping (e.g. a YAML recipe); unknown keys raise ``DeltaConfigError``."""
        if not isinstance(d, Mapping):
            raise DeltaConfigTypeError(f"TrainConfig.from_dict needs a mapping, got {d!r} ({type(d).__name__})")
        check_known_keys("TrainConfig", d, cls.known_keys())
        kwargs = dict(d)
        if isinstance(kwargs.get("adam_betas"), list):
            kwargs["adam_betas"] = tuple(kwargs["adam_betas"])
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-able dict that :meth:`from_dict` accepts."""
        out = {k: getattr(self, k) for k in self.known_keys()}
        out["adam_betas"] = list(self.adam_betas)
        return out
