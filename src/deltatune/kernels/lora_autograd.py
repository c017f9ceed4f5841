"""The autograd core of the LoRA kernels: one memory-lean ``torch.autograd.Function`` behind every variant.

This module owns the Function, its unchecked entry point :func:`run_lora`, and the entry points the LoRA
layers use, with named fields: a :class:`LoraProjection` and :func:`lora_projection` /
:func:`lora_projections`. The argument-checked public functions (:func:`~deltatune.kernels.lora_linear`
and friends) are in :mod:`deltatune.kernels.lora_function`.

``y = x @ W^T + b + scaling * (drop(x) @ A^T) @ B^T`` with a frozen base ``W`` (and ``b``) and trainable
adapters ``A`` (r, in) and ``B`` (out, r).

What the backward keeps (per token, ``in`` = input features, ``R`` = total LoRA rank, ``s`` = bytes per
element of the compute dtype):

* without dropout: the input ``x`` once, in the compute dtype: ``in * s`` bytes (it is needed for ``dA``);
* with dropout: the dropped input ``drop(x)`` **instead of** ``x`` (``in * s`` bytes; ``x`` itself is not
  needed, the frozen base matmul keeps nothing) and the keep-mask: on the CPU packed to one bit per
  element (``in / 8`` bytes; a bool mask, ``in`` bytes, when ``in`` is not a multiple of 8), so dropout
  costs an eighth of a byte per input element; on CUDA one byte per element (``in`` bytes), because
  packing it costs more time there than the memory is worth (``common.saved_mask``). (A naive ``lora_B(lora_A(dropout(x)))`` after a base layer
  that saved ``x`` keeps ``x``, the dropped copy *and* a 1-byte mask.)
* with dropout on CUDA (Triton installed, no explicit ``seed``, outside ``torch.compile``): ``x`` itself and
  an int64 seed, no dropped copy and no mask: the mask is regenerated inside the A-side kernels of
  :mod:`deltatune.kernels.dropout_triton`, so the step costs about what it costs without dropout;
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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DeltaConfigError
from . import dropout_triton as tri
from .common import cast, compute_dtype, drop, mm_in, saved_mask, undrop, unpack_mask

__all__ = [
    "LoraProjection",
    "Plan",
    "cat_cdt",
    "fused_a",
    "fused_a_with_seed",
    "lora_projection",
    "lora_projections",
    "run_lora",
    "whole_plan",
]


# ----------------------------------------------------------------------------------------------------------
# the one Function behind every variant
# ----------------------------------------------------------------------------------------------------------
# A "plan" describes the LoRA slices: for slice s, (group g, out start, out end, rank start, rank end).
# Group g is one output y_g = x @ W_g^T + b_g; slice s adds scaling_s * xa[:, r0:r1] @ B_s^T into
# y_g[:, o0:o1]. The rank ranges of all slices partition [0, R) where R = lora_A.shape[0].
Plan = tuple[tuple[int, int, int, int, int], ...]


def _lora_forward(
    x: Tensor,
    lora_A: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    Bs: Sequence[Tensor],
    plan: Plan,
    scalings: Sequence[float],
    p: float,
    seed: int | None,
    fifo: bool,
    cdt: torch.dtype,
) -> tuple[Tensor, Tensor | None, Tensor, list[Tensor], bool, list[Tensor]]:
    """Shared forward body. Returns the adapter input (``x`` in the compute dtype, ``x`` itself when no cast
    is needed; with dropout the dropped ``(N, in)`` copy, or ``x`` when the dropout runs inside the Triton
    kernels of :mod:`deltatune.kernels.dropout_triton`), the keep-mask (None without dropout; with the Triton
    kernels the int64 seed tensor that regenerates it), ``xa`` and
    the outputs (both shaped like ``x`` up to the last dimension), and whether the plan is "whole" (every
    slice covers the full output of its own group, in order: :func:`lora_linear` and
    :func:`lora_linear_multi`), and the B matrices in the compute dtype (saved for the backward, so that it
    does not cast them again). Written for few tensor operations: the per-call cost of small layers is
    dominated by the number of dispatched operations."""
    xc = cast(x, cdt)
    A = cast(lora_A, cdt)
    if p > 0.0 and seed is None and tri.usable(xc, cdt):
        # dropout inside the A-side kernels: the adapter input stays x itself, the "mask" is its seed
        xd = xc.reshape(-1, xc.shape[-1]).contiguous()
        mask = tri.draw_seed(xc.device)
        xa = tri.dropped_xa(xd, A, mask, p).view(*xc.shape[:-1], A.shape[0])
    elif p > 0.0:
        xd, mask = drop(xc.reshape(-1, xc.shape[-1]), p, seed)
        xa = F.linear(xd, A).view(*xc.shape[:-1], A.shape[0])
    else:
        xd, mask = xc, None
        xa = F.linear(xc, A)
    ys = []
    for w, b in zip(weights, biases):
        w = cast(w, cdt)
        ys.append(F.linear(xc, w.t() if fifo else w, None if b is None else cast(b, cdt)))
    whole = len(plan) == len(ys) and all(
        g == i and o0 == 0 and o1 == ys[g].shape[-1] for i, (g, o0, o1, _, _) in enumerate(plan)
    )
    xa2 = xa.reshape(-1, xa.shape[-1])
    Bcs = [cast(B, cdt) for B in Bs]
    if whole:
        xas = (xa2,) if len(plan) == 1 else xa2.split([r1 - r0 for (_, _, _, r0, r1) in plan], dim=-1)
        for y, xa_g, Bc, s in zip(ys, xas, Bcs, scalings):
            y.view(-1, y.shape[-1]).addmm_(xa_g, Bc.t(), alpha=s)  # one kernel: y += s * xa @ B^T
    else:  # LoRA on output slices (lora_merged_linear)
        for (g, o0, o1, r0, r1), Bc, s in zip(plan, Bcs, scalings):
            y2 = ys[g].view(-1, ys[g].shape[-1])
            y2[:, o0:o1].addmm_(xa2[:, r0:r1], Bc.t(), alpha=s)
    return xd, mask, xa, ys, whole, Bcs


def cat_cdt(As: Sequence[Tensor], cdt: torch.dtype) -> Tensor:
    """The A matrices stacked along the rank dimension, in the compute dtype (no copy for a single one).
    Differentiable when called outside the autograd Function: gradients reach each A in its own dtype."""
    if len(As) == 1:
        return As[0]
    return torch.cat([cast(a, cdt) for a in As], dim=0)


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
        lora_A = cat_cdt(As, cdt)
        xd, mask, xa, ys, whole, Bcs = _lora_forward(
            x, lora_A, weights, biases, Bs, plan, scalings, p, seed, fifo, cdt
        )
        # without dropout xd is x itself when no cast was needed, so the saved tensor is x's own storage;
        # several A matrices are saved as their (small) concatenation, so the backward does not concatenate
        # them again
        if n_As > 1:
            As = (lora_A,)
        # a keep-mask is saved as common.saved_mask stores it; the Triton kernels' seed as it is
        kept = mask if mask is None or tri.is_seed(mask) else saved_mask(mask)
        # the Bs in the compute dtype (the parameters themselves when no cast was needed; a cast copy is
        # out x r, small): the backward uses them as they are
        if recompute_xa:
            ctx.save_for_backward(xd, kept, *As, *weights, *Bcs)
        else:
            ctx.save_for_backward(xd, kept, xa, *As, *weights, *Bcs)
        ctx.B_dtypes = [B.dtype for B in Bs]
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
        # x (dropped when p > 0, unless the dropout runs in the Triton kernels) and the keep-mask (None when
        # p == 0; the int64 seed of the Triton kernels' mask)
        x_saved, mask = saved[0], saved[1]
        fused_drop = mask is not None and tri.is_seed(mask)
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
        A = cast(A_saved, cdt)
        n_rows = xd.shape[0]
        if recompute_xa:
            xa = tri.dropped_xa(xd, A, mask, p) if fused_drop else F.linear(xd, A)
        else:
            xa = saved[2]
            if xa.dim() != 2:
                xa = xa.reshape(n_rows, xa.shape[-1])
        dy2 = [cast(dy if dy.dim() == 2 else dy.reshape(n_rows, dy.shape[-1]), cdt) for dy in dys]

        dBs: list[Tensor | None] = []
        if whole:
            xas = (xa,) if len(plan) == 1 else xa.split([r1 - r0 for (_, _, _, r0, r1) in plan], dim=1)
            parts = []
            for dy, xa_g, Bc, b_dtype, s, nb in zip(dy2, xas, Bs, ctx.B_dtypes, scalings, need_B):
                # s * (dy @ B) and s * (dy^T @ xa) as single operations (beta=0: the first argument only
                # supplies the shape and is not read); dB straight in the parameter's dtype where a matmul
                # can write it (CUDA), else cast
                parts.append(torch.addmm(xa_g, dy, Bc, beta=0, alpha=s))
                dBs.append(mm_in(b_dtype, dy.t(), xa_g, s) if nb else None)
            dxa = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        else:
            dxa = xa.new_empty(xa.shape)
            for (g, o0, o1, r0, r1), Bc, b_dtype, s, nb in zip(plan, Bs, ctx.B_dtypes, scalings, need_B):
                dy = dy2[g]
                dy_s = dy if (o0 == 0 and o1 == dy.shape[1]) else dy[:, o0:o1]
                dxa[:, r0:r1] = torch.mm(dy_s, Bc).mul_(s)
                dBs.append(mm_in(b_dtype, dy_s.t(), xa[:, r0:r1], s) if nb else None)

        dAs: list[Tensor | None] = [None] * n_As
        if any(need_As):
            # written in the A matrices' dtype when they share one (else in the compute dtype, cast per A below)
            a_dtypes = {A_saved.dtype} if n_As == 1 else {d for _, d in ctx.A_info}
            if fused_drop:
                dA = tri.dropped_grad_A(dxa.contiguous(), xd, mask, p)
            else:
                dA = mm_in(a_dtypes.pop() if len(a_dtypes) == 1 else cdt, dxa.t(), xd)
            if n_As == 1:
                dAs[0] = cast(dA, A_saved.dtype)
            else:
                info = ctx.A_info
                for i, ((_, a_dtype), dA_i) in enumerate(zip(info, dA.split([r for r, _ in info], dim=0))):
                    if need_As[i]:
                        dAs[i] = cast(dA_i, a_dtype)

        dx = None
        if need_x:
            for g, w in enumerate(weights):
                wc = cast(w, cdt)
                wt = wc.t() if fifo else wc  # dx = dy @ W (W: out x in) or dy @ W^T (W: in x out)
                if dx is None:
                    dx = torch.mm(dy2[g], wt)
                else:
                    dx.addmm_(dy2[g], wt)
            if fused_drop:
                tri.add_dropped_grad_x(dx, dxa.contiguous(), A, mask, p)
            elif mask is not None:
                dx.add_(undrop(torch.mm(dxa, A), unpack_mask(mask), p))
            else:
                dx.addmm_(dxa, A)
            if len(x_shape) != 2:
                dx = dx.view(x_shape)
            dx = cast(dx, x_dtype)

        if not has_bias:
            return (dx, None, *dAs, *([None] * n_groups), *dBs)
        dbs = []
        for b_dtype, nb, dy in zip(ctx.bias_dtypes, need_b, dy2):
            dbs.append(cast(dy.sum(0), b_dtype) if (b_dtype is not None and nb) else None)
        return (dx, None, *dAs, *([None] * n_groups), *dbs, *dBs)


def run_lora(
    x: Tensor,
    lora_A: Tensor | Sequence[Tensor],
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    Bs: Sequence[Tensor],
    plan: Plan,
    scalings: Sequence[float],
    dropout_p: float,
    training: bool,
    seed: int | None,
    fifo: bool,
    recompute_xa: bool = False,
) -> list[Tensor]:
    """The unchecked entry point behind every variant: group ``g``'s output is ``x @ W_g^T + b_g`` plus, for each
    slice ``s`` of ``plan`` in that group, ``scalings[s] * xa[:, r0:r1] @ Bs[s]^T`` added into its ``o0:o1``
    outputs, with ``xa = drop(x) @ A^T``. ``lora_A`` is one ``(R, in)`` matrix or a list of matrices stacked
    along the rank (``R = sum r_i``; concatenated inside the autograd Function). The base weights must be
    frozen while autograd is on (:class:`DeltaConfigError`); nothing else is checked."""
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
    cdt = compute_dtype(x)
    grad_needed = torch.is_grad_enabled() and (
        x.requires_grad
        or any(a.requires_grad for a in As)
        or any(b is not None and b.requires_grad for b in biases)
        or any(B.requires_grad for B in Bs)
    )
    if not grad_needed:
        return _lora_forward(x, cat_cdt(As, cdt), weights, biases, Bs, plan, scalings, p, seed, fifo, cdt)[3]
    has_bias = any(b is not None for b in biases)
    meta = (plan, tuple(scalings), p, seed, fifo, cdt, recompute_xa, len(weights), len(As), has_bias)
    if has_bias:
        outs = _LoRAFn.apply(x, meta, *As, *weights, *biases, *Bs)
    else:
        outs = _LoRAFn.apply(x, meta, *As, *weights, *Bs)
    return [outs] if isinstance(outs, Tensor) else list(outs)


def whole_plan(lora_As: Sequence[Tensor], lora_Bs: Sequence[Tensor]) -> Plan:
    """The plan of projections that each take their own whole output: slice ``i`` is group ``i``'s full
    ``B_i.shape[0]`` outputs, fed by its ``A_i`` rows of the stacked A matrices."""
    plan = []
    r_off = 0
    for i, (a, b) in enumerate(zip(lora_As, lora_Bs)):
        plan.append((i, 0, b.shape[0], r_off, r_off + a.shape[0]))
        r_off += a.shape[0]
    return tuple(plan)

# ----------------------------------------------------------------------------------------------------------
# entry points with named fields (the LoRA layers' fast path)
# ----------------------------------------------------------------------------------------------------------
class LoraProjection(NamedTuple):
    """One plain linear LoRA projection: ``x @ W^T + b + scaling * (drop(x) @ A^T) @ B^T``."""

    weight: Tensor
    """The frozen base weight, ``(out, in)`` (``(in, out)`` with ``fan_in_fan_out``)."""
    bias: Tensor | None
    """The base bias ``(out,)`` or None."""
    lora_A: Tensor
    """``(r, in)``."""
    lora_B: Tensor
    """``(out, r)``."""
    scaling: float
    """The LoRA scaling (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA)."""
    dropout_p: float
    """The dropout probability in effect (0.0 for none, e.g. in eval mode)."""
    fan_in_fan_out: bool
    """``weight`` is stored ``(in, out)`` (transformers' GPT-2 ``Conv1D``)."""


def lora_projection(x: Tensor, proj: LoraProjection) -> Tensor:
    """``proj``'s output for ``x`` (frozen base and LoRA in one autograd node); unchecked, for callers whose
    tensors are consistent by construction (the LoRA layers)."""
    A, B = proj.lora_A, proj.lora_B
    plan: Plan = ((0, 0, B.shape[0], 0, A.shape[0]),)
    return run_lora(x, A, (proj.weight,), (proj.bias,), (B,), plan, (proj.scaling,), proj.dropout_p, True, None,
                    proj.fan_in_fan_out)[0]


def lora_projections(x: Tensor, projs: Sequence[LoraProjection]) -> list[Tensor]:
    """The outputs of several projections that read the same ``x`` (q/k/v, gate/up), with ONE matmul against
    their concatenated A matrices and one shared dropout mask, in one autograd node. The projections must
    agree on ``dropout_p`` and ``fan_in_fan_out`` (:class:`DeltaConfigError` otherwise); shapes are not
    checked."""
    first = projs[0]
    if any(p.dropout_p != first.dropout_p or p.fan_in_fan_out != first.fan_in_fan_out for p in projs):
        raise DeltaConfigError(
            "projections computed together must share dropout_p and fan_in_fan_out, got "
            f"{[(p.dropout_p, p.fan_in_fan_out) for p in projs]}"
        )
    As = [p.lora_A for p in projs]
    Bs = [p.lora_B for p in projs]
    return run_lora(x, As, [p.weight for p in projs], [p.bias for p in projs], Bs, whole_plan(As, Bs),
                    [p.scaling for p in projs], first.dropout_p, True, None, first.fan_in_fan_out)


# ----------------------------------------------------------------------------------------------------------
# fused A primitive
# ----------------------------------------------------------------------------------------------------------
class _FusedAFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, A_cat, p, seed, cdt):
        x2 = x.reshape(-1, x.shape[-1]).to(cdt)
        xd, mask = drop(x2, p, seed) if p > 0.0 else (x2, None)
        xa = xd @ A_cat.to(cdt).t()
        x_saved = x if (xd.data_ptr() == x.data_ptr() and x.dtype == cdt) else xd
        ctx.save_for_backward(x_saved, None if mask is None else saved_mask(mask), A_cat)
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
                dx = undrop(dx, unpack_mask(mask), p)
            dx = dx.reshape(x_shape).to(x_dtype)
        return dx, dA, None, None, None


def fused_a(x: Tensor, lora_As: list[Tensor], p: float, seed: int | None) -> Tensor:
    """Unchecked ``drop(x) @ cat(lora_As)^T`` (``(..., sum r_i)``) as one autograd node; ``p`` is the dropout
    probability in effect, ``seed`` None or an explicit dropout seed."""
    cdt = compute_dtype(x)
    A_cat = cat_cdt(lora_As, cdt)
    if torch.is_grad_enabled() and (x.requires_grad or A_cat.requires_grad):
        return _FusedAFn.apply(x, A_cat, p, seed, cdt)
    x2 = x.reshape(-1, x.shape[-1]).to(cdt)
    xd = drop(x2, p, seed)[0] if p > 0.0 else x2
    return (xd @ A_cat.to(cdt).t()).reshape(*x.shape[:-1], A_cat.shape[0])


@torch.compiler.disable
def fused_a_with_seed(x: Tensor, lora_As: list[Tensor], p: float, seed: int) -> Tensor:
    """:func:`fused_a` with an explicit seed, outside torch.compile graphs (as :func:`run_lora`)."""
    return fused_a(x, lora_As, p, seed)
