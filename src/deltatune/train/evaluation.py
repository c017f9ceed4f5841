"""Evaluation of :class:`~deltatune.train.Trainer`: the mean token loss over an evaluation set on all ranks.

:class:`EvalMixin` holds :meth:`~deltatune.train.Trainer.evaluate` (plain cross-entropy of the default loss,
or the ``loss_fn``; FSDP ranks run as many batches as rank 0) and the logging of its result during
training.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import DeltaConfigError
from .distributed import all_reduce_sum
from .losses import check_label_range
from .step import _to_device

__all__ = ["EvalMixin"]


class EvalMixin:
    """The Trainer's evaluation methods (mixed into :class:`~deltatune.train.Trainer`)."""

    def _evaluate_and_log(self) -> dict[str, Any]:
        metrics = self.evaluate()
        self._log(
            {
                "split": "eval",
                "step": self.state.step,
                "epoch": round(self._epoch_fraction(), 6),
                "loss": metrics["eval_loss"],
                "ppl": metrics["eval_ppl"],
                "tokens": metrics["eval_tokens"],
                "elapsed": round(self.state.elapsed, 4),
            }
        )
        for cb in self.callbacks:
            cb.on_evaluate(self, metrics)
        return metrics

    @torch.no_grad()
    def evaluate(self, eval_dataset: Any = None) -> dict[str, Any]:
        """Mean token loss over ``eval_dataset`` (default: the trainer's) on all ranks.

        Returns ``{"eval_loss", "eval_ppl" (= exp(eval_loss)), "eval_tokens"}``. The default loss
        is plain cross-entropy here (no label smoothing). The model's train/eval mode is restored.
        """
        self._check_open("evaluate")
        ds = eval_dataset if eval_dataset is not None else self.eval_dataset
        if ds is None:
            raise DeltaConfigError("evaluate() needs an eval_dataset (given to the Trainer or to evaluate()), got None")
        c = self.config
        bs = c.eval_batch_size or c.batch_size
        own = list(range(self.dist.rank, len(ds), self.dist.world_size))
        batches = [own[i : i + bs] for i in range(0, len(own), bs)]
        n_real = len(batches)
        if self.is_fsdp:
            # every forward of a sharded model is collective: all ranks must run as many batches as
            # rank 0 (which holds the most examples); the extra ones repeat example 0 and are ignored
            most = -(-len(range(0, len(ds), self.dist.world_size)) // bs)
            batches += [[0]] * (most - n_real)
        was_training = self.model.training
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        # unit counts: device tensors (the default loss) are summed on the device and read once
        # after the loop instead of once per batch; host ints (a custom loss_fn) are added here
        n_dev = torch.zeros((), dtype=torch.int64, device=self.device)
        n_total = 0
        try:
            from tqdm.auto import tqdm

            loader = self._loader(ds, batches, c.seed)
            bar = tqdm(loader, desc="eval", leave=False, disable=not (self.is_main and c.progress_bar))
            for i, batch in enumerate(bar):
                if self.loss_fn is None and isinstance(batch, Mapping) and "labels" in batch and self._ddp is None:
                    if not self.is_fsdp:
                        check_label_range(self.model, batch["labels"])
                batch = _to_device(batch, self.device)
                with self._autocast():
                    loss_sum, n = self._compute_loss(self.model, batch, 0.0)
                if i < n_real:
                    total.add_(loss_sum.detach())
                    if isinstance(n, torch.Tensor):
                        n_dev.add_(n.detach().reshape(()).to(n_dev.device, torch.int64))
                    else:
                        n_total += int(n)
        finally:
            self.model.train(was_training)
        n_total += int(n_dev)
        tot = all_reduce_sum(self.dist, torch.stack([total.cpu(), torch.tensor(float(n_total), dtype=torch.float64)]))
        loss_sum, n = float(tot[0]), int(round(float(tot[1])))
        loss = loss_sum / n if n else float("nan")
        try:
            ppl = math.exp(loss)
        except OverflowError:
            ppl = float("inf")
        return {"eval_loss": loss, "eval_ppl": ppl, "eval_tokens": n}
