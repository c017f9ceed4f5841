"""LoRA dropout fused into the adapter's A-side matmuls (Triton, CUDA): no dropped copy, no saved mask.

The unfused path (:mod:`deltatune.kernels.lora_autograd`) runs ``torch.native_dropout`` on the adapter input,
keeps the dropped copy and a one-byte mask for the backward and applies the mask again to the input
gradient: three passes over an ``(N, in)`` tensor that the frozen base matmul never needed. Here the keep
mask is a pure function of ``(seed, row, column)``, computed inside the matmul kernels from Philox
(counter-based, 10 rounds, as ``torch.native_dropout``'s CUDA generator):

* forward: ``xa = (x * keep / (1 - p)) @ A^T`` reads ``x`` once and writes only the small ``(N, R)`` product;
* backward: ``dA = dxa^T @ (x * keep / (1 - p))`` (split over row blocks, partial sums added in a fixed
  order: deterministic) and ``dx += (dxa @ A) * keep / (1 - p)`` in place, each regenerating the same mask.

So the backward keeps ``x`` itself (which the rest of the graph usually keeps anyway) and one int64 seed,
instead of a dropped copy and a mask; the step reads and writes about as much memory as without dropout.

The seed is drawn on the device by ``torch.randint`` from the default CUDA generator, so
``torch.manual_seed`` makes runs reproducible, a CUDA-graph replay draws a fresh mask, and
``torch.utils.checkpoint`` (which restores the RNG state) recomputes the same one. The masks differ from
``torch.native_dropout``'s (another stream of the same distribution: each element kept with probability
``1 - p``, to 2^-24; the kept elements are scaled by the inverse of the exact keep probability).

How the mask is drawn is set per process (read at import, so a forward and its backward agree):
``DELTATUNE_DROPOUT_BITS`` (24: one 32-bit Philox number per element; 16: two elements per number, half
the Philox work, ``p`` rounded up to a multiple of 2^-16) and ``DELTATUNE_DROPOUT_ROUNDS`` (Philox rounds,
7 to 10); :class:`RngSetting`.

The kernels are defined only when ``triton`` imports and CUDA is available (or ``TRITON_INTERPRET=1``, the
Triton interpreter on CPU tensors, which the CPU tests use); :func:`usable` says whether a call can take
this path. ``DELTATUNE_TRITON_DROPOUT=0`` turns it off (the unfused path then runs). Imports only torch,
``deltatune.errors`` (and triton).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from ..errors import DeltaConfigError

__all__ = [
    "RNG",
    "TRITON_DROPOUT",
    "TILES",
    "RngSetting",
    "Tile",
    "add_dropped_grad_x",
    "draw_seed",
    "dropped_grad_A",
    "dropped_xa",
    "is_seed",
    "keep_mask",
    "keep_probability",
    "rng_setting",
    "threshold",
    "tiles",
    "usable",
]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

#: whether the Triton kernels are defined in this process (triton importable, and CUDA or the interpreter)
TRITON_DROPOUT: bool = importlib.util.find_spec("triton") is not None and (
    _INTERPRET or torch.cuda.is_available()
)

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BN = 64  # rows per tile of keep_mask
_BK = 64  # input features per tile (a multiple of 8: one Philox call gives 4 numbers, 8 halves)


class Tile(NamedTuple):
    """A kernel's tile: ``rows`` (tokens) x ``cols`` (input features) per program, and its warps."""

    rows: int
    cols: int
    warps: int


def tiles(environ: Mapping[str, str] | None = None) -> dict[str, Tile]:
    """The tiles of the three kernels (``xa``, ``da``, ``dx``): 64 x 64 with 4 warps, or as
    ``DELTATUNE_DROPOUT_TILES`` says (for benchmarks), e.g. ``xa=32x64x4,dx=64x128x8``: rows and columns powers
    of two from 16 (columns from 16, so a tile holds whole Philox groups), warps 1 to 16. The mask does not
    depend on the tiles; the order of the fp32 sums does."""
    env = os.environ if environ is None else environ
    out = {name: Tile(64, 64, 4) for name in ("xa", "da", "dx")}
    spec = env.get("DELTATUNE_DROPOUT_TILES", "").strip()
    for item in filter(None, (i.strip() for i in spec.split(","))):
        name, _, dims = item.partition("=")
        parts = dims.split("x")
        ok = name in out and len(parts) == 3 and all(d.isdigit() for d in parts)
        if ok:
            t = Tile(*(int(d) for d in parts))
            ok = all(v >= 16 and v & (v - 1) == 0 for v in t[:2]) and t.warps in (1, 2, 4, 8, 16)
        if not ok:
            raise DeltaConfigError(
                f"DELTATUNE_DROPOUT_TILES: {item!r} is not KERNEL=ROWSxCOLSxWARPS with KERNEL one of xa, da, dx, "
                "ROWS and COLS powers of two >= 16 and WARPS one of 1, 2, 4, 8, 16"
            )
        out[name] = t
    return out


