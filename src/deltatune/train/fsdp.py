"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for delta training: shard the frozen base,
train the delta, and write checkpoints with the full (unsharded) delta tensors.

:func:`shard_model` calls ``fully_shard`` on every transformer block (found generically, see
:func:`find_block_modules`) and then on the root module, with a ``MixedPrecisionPolicy`` built
from the training precision (:func:`mixed_precision_policy`). After that every parameter of the
model is a ``DTensor`` sharded on dim 0 over the ranks; a rank may hold an empty (shape ``[0,
...]``) piece of a small parameter, which is why nothing here ever writes a local shard:

* :func:`full_parameters` is a context manager that gathers chosen parameters
  (``DTensor.full_tensor()``, a collective every rank must enter) and swaps them into the model
  as plain parameters for the duration of the block, on rank 0 only (saving) or on every rank
  with the values written back into the shards on exit (loading). Any ``save_fn``/``load_fn``
  written for a single-process model — :func:`deltatune.checkpoint.save_delta` /
  :func:`~deltatune.checkpoint.load_delta` included — then works unchanged on a sharded one.
* :func:`full_optimizer_state_dict` / :func:`shard_optimizer_state_dict` convert the optimizer's
  sharded state to the full tensors of a single-process ``state_dict()`` and back.
* :func:`save_delta_sharded` is ``save_delta`` for a sharded model (collective; rank 0 writes).

Frozen and trainable parameters may share one FSDP unit (FSDP2 reduce-scatters only the
gradients of parameters that require them).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import CheckpointError, DeltaConfigError

__all__ = [
    "BLOCK_SUFFIXES",
    "checkpoint_param_names",
    "find_block_modules",
    "full_optimizer_state_dict",
    "full_parameters",
    "is_dtensor",
    "is_sharded",
    "mixed_precision_policy",
    "reshard_all",
    "run_on_rank0",
    "save_delta_sharded",
    "shard_model",
    "shard_optimizer_state_dict",
]

#: Class-name endings that mark a repeated transformer block inside a ``ModuleList``.
BLOCK_SUFFIXES = ("DecoderLayer", "EncoderLayer", "Block", "Layer")


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (a sharded FSDP2 parameter)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(t, DTensor)


def is_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``model`` or to one of its submodules."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def reshard_all(model: nn.Module) -> None:
    """Return every FSDP unit of ``model`` to its sharded state (after an eval forward, the root
    unit keeps its parameters gathered until the next forward)."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


# ---------------------------------------------------------------------------- sharding
def _is_delta_layer(module: nn.Module) -> bool:
    from ..methods.base import DeltaLayer

    return isinstance(module, DeltaLayer)


def find_block_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The transformer blocks of ``model`` (``(name, module)``, outermost only, in order).

    A block is a module whose class is named in ``_no_split_modules`` (set by transformers, e.g.
    ``["LlamaDecoderLayer"]``) of the model or a submodule; when nothing matches that, a direct
    child of an ``nn.ModuleList`` whose class name ends in one of :data:`BLOCK_SUFFIXES`.
    deltatune's own wrapper layers are never blocks. Blocks nested inside a chosen block are
    skipped (the outer one becomes the FSDP unit).
    """
    named = list(model.named_modules())
    no_split: set[str] = set()
    for _, m in named:
        names = getattr(m, "_no_split_modules", None)
        if isinstance(names, (list, tuple, set)):
            no_split.update(str(n) for n in names)

    def select(pred: Any) -> list[tuple[str, nn.Module]]:
        out: list[tuple[str, nn.Module]] = []
        for name, m in named:
            if not name or _is_delta_layer(m) or not pred(name, m):
                continue
            if any(name.startswith(f"{outer}.") for outer, _ in out):
                continue
            out.append((name, m))
        return out

    if no_split:
        found = select(lambda _n, m: type(m).__name__ in no_split)
        if found:
            return found
    list_children: set[int] = set()
    for _, m in named:
        if isinstance(m, nn.ModuleList):
            list_children.update(id(c) for c in m)
    return select(lambda _n, m: id(m) in list_children and type(m).__name__.endswith(BLOCK_SUFFIXES))


