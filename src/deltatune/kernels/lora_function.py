"""Memory-lean LoRA forward/backward as one ``torch.autograd.Function``.

``y = x @ W^T + b + scaling * (drop(x) @ A^T) @ B^T`` with a frozen base ``W`` (and ``b``) and trainable
adapters ``A`` (r, in) and ``B`` (out, r).

What the backward keeps (per token, ``in`` = input features, ``R`` = total LoRA rank, ``s`` = bytes per
element of the compute dtype):

* without dropout: the input ``x`` once, in the compute dtype: ``in * s`` bytes (it is needed for ``dA``);
* with dropout: the dropped input ``drop(x)`` **instead of** ``x`` (``in * s`` bytes; ``x`` itself is not
  needed, the frozen base matmul keeps nothing) and the keep-mask packed to one bit per element
  (``in / 8`` bytes; a bool mask, ``in`` bytes, when ``in`` is not a multiple of 8), so dropout costs
  an eighth of a byte per input element. (A naive ``lora_B(lora_A(dropout(x)))`` after a base layer
  that saved ``x`` keeps ``x``, the dropped copy *and* a 1-byte mask.)
* the small product ``xa = drop(x) @ A^T``: ``R * s`` bytes (needed for ``dB``);
* references to ``W``, ``A``, ``B`` (parameters: no extra memory). ``W`` is never saved as a cast copy; if
  its dtype differs from the compute dtype it is re-cast in the backward.

No weight gradient of ``W`` is computed. Adapter matmuls run in the activation (compute) dtype: ``A`` and
``B`` are cast down to it (they are small), ``x`` is never upcast; gradients of ``A``/``B`` come back in
the parameters' own dtype (so fp32 master adapters work with bf16 activations).

Compute dtype: the ``torch.autocast`` dtype of ``x``'s device when autocast is enabled there, else
``x.dtype``. The casts are explicit, so the Function does not depend on autocast being active in the
backward (this replaces ``torch.amp.custom_fwd``/``custom_bwd``, whose ``device_type`` is fixed when
the class is defined and would tie the Function to one device type).

Saving ``xa`` versus recomputing it in the backward: saving costs ``R/in`` of the saved ``x``
(16/4096 = 0.4% for a Llama-7B projection) and recomputing costs an extra ``N*in*R`` matmul in every
backward; ``benchmarks/bench_kernels.py`` measures the recompute variant as slower, so ``xa`` is saved.

Dropout randomness: unless ``seed`` is passed, the mask is drawn by ``torch.native_dropout`` (one fused
kernel, what ``torch.nn.functional.dropout`` runs) from the default generator of ``x``'s device. So
``torch.manual_seed`` makes runs reproducible, ``torch.utils.checkpoint`` (which restores the CPU and
CUDA RNG states before recomputing) regenerates exactly the same mask, the call needs no host
round trip (it can be captured in a CUDA graph, where every replay draws a fresh mask, and traced by
``torch.compile`` without a graph break). With an explicit ``seed`` the mask is
:func:`dropout_mask` ``(shape, p, seed, device)`` (a private generator; such calls run outside
``torch.compile`` graphs). Grouped variants (:func:`lora_linear_multi`, :func:`lora_merged_linear`,
:func:`fused_lora_A`) apply **one** mask to the shared input, as loralib's ``MergedLinear`` does (PEFT
draws an independent mask per projection; the distribution of each projection's update is the same).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DeltaConfigError, DeltaConfigTypeError
from ..validation import check_bool, check_float, check_int, check_type

__all__ = [
    "dropout_mask",
    "fused_lora_A",
    "lora_linear",
    "lora_linear_multi",
    "lora_merged_linear",
    "pack_mask",
    "unpack_mask",
]

# ----------------------------------------------------------------------------------------------------------
# dropout
# ----------------------------------------------------------------------------------------------------------
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
    return _mask(shape, p, seed, device)


def _mask(shape: Sequence[int] | torch.Size, p: float, seed: int, device: torch.device | str) -> Tensor:
    """:func:`dropout_mask` without the argument checks (the kernels' own calls)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.rand(tuple(shape), generator=gen, device=device, dtype=torch.float32) >= p


def _drop(x2: Tensor, p: float, seed: int | None) -> tuple[Tensor, Tensor]:
    """``(drop(x2), keep-mask)`` of inverted dropout: ``torch.native_dropout`` on the default generator, or
    the :func:`dropout_mask` of an explicit ``seed``."""
    if seed is None:
        return torch.native_dropout(x2, p, True)
    mask = _mask(x2.shape, p, seed, x2.device)
    return x2.mul(mask).mul_(1.0 / (1.0 - p)), mask


def _undrop(g: Tensor, mask: Tensor, p: float) -> Tensor:
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


def unpack_mask(packed: Tensor) -> Tensor:
    """The bool mask :func:`pack_mask` packed (a bool tensor is returned unchanged)."""
    if packed.dtype == torch.bool:
        return packed
    bits = torch.bitwise_and(packed.unsqueeze(-1), _bit_weights(packed.device)).ne_(0).view(torch.bool)
    return bits.reshape(*packed.shape[:-1], packed.shape[-1] * 8)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype matmuls on ``x`` run in: the autocast dtype when autocast is on for its device, else ``x.dtype``."""
    dev = x.device.type
    try:
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
    except (RuntimeError, TypeError):  # device type without autocast support
        pass
    return x.dtype


# ----------------------------------------------------------------------------------------------------------
# the one Function behind every variant
# ----------------------------------------------------------------------------------------------------------
# A "plan" describes the LoRA slices: for slice s, (group g, out start, out end, rank start, rank end).
# Group g is one output y_g = x @ W_g^T + b_g; slice s adds scaling_s * xa[:, r0:r1] @ B_s^T into
# y_g[:, o0:o1]. The rank ranges of all slices partition [0, R) where R = lora_A.shape[0].
_Plan = tuple[tuple[int, int, int, int, int], ...]


def _cast(t: Tensor, cdt: torch.dtype) -> Tensor:
    """``t.to(cdt)`` without the dispatcher round trip when ``t`` already has that dtype."""
    return t if t.dtype == cdt else t.to(cdt)


def _lora_forward(
    x: Tensor,
    lora_A: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    Bs: Sequence[Tensor],
    plan: _Plan,
    scalings: Sequence[float],
    p: float,
    seed: int | None,
    fifo: bool,
    cdt: torch.dtype,
) -> tuple[Tensor, Tensor | None, Tensor, list[Tensor], bool]:
    """Shared forward body. Returns the adapter input (``x`` in the compute dtype, ``x`` itself when no cast
    is needed; with dropout the dropped ``(N, in)`` copy), the keep-mask (None without dropout), ``xa`` and
    the outputs (both shaped like ``x`` up to the last dimension), and whether the plan is "whole" (every
    slice covers the full output of its own group, in order: :func:`lora_linear` and
    :func:`lora_linear_multi`). Written for few tensor operations: the per-call cost of small layers is
    dominated by the number of dispatched operations."""
    xc = _cast(x, cdt)
    A = _cast(lora_A, cdt)
    if p > 0.0:
        xd, mask = _drop(xc.reshape(-1, xc.shape[-1]), p, seed)
        xa = F.linear(xd, A).view(*xc.shape[:-1], A.shape[0])
    else:
        xd, mask = xc, None
        xa = F.linear(xc, A)
    ys = []
    for w, b in zip(weights, biases):
        w = _cast(w, cdt)
        ys.append(F.linear(xc, w.t() if fifo else w, None if b is None else _cast(b, cdt)))
    whole = len(plan) == len(ys) and all(
        g == i and o0 == 0 and o1 == ys[g].shape[-1] for i, (g, o0, o1, _, _) in enumerate(plan)
    )
    if whole:
        xas = (xa,) if len(plan) == 1 else xa.split([r1 - r0 for (_, _, _, r0, r1) in plan], dim=-1)
        for y, xa_g, B, s in zip(ys, xas, Bs, scalings):
            y.add_(F.linear(xa_g, _cast(B, cdt)), alpha=s)
    else:  # LoRA on output slices (lora_merged_linear)
        xa2 = xa.reshape(-1, xa.shape[-1])
        for (g, o0, o1, r0, r1), B, s in zip(plan, Bs, scalings):
            y2 = ys[g].view(-1, ys[g].shape[-1])
            y2[:, o0:o1].addmm_(xa2[:, r0:r1], _cast(B, cdt).t(), alpha=s)
    return xd, mask, xa, ys, whole


def _cat_cdt(As: Sequence[Tensor], cdt: torch.dtype) -> Tensor:
    """The A matrices stacked along the rank dimension, in the compute dtype (no copy for a single one).
    Differentiable when called outside the autograd Function: gradients reach each A in its own dtype."""
    if len(As) == 1:
        return As[0]
    return torch.cat([_cast(a, cdt) for a in As], dim=0)


class _LoRAFn(torch.autograd.Function):
    """Inputs: x, the meta tuple ``(plan, scalings, p, seed, fifo, cdt, recompute_xa, n_groups, n_As,
    has_bias)``, then n_As A matrices (stacked along the rank), n_groups weights, n_groups biases (only when
    ``has_bias``) and n_slices Bs. Outputs: n_groups tensors. Several A matrices are concatenated inside the
    Function, so grouping projections adds no autograd node of its own."""

    @staticmethod
    def forward(ctx, x, meta, *tensors):
        plan, scalings, p, seed, fifo, cdt, recompute_xa, n_groups, n_As, has_bias = meta
        As = tensors[:n_As]
        weights = tensors[n_As : n_As + n_groups]
        if has_bias:
            biases = tensors[n_As + n_groups : n_As + 2 * n_groups]
            Bs = tensors[n_As + 2 * n_groups :]
        else:
            biases = (None,) * n_groups
            Bs = tensors[n_As + n_groups :]
        lora_A = _cat_cdt(As, cdt)
        xd, mask, xa, ys, whole = _lora_forward(
            x, lora_A, weights, biases, Bs, plan, scalings, p, seed, fifo, cdt
        )
        # without dropout xd is x itself when no cast was needed, so the saved tensor is x's own storage;
        # several A matrices are saved as their (small) concatenation, so the backward does not concatenate
        # them again
        if n_As > 1:
            As = (lora_A,)
        kept = None if mask is None else pack_mask(mask)
        if recompute_xa:
            ctx.save_for_backward(xd, kept, *As, *weights, *Bs)
        else:
            ctx.save_for_backward(xd, kept, xa, *As, *weights, *Bs)
        if n_As > 1:
            ctx.A_info = [(a.shape[0], a.dtype) for a in tensors[:n_As]]
        ctx.meta = meta
        ctx.extra = (whole, x.shape, x.dtype)
        if has_bias:
            ctx.bias_dtypes = [None if b is None else b.dtype for b in biases]
        return ys[0] if n_groups == 1 else tuple(ys)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *dys):
        plan, scalings, p, seed, fifo, cdt, recompute_xa, n_groups, n_As, has_bias = ctx.meta
        whole, x_shape, x_dtype = ctx.extra
        saved = ctx.saved_tensors
        x_saved, mask = saved[0], saved[1]  # x (dropped when p > 0) and the packed keep-mask (None when p == 0)
        rest = saved[2:] if recompute_xa else saved[3:]
        A_saved = rest[0]  # the one A, or the concatenation (compute dtype) of several
        weights, Bs = rest[1 : 1 + n_groups], rest[1 + n_groups :]
        needs = ctx.needs_input_grad
        need_x = needs[0]
        need_As = needs[2 : 2 + n_As]
        off_b = 2 + n_As + n_groups
        need_b = needs[off_b : off_b + n_groups] if has_bias else (False,) * n_groups
        need_B = needs[off_b + n_groups :] if has_bias else needs[off_b:]

        in_f = x_shape[-1]
        xd = x_saved if x_saved.dim() == 2 else x_saved.reshape(-1, in_f)  # the adapter's input, 2-D
        A = _cast(A_saved, cdt)
        n_rows = xd.shape[0]
        if recompute_xa:
            xa = F.linear(xd, A)
        else:
            xa = saved[2]
            if xa.dim() != 2:
                xa = xa.reshape(n_rows, xa.shape[-1])
        dy2 = [_cast(dy if dy.dim() == 2 else dy.reshape(n_rows, dy.shape[-1]), cdt) for dy in dys]

        dBs: list[Tensor | None] = []
        if whole:
            xas = (xa,) if len(plan) == 1 else xa.split([r1 - r0 for (_, _, _, r0, r1) in plan], dim=1)
            parts = []
            for dy, xa_g, B, s, nb in zip(dy2, xas, Bs, scalings, need_B):
                Bc = _cast(B, cdt)
                # s * (dy @ B) and s * (dy^T @ xa) as single operations (beta=0: the first argument only
                # supplies the shape and is not read)
                parts.append(torch.addmm(xa_g, dy, Bc, beta=0, alpha=s))
                dBs.append(_cast(torch.addmm(Bc, dy.t(), xa_g, beta=0, alpha=s), B.dtype) if nb else None)
            dxa = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        else:
            dxa = xa.new_empty(xa.shape)
            for (g, o0, o1, r0, r1), B, s, nb in zip(plan, Bs, scalings, need_B):
                dy = dy2[g]
                dy_s = dy if (o0 == 0 and o1 == dy.shape[1]) else dy[:, o0:o1]
                dxa[:, r0:r1] = torch.mm(dy_s, _cast(B, cdt)).mul_(s)
                dBs.append(_cast(torch.mm(dy_s.t(), xa[:, r0:r1]).mul_(s), B.dtype) if nb else None)

        dAs: list[Tensor | None] = [None] * n_As
        if any(need_As):
            dA = torch.mm(dxa.t(), xd)
            if n_As == 1:
                dAs[0] = _cast(dA, A_saved.dtype)
            else:
                info = ctx.A_info
                for i, ((_, a_dtype), dA_i) in enumerate(zip(info, dA.split([r for r, _ in info], dim=0))):
                    if need_As[i]:
                        dAs[i] = _cast(dA_i, a_dtype)

        dx = None
        if need_x:
            for g, w in enumerate(weights):
                wc = _cast(w, cdt)
                wt = wc.t() if fifo else wc  # dx = dy @ W (W: out x in) or dy @ W^T (W: in x out)
                if dx is None:
                    dx = torch.mm(dy2[g], wt)
                else:
                    dx.addmm_(dy2[g], wt)
            if mask is not None:
                dx.add_(_undrop(torch.mm(dxa, A), unpack_mask(mask), p))
            else:
                dx.addmm_(dxa, A)
            if len(x_shape) != 2:
                dx = dx.view(x_shape)
            dx = _cast(dx, x_dtype)

        if not has_bias:
            return (dx, None, *dAs, *([None] * n_groups), *dBs)
        dbs = []
        for b_dtype, nb, dy in zip(ctx.bias_dtypes, need_b, dy2):
            dbs.append(_cast(dy.sum(0), b_dtype) if (b_dtype is not None and nb) else None)
        return (dx, None, *dAs, *([None] * n_groups), *dbs, *dBs)


def _run(
    x: Tensor,
    lora_A: Tensor | Sequence[Tensor],
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    Bs: Sequence[Tensor],
    plan: _Plan,
    scalings: Sequence[float],
    dropout_p: float,
    training: bool,
    seed: int | None,
    fifo: bool,
    recompute_xa: bool = False,
) -> list[Tensor]:
    """Unchecked entry point. ``lora_A`` is one ``(R, in)`` matrix or a list of matrices stacked along the
    rank (``R = sum r_i``; concatenated inside the autograd Function)."""
    As = (lora_A,) if isinstance(lora_A, Tensor) else tuple(lora_A)
    if torch.is_grad_enabled():
        for i, w in enumerate(weights):
            if w.requires_grad:
                name = "weight" if len(weights) == 1 else f"weights[{i}]"
                raise DeltaConfigError(
                    f"{name} must be frozen (requires_grad=False): the LoRA kernels compute no gradient for the "
                    f"base weight, got requires_grad=True"
                )
    p = float(dropout_p) if training else 0.0
    if p > 0.0 and seed is not None:
        return _apply_with_seed(x, As, weights, biases, Bs, plan, scalings, p, seed, fifo, recompute_xa)
    return _apply(x, As, weights, biases, Bs, plan, scalings, p, None, fifo, recompute_xa)


@torch.compiler.disable
def _apply_with_seed(x, As, weights, biases, Bs, plan, scalings, p, seed, fifo, recompute_xa):
    """Dropout with an explicit seed (a private generator): runs outside torch.compile graphs, so the seed
    is neither baked into a graph nor a cause of recompilation."""
    return _apply(x, As, weights, biases, Bs, plan, scalings, p, seed, fifo, recompute_xa)


def _apply(x, As, weights, biases, Bs, plan, scalings, p, seed, fifo, recompute_xa):
    cdt = _compute_dtype(x)
    grad_needed = torch.is_grad_enabled() and (
        x.requires_grad
        or any(a.requires_grad for a in As)
        or any(b is not None and b.requires_grad for b in biases)
        or any(B.requires_grad for B in Bs)
    )
    if not grad_needed:
        return _lora_forward(x, _cat_cdt(As, cdt), weights, biases, Bs, plan, scalings, p, seed, fifo, cdt)[3]
    has_bias = any(b is not None for b in biases)
    meta = (plan, tuple(scalings), p, seed, fifo, cdt, recompute_xa, len(weights), len(As), has_bias)
    if has_bias:
        outs = _LoRAFn.apply(x, meta, *As, *weights, *biases, *Bs)
    else:
        outs = _LoRAFn.apply(x, meta, *As, *weights, *Bs)
    return [outs] if isinstance(outs, Tensor) else list(outs)


# ----------------------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------------------
def _check_tensor(name: str, value: object, ndim: int | None = None) -> Tensor:
    check_type(name, value, Tensor, "a torch.Tensor")
    assert isinstance(value, Tensor)
    if ndim is not None and value.dim() != ndim:
        raise DeltaConfigError(f"{name} must be a {ndim}-D tensor, got shape {tuple(value.shape)}")
    return value


def _check_common(x: object, dropout_p: object, training: object, seed: object) -> None:
    _check_tensor("x", x)
    assert isinstance(x, Tensor)
    if x.dim() < 1:
        raise DeltaConfigError(
            f"x must have at least 1 dimension (..., in_features), got shape {tuple(x.shape)}"
        )
    check_float("dropout_p", dropout_p, low=0.0, high=1.0, high_inclusive=False)
    check_bool("training", training)
    if seed is not None:
        check_int("seed", seed, minimum=0)


def _check_scaling(name: str, value: object) -> float:
    return check_float(name, value)


def _check_base(
    name_w: str, weight: object, name_b: str, bias: object, in_f: int, fifo: bool
) -> tuple[Tensor, int]:
    w = _check_tensor(name_w, weight, 2)
    w_in = w.shape[0] if fifo else w.shape[1]
    out = w.shape[1] if fifo else w.shape[0]
    if w_in != in_f:
        layout = (
            "(in_features, out_features) with fan_in_fan_out=True" if fifo else "(out_features, in_features)"
        )
        raise DeltaConfigError(
            f"{name_w} must have shape {layout} matching x's last dimension {in_f}, got shape {tuple(w.shape)}"
        )
    if bias is not None:
        b = _check_tensor(name_b, bias, 1)
        if b.shape[0] != out:
            raise DeltaConfigError(
                f"{name_b} must have shape ({out},) or be None, got shape {tuple(b.shape)}"
            )
    return w, out


# ----------------------------------------------------------------------------------------------------------
# public entry points
# ----------------------------------------------------------------------------------------------------------
def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float,
    training: bool,
    *,
    fan_in_fan_out: bool = False,
    seed: int | None = None,
) -> Tensor:
    """LoRA linear ``x @ W^T + b + scaling * (drop(x) @ A^T) @ B^T`` with a lean custom backward.

    Args:
        x: input ``(..., in_features)``.
        weight: frozen base weight ``(out, in)`` (``(in, out)`` with ``fan_in_fan_out``, GPT-2 ``Conv1D``).
            It must have ``requires_grad=False`` while autograd is on (raises :class:`DeltaConfigError`).
        bias: base bias ``(out,)`` or ``None``; it may be trainable (its gradient is ``dy.sum(0)``).
        lora_A: ``(r, in)``; lora_B: ``(out, r)``; any float dtype (cast to the compute dtype).
        scaling: the LoRA scaling (e.g. ``alpha / r``).
        dropout_p: dropout probability on the LoRA branch input, in ``[0, 1)``.
        training: dropout is applied only when True.
        fan_in_fan_out: ``weight`` is stored ``(in, out)``.
        seed: dropout seed (see :func:`dropout_mask`); when None the mask comes from the default generator
            of ``x``'s device (``torch.native_dropout``).

    Returns:
        ``(..., out)`` in the compute dtype (autocast dtype, else ``x.dtype``).
    """
    _check_common(x, dropout_p, training, seed)
    check_bool("fan_in_fan_out", fan_in_fan_out)
    s = _check_scaling("scaling", scaling)
    in_f = x.shape[-1]
    w, out = _check_base("weight", weight, "bias", bias, in_f, fan_in_fan_out)
    A = _check_tensor("lora_A", lora_A, 2)
    B = _check_tensor("lora_B", lora_B, 2)
    r = A.shape[0]
    if A.shape[1] != in_f:
        raise DeltaConfigError(f"lora_A must have shape (r, {in_f}), got shape {tuple(A.shape)}")
    if tuple(B.shape) != (out, r):
        raise DeltaConfigError(f"lora_B must have shape ({out}, {r}), got shape {tuple(B.shape)}")
    plan: _Plan = ((0, 0, out, 0, r),)
    return _run(x, A, [w], [bias], [B], plan, [s], dropout_p, training, seed, fan_in_fan_out)[0]


def lora_linear_multi(
    x: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None] | None,
    lora_As: Sequence[Tensor],
    lora_Bs: Sequence[Tensor],
    scalings: float | Sequence[float],
    dropout_p: float,
    training: bool,
    *,
    fan_in_fan_out: bool = False,
    seed: int | None = None,
) -> list[Tensor]:
    """Several LoRA linears sharing one input (q/k/v, gate/up), with ONE concatenated A matmul.

    ``y_i = x @ W_i^T + b_i + scaling_i * (drop(x) @ A_i^T) @ B_i^T`` for each projection ``i``; the A
    products are computed as ``drop(x) @ cat(A_i)^T``, ``x`` is saved once for all of them and one
    dropout mask is shared. Ranks may differ between projections.

    Args:
        weights: frozen base weights, one per projection (same layout rule as :func:`lora_linear`).
        biases: one bias (or None) per projection, or None for no biases at all.
        lora_As / lora_Bs: ``(r_i, in)`` / ``(out_i, r_i)`` per projection.
        scalings: one float for all projections or one per projection.

    Returns:
        list of outputs ``(..., out_i)``.
    """
    _check_common(x, dropout_p, training, seed)
    check_bool("fan_in_fan_out", fan_in_fan_out)
    in_f = x.shape[-1]
    for nm, seq in (("weights", weights), ("lora_As", lora_As), ("lora_Bs", lora_Bs)):
        if not isinstance(seq, (list, tuple)) or not seq:
            raise DeltaConfigTypeError(f"{nm} must be a non-empty list of tensors, got {type(seq).__name__}")
    k = len(weights)
    if len(lora_As) != k or len(lora_Bs) != k:
        raise DeltaConfigError(
            f"weights, lora_As and lora_Bs must have the same length, got {k}, {len(lora_As)}, {len(lora_Bs)}"
        )
    if biases is None:
        biases = [None] * k
    if not isinstance(biases, (list, tuple)) or len(biases) != k:
        raise DeltaConfigError(f"biases must be None or a list of {k} tensors/None, got {biases!r}")
    if isinstance(scalings, (list, tuple)):
        if len(scalings) != k:
            raise DeltaConfigError(
                f"scalings must be a float or a list of {k} floats, got {list(scalings)!r}"
            )
        sc = [_check_scaling(f"scalings[{i}]", s) for i, s in enumerate(scalings)]
    else:
        sc = [_check_scaling("scalings", scalings)] * k
    ws = []
    for i in range(k):
        w, out = _check_base(f"weights[{i}]", weights[i], f"biases[{i}]", biases[i], in_f, fan_in_fan_out)
        ws.append(w)
        A = _check_tensor(f"lora_As[{i}]", lora_As[i], 2)
        B = _check_tensor(f"lora_Bs[{i}]", lora_Bs[i], 2)
        if A.shape[1] != in_f:
            raise DeltaConfigError(f"lora_As[{i}] must have shape (r, {in_f}), got shape {tuple(A.shape)}")
        if tuple(B.shape) != (out, A.shape[0]):
            raise DeltaConfigError(f"lora_Bs[{i}] must have shape ({out}, {A.shape[0]}), got shape {tuple(B.shape)}")
    return _run(
        x, list(lora_As), ws, list(biases), list(lora_Bs), _whole_plan(lora_As, lora_Bs), sc, dropout_p, training,
        seed, fan_in_fan_out,
    )


def _whole_plan(lora_As: Sequence[Tensor], lora_Bs: Sequence[Tensor]) -> _Plan:
    """The plan of projections that each take their own whole output: slice ``i`` is group ``i``'s full
    ``B_i.shape[0]`` outputs, fed by its ``A_i`` rows of the stacked A matrices."""
    plan = []
    r_off = 0
    for i, (a, b) in enumerate(zip(lora_As, lora_Bs)):
        plan.append((i, 0, b.shape[0], r_off, r_off + a.shape[0]))
        r_off += a.shape[0]
    return tuple(plan)


def lora_merged_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor | Sequence[Tensor],
    enable_lora: Sequence[bool],
    scaling: float,
    dropout_p: float,
    training: bool,
    *,
    out_splits: Sequence[int] | None = None,
    fan_in_fan_out: bool = False,
    seed: int | None = None,
) -> Tensor:
    """loralib ``MergedLinear``-style fused projection: one base weight, LoRA on some output slices only.

    The output ``(..., out)`` is split into ``len(enable_lora)`` slices (equal, or ``out_splits``);
    slice ``j`` with ``enable_lora[j]`` True gets ``scaling * xa_j @ B_j^T`` where ``xa_j`` is the j-th
    block of ``r`` columns of ``drop(x) @ lora_A^T`` (one matmul for all enabled slices).

    Args:
        lora_A: ``(r * k, in)`` with ``k = sum(enable_lora)`` (loralib layout: blocks in slice order).
        lora_B: ``(sum of enabled slice sizes, r)`` stacked in slice order (loralib layout), or a list of
            ``k`` tensors ``(size_j, r)``.
        enable_lora: one bool per output slice, at least one True.
        out_splits: slice sizes summing to ``out`` (default: ``out`` split equally).
    """
    _check_common(x, dropout_p, training, seed)
    check_bool("fan_in_fan_out", fan_in_fan_out)
    s = _check_scaling("scaling", scaling)
    in_f = x.shape[-1]
    w, out = _check_base("weight", weight, "bias", bias, in_f, fan_in_fan_out)
    if not isinstance(enable_lora, (list, tuple)) or not enable_lora:
        raise DeltaConfigTypeError(f"enable_lora must be a non-empty list of bool, got {enable_lora!r}")
    for i, e in enumerate(enable_lora):
        check_bool(f"enable_lora[{i}]", e)
    n_slices = len(enable_lora)
    k = sum(enable_lora)
    if k == 0:
        raise DeltaConfigError(f"enable_lora must enable at least one slice, got {list(enable_lora)!r}")
    if out_splits is None:
        if out % n_slices:
            raise DeltaConfigError(
                f"out_features ({out}) must be divisible by len(enable_lora) ({n_slices}) when out_splits is None"
            )
        sizes = [out // n_slices] * n_slices
    else:
        if not isinstance(out_splits, (list, tuple)) or len(out_splits) != n_slices:
            raise DeltaConfigError(f"out_splits must be a list of {n_slices} ints, got {out_splits!r}")
        sizes = [check_int(f"out_splits[{i}]", v, minimum=1) for i, v in enumerate(out_splits)]
        if sum(sizes) != out:
            raise DeltaConfigError(
                f"out_splits must sum to out_features ({out}), got {list(sizes)!r} (sum {sum(sizes)})"
            )
    A = _check_tensor("lora_A", lora_A, 2)
    if A.shape[1] != in_f or A.shape[0] % k:
        raise DeltaConfigError(
            f"lora_A must have shape (r * {k}, {in_f}) for {k} enabled slices, got shape {tuple(A.shape)}"
        )
    r = A.shape[0] // k
    enabled_sizes = [sz for sz, e in zip(sizes, enable_lora) if e]
    if isinstance(lora_B, Tensor):
        B = _check_tensor("lora_B", lora_B, 2)
        if tuple(B.shape) != (sum(enabled_sizes), r):
            raise DeltaConfigError(
                f"lora_B must have shape ({sum(enabled_sizes)}, {r}) (enabled slices stacked), got shape {tuple(B.shape)}"
            )
        Bs = list(torch.split(B, enabled_sizes, dim=0)) if k > 1 else [B]
    else:
        if not isinstance(lora_B, (list, tuple)) or len(lora_B) != k:
            raise DeltaConfigError(f"lora_B must be a tensor or a list of {k} tensors, got {lora_B!r}")
        Bs = []
        for j, (b_j, sz) in enumerate(zip(lora_B, enabled_sizes)):
            b_j = _check_tensor(f"lora_B[{j}]", b_j, 2)
            if tuple(b_j.shape) != (sz, r):
                raise DeltaConfigError(
                    f"lora_B[{j}] must have shape ({sz}, {r}), got shape {tuple(b_j.shape)}"
                )
            Bs.append(b_j)
    plan = []
    o = 0
    j = 0
    for sz, e in zip(sizes, enable_lora):
        if e:
            plan.append((0, o, o + sz, j * r, (j + 1) * r))
            j += 1
        o += sz
    return _run(x, A, [w], [bias], Bs, tuple(plan), [s] * k, dropout_p, training, seed, fan_in_fan_out)[0]


# ----------------------------------------------------------------------------------------------------------
# fused A primitive
# ----------------------------------------------------------------------------------------------------------
class _FusedAFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, A_cat, p, seed, cdt):
        x2 = x.reshape(-1, x.shape[-1]).to(cdt)
        xd, mask = _drop(x2, p, seed) if p > 0.0 else (x2, None)
        xa = xd @ A_cat.to(cdt).t()
        x_saved = x if (xd.data_ptr() == x.data_ptr() and x.dtype == cdt) else xd
        ctx.save_for_backward(x_saved, None if mask is None else pack_mask(mask), A_cat)
        ctx.meta = (p, cdt, x.shape, x.dtype)
        return xa.reshape(*x.shape[:-1], xa.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dxa):
        p, cdt, x_shape, x_dtype = ctx.meta
        x_saved, mask, A_cat = ctx.saved_tensors  # x (dropped when p > 0), keep-mask or None, A
        xd = x_saved.reshape(-1, x_shape[-1])
        dxa2 = dxa.reshape(xd.shape[0], -1).to(cdt)
        A = A_cat.to(cdt)
        dA = None
        if ctx.needs_input_grad[1]:
            dA = (dxa2.t() @ xd).to(A_cat.dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = dxa2 @ A
            if mask is not None:
                dx = _undrop(dx, unpack_mask(mask), p)
            dx = dx.reshape(x_shape).to(x_dtype)
        return dx, dA, None, None, None


def fused_lora_A(
    x: Tensor,
    lora_As: Sequence[Tensor],
    dropout_p: float = 0.0,
    training: bool = False,
    *,
    seed: int | None = None,
    lora_Bs: Sequence[Tensor] | None = None,
    weights: Sequence[Tensor] | None = None,
    biases: Sequence[Tensor | None] | None = None,
    scalings: float | Sequence[float] = 1.0,
    fan_in_fan_out: bool = False,
    check: bool = True,
) -> list[Tensor]:
    """``[drop(x) @ A_i^T for A_i in lora_As]`` computed with ONE matmul against ``cat(lora_As)``.

    Autograd-correct building block for grouping projections that share an input: the layer code can
    compute the A products of q/k/v once and finish each projection with plain ops
    (``F.linear(x, W_i, b_i) + scaling * xa_i @ B_i.T``: with a frozen ``W_i`` autograd saves no copy of
    ``x`` for it). ``x`` is saved once (the dropped ``x`` with dropout, plus its bit-packed keep-mask: one
    mask shared by all ``A_i``).

    With ``lora_Bs`` and ``weights`` (and optionally ``biases``, ``scalings``, ``fan_in_fan_out``) the
    products are finished inside the same autograd node: the result is the list of projection outputs
    ``x @ W_i^T + b_i + scaling_i * (drop(x) @ A_i^T) @ B_i^T``, exactly :func:`lora_linear_multi`.
    ``check=False`` skips the argument checks of that form (for callers whose tensors are known to be
    consistent, e.g. :class:`~deltatune.methods.lora.LoraLayer`; ``scalings`` must then be a list).

    Returns:
        list of ``(..., r_i)`` tensors (views of one ``(..., sum r_i)`` result) in the compute dtype, or
        the projections' outputs ``(..., out_i)`` when ``lora_Bs`` is given.
    """
    if lora_Bs is not None or weights is not None:
        if lora_Bs is None or weights is None:
            raise DeltaConfigError("fused_lora_A needs both lora_Bs and weights to finish the projections")
        if not check:
            return _run(
                x, lora_As, weights, biases if biases is not None else [None] * len(weights), lora_Bs,
                _whole_plan(lora_As, lora_Bs), scalings, dropout_p, training, seed, fan_in_fan_out,
            )
        return lora_linear_multi(
            x, weights, biases, lora_As, lora_Bs, scalings, dropout_p, training,
            fan_in_fan_out=fan_in_fan_out, seed=seed,
        )
    _check_common(x, dropout_p, training, seed)
    if not isinstance(lora_As, (list, tuple)) or not lora_As:
        raise DeltaConfigTypeError(
            f"lora_As must be a non-empty list of tensors, got {type(lora_As).__name__}"
        )
    in_f = x.shape[-1]
    ranks = []
    for i, a in enumerate(lora_As):
        a = _check_tensor(f"lora_As[{i}]", a, 2)
        if a.shape[1] != in_f:
            raise DeltaConfigError(f"lora_As[{i}] must have shape (r, {in_f}), got shape {tuple(a.shape)}")
        ranks.append(a.shape[0])
    p = float(dropout_p) if training else 0.0
    if p > 0.0 and seed is not None:
        xa = _fused_a_with_seed(x, list(lora_As), p, seed)
    else:
        xa = _fused_a(x, list(lora_As), p, None)
    return list(torch.split(xa, ranks, dim=-1))


def _fused_a(x: Tensor, lora_As: list[Tensor], p: float, seed: int | None) -> Tensor:
    cdt = _compute_dtype(x)
    A_cat = _cat_cdt(lora_As, cdt)
    if torch.is_grad_enabled() and (x.requires_grad or A_cat.requires_grad):
        return _FusedAFn.apply(x, A_cat, p, seed, cdt)
    x2 = x.reshape(-1, x.shape[-1]).to(cdt)
    xd = _drop(x2, p, seed)[0] if p > 0.0 else x2
    return (xd @ A_cat.to(cdt).t()).reshape(*x.shape[:-1], A_cat.shape[0])


@torch.compiler.disable
def _fused_a_with_seed(x: Tensor, lora_As: list[Tensor], p: float, seed: int) -> Tensor:
    return _fused_a(x, lora_As, p, seed)