#: the tiles of this process (read at import)
TILES: dict[str, Tile] = tiles()


class RngSetting(NamedTuple):
    """How the keep mask is drawn: ``bits`` of uniform integer per element (24: one 32-bit Philox number
    per element; 16: two elements per number, half the Philox work, ``p`` rounded up to a multiple of
    2^-16) and Philox ``rounds`` (10 as cuRAND's Philox4x32-10; 7 passes TestU01's BigCrush too, per
    Salmon et al. 2011)."""

    bits: int
    rounds: int


def rng_setting(environ: Mapping[str, str] | None = None) -> RngSetting:
    """The setting named by ``DELTATUNE_DROPOUT_BITS`` (24 or 16, default 24) and
    ``DELTATUNE_DROPOUT_ROUNDS`` (7 to 10, default 10); anything else is a :class:`DeltaConfigError`."""
    env = os.environ if environ is None else environ
    bits = env.get("DELTATUNE_DROPOUT_BITS", "24")
    rounds = env.get("DELTATUNE_DROPOUT_ROUNDS", "10")
    if bits not in ("24", "16"):
        raise DeltaConfigError(f"DELTATUNE_DROPOUT_BITS must be 24 or 16, got {bits!r}")
    if rounds not in ("7", "8", "9", "10"):
        raise DeltaConfigError(f"DELTATUNE_DROPOUT_ROUNDS must be one of 7, 8, 9, 10, got {rounds!r}")
    return RngSetting(int(bits), int(rounds))


#: the setting of this process (read once at import, so a forward and its backward draw the same mask)
RNG: RngSetting = rng_setting()


def threshold(p: float, rng: RngSetting | None = None) -> int:
    """The integer an element's uniform ``bits``-bit number must reach to be kept: ``ceil(p * 2^bits)``."""
    return math.ceil(p * (1 << (rng or RNG).bits))


def keep_probability(p: float, rng: RngSetting | None = None) -> float:
    """The exact probability that an element is kept for dropout ``p`` (``1 - threshold / 2^bits``); the
    kernels scale kept elements by its inverse, so the expectation is unchanged."""
    rng = rng or RNG
    return 1.0 - threshold(p, rng) / (1 << rng.bits)

