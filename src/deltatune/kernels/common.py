"""What the LoRA kernels share: the compute dtype, cheap casts, and dropout masks (seeded or drawn by
``torch.native_dropout``) with their one-bit-per-element packing (CPU) for the backward, and matmuls that
write a gradient in its parameter's dtype (:func:`mm_in`).

Imports only :mod:`deltatune.validation` and torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..validation import check_float, check_int

__all__ = [
    "cast",
    "compute_dtype",
    "drop",
    "dropout_mask",
    "mm_in",
    "pack_mask",
    "saved_mask",
    "seeded_mask",
    "undrop",
    "unpack_mask",
]


def dropout_mask(
    shape: Sequence[int] | torch.Size, p: float, seed: int, device: torch.device | str
) -> Tensor:
    """Keep-mask (bool, True = keep) of inverted dropout with drop probability ``p``, reproducible from ``seed``.

    The same ``(shape, p, seed, device)`` always gives the same mask; the kernels use it for calls with an
    explicit ``seed`` (without one they draw with ``torch.native_dropout``). Each element is kept with
    probability ``1 - p`` (``torch.rand(...) >= p`` with a private generator seeded by ``seed``).
    """
    check_float("p", p, low=0.0, high=1.0, high_inclusive=False)
    check_int("seed", seed, minimum=0)
    return seeded_mask(shape, p, seed, device)


def seeded_mask(shape: Sequence[int] | torch.Size, p: float, seed: int, device: torch.device | str) -> Tensor:
    """:func:`dropout_mask` without the argument checks (the kernels' own calls)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.rand(tuple(shape), generator=gen, device=device, dtype=torch.float32) >= p


def drop(x2: Tensor, p: float, seed: int | None) -> tuple[Tensor, Tensor]:
    """``(drop(x2), keep-mask)`` of inverted dropout: ``torch.native_dropout`` on the default generator, or
    the :func:`dropout_mask` of an explicit ``seed``."""
    if seed is None:
        return torch.native_dropout(x2, p, True)
    mask = seeded_mask(x2.shape, p, seed, x2.device)
    return x2.mul(mask).mul_(1.0 / (1.0 - p)), mask


def undrop(g: Tensor, mask: Tensor, p: float) -> Tensor:
    """Gradient through inverted dropout: ``g * mask / (1 - p)`` (one fused kernel)."""
    return torch.ops.aten.native_dropout_backward(g, mask, 1.0 / (1.0 - p))


_BIT_WEIGHTS: dict[torch.device, Tensor] = {}


def _bit_weights(device: torch.device) -> Tensor:
    """``[1, 2, 4, ..., 128]`` as uint8 on ``device``, made once per device (so that no host-to-device copy
    happens inside a CUDA graph capture after the first, eager, call)."""
    if torch.compiler.is_compiling():  # a constant of the traced graph (no side effect on the cache)
        return _new_bit_weights(device)
    w = _BIT_WEIGHTS.get(device)
    if w is None:
        w = _BIT_WEIGHTS[device] = _new_bit_weights(device)
    return w


def _new_bit_weights(device: torch.device) -> Tensor:
    return torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=device)


def pack_mask(mask: Tensor) -> Tensor:
    """A bool ``(..., n)`` mask packed to uint8 ``(..., n / 8)``, one bit per element (little-endian within a
    byte); returned unchanged when ``n`` is not a multiple of 8. :func:`unpack_mask` inverts it."""
    n = mask.shape[-1]
    if n % 8:
        return mask
    bits = mask.reshape(*mask.shape[:-1], n // 8, 8).view(torch.uint8)
    return torch.sum(bits * _bit_weights(mask.device), dim=-1, dtype=torch.uint8)


def saved_mask(mask: Tensor) -> Tensor:
    """The keep-mask as the LoRA kernels save it for the backward: packed to bits (:func:`pack_mask`) on the
    CPU, where memory is what is short, and kept as one byte per element on CUDA, where packing and
    unpacking cost a sixth of a SmolLM2-shape training step (the H100 profile of 2026-12-07: a reduce, a
    multiply, an ``and`` and a compare over every masked element) for about 2 GiB at 16 x 1024 tokens.
    :func:`unpack_mask` reads either."""
    return mask if mask.is_cuda else pack_mask(mask)


def unpack_mask(packed: Tensor) -> Tensor:
    """The bool mask :func:`pack_mask` packed (a bool tensor is returned unchanged)."""
    if packed.dtype == torch.bool:
        return packed
    bits = torch.bitwise_and(packed.unsqueeze(-1), _bit_weights(packed.device)).ne_(0).view(torch.bool)
    return bits.reshape(*packed.shape[:-1], packed.shape[-1] * 8)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype matmuls on ``x`` run in: the autocast dtype when autocast is on for its device, else ``x.dtype``."""
    dev = x.device.type
    try:
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
    except (RuntimeError, TypeError):  # device type without autocast support
        pass
    return x.dtype


def cast(t: Tensor, cdt: torch.dtype) -> Tensor:
    """``t.to(cdt)`` without the dispatcher round trip when ``t`` already has that dtype."""
    return t if t.dtype == cdt else t.to(cdt)


def _has_out_dtype_mm() -> bool:
    """Whether this torch build has CUDA kernels for ``mm``/``addmm`` with ``out_dtype`` (a half-precision
    product written as float32 by the matmul itself)."""
    try:
        has = torch._C._dispatch_has_kernel_for_dispatch_key
        return bool(has("aten::mm.dtype", "CUDA") and has("aten::addmm.dtype", "CUDA"))
    except (AttributeError, RuntimeError):
        return False


_OUT_DTYPE_MM = _has_out_dtype_mm()


def mm_in(dtype: torch.dtype, a: Tensor, b: Tensor, alpha: float = 1.0) -> Tensor:
    """``alpha * a @ b`` returned in ``dtype`` (the gradient of a parameter in the parameter's own dtype).

    On CUDA, for float16/bfloat16 inputs and a float32 ``dtype``, one matmul accumulates in float32 and writes
    float32 (``out_dtype``): no cast kernel, and no rounding to half precision on the way. Elsewhere the
    product is computed in the inputs' dtype, scaled inside the same matmul, then cast (as before)."""
    if dtype == torch.float32 and a.dtype != dtype and a.is_cuda and _OUT_DTYPE_MM:
        if alpha == 1.0:
            return torch.mm(a, b, out_dtype=dtype)
        return torch.addmm(a.new_empty((a.shape[0], b.shape[1]), dtype=dtype), a, b, beta=0, alpha=alpha,
                           out_dtype=dtype)
    if alpha == 1.0:
        return cast(torch.mm(a, b), dtype)
    return cast(torch.addmm(a.new_empty((a.shape[0], b.shape[1])), a, b, beta=0, alpha=alpha), dtype)
