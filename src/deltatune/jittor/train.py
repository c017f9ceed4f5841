"""Training on the Jittor side, matching :class:`deltatune.train.Trainer` step for step.

* Loss: label-smoothed cross-entropy over the shifted labels, prompt and padding (``-100``) masked,
  summed over the batch's counted tokens and divided by their number (the Trainer's default loss,
  ``F.cross_entropy(..., label_smoothing=eps)``: ``(1 - eps) * nll + eps * mean_v(-log p_v)``); the
  log-softmax and its sums over the vocabulary in float64, the summed loss rounded to float32.
* Gradient clipping as ``torch.nn.utils.clip_grad_norm_`` (total L2 norm, ``max_norm / (norm + 1e-6)``
  capped at 1).
* :class:`AdamW`: the update of :class:`deltatune.train.AdamW` (decoupled weight decay
  ``p *= 1 - lr * wd``, the same bias-correction switch; the decay rule decays every 2-D matrix, which
  all LoRA matrices are).
* Learning rate: :func:`deltatune.train.schedules.lr_factor` (the same linear warm-up schedule).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import require_jittor
from .models import to_jt

__all__ = ["AdamW", "logits_loss_sum", "clip_grad_norm", "evaluate", "train_step"]

IGNORE_INDEX = -100


def logits_loss_sum(logits: Any, labels: np.ndarray, label_smoothing: float = 0.0) -> tuple[Any, int]:
    """(summed token loss as a Jittor scalar, number of counted tokens) for next-token prediction."""
    require_jittor()
    labels = np.asarray(labels, dtype=np.int64)[:, 1:].reshape(-1)
    v = logits.shape[-1]
    # in float64: PyTorch's float32 log-softmax and class sums are blocked and near-exact, Jittor's CPU
    # reductions add the ~50k classes one after another (a 2.5e-5 relative loss error on SmolLM2's
    # vocabulary, and as much on the gradient's softmax term); float64 gives PyTorch's values within rounding
    x = logits[:, :-1, :].reshape(-1, v).float64()
    a = x - x.max(-1, keepdims=True)
    lp = a - a.exp().sum(-1, keepdims=True).log()
    valid = labels != IGNORE_INDEX
    n = int(valid.sum())
    idx = to_jt(np.where(valid, labels, 0).reshape(-1, 1))
    nll = -lp.gather(1, idx).reshape(-1)
    w = to_jt(valid.astype(np.float64))
    if label_smoothing > 0:
        smooth = -lp.mean(-1)
        per = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    else:
        per = nll
    return (per * w).sum().float32(), n


def clip_grad_norm(grads: Sequence[Any], max_norm: float | None) -> tuple[list[Any], float]:
    """Clip like ``torch.nn.utils.clip_grad_norm_``; returns (grads, total norm before clipping)."""
    jt = require_jittor()
    sq = [(g * g).sum() for g in grads]
    total = float(jt.sqrt(sum(sq[1:], sq[0])).item()) if sq else 0.0
    if max_norm is None:
        return list(grads), total
    coef = min(1.0, max_norm / (total + 1e-6))
    if coef < 1.0:
        grads = [g * np.float32(coef) for g in grads]
    return list(grads), total


class AdamW:
    """:class:`deltatune.train.AdamW`'s update on Jittor Vars (see the module docstring)."""

    def __init__(
        self, params: Sequence[Any], lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
        weight_decay: float = 0.0, bias_correction: bool = True, decay: Sequence[bool] | None = None,
    ) -> None:
        jt = require_jittor()
        self.params = list(params)
        self.lr = lr
        self.betas = betas
        self.eps = eps
        self.weight_decay = weight_decay
        self.bias_correction = bias_correction
        self.decay = list(decay) if decay is not None else [len(p.shape) >= 2 for p in self.params]
        self.m = [jt.zeros(p.shape, dtype="float32").stop_grad() for p in self.params]
        self.v = [jt.zeros(p.shape, dtype="float32").stop_grad() for p in self.params]
        self.t = 0

    def step(self, grads: Sequence[Any]) -> None:
        """One update with ``grads`` (aligned with the parameters) at the current ``lr``."""
        jt = require_jittor()
        self.t += 1
        lr, (b1, b2), t = self.lr, self.betas, self.t
        outs = []
        for i, (p, g) in enumerate(zip(self.params, grads)):
            g = g.stop_grad()
            new_p = p * (1.0 - lr * self.weight_decay) if (self.weight_decay and self.decay[i]) else p
            m = self.m[i] + (g - self.m[i]) * (1.0 - b1)  # torch lerp: m + w * (g - m)
            v = self.v[i] * b2 + g * g * (1.0 - b2)
            denom = jt.sqrt(v)
            if self.bias_correction:
                denom = denom / math.sqrt(1.0 - b2**t) + self.eps
                new_p = new_p + m / denom * (-lr / (1.0 - b1**t))
            else:
                new_p = new_p + m / (denom + self.eps) * (-lr)
            self.m[i].update(m.stop_grad())
            self.v[i].update(v.stop_grad())
            p.update(new_p)
            outs += [p, self.m[i], self.v[i]]
        jt.sync(outs)


def train_step(
    model: Any, params: Sequence[Any], optimizer: AdamW, batch: dict[str, Any], label_smoothing: float,
    max_grad_norm: float | None,
) -> dict[str, Any]:
    """Forward, backward, clip and one optimiser step on ``batch`` (numpy/torch ``input_ids``,
    ``attention_mask``, ``labels``); returns ``{"loss_sum", "n", "grad_norm"}``."""
    jt = require_jittor()
    ids, mask, labels = (_np(batch[k]) for k in ("input_ids", "attention_mask", "labels"))
    logits, _ = model(ids, attention_mask=mask)
    total, n = logits_loss_sum(logits, labels, label_smoothing)
    objective = total / float(max(n, 1))
    grads = jt.grad(objective, list(params))
    grads, norm = clip_grad_norm(grads, max_grad_norm)
    loss_sum = float(total.item())
    optimizer.step(grads)
    return {"loss_sum": loss_sum, "n": n, "grad_norm": norm, "tokens": int(mask.sum())}


def evaluate(model: Any, dataset: Sequence[Any], collate: Any, batch_size: int) -> dict[str, Any]:
    """Mean token cross-entropy (no smoothing) over ``dataset`` in file order, as ``Trainer.evaluate``."""
    jt = require_jittor()
    total, n_total = 0.0, 0
    was = model.training
    model.train(False)
    try:
        with jt.no_grad():
            for i in range(0, len(dataset), batch_size):
                batch = collate([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))])
                logits, _ = model(_np(batch["input_ids"]), attention_mask=_np(batch["attention_mask"]))
                s, n = logits_loss_sum(logits, _np(batch["labels"]), 0.0)
                total += float(s.item())
                n_total += n
    finally:
        model.train(was)
    loss = total / n_total if n_total else float("nan")
    return {"eval_loss": loss, "eval_ppl": math.exp(loss) if loss < 700 else float("inf"), "eval_tokens": n_total}


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)
