"""Chunked linear + cross-entropy that never materialises the full ``(N, V)`` logits.

:func:`linear_cross_entropy` equals ``F.cross_entropy((hidden @ weight.T + bias).float(), labels, ...)``
(the HF causal-LM recipe, which upcasts the logits) in value and in gradient, but processes the rows in
chunks of ``chunk_size``: per chunk it forms the logits in the compute dtype, takes their log-softmax in
fp32 (or fp64 for fp64 inputs; one fused kernel reading the logits, no upcast copy), and — for
``reduction`` ``"mean"``/``"sum"``, or ``"none"`` with a frozen ``weight`` — computes that chunk's
gradient right away in the forward pass (``exp`` in place, the target subtracted, then one kernel that
scales and rounds to the compute dtype), so the backward only scales the stored ``dhidden (N, H)`` (and
``dweight (V, H)`` / ``dbias``) by the incoming gradient. Peak extra memory is ``O(chunk_size * V)``
instead of ``O(N * V)``. With ``reduction="none"`` and a trainable ``weight`` the per-row incoming
gradient is unknown in the forward, so nothing beyond the inputs is kept and the chunk logits are
recomputed in the backward.

Semantics (checked against ``F.cross_entropy`` in the tests):

* ``ignore_index`` rows contribute 0 to the loss and to every gradient; ``"mean"`` divides by the number
  of non-ignored rows, so when **all** rows are ignored ``"mean"`` returns ``nan`` (0/0, exactly like
  ``F.cross_entropy``) with all-zero gradients, and ``"sum"``/``"none"`` return zeros.
* ``label_smoothing = eps`` mixes the one-hot target with the uniform distribution over all ``V``
  classes: row loss ``(1 - eps) * nll + eps * (lse - mean(logits))``; ignored rows are excluded from both
  terms and from the mean's denominator (PyTorch's definition).
* The loss comes back in fp32 for half/bfloat16 inputs (fp64 for fp64 inputs); gradients come back in
  the dtypes of ``hidden``, ``weight`` and ``bias``. Weight- and bias-gradient accumulation across
  chunks is in fp32 (fp64 for fp64 weights), also under autocast.
* Out-of-range labels (not ``ignore_index`` and not in ``[0, V)``) raise :class:`DeltaConfigError` (the
  check reads one device value, so it is skipped while a CUDA graph is being captured).

The chunk-gradient-in-forward technique is the one popularised by Liger-Kernel's fused linear
cross-entropy and Apple's cut-cross-entropy (behaviour only; no code from either).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DeltaConfigError
from ..validation import check_choice, check_float, check_int, check_type
from .common import compute_dtype

__all__ = ["causal_lm_loss", "default_chunk_size", "linear_cross_entropy"]

_TARGET_CHUNK_ELEMS = 2**25  # 32M logits per chunk: 128 MiB in fp32
_ROW_MULTIPLE = 128  # matmul tile height on tensor-core GPUs: a chunk of 130 rows wastes half a tile


def default_chunk_size(n_rows: int, vocab_size: int) -> int:
    """Rows per chunk used when ``chunk_size`` is None: about 32M logits (128 MiB fp32) per chunk, rounded
    down to a multiple of 128 rows when that is at least 128 (so the chunk matmuls fill whole tiles)."""
    rows = max(1, _TARGET_CHUNK_ELEMS // max(1, vocab_size))
    if rows >= _ROW_MULTIPLE:
        rows -= rows % _ROW_MULTIPLE
    return min(n_rows, rows)


def _acc_dtype(dt: torch.dtype) -> torch.dtype:
    return torch.promote_types(dt, torch.float32)


def _chunk_buffer(h: Tensor, w: Tensor, chunk: int, acc: torch.dtype) -> Tensor | None:
    """One ``(chunk, V)`` buffer that every chunk's logits (and their log-softmax, in place) reuse, where that
    applies: on the CPU with logits already in ``acc``. A fresh chunk-sized tensor per chunk is a fresh
    ``mmap`` (glibc maps blocks this large directly and unmaps them on free), whose pages are faulted in
    and zeroed again by every chunk: about a tenth of a chunk's matmul at 341 x 49,152."""
    if h.device.type != "cpu" or h.dtype != acc or h.shape[0] == 0:
        return None
    return torch.empty(min(chunk, h.shape[0]), w.shape[0], dtype=acc, device=h.device)