if TRITON_DROPOUT:
    import triton
    import triton.language as tl

    @triton.jit
    def _keep_tile(seed, rows, k0, K, thr, BN: tl.constexpr, BK: tl.constexpr, BITS: tl.constexpr,
                   ROUNDS: tl.constexpr):
        """The (BN, BK) keep mask of rows ``rows`` and columns ``k0 .. k0+BK``: element (n, k) is kept when its
        ``BITS``-bit uniform integer is at least ``thr``. BITS 24: number ``k % 4`` of Philox counter
        ``n * ceil(K/4) + k // 4``, its top 24 bits. BITS 16: half ``k % 2`` (low, high) of number
        ``(k // 2) % 4`` of counter ``n * ceil(K/8) + k // 8`` (two elements per 32-bit number: half the
        Philox work)."""
        PER: tl.constexpr = 4 if BITS == 24 else 8
        KG = (K + PER - 1) // PER
        groups = k0 // PER + tl.arange(0, BK // PER)
        ctr = rows.to(tl.int64)[:, None] * KG + groups[None, :]
        r0, r1, r2, r3 = tl.randint4x(seed, ctr, ROUNDS)
        r = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BN, BK * 4 // PER))  # numbers in column order
        if BITS == 24:
            return (r >> 8).to(tl.int32) >= thr
        h = tl.reshape(tl.join(r & 0xFFFF, r >> 16), (BN, BK))
        return h.to(tl.int32) >= thr

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        """``a @ b`` accumulated in float32; exact float32 products (no TF32) for float32 inputs."""
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _xa_kernel(x_ptr, a_ptr, out_ptr, seed_ptr, N, K, R, thr, scale,
                   sxn, sak, sar, son,
                   BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, IEEE: tl.constexpr,
                   BITS: tl.constexpr, ROUNDS: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BN + tl.arange(0, BN)
        rr = tl.arange(0, BR)
        seed = tl.load(seed_ptr)
        acc = tl.zeros((BN, BR), dtype=tl.float32)
        for k0 in range(0, K, BK):
            cols = k0 + tl.arange(0, BK)
            xm = (rows[:, None] < N) & (cols[None, :] < K)
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * sxn + cols[None, :], mask=xm, other=0.0)
            keep = _keep_tile(seed, rows, k0, K, thr, BN, BK, BITS, ROUNDS)
            x = tl.where(keep, x, tl.zeros_like(x))
            am = (cols[:, None] < K) & (rr[None, :] < R)
            a = tl.load(a_ptr + cols[:, None] * sak + rr[None, :] * sar, mask=am, other=0.0)
            acc += _dot(x, a, IEEE)
        acc = acc * scale
        om = (rows[:, None] < N) & (rr[None, :] < R)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * son + rr[None, :], acc.to(out_ptr.dtype.element_ty), mask=om)

    @triton.jit
    def _da_kernel(dxa_ptr, x_ptr, part_ptr, seed_ptr, N, K, R, thr, scale, rows_per,
                   sdn, sxn,
                   BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, IEEE: tl.constexpr,
                   BITS: tl.constexpr, ROUNDS: tl.constexpr):
        pk = tl.program_id(0)
        ps = tl.program_id(1)
        cols = pk * BK + tl.arange(0, BK)
        rr = tl.arange(0, BR)
        seed = tl.load(seed_ptr)
        acc = tl.zeros((BR, BK), dtype=tl.float32)
        start = ps * rows_per
        for n0 in range(start, start + rows_per, BN):
            rows = n0 + tl.arange(0, BN)
            rm = rows < N
            g = tl.load(dxa_ptr + rows[:, None].to(tl.int64) * sdn + rr[None, :],
                        mask=rm[:, None] & (rr[None, :] < R), other=0.0)
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * sxn + cols[None, :],
                        mask=rm[:, None] & (cols[None, :] < K), other=0.0)
            keep = _keep_tile(seed, rows, pk * BK, K, thr, BN, BK, BITS, ROUNDS)
            x = tl.where(keep, x, tl.zeros_like(x))
            acc += _dot(tl.trans(g), x, IEEE)
        acc = acc * scale
        out = part_ptr + ps.to(tl.int64) * R * K + rr[:, None] * K + cols[None, :]
        tl.store(out, acc, mask=(rr[:, None] < R) & (cols[None, :] < K))

    @triton.jit
    def _dx_kernel(dx_ptr, dxa_ptr, a_ptr, seed_ptr, N, K, R, thr, scale,
                   sdxn, sdn, sak, sar,
                   BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, IEEE: tl.constexpr,
                   BITS: tl.constexpr, ROUNDS: tl.constexpr):
        pn = tl.program_id(0)
        pk = tl.program_id(1)
        rows = pn * BN + tl.arange(0, BN)
        cols = pk * BK + tl.arange(0, BK)
        rr = tl.arange(0, BR)
        seed = tl.load(seed_ptr)
        g = tl.load(dxa_ptr + rows[:, None].to(tl.int64) * sdn + rr[None, :],
                    mask=(rows[:, None] < N) & (rr[None, :] < R), other=0.0)
        a = tl.load(a_ptr + rr[:, None] * sar + cols[None, :] * sak,
                    mask=(rr[:, None] < R) & (cols[None, :] < K), other=0.0)
        t = _dot(g, a, IEEE)
        keep = _keep_tile(seed, rows, pk * BK, K, thr, BN, BK, BITS, ROUNDS)
        t = tl.where(keep, t * scale, tl.zeros_like(t))
        m = (rows[:, None] < N) & (cols[None, :] < K)
        ptrs = dx_ptr + rows[:, None].to(tl.int64) * sdxn + cols[None, :]
        dx = tl.load(ptrs, mask=m, other=0.0).to(tl.float32)
        tl.store(ptrs, (dx + t).to(dx_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _mask_kernel(out_ptr, seed_ptr, N, K, thr, BN: tl.constexpr, BK: tl.constexpr, BITS: tl.constexpr,
                     ROUNDS: tl.constexpr):
        pn = tl.program_id(0)
        pk = tl.program_id(1)
        rows = pn * BN + tl.arange(0, BN)
        cols = pk * BK + tl.arange(0, BK)
        keep = _keep_tile(tl.load(seed_ptr), rows, pk * BK, K, thr, BN, BK, BITS, ROUNDS)
        m = (rows[:, None] < N) & (cols[None, :] < K)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], keep.to(tl.int8), mask=m)


def usable(x: Tensor, cdt: torch.dtype) -> bool:
    """Whether a dropout call on ``x`` (compute dtype ``cdt``) can take the fused path: the kernels are
    defined, ``DELTATUNE_TRITON_DROPOUT`` is not ``0``, ``x`` is on CUDA (any device under the interpreter),
    ``cdt`` is float16, bfloat16 or float32, and no ``torch.compile`` trace is running."""
    if not TRITON_DROPOUT or os.environ.get("DELTATUNE_TRITON_DROPOUT", "1") == "0":
        return False
    if not (x.is_cuda or _INTERPRET) or cdt not in _DTYPES:
        return False
    return not torch.compiler.is_compiling()


