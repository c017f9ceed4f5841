"""The argument-checked LoRA kernels: :func:`lora_linear`, :func:`lora_linear_multi` (projections sharing an
input), :func:`lora_merged_linear` (loralib's ``MergedLinear``: LoRA on some output slices) and
:func:`fused_lora_A` (the A products of several projections with one matmul).

Each checks its arguments (a :class:`~deltatune.errors.DeltaConfigError` naming the argument, its shape and
the expected one) and runs the one autograd Function of :mod:`deltatune.kernels.lora_autograd`, which
documents what the backward keeps in memory and the compute dtype.

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
from torch import Tensor

from ..errors import DeltaConfigError, DeltaConfigTypeError
from ..validation import check_bool, check_float, check_int, check_type
from .lora_autograd import Plan, fused_a, fused_a_with_seed, run_lora, whole_plan

__all__ = [
    "fused_lora_A",
    "lora_linear",
    "lora_linear_multi",
    "lora_merged_linear",
]


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
    plan: Plan = ((0, 0, out, 0, r),)
    return run_lora(x, A, [w], [bias], [B], plan, [s], dropout_p, training, seed, fan_in_fan_out)[0]


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
    return run_lora(
        x, list(lora_As), ws, list(biases), list(lora_Bs), whole_plan(lora_As, lora_Bs), sc, dropout_p, training,
        seed, fan_in_fan_out,
    )


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
    return run_lora(x, A, [w], [bias], Bs, tuple(plan), [s] * k, dropout_p, training, seed, fan_in_fan_out)[0]



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
    consistent; ``scalings`` must then be a list). The LoRA layers use
    :func:`~deltatune.kernels.lora_autograd.lora_projections`, the same computation with named fields.

    Returns:
        list of ``(..., r_i)`` tensors (views of one ``(..., sum r_i)`` result) in the compute dtype, or
        the projections' outputs ``(..., out_i)`` when ``lora_Bs`` is given.
    """
    if lora_Bs is not None or weights is not None:
        if lora_Bs is None or weights is None:
            raise DeltaConfigError("fused_lora_A needs both lora_Bs and weights to finish the projections")
        if not check:
            return run_lora(
                x, lora_As, weights, biases if biases is not None else [None] * len(weights), lora_Bs,
                whole_plan(lora_As, lora_Bs), scalings, dropout_p, training, seed, fan_in_fan_out,
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
        xa = fused_a_with_seed(x, list(lora_As), p, seed)
    else:
        xa = fused_a(x, list(lora_As), p, None)
    return list(torch.split(xa, ranks, dim=-1))