def _chunk_log_softmax(h_c: Tensor, w: Tensor, b: Tensor | None, acc: torch.dtype, buf: Tensor | None = None) -> Tensor:
    """Log-softmax of one chunk's logits in ``acc`` precision: the matmul in the compute dtype, then one
    fused ``log_softmax`` kernel that reads the logits in place of an upcast copy. With ``buf`` (see
    :func:`_chunk_buffer`: CPU, logits in ``acc``) the logits are written into its first rows and the
    log-softmax overwrites them: the CPU kernel writes each element from the same element of its input
    after the row's max and sum are known, so the result is bitwise the out-of-place one (a test pins
    this) and a chunk needs one ``(rows, V)`` buffer instead of two."""
    if buf is not None:
        z = buf[: h_c.shape[0]]
        if b is not None:
            torch.addmm(b, h_c, w.t(), out=z)
        else:
            torch.mm(h_c, w.t(), out=z)
        return torch.log_softmax(z, dim=1, out=z)
    z = torch.addmm(b, h_c, w.t()) if b is not None else h_c @ w.t()
    return torch.log_softmax(z, dim=1, dtype=acc)


def _row_loss(logp: Tensor, safe_y: Tensor, valid: Tensor, eps: float) -> Tensor:
    """Per-row loss from the log-softmax: ``-(1 - eps) * logp[y] - eps * mean(logp)``."""
    nll = -logp.gather(1, safe_y[:, None])[:, 0]
    row = (1.0 - eps) * nll - eps * logp.mean(dim=1) if eps > 0.0 else nll
    return torch.where(valid, row, torch.zeros((), dtype=row.dtype, device=row.device))


def _dlogits(
    logp: Tensor, safe_y: Tensor, coef: Tensor, eps: float, out_dtype: torch.dtype, unit_coef: bool = False
) -> Tensor:
    """``coef[:, None] * (softmax - target_distribution)`` from the log-softmax (consumed in place), written
    in ``out_dtype``: the products are formed in ``logp``'s precision and rounded once, by the kernel that
    writes the result (no separate cast pass). ``unit_coef``: every ``coef`` is 0 or 1 (the valid-row
    mask of ``"sum"``/``"none"``) and ``logp`` is on the CPU; then the rows of coefficient 0 are zeroed
    instead of multiplying every element by its row's coefficient (bitwise the same: the values are
    finite), which saves a pass over the chunk (the row indices are read on the host)."""
    p = logp.exp_()
    p.scatter_add_(1, safe_y[:, None], torch.full_like(logp[:, :1], -(1.0 - eps)))
    if out_dtype == p.dtype:
        if eps > 0.0:
            p.sub_(eps / p.shape[1])
        if unit_coef:
            zero_rows = (coef == 0).nonzero()[:, 0]
            return p.index_fill_(0, zero_rows, 0.0) if zero_rows.numel() else p
        return p.mul_(coef[:, None])
    c = coef[:, None]
    out = torch.empty(p.shape, dtype=out_dtype, device=p.device)
    if eps > 0.0:
        return torch.addcmul(c * (-eps / p.shape[1]), p, c, out=out)
    return torch.mul(p, c, out=out)


def _accumulate_chunk_grads(
    dz: Tensor, h: Tensor, w: Tensor, s: int, e: int, cdt: torch.dtype, dh: Tensor | None, dw: Tensor | None
) -> None:
    """Add one row chunk's gradient (``dz`` = dloss/dlogits of rows ``s:e``, compute dtype) into dh/dw."""
    if dh is not None:
        torch.mm(dz, w, out=dh[s:e])
    if dw is not None:
        if dw.dtype == cdt:
            dw.addmm_(dz.t(), h[s:e])
        else:
            dw.add_(dz.t() @ h[s:e])