def mixed_precision_policy(mixed_precision: str, device: torch.device) -> Any:
    """The ``MixedPrecisionPolicy`` for ``TrainConfig.mixed_precision`` on ``device``.

    ``"bf16"`` on CUDA: parameters all-gathered and computed in bfloat16, gradients reduced in
    float32 (the sharded master weights keep their own dtype). Everything else (``"no"``, or any
    setting on CPU, where Gloo runs): no casting, so fp32 stays fp32 (CPU bf16 autocast still
    applies in the trainer, as in a single process).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mixed_precision == "fp16":
        raise DeltaConfigError(
            "mixed_precision='fp16' is not supported with distributed='fsdp' (its GradScaler is not "
            "shard-aware); use 'bf16' or 'no'"
        )
    if mixed_precision == "bf16" and device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def _check_uniform_grad_dtype(unit_name: str, params: Iterable[nn.Parameter], cast: torch.dtype | None) -> None:
    """FSDP2 reduce-scatters the gradients of one unit in one buffer: they must share a dtype."""
    if cast is not None:
        return
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params if p.requires_grad})
    if len(dtypes) > 1:
        raise DeltaConfigError(
            f"FSDP unit {unit_name or '<root>'!r} has trainable parameters of several dtypes {dtypes}; "
            "FSDP2 reduces a unit's gradients in one buffer. Use mixed_precision='bf16' on CUDA "
            "(one compute dtype) or give the trainable parameters one dtype"
        )


def _self_contained(model: nn.Module, blocks: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Drop blocks that share a parameter with a module outside them (tied weights across units):
    FSDP2 would shard such a parameter twice and silently untie it. They stay in the root unit."""
    holders: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(p), []).append(name)
    kept = []
    for name, block in blocks:
        prefix = f"{name}."
        if all(h.startswith(prefix) for p in block.parameters() for h in holders.get(id(p), [])):
            kept.append((name, block))
    return kept


def shard_model(
    model: nn.Module,
    *,
    device: torch.device,
    mixed_precision: str = "no",
    blocks: list[tuple[str, nn.Module]] | None = None,
) -> list[str]:
    """Apply FSDP2 to ``model`` in place: ``fully_shard`` each block, then the root.

    The default process group must exist (one mesh dimension over all ranks). Call this after
    activation checkpointing was switched on and after the delta method was applied (sharding
    replaces every parameter by a ``DTensor``; build the optimizer afterwards). ``blocks``
    defaults to :func:`find_block_modules`; a block that shares a parameter with a module outside
    it (tied weights) is left to the root unit. Returns the names of the units (``""`` = root).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise DeltaConfigError("shard_model needs an initialised default process group (launch with torchrun)")
    if is_sharded(model):
        raise DeltaConfigError(f"{type(model).__name__} is already sharded with fully_shard")
    policy = mixed_precision_policy(mixed_precision, device)
    blocks = find_block_modules(model) if blocks is None else blocks
    blocks = _self_contained(model, blocks)
    in_block: set[int] = set()
    for name, block in blocks:
        params = list(block.parameters())
        _check_uniform_grad_dtype(name, params, policy.param_dtype)
        in_block.update(id(p) for p in params)
    _check_uniform_grad_dtype("", [p for p in model.parameters() if id(p) not in in_block], policy.param_dtype)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for _, block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return [name for name, _ in blocks] + [""]


# ---------------------------------------------------------------------------- gathering
def checkpoint_param_names(model: nn.Module) -> list[str]:
    """Parameters a checkpoint needs: every ``requires_grad`` parameter, plus the delta tensors of
    every deltatune adapter on ``model`` (inactive adapters are frozen but still saved)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    from ..methods.base import get_records

    records = get_records(model)
    if records:
        from ..checkpoint import delta_parameter_names

        params = dict(model.named_parameters())
        for adapter in records:
            names.extend(n for n in delta_parameter_names(model, adapter).values() if n in params)
    return list(dict.fromkeys(names))


