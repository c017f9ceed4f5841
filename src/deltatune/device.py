"""The one device resolver: a device name (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``...)
becomes a :class:`torch.device` that exists on this machine, or a named error before any work.

Model loading (:func:`deltatune.models.load`), the Trainer's process set-up
(:func:`deltatune.train.distributed.init_distributed`) and the task pipelines all resolve devices
here, so ``"auto"`` and the error messages mean the same everywhere. Imports only :mod:`.errors`
and ``torch`` (a low module: anything may import it).
"""

from __future__ import annotations

import torch

from .errors import DeltaConfigError, DeltaConfigTypeError

__all__ = ["resolve_device"]


def _check_local_rank(local_rank: object) -> None:
    if local_rank is None:
        return
    if isinstance(local_rank, bool) or not isinstance(local_rank, int):
        raise DeltaConfigTypeError(f"local_rank must be None or an int >= 0, got {local_rank!r}")
    if local_rank < 0:
        raise DeltaConfigError(f"local_rank must be None or an int >= 0, got {local_rank!r}")


def resolve_device(
    device: str | torch.device, local_rank: int | None = None, *, field: str = "device"
) -> torch.device:
    """Map a device name to an available :class:`torch.device`.

    Args:
        device: ``"auto"`` (CUDA if available, else CPU), any name ``torch.device`` parses (``"cpu"``,
            ``"cuda"``, ``"cuda:1"``, ``"mps"``...) or a ``torch.device``.
        local_rank: this process's GPU under ``torchrun`` (its ``LOCAL_RANK``): ``"auto"`` and a
            ``"cuda"`` without an index become ``cuda:<local_rank>``. ``None`` leaves such a device
            without an index (the current CUDA device). An explicit index always wins.
        field: the name of the setting, used in error messages (e.g. ``"train.device"``).

    Returns:
        The device. CUDA and MPS devices are checked to exist (CUDA: the index is below the device
        count); other device types are returned as ``torch.device`` parses them.

    Raises:
        DeltaConfigTypeError: ``device`` is neither a str nor a torch.device, or ``local_rank`` is not
            an int.
        DeltaConfigError: the name is not a device, or the device does not exist here.
    """
    if not isinstance(device, (str, torch.device)):
        raise DeltaConfigTypeError(f"{field} must be 'auto', a str or a torch.device, got {device!r}")
    _check_local_rank(local_rank)
    if isinstance(device, str) and device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        device = "cuda"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise DeltaConfigError(
            f"{field} must be 'auto' or a torch device such as 'cpu' or 'cuda:0', got {device!r}"
        ) from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeltaConfigError(f"{field} must be an available device, got {device!r} but CUDA is not available")
        if dev.index is None and local_rank is not None:
            dev = torch.device("cuda", local_rank)
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise DeltaConfigError(
                f"{field} must be an available device, got {str(dev)!r} but only {count} CUDA device(s) exist"
            )
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise DeltaConfigError(f"{field} must be an available device, got {device!r} but MPS is not available")
    return dev