class _LinearCEFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, eps, reduction, chunk, cdt):
        n, v = hidden.shape[0], weight.shape[0]
        acc = _acc_dtype(cdt)
        h = hidden.to(cdt)
        w = weight.to(cdt)
        b = bias.to(cdt) if bias is not None else None
        valid = labels != ignore_index
        safe_y = torch.where(valid, labels, torch.zeros_like(labels))
        n_valid = valid.sum().to(acc)
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        any_grad = need_h or need_w or need_b
        precompute = any_grad and (reduction != "none" or not (need_w or need_b))
        if reduction == "mean":
            # 1/n_valid on valid rows, 0 elsewhere (so all-ignored gives zero gradients, like PyTorch)
            coef = torch.where(valid, 1.0 / n_valid, torch.zeros((), dtype=acc, device=n_valid.device))
        else:
            coef = valid.to(acc)
        unit_coef = reduction != "mean" and hidden.device.type == "cpu" and not torch.compiler.is_compiling()

        rows = torch.empty(n, dtype=acc, device=hidden.device)
        dh = torch.empty_like(h) if (precompute and need_h) else None
        w_acc_dtype = _acc_dtype(weight.dtype)  # fp32 (fp64 for fp64 weights), never a half type
        dw = torch.zeros(w.shape, dtype=w_acc_dtype, device=w.device) if (precompute and need_w) else None
        db = torch.zeros(v, dtype=acc, device=hidden.device) if (precompute and need_b) else None

        buf = _chunk_buffer(h, w, chunk, acc)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            logp = _chunk_log_softmax(h[s:e], w, b, acc, buf)
            rows[s:e] = _row_loss(logp, safe_y[s:e], valid[s:e], eps)
            if precompute:
                # the bias gradient is summed in full precision, so it needs the products before rounding
                dz = _dlogits(logp, safe_y[s:e], coef[s:e], eps, acc if db is not None else cdt, unit_coef)
                if db is not None:
                    db.add_(dz.sum(0))
                    dz = dz.to(cdt)
                del logp
                _accumulate_chunk_grads(dz, h, w, s, e, cdt, dh, dw)

        if reduction == "mean":
            loss = rows.sum() / n_valid
        elif reduction == "sum":
            loss = rows.sum()
        else:
            loss = rows

        ctx.meta = (
            reduction,
            precompute,
            eps,
            chunk,
            cdt,
            hidden.dtype,
            weight.dtype,
            None if bias is None else bias.dtype,
        )
        if precompute:
            ctx.save_for_backward(dh, dw, db)
        elif any_grad:
            ctx.save_for_backward(hidden, weight, bias, labels, coef)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        reduction, precompute, eps, chunk, cdt, h_dtype, w_dtype, b_dtype = ctx.meta
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if precompute:
            dh, dw, db = ctx.saved_tensors
            if reduction == "none":
                gh = g.to(dh.dtype)[:, None]
                dh = dh * gh if (need_h and dh is not None) else None
                return (
                    dh.to(h_dtype) if dh is not None else None,
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                )
            gh = g.to(dh.dtype) if dh is not None else None
            out_h = (dh * gh).to(h_dtype) if (need_h and dh is not None) else None
            out_w = (dw * g.to(dw.dtype)).to(w_dtype) if (need_w and dw is not None) else None
            out_b = (db * g.to(db.dtype)).to(b_dtype) if (need_b and db is not None) else None
            return out_h, out_w, out_b, None, None, None, None, None, None

        # reduction == "none" with a trainable weight/bias: recompute the chunk logits
        hidden, weight, bias, labels, coef = ctx.saved_tensors
        acc = coef.dtype
        h = hidden.to(cdt)
        w = weight.to(cdt)
        b = bias.to(cdt) if bias is not None else None
        valid = coef != 0
        safe_y = torch.where(valid, labels, torch.zeros_like(labels))
        rc = coef * g.to(acc)
        n = h.shape[0]
        dh = torch.empty_like(h) if need_h else None
        w_acc_dtype = _acc_dtype(w_dtype)
        dw = torch.zeros(w.shape, dtype=w_acc_dtype, device=w.device) if need_w else None
        db = torch.zeros(w.shape[0], dtype=acc, device=h.device) if need_b else None
        buf = _chunk_buffer(h, w, chunk, acc)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            logp = _chunk_log_softmax(h[s:e], w, b, acc, buf)
            dz = _dlogits(logp, safe_y[s:e], rc[s:e], eps, acc if db is not None else cdt)
            if db is not None:
                db.add_(dz.sum(0))
                dz = dz.to(cdt)
            del logp
            _accumulate_chunk_grads(dz, h, w, s, e, cdt, dh, dw)
        return (
            dh.to(h_dtype) if dh is not None else None,
            dw.to(w_dtype) if dw is not None else None,
            db.to(b_dtype) if db is not None else None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def _validate(
    hidden: object,
    weight: object,
    labels: object,
    bias: object,
    ignore_index: object,
    label_smoothing: object,
    reduction: object,
    chunk_size: object,
) -> None:
    check_type("hidden", hidden, Tensor, "a torch.Tensor")
    check_type("weight", weight, Tensor, "a torch.Tensor")
    check_type("labels", labels, Tensor, "a torch.Tensor")
    assert isinstance(hidden, Tensor) and isinstance(weight, Tensor) and isinstance(labels, Tensor)
    if hidden.dim() != 2:
        raise DeltaConfigError(f"hidden must be a 2-D tensor (N, H), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise DeltaConfigError(
            f"weight must have shape (V, {hidden.shape[1]}) matching hidden, got shape {tuple(weight.shape)}"
        )
    if labels.dim() != 1 or labels.shape[0] != hidden.shape[0]:
        raise DeltaConfigError(
            f"labels must have shape ({hidden.shape[0]},), got shape {tuple(labels.shape)}"
        )
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise DeltaConfigError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if bias is not None:
        check_type("bias", bias, Tensor, "a torch.Tensor or None")
        assert isinstance(bias, Tensor)
        if tuple(bias.shape) != (weight.shape[0],):
            raise DeltaConfigError(
                f"bias must have shape ({weight.shape[0]},) or be None, got shape {tuple(bias.shape)}"
            )
    check_int("ignore_index", ignore_index)
    check_float("label_smoothing", label_smoothing, low=0.0, high=1.0)
    check_choice("reduction", reduction, ("mean", "sum", "none"))
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, minimum=1)