def _slots(model: nn.Module, names: Iterable[str]) -> list[tuple[str, nn.Parameter, list[tuple[nn.Module, str]]]]:
    """Unique parameters named in ``names`` (first name, parameter, every (module, attribute)
    that holds it)."""
    holders: list[tuple[str, nn.Module, str, nn.Parameter]] = []
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            if param is not None:
                holders.append((f"{mod_name}.{attr}" if mod_name else attr, module, attr, param))
    wanted = set(names)
    missing = sorted(wanted - {h[0] for h in holders})
    if missing:
        raise CheckpointError(f"no parameter named {missing[:5]} in {type(model).__name__}")
    ids = {id(param) for name, _, _, param in holders if name in wanted}
    found: dict[int, tuple[str, nn.Parameter, list[tuple[nn.Module, str]]]] = {}
    for name, module, attr, param in holders:
        if id(param) in ids:
            entry = found.setdefault(id(param), (name, param, []))
            if not any(m is module and a == attr for m, a in entry[2]):
                entry[2].append((module, attr))
    return list(found.values())


@torch.no_grad()
def _gather(param: nn.Parameter, name: str, device: torch.device | None) -> torch.Tensor:
    full = param.full_tensor() if is_dtensor(param) else param.detach()
    if tuple(full.shape) != tuple(param.shape) or (full.numel() == 0 and param.numel() != 0):
        raise CheckpointError(
            f"gathering parameter {name!r} gave shape {tuple(full.shape)}, expected {tuple(param.shape)}"
        )
    if full.numel() == 0:
        raise CheckpointError(f"parameter {name!r} is empty (shape {tuple(full.shape)}); refusing to checkpoint it")
    full = full.detach()
    if device is not None:
        full = full.to(device)
    local = param.to_local() if is_dtensor(param) else param
    # never alias the parameter's own storage (one rank: the "gathered" tensor may be the shard)
    return full.clone() if full.untyped_storage().data_ptr() == local.untyped_storage().data_ptr() else full


@contextlib.contextmanager
def full_parameters(
    model: nn.Module,
    names: Iterable[str] | None = None,
    *,
    rank0_only: bool = True,
    writeback: bool = False,
    device: torch.device | str | None = "cpu",
) -> Iterator[nn.Module]:
    """Swap the full (unsharded) values of parameters ``names`` into ``model`` for a block.

    Every rank must enter (each ``full_tensor()`` is an all-gather). ``names`` defaults to
    :func:`checkpoint_param_names`. Inside the block the named parameters are plain
    ``nn.Parameter`` tensors of their global shape (on ``device``; ``None`` = where they are)
    on rank 0, or on every rank with ``rank0_only=False``; the other parameters stay sharded.
    With ``writeback=True`` (needs ``rank0_only=False``) the values the block left in the full
    tensors are copied back into each rank's shard on exit (loading a checkpoint). A model that
    is not sharded is yielded as it is (for ``writeback`` nothing needs copying). A gathered
    tensor that comes back empty or with the wrong shape raises :class:`CheckpointError`.
    """
    if writeback and rank0_only:
        raise DeltaConfigError("full_parameters(writeback=True) needs rank0_only=False (every rank loads)")
    if not is_sharded(model):
        yield model
        return
    from torch.distributed.tensor import distribute_tensor

    reshard_all(model)
    names = checkpoint_param_names(model) if names is None else list(names)
    keep = not rank0_only or dist.get_rank() == 0
    dev = torch.device(device) if device is not None else None
    swapped: list[tuple[nn.Parameter, nn.Parameter, list[tuple[nn.Module, str]]]] = []
    slots = _slots(model, names)
    try:
        for name, param, holders in slots:
            full = _gather(param, name, dev if keep else None)
            if not keep:
                continue
            new = nn.Parameter(full, requires_grad=param.requires_grad)
            for module, attr in holders:
                module._parameters[attr] = new
            swapped.append((param, new, holders))
        yield model
        if writeback:
            with torch.no_grad():
                for param, new, _ in swapped:
                    if not is_dtensor(param):
                        param.copy_(new.detach())
                        continue
                    value = new.detach().to(device=param.device, dtype=param.dtype)
                    shard = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
                    param.copy_(shard)
    finally:
        for param, _, holders in swapped:
            for module, attr in holders:
                module._parameters[attr] = param