def draw_seed(device: torch.device) -> Tensor:
    """A fresh mask seed, an int64 scalar tensor drawn on ``device`` from its default generator (no host
    round trip; captured CUDA graphs draw a new one at every replay)."""
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)


def is_seed(t: Tensor) -> bool:
    """Whether ``t`` (a saved "mask" of the LoRA kernels) is a seed of :func:`draw_seed` rather than a keep-mask
    (masks are bool or uint8)."""
    return t.dtype == torch.int64


@functools.cache
def _row_splits_target(device: torch.device) -> int:
    """Programs the ``dA`` kernel aims for on ``device``: four per multiprocessor on CUDA (read once per
    device, not in every backward), 8 under the interpreter."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def _rng_args(rng: RngSetting | None) -> dict[str, int]:
    rng = rng or RNG
    return {"BITS": rng.bits, "ROUNDS": rng.rounds}


def _br(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def dropped_xa(x2: Tensor, A: Tensor, seed: Tensor, p: float, rng: RngSetting | None = None) -> Tensor:
    """``(x2 * keep / q) @ A^T`` for a row-major ``(N, K)`` ``x2`` and ``(R, K)`` ``A`` of one dtype,
    in that dtype (fp32 accumulation); ``q = keep_probability(p, rng)``, ``rng`` defaults to :data:`RNG`."""
    N, K = x2.shape
    R = A.shape[0]
    out = x2.new_empty((N, R))
    t = TILES["xa"]
    _xa_kernel[(triton.cdiv(N, t.rows),)](
        x2, A, out, seed, N, K, R, threshold(p, rng), 1.0 / keep_probability(p, rng),
        x2.stride(0), A.stride(1), A.stride(0), out.stride(0),
        BN=t.rows, BK=t.cols, BR=_br(R), IEEE=x2.dtype == torch.float32, num_warps=t.warps, **_rng_args(rng),
    )
    return out


def dropped_grad_A(dxa: Tensor, x2: Tensor, seed: Tensor, p: float, rng: RngSetting | None = None) -> Tensor:
    """``dxa^T @ (x2 * keep / q)``, ``(R, K)`` in float32: row blocks are split over enough programs
    to fill the device, and their partial sums are added in a fixed order (deterministic)."""
    N, K = x2.shape
    R = dxa.shape[1]
    t = TILES["da"]
    col_blocks = triton.cdiv(K, t.cols)
    row_blocks = triton.cdiv(N, t.rows)
    target = _row_splits_target(x2.device)
    splits = max(1, min(row_blocks, triton.cdiv(target, col_blocks)))
    rows_per = triton.cdiv(row_blocks, splits) * t.rows
    splits = triton.cdiv(N, rows_per)
    part = torch.empty((splits, R, K), device=x2.device, dtype=torch.float32)
    _da_kernel[(col_blocks, splits)](
        dxa, x2, part, seed, N, K, R, threshold(p, rng), 1.0 / keep_probability(p, rng), rows_per,
        dxa.stride(0), x2.stride(0),
        BN=t.rows, BK=t.cols, BR=_br(R), IEEE=x2.dtype == torch.float32, num_warps=t.warps, **_rng_args(rng),
    )
    return part[0] if splits == 1 else part.sum(0)


def add_dropped_grad_x(dx: Tensor, dxa: Tensor, A: Tensor, seed: Tensor, p: float, rng: RngSetting | None = None) -> Tensor:
    """``dx += (dxa @ A) * keep / q`` in place (``dx`` row-major ``(N, K)``); returns ``dx``."""
    N, K = dx.shape
    R = A.shape[0]
    t = TILES["dx"]
    _dx_kernel[(triton.cdiv(N, t.rows), triton.cdiv(K, t.cols))](
        dx, dxa, A, seed, N, K, R, threshold(p, rng), 1.0 / keep_probability(p, rng),
        dx.stride(0), dxa.stride(0), A.stride(1), A.stride(0),
        BN=t.rows, BK=t.cols, BR=_br(R), IEEE=dx.dtype == torch.float32, num_warps=t.warps, **_rng_args(rng),
    )
    return dx


def keep_mask(n_rows: int, n_cols: int, seed: Tensor, p: float, rng: RngSetting | None = None) -> Tensor:
    """The bool ``(n_rows, n_cols)`` keep mask the kernels use for ``seed`` (for tests and checks)."""
    out = torch.empty((n_rows, n_cols), device=seed.device, dtype=torch.int8)
    _mask_kernel[(triton.cdiv(n_rows, _BN), triton.cdiv(n_cols, _BK))](
        out, seed, n_rows, n_cols, threshold(p, rng), BN=_BN, BK=_BK, **_rng_args(rng)
    )
    return out.bool()
