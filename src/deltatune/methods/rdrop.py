"""R-Drop (Liang et al., 2021): regularise two dropout passes of the same input to agree.

Usage::

    batch2 = rdrop_repeat(batch)                 # every row twice (interleaved by default)
    logits = model(**{k: v for k, v in batch2.items() if k != "labels"}).logits
    loss = RDropLoss(alpha=4.0)(logits, batch2["labels"])

The loss for the two passes' logits ``z1, z2`` (rows ``0::2`` and ``1::2`` for the interleaved
layout, first and second half for ``"concat"``), with ``P_i = softmax(z_i)`` and
``KL_n = KL(P2 ‖ P1) + KL(P1 ‖ P2)`` at counted position ``n`` (summed over classes):

* ``kl_reduction="sum"`` (default; what MindPet's ``RDropLoss`` and the original R-Drop code
  compute: the KL is summed over the batch, not averaged)::

      loss = CE + alpha / 4 · Σ_n KL_n

  This is MindPet 1.0.4's scaling exactly (checked against it by ``scripts/mindpet_parity.sh``). The
  original R-Drop code sums the same terms over the batch but weights them ``alpha / 2`` (it averages
  the pair, then multiplies by ``alpha``): pass ``alpha = 2·a`` here to reproduce its weight ``a``.
* ``kl_reduction="mean"`` (deltatune's earlier form, kept as a named option): the KL averaged over
  the counted positions like the CE, ``loss = CE + alpha / 2 · mean_n KL_n``. It equals ``"sum"`` only
  for exactly two counted positions.

``CE = ½ (CE(z1, y) + CE(z2, y))`` is reduced by ``reduction``: ``"mean"`` averages it over the
counted positions, ``"sum"`` sums it (the KL term is then the batch sum under both
``kl_reduction`` values), ``"none"`` returns the per-position loss ``CE_n + c · KL_n`` (``c`` the
factor above: ``alpha/4`` or ``alpha/2``) of shape ``(B,)`` or ``(B, T-1)``, ignored positions 0.
For causal-LM logits ``(2B, T, V)`` labels are shifted as Hugging Face does (position ``t``
predicts label ``t+1``); positions whose label is ``ignore_index`` are excluded from both CE and KL.
A batch with no counted position gives 0 under ``"mean"`` (where ``F.cross_entropy`` would give NaN).

This is a loss, not a graph method: it has no registry entry.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import DeltaConfigError, DeltaConfigTypeError
from ..validation import check_bool, check_choice, check_float, check_int, check_type

__all__ = ["RDropLoss", "rdrop_repeat", "rdrop_split"]

LAYOUTS = ("interleave", "concat")
KL_REDUCTIONS = ("sum", "mean")


def rdrop_repeat(batch: Mapping[str, Any], layout: str = "interleave") -> dict[str, Any]:
    """Duplicate every tensor of ``batch`` along dimension 0.

    ``layout="interleave"`` gives rows ``x0, x0, x1, x1, ...`` (``repeat_interleave``);
    ``"concat"`` gives ``x0, x1, ..., x0, x1, ...``. 0-d tensors and non-tensor values are copied
    unchanged. All tensors with a batch dimension must share its size.
    """
    check_type("batch", batch, Mapping, "a dict of tensors")
    check_choice("layout", layout, LAYOUTS)
    sizes = {k: v.shape[0] for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
    if len(set(sizes.values())) > 1:
        raise DeltaConfigError(f"batch tensors must share their first (batch) dimension, got sizes {sizes}")
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            out[k] = v.repeat_interleave(2, dim=0) if layout == "interleave" else torch.cat([v, v], dim=0)
        else:
            out[k] = v
    return out


def rdrop_split(t: torch.Tensor, layout: str = "interleave") -> tuple[torch.Tensor, torch.Tensor]:
    """The two copies of a tensor produced from an :func:`rdrop_repeat` batch."""
    check_choice("layout", layout, LAYOUTS)
    if t.shape[0] % 2:
        raise DeltaConfigError(
            f"R-Drop needs an even batch dimension (each row twice, see rdrop_repeat), got shape {tuple(t.shape)}"
        )
    if layout == "interleave":
        return t[0::2], t[1::2]
    return t.chunk(2, dim=0)  # type: ignore[return-value]


class RDropLoss(nn.Module):
    """Cross-entropy on both dropout passes plus ``alpha`` × symmetric KL between them.

    Args:
        alpha: weight of the KL term (>= 0; 4.0 as MindPet's default).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (of the cross-entropy; see the module docstring).
        kl_reduction: ``"sum"`` (default, MindPet's and the original R-Drop's: the KL summed over the
            batch, weighted ``alpha/4``) or ``"mean"`` (averaged over positions, weighted ``alpha/2``).
        kl_target_grad: let the gradient flow through the target distribution of each KL term (the
            original R-Drop's PyTorch code, default). ``False`` treats it as a constant, which is what
            MindPet computes (MindSpore's ``KLDivLoss`` passes no gradient to its target); the value is
            the same either way.
        ignore_index: label value excluded from CE and KL.
        layout: how the batch was duplicated (``"interleave"`` or ``"concat"``, see :func:`rdrop_repeat`).
        shift_labels: shift labels for causal LM (position t predicts label t+1). None: shift when
            the logits are 3-D ``(2B, T, V)``; set False for token classification.
    """

    def __init__(
        self,
        alpha: float = 4.0,
        reduction: str = "mean",
        ignore_index: int = -100,
        layout: str = "interleave",
        shift_labels: bool | None = None,
        kl_reduction: str = "sum",
        kl_target_grad: bool = True,
    ) -> None:
        super().__init__()
        self.alpha = check_float("RDropLoss.alpha", alpha, low=0.0)
        self.reduction = check_choice("RDropLoss.reduction", reduction, ("mean", "sum", "none"))
        self.ignore_index = check_int("RDropLoss.ignore_index", ignore_index)
        self.layout = check_choice("RDropLoss.layout", layout, LAYOUTS)
        if shift_labels is not None:
            check_bool("RDropLoss.shift_labels", shift_labels)
        self.shift_labels = shift_labels
        self.kl_reduction = check_choice("RDropLoss.kl_reduction", kl_reduction, KL_REDUCTIONS)
        self.kl_target_grad = check_bool("RDropLoss.kl_target_grad", kl_target_grad)

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, reduction={self.reduction!r}, kl_reduction={self.kl_reduction!r}, "
            f"ignore_index={self.ignore_index}, layout={self.layout!r}"
        )

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss of ``logits`` ``(2B, C)`` or ``(2B, T, V)`` from a duplicated batch.

        ``labels`` is ``(2B,)`` / ``(2B, T)`` (the duplicated batch's labels; both copies must be
        equal) or ``(B,)`` / ``(B, T)``.
        """
        check_type("logits", logits, torch.Tensor, "a tensor")
        check_type("labels", labels, torch.Tensor, "a tensor")
        if logits.dim() not in (2, 3):
            raise DeltaConfigError(f"logits must have shape (2B, C) or (2B, T, V), got {tuple(logits.shape)}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise DeltaConfigTypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
        z1, z2 = rdrop_split(logits, self.layout)
        b = z1.shape[0]
        if labels.shape[0] == 2 * b:
            y1, y2 = rdrop_split(labels, self.layout)
            if not torch.equal(y1, y2):
                raise DeltaConfigError("labels of the two copies differ; duplicate the batch with rdrop_repeat")
            labels = y1
        if tuple(labels.shape) != tuple(z1.shape[:-1]):
            raise DeltaConfigError(
                f"labels must have shape {tuple(z1.shape[:-1])} (or the duplicated {(2 * b, *z1.shape[1:-1])}) for "
                f"logits of shape {tuple(logits.shape)}, got {tuple(labels.shape)}"
            )
        shift = self.shift_labels if self.shift_labels is not None else logits.dim() == 3
        if shift and logits.dim() == 3:
            z1, z2, labels = z1[:, :-1], z2[:, :-1], labels[:, 1:]
        out_shape = labels.shape
        z1 = z1.reshape(-1, z1.shape[-1]).float()
        z2 = z2.reshape(-1, z2.shape[-1]).float()
        y = labels.reshape(-1)
        mask = y != self.ignore_index
        bad = mask & ((y < 0) | (y >= z1.shape[-1]))
        if bool(bad.any()):
            raise DeltaConfigError(
                f"labels must be {self.ignore_index} (ignored) or a class in [0, {z1.shape[-1]}) for logits with "
                f"{z1.shape[-1]} classes, got {int(y[bad][0])}"
            )
        ce = 0.5 * (
            F.cross_entropy(z1, y, ignore_index=self.ignore_index, reduction="none")
            + F.cross_entropy(z2, y, ignore_index=self.ignore_index, reduction="none")
        )
        lp1, lp2 = F.log_softmax(z1, dim=-1), F.log_softmax(z2, dim=-1)
        # KL(P2 || P1) + KL(P1 || P2), summed over classes
        t1, t2 = (lp1, lp2) if self.kl_target_grad else (lp1.detach(), lp2.detach())
        kl = (t2.exp() * (t2 - lp1)).sum(-1) + (t1.exp() * (t1 - lp2)).sum(-1)
        zero = torch.zeros_like(ce)
        ce, kl = torch.where(mask, ce, zero), torch.where(mask, kl, zero)
        weight = self.alpha * (0.25 if self.kl_reduction == "sum" else 0.5)
        if self.reduction == "none":
            return (ce + weight * kl).view(out_shape)
        if self.reduction == "sum":
            return ce.sum() + weight * kl.sum()
        count = mask.sum().clamp(min=1)
        kl_term = kl.sum() if self.kl_reduction == "sum" else kl.sum() / count
        return ce.sum() / count + weight * kl_term