# ---------------------------------------------------------------------------- optimizer state
def _ordered_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


@torch.no_grad()
def full_optimizer_state_dict(optimizer: torch.optim.Optimizer, device: torch.device | str = "cpu") -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded state tensor gathered to its full shape.

    Collective (every rank must call it, in the same order); every rank gets the result (only
    rank 0 needs to write it). The result has the layout of a single-process optimizer.
    """
    sd = optimizer.state_dict()
    out_state: dict[Any, dict[str, Any]] = {}
    for idx in sorted(sd["state"], key=int):
        entry = {}
        for key in sorted(sd["state"][idx]):
            value = sd["state"][idx][key]
            if is_dtensor(value):
                value = value.full_tensor().to(device)
                if value.numel() == 0:
                    raise CheckpointError(f"optimizer state {key!r} of parameter #{idx} gathered empty")
            elif isinstance(value, torch.Tensor):
                value = value.detach().to(device)
            entry[key] = value
        out_state[idx] = entry
    return {"state": out_state, "param_groups": sd["param_groups"]}


def shard_optimizer_state_dict(optimizer: torch.optim.Optimizer, full: dict[str, Any]) -> dict[str, Any]:
    """Undo :func:`full_optimizer_state_dict` for this rank: every state tensor of a sharded
    parameter's full shape becomes a ``DTensor`` shard like the parameter (no communication:
    every rank holds the full state). Pass the result to ``optimizer.load_state_dict``."""
    from torch.distributed.tensor import distribute_tensor

    params = _ordered_params(optimizer)
    state = full.get("state", {})
    out_state: dict[Any, dict[str, Any]] = {}
    for idx, entry in state.items():
        i = int(idx)
        if i >= len(params):
            raise CheckpointError(f"optimizer state names parameter #{i}, but the optimizer has {len(params)}")
        p = params[i]
        new = {}
        for key, value in entry.items():
            if is_dtensor(p) and isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(p.shape):
                value = distribute_tensor(
                    value.to(device=p.device), p.device_mesh, p.placements, src_data_rank=None
                )
            new[key] = value
        out_state[idx] = new
    return {"state": out_state, "param_groups": full["param_groups"]}


# ---------------------------------------------------------------------------- delta export
def save_delta_sharded(
    model: nn.Module, directory: str | os.PathLike[str], adapter_name: str | None = None
) -> Path | None:
    """:func:`deltatune.checkpoint.save_delta` for a model sharded with FSDP2.

    Collective: every rank must call it; the adapter's tensors are gathered to their full shape
    and rank 0 writes the usual ``delta.safetensors`` + ``delta_config.json`` (loadable with
    ``load_delta`` on one process). Returns the directory on rank 0, ``None`` elsewhere. On a
    model that is not sharded it simply calls ``save_delta`` (on rank 0 when a process group
    exists).
    """
    from ..checkpoint import save_delta

    out: list[Path | None] = [None]

    def write() -> None:
        out[0] = save_delta(model, directory, adapter_name)

    with full_parameters(model, rank0_only=True):
        run_on_rank0(write)
    return out[0]


def run_on_rank0(fn: Any, *, distributed: bool | None = None) -> None:
    """Call ``fn()`` on rank 0 only; every rank returns once it is done, and if it raised, every
    rank raises (rank 0 re-raises the original exception, the others a :class:`CheckpointError`
    naming it), so that no rank is left waiting in a later collective. Without a process group
    (or with ``distributed=False``) ``fn`` is simply called; ``None`` = whether one exists."""
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized()
    if not distributed:
        fn()
        return
    error: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - re-raised below after telling the other ranks
            error = exc
    box = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[0] is not None:
        raise CheckpointError(f"rank 0 failed while writing: {box[0]}")
