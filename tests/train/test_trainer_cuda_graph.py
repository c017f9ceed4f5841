"""Trainer(cuda_graph=True): errors before any work (CPU) and captured steps equal eager ones (CUDA only)."""

from __future__ import annotations

import pytest
import torch
from _train_utils import lm_examples, tiny_llama, tiny_lm, trainable_state

from deltatune.errors import DeltaConfigError
from deltatune.train import PadCollator, TrainConfig, Trainer

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cfg(**kw):
    base = {"progress_bar": False, "tensorboard": False, "cuda_graph": True}
    base.update(kw)
    return TrainConfig(**base)


def test_custom_loss_is_refused_before_any_work():
    with pytest.raises(DeltaConfigError, match=r"cuda_graph=True needs the default causal-LM loss or a loss_fn with a "
                                                r"unit_count\(batch\) method"):
        Trainer(tiny_lm(), _cfg(), lm_examples(2), loss_fn=lambda m, b: (torch.zeros(()), 1))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_cpu_device_is_refused_before_any_work():
    with pytest.raises(DeltaConfigError, match=r"cuda_graph=True needs a CUDA device, got device 'cpu'"):
        Trainer(tiny_lm(), _cfg(device="cpu"), lm_examples(2))


def _run(cuda_graph: bool, max_graphs: int | None = None):
    data = lm_examples(24, seed=5, min_len=3, max_len=20)
    cfg = _cfg(cuda_graph=cuda_graph, lr=5e-3, batch_size=4, grad_accum_steps=2, max_steps=6, warmup_steps=2,
               log_every=1, max_grad_norm=0.5, device="cuda", shuffle=False)
    model = tiny_llama()
    tr = Trainer(model, cfg, data, collate_fn=PadCollator(pad_to_multiple_of=8))
    if max_graphs is not None:
        tr.MAX_CUDA_GRAPHS = max_graphs
    tr.train()
    logs = [(r["loss"], r["grad_norm"], r["lr"]) for r in tr.log_history if r["split"] == "train"]
    return logs, trainable_state(model), tr


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("max_graphs", [None, 1])
def test_captured_training_equals_eager_training(max_graphs):
    eager_logs, eager_state, _ = _run(False)
    logs, state, tr = _run(True, max_graphs)
    assert len(tr._graphs) >= 1 and (max_graphs is None or len(tr._graphs) == max_graphs)
    assert [lr for _, _, lr in logs] == [lr for _, _, lr in eager_logs]
    for (loss, norm, _), (e_loss, e_norm, _) in zip(logs, eager_logs):
        assert loss == pytest.approx(e_loss, rel=1e-4)
        assert norm == pytest.approx(e_norm, rel=1e-3)
    for name, value in eager_state.items():
        torch.testing.assert_close(state[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_config_device_check():
    TrainConfig(cuda_graph=False, device="cpu").check_cuda_graph_device()  # off: nothing to check
    with pytest.raises(DeltaConfigError, match=r"cuda_graph=True needs a CUDA device, got device 'cpu'"):
        TrainConfig(cuda_graph=True, device="cpu").check_cuda_graph_device()


def _run_classifier(cuda_graph: bool):
    from deltatune.tasks import classification_loss

    torch.manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Dropout(0.0), torch.nn.Linear(16, 3))

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return type("O", (), {"logits": self.net(x)})()

    g = torch.Generator().manual_seed(1)
    data = [{"x": torch.randn(8, generator=g), "labels": int(torch.randint(0, 3, (1,), generator=g))} for _ in range(16)]
    cfg = _cfg(cuda_graph=cuda_graph, lr=1e-2, batch_size=4, max_steps=6, log_every=1, device="cuda", shuffle=False)
    wrapped = Wrap()
    tr = Trainer(wrapped, cfg, data, loss_fn=classification_loss(False))
    tr.train()
    return [r["loss"] for r in tr.log_history if r["split"] == "train"], trainable_state(wrapped), tr


@cuda
@pytest.mark.gpu
def test_captured_classification_equals_eager():
    eager, eager_state, _ = _run_classifier(False)
    losses, state, tr = _run_classifier(True)
    assert tr.capture and len(tr._graphs) == 1
    assert losses == pytest.approx(eager, rel=1e-4)
    for name, value in eager_state.items():
        torch.testing.assert_close(state[name], value, rtol=1e-4, atol=1e-5, msg=name)


@cuda
@pytest.mark.gpu
def test_auto_captures_on_cuda_and_equals_eager():
    data = lm_examples(8, seed=5, min_len=3, max_len=20)

    def run(cuda_graph):
        cfg = TrainConfig(progress_bar=False, tensorboard=False, cuda_graph=cuda_graph, batch_size=4, max_steps=3,
                          log_every=1, device="cuda", shuffle=False, lr=5e-3)
        tr = Trainer(tiny_llama(), cfg, data, collate_fn=PadCollator(pad_to_multiple_of=8))
        tr.train()
        return tr, [r["loss"] for r in tr.log_history if r["split"] == "train"]

    auto, losses = run("auto")
    assert auto.capture and auto.eager_reason == "" and len(auto._graphs) >= 1
    eager, ref = run(False)
    assert not eager.capture and losses == pytest.approx(ref, rel=1e-4)


@cuda
@pytest.mark.gpu
def test_auto_falls_back_to_eager_when_the_capture_fails():
    class HostReadingLoss:  # reads a device value on every call: cannot be captured
        def unit_count(self, batch):
            return int(batch["label"].shape[0])

        def __call__(self, model, batch):
            logits = model(input_ids=batch["input_ids"]).logits[:, -1]
            loss = torch.nn.functional.cross_entropy(logits.float(), batch["label"])
            float(loss)  # host read
            return loss, batch["label"].shape[0]

    data = [{"input_ids": [3, 4, 5, 6], "label": i % 5} for i in range(12)]

    def run(cuda_graph):
        cfg = TrainConfig(progress_bar=False, tensorboard=False, cuda_graph=cuda_graph, batch_size=4, max_steps=5,
                          log_every=1, device="cuda", shuffle=False, lr=5e-3, fused_kernels="none")
        tr = Trainer(tiny_llama(), cfg, data, loss_fn=HostReadingLoss())
        tr.train()
        return tr, [r["loss"] for r in tr.log_history if r["split"] == "train"]

    auto, losses = run("auto")
    assert not auto.capture and auto.eager_reason.startswith("capturing the step failed (")
    # the failed capture gave the random generator back: random ops (dropout) still run afterwards
    torch.randint(0, 5, (4,), device="cuda")
    assert torch.nn.functional.dropout(torch.ones(64, device="cuda"), 0.5).eq(0).any()
    _, ref = run(False)
    assert losses == pytest.approx(ref, rel=1e-4)


def test_capture_is_faster_compares_best_times():
    from deltatune.train.step import capture_is_faster

    assert capture_is_faster([0.010, 0.009], [0.004, 0.005, 0.004])
    assert not capture_is_faster([0.050, 0.040], [0.045, 0.044, 0.046])
    assert capture_is_faster([0.02], [0.02])  # a tie keeps the capture
    with pytest.raises(ValueError, match=r"^need eager and replay times, got 0 and 3$"):
        capture_is_faster([], [1.0, 1.0, 1.0])


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("eager_wins", [True, False])
def test_auto_keeps_the_faster_of_eager_and_captured(monkeypatch, eager_wins):
    from deltatune.train import step as step_mod

    def fake_timed(fn, device):  # eager warm-up calls "take" 1 ms, replays 2 ms (or the reverse)
        out = fn()
        replay = fake_timed.trainer._graphs and next(iter(fake_timed.trainer._graphs.values())).graph is not None
        return out, (0.002 if replay else 0.001) if eager_wins else (0.001 if replay else 0.002)

    monkeypatch.setattr(step_mod, "_timed_call", fake_timed)
    data = lm_examples(48)

    def run(cuda_graph):
        cfg = TrainConfig(progress_bar=False, tensorboard=False, cuda_graph=cuda_graph, batch_size=4, max_steps=10,
                          log_every=1, device="cuda", shuffle=False, lr=5e-3, fused_kernels="none")
        tr = Trainer(tiny_llama(), cfg, data, collate_fn=PadCollator(pad_token_id=0, pad_to_multiple_of=64))
        fake_timed.trainer = tr
        tr.train()
        return tr, [r["loss"] for r in tr.log_history if r["split"] == "train"]

    auto, losses = run("auto")
    _, ref = run(False)
    assert losses == pytest.approx(ref, rel=1e-4)
    assert len(auto._auto_times["eager"]) == 2 and len(auto._auto_times["replay"]) == 3
    if eager_wins:
        assert not auto.capture and not auto._graphs
        assert auto.eager_reason == "eager steps measured faster than captured ones (1.0 ms against 2.0 ms per step)"
    else:
        assert auto.capture and auto.eager_reason == "" and auto._auto_times["captured"]
