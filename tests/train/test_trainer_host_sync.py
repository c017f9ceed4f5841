"""The training loop reads nothing computed by the model back to the host between two log steps,
and the logged window means are exactly the means of the per-step numbers."""

from __future__ import annotations

import sys

import pytest
import torch
from _train_utils import lm_examples, tiny_lm
from _train_utils import single_thread as _single_thread  # noqa: F401
from torch.overrides import TorchFunctionMode

from deltatune.train import TrainConfig, Trainer, TrainerCallback

# Python conversions of a tensor that wait for the device (a host-device synchronisation on CUDA)
_HOST_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu"}
# functions allowed to read tensors: they count tokens on the CPU copy of a batch, before the device
_CPU_COUNTERS = {"count_loss_tokens", "_input_tokens"}


class _HostReads(TorchFunctionMode):
    """Records the function that converted a tensor to a Python value, while ``on``."""

    def __init__(self) -> None:
        super().__init__()
        self.on = False
        self.callers: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.on and getattr(func, "__name__", "") in _HOST_READS:
            self.callers.append(sys._getframe(1).f_code.co_name)
        return func(*args, **(kwargs or {}))


class _Window(TrainerCallback):
    def __init__(self, mode: _HostReads, log_every: int) -> None:
        self.mode, self.log_every = mode, log_every

    def on_step_end(self, trainer: Trainer) -> None:
        # watch the next step unless it logs (every log_every steps and the last step)
        nxt = trainer.state.step + 1
        self.mode.on = nxt % self.log_every != 0 and nxt < trainer.total_steps


@pytest.mark.parametrize("max_grad_norm", [1.0, None])
@pytest.mark.parametrize("grad_accum_steps", [1, 2])
def test_no_host_reads_of_device_values_between_log_steps(max_grad_norm, grad_accum_steps):
    log_every = 4
    mode = _HostReads()
    cfg = TrainConfig(
        lr=1e-2, batch_size=2, max_steps=9, log_every=log_every, grad_accum_steps=grad_accum_steps,
        max_grad_norm=max_grad_norm, progress_bar=False, tensorboard=False, device="cpu",
    )
    tr = Trainer(tiny_lm(), cfg, lm_examples(40, seed=3), callbacks=[_Window(mode, log_every)])
    with mode:
        tr.train()
    assert set(mode.callers) <= _CPU_COUNTERS, sorted(set(mode.callers) - _CPU_COUNTERS)
    assert [r["step"] for r in tr.log_history] == [4, 8, 9]
    assert all(isinstance(r["grad_norm"], float) and r["grad_norm"] > 0 for r in tr.log_history)


def test_window_loss_is_the_exact_mean_of_the_step_losses():
    """The loss of a log record is sum(step loss sums, float64) / sum(units), where a step's loss
    sum is the float32 sum of its micro-batches' mean * n."""
    parts: list[torch.Tensor] = []
    counts: list[int] = []

    def loss_fn(model, batch):
        logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        n = int((labels != -100).sum())
        parts.append((loss.detach().float() * n).clone())
        counts.append(n)
        return loss, n

    accum, log_every, steps = 3, 2, 7
    cfg = TrainConfig(
        lr=1e-2, batch_size=2, max_steps=steps, log_every=log_every, grad_accum_steps=accum,
        progress_bar=False, tensorboard=False, device="cpu",
    )
    tr = Trainer(tiny_lm(), cfg, lm_examples(60, seed=5), loss_fn=loss_fn)
    summary = tr.train()
    step_sums, step_ns = [], []
    for s in range(steps):
        acc = parts[s * accum]
        for p in parts[s * accum + 1 : (s + 1) * accum]:
            acc = acc + p  # float32, in micro-batch order
        step_sums.append(acc.double())
        step_ns.append(sum(counts[s * accum : (s + 1) * accum]))
    logged = [r for r in tr.log_history if r["split"] == "train"]
    assert [r["step"] for r in logged] == [2, 4, 6, 7]
    start = 0
    for r in logged:
        win = torch.zeros((), dtype=torch.float64)
        for x in step_sums[start : r["step"]]:
            win += x
        assert r["loss"] == float(win) / sum(step_ns[start : r["step"]])
        start = r["step"]
    assert summary["final_loss"] == logged[-1]["loss"]
    assert summary["loss_tokens"] == sum(counts)