def _capturing(t: Tensor) -> bool:
    """True while ``t``'s CUDA device is capturing a graph (host reads of device values are not allowed)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _check_label_range(labels: Tensor, v: int, ignore_index: int) -> None:
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= v))
    if bool(bad.any()):
        first = int(labels[bad][0])
        raise DeltaConfigError(
            f"labels must be in [0, {v}) or equal ignore_index ({ignore_index}), got {first}"
        )


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
    check_labels: bool = True,
) -> Tensor:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels`` without the full logits.

    Args:
        hidden: ``(N, H)`` activations (e.g. the last hidden states, flattened).
        weight: ``(V, H)`` output projection (e.g. ``lm_head.weight``); frozen or trainable.
        labels: ``(N,)`` integer class indices or ``ignore_index``.
        bias: optional ``(V,)``.
        ignore_index, label_smoothing, reduction: as in ``torch.nn.functional.cross_entropy``.
        chunk_size: rows per chunk (default :func:`default_chunk_size`: ~32M logits per chunk).
        check_labels: check the label range (``False``: the caller checked a host copy; device labels
            are then not read back).

    Returns:
        scalar (``"mean"``/``"sum"``) or ``(N,)`` (``"none"``) loss in fp32 (fp64 for fp64 inputs).
    """
    _validate(hidden, weight, labels, bias, ignore_index, label_smoothing, reduction, chunk_size)
    v = weight.shape[0]
    # checked where the labels are (host labels: no device read); device labels are read back, which is
    # not allowed (and skipped) while a CUDA graph is being captured or torch.compile traces
    labels = labels.long()
    if check_labels and not torch.compiler.is_compiling() and not (labels.is_cuda and _capturing(hidden)):
        _check_label_range(labels, v, ignore_index)
    labels = labels.to(hidden.device)
    chunk = chunk_size if chunk_size is not None else default_chunk_size(hidden.shape[0], v)
    cdt = compute_dtype(hidden)
    if not torch.is_grad_enabled():  # evaluation: no gradient work or V x H buffers at all
        hidden, weight = hidden.detach(), weight.detach()
        bias = bias.detach() if bias is not None else None
    return _LinearCEFn.apply(
        hidden, weight, bias, labels, int(ignore_index), float(label_smoothing), reduction, chunk, cdt
    )


def causal_lm_loss(
    hidden_states: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    num_items_in_batch: int | Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Next-token loss of a causal LM from its last hidden states, without materialising the logits.

    Like Hugging Face's ``ForCausalLMLoss``: position ``t`` predicts ``labels[:, t + 1]`` (the labels are
    padded with ``ignore_index`` on the right and shifted, so ``hidden_states`` is not sliced/copied and
    the last position is ignored). With ``num_items_in_batch`` the loss is the *sum* divided by it (HF's
    gradient-accumulation-correct normalisation; only with ``reduction="mean"``).

    Args:
        hidden_states: ``(B, T, H)``; lm_head_weight: ``(V, H)``; labels: ``(B, T)`` (unshifted).

    Returns:
        scalar loss, or ``(B, T)`` per-position losses for ``reduction="none"`` (last column 0).
    """
    check_type("hidden_states", hidden_states, Tensor, "a torch.Tensor")
    check_type("labels", labels, Tensor, "a torch.Tensor")
    if hidden_states.dim() != 3:
        raise DeltaConfigError(
            f"hidden_states must be a 3-D tensor (B, T, H), got shape {tuple(hidden_states.shape)}"
        )
    bsz, t, hdim = hidden_states.shape
    if tuple(labels.shape) != (bsz, t):
        raise DeltaConfigError(f"labels must have shape ({bsz}, {t}), got shape {tuple(labels.shape)}")
    check_choice("reduction", reduction, ("mean", "sum", "none"))
    if num_items_in_batch is not None:
        if reduction != "mean":
            raise DeltaConfigError(
                f"num_items_in_batch needs reduction='mean' (it replaces the mean's denominator), got {reduction!r}"
            )
        if not isinstance(num_items_in_batch, Tensor):
            check_int("num_items_in_batch", num_items_in_batch, minimum=1)
    check_int("ignore_index", ignore_index)
    shifted = F.pad(labels, (0, 1), value=ignore_index)[:, 1:]
    red = "sum" if num_items_in_batch is not None else reduction
    loss = linear_cross_entropy(
        hidden_states.reshape(bsz * t, hdim),
        lm_head_weight,
        shifted.reshape(-1),
        bias=bias,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction=red,
        chunk_size=chunk_size,
    )
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    elif reduction == "none":
        loss = loss.reshape(bsz, t)
    return loss
