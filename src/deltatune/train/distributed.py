"""Process-group set-up and deterministic data sharding.

Under ``torchrun`` (environment ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) :func:`init_distributed`
joins the default process group (NCCL on CUDA, Gloo on CPU); its device comes from
:func:`deltatune.device.resolve_device` (re-exported here) with the process's ``LOCAL_RANK``.
:class:`EpochBatchSampler` produces the batches of one epoch as a pure function of (seed, epoch,
rank, world size), so that runs are reproducible and resumable mid-epoch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..device import resolve_device
from ..errors import DeltaConfigError

__all__ = [
    "DistContext",
    "EpochBatchSampler",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "init_distributed",
    "resolve_device",
]


@dataclass
class DistContext:
    """Where this process stands: ``rank``/``world_size``/``local_rank`` and its ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    enabled: bool = False
    created_group: bool = False

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the process that logs and writes files)."""
        return self.rank == 0

    def close(self) -> None:
        """Destroy the process group if :func:`init_distributed` created it."""
        if self.created_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
            self.created_group = False


def init_distributed(mode: str, device: str = "auto") -> DistContext:
    """Return the :class:`DistContext` for ``mode`` (``"none"``, ``"ddp"`` or ``"fsdp"``).

    For ``"ddp"`` and ``"fsdp"`` the environment of ``torchrun`` must be set; the default process
    group is created (NCCL on CUDA, Gloo on CPU) unless one already exists.
    """
    if mode == "none":
        return DistContext(device=resolve_device(device, 0))
    if mode not in ("ddp", "fsdp"):
        raise DeltaConfigError(f"distributed must be one of 'none', 'ddp', 'fsdp', got {mode!r}")
    missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k not in os.environ]
    if missing and not (dist.is_available() and dist.is_initialized()):
        raise DeltaConfigError(
            f"distributed={mode!r} needs a torchrun launch (environment {', '.join(missing)} not set); "
            "run with `torchrun --nproc_per_node N script.py` or use distributed='none'"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        created = True
    return DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=dev,
        enabled=True,
        created_group=created,
    )


def _comm_device(ctx: DistContext) -> torch.device:
    return ctx.device if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(ctx: DistContext, values: list[float] | torch.Tensor) -> torch.Tensor:
    """Sum ``values`` over all ranks (float64); returns a CPU tensor. A no-op copy without DDP."""
    t = values.detach().to(torch.float64) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.float64)
    if not ctx.enabled:
        return t.cpu()
    t = t.to(_comm_device(ctx))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu()


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op without DDP)."""
    if ctx.enabled:
        dist.barrier()


def broadcast_object(ctx: DistContext, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (no-op without DDP)."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class EpochBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of one epoch, sharded over ranks, starting at batch ``start_batch``.

    The epoch's order is ``torch.randperm(n)`` under a generator seeded with ``seed + epoch`` (or
    ``range(n)`` without ``shuffle``), padded by wrapping around to a multiple of ``world_size``;
    rank ``r`` takes every ``world_size``-th index from ``r``, in batches of ``batch_size`` (the
    last one may be short). So the union over ranks of batch ``t`` is exactly batch ``t`` of a
    single process with ``batch_size * world_size``. ``generator_state`` (the state before the
    permutation) may replace the seed, to restore a saved sampler exactly.
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        *,
        seed: int,
        epoch: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
        generator_state: torch.Tensor | None = None,
    ) -> None:
        if num_examples < 1:
            raise DeltaConfigError(f"the dataset must hold at least one example, got {num_examples}")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.start_batch = start_batch
        gen = torch.Generator()
        gen.manual_seed(seed + epoch)
        if generator_state is not None:
            gen.set_state(generator_state)
        self.initial_generator_state = gen.get_state()
        order = torch.randperm(num_examples, generator=gen) if shuffle else torch.arange(num_examples)
        total = -(-num_examples // world_size) * world_size
        if total > num_examples:
            order = torch.cat([order, order.repeat(-(-total // num_examples))[: total - num_examples]])
        self._indices: list[int] = order[rank::world_size].tolist()
        self.batches_per_epoch = -(-len(self._indices) // batch_size)
        if start_batch > self.batches_per_epoch:
            raise DeltaConfigError(
                f"start_batch must be <= {self.batches_per_epoch} (batches per epoch), got {start_batch}"
            )

    def __iter__(self) -> Iterator[list[int]]:
        b = self.batch_size
        for i in range(self.start_batch, self.batches_per_epoch):
            yield self._indices[i * b : (i + 1) * b]

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch
