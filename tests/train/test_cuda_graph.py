"""CapturedStep: argument errors (CPU) and captured training steps against eager ones (CUDA only)."""

from __future__ import annotations

import copy

import pytest
import torch

import deltatune as dt
from deltatune.errors import DeltaConfigError
from deltatune.kernels import causal_lm_loss

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _noop(batch):
    return torch.zeros(())


def test_refuses_an_optimizer_that_is_not_capturable():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(
        DeltaConfigError,
        match=r"optimizer AdamW must be built with capturable=True to be captured in a CUDA graph",
    ):
        dt.CapturedStep(_noop, torch.optim.AdamW([p], capturable=False))


def test_argument_errors():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], capturable=True)
    with pytest.raises(DeltaConfigError, match=r"step_fn must be callable, got int"):
        dt.CapturedStep(3, opt)  # type: ignore[arg-type]
    with pytest.raises(DeltaConfigError, match=r"warmup must be an int >= 1, got 0|warmup must be .*got 0"):
        dt.CapturedStep(_noop, opt, warmup=0)
    step = dt.CapturedStep(_noop, opt)
    with pytest.raises(DeltaConfigError, match=r"batch must be a mapping of name -> tensor, got list"):
        step([torch.zeros(2)])  # type: ignore[arg-type]
    with pytest.raises(DeltaConfigError, match=r"batch\['ids'\] must be a CUDA tensor to be captured, got device cpu"):
        step({"ids": torch.zeros(2)})
    assert step.calls == 0  # refused before any work


def _model_and_step(dropout: float, lr: float, seed: int = 0):
    from tests.tiny_models import llama

    torch.manual_seed(seed)
    model = dt.apply(llama(), dt.LoraConfig(r=4, alpha=8, dropout=dropout, target_modules=TARGETS, init="random"))
    model = model.cuda().train()
    model.config.use_cache = False
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, capturable=True, foreach=True)

    def step(batch):
        hidden = model.model(input_ids=batch["ids"]).last_hidden_state
        loss = causal_lm_loss(hidden, model.lm_head.weight, batch["labels"])
        loss.backward()
        opt.step()
        return loss.detach()

    return model, opt, step


def _batches(n: int, vocab: int = 64):
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (2, 16), generator=g).cuda()
        out.append({"ids": ids, "labels": ids.clone()})
    return out


@cuda
@pytest.mark.gpu
def test_captured_steps_equal_eager_steps_without_dropout():
    batches = _batches(6)
    model, opt, step = _model_and_step(0.0, 1e-2)
    eager_model = copy.deepcopy(model)
    eager_opt = torch.optim.AdamW([p for p in eager_model.parameters() if p.requires_grad], lr=1e-2,
                                  capturable=True, foreach=True)

    def eager_step(batch):
        hidden = eager_model.model(input_ids=batch["ids"]).last_hidden_state
        loss = causal_lm_loss(hidden, eager_model.lm_head.weight, batch["labels"])
        loss.backward()
        eager_opt.step()
        eager_opt.zero_grad(set_to_none=True)
        return loss.detach()

    captured = dt.CapturedStep(step, opt, warmup=2)
    got = [captured(b) for b in batches]
    exp = [eager_step(b) for b in batches]
    assert captured.graph is not None and captured.calls == 6
    torch.testing.assert_close(torch.stack(got), torch.stack(exp), rtol=1e-5, atol=1e-6)
    for (n, p), (_, q) in zip(model.named_parameters(), eager_model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    assert len({float(x) for x in got}) > 1  # the parameters moved: the steps really ran


@cuda
@pytest.mark.gpu
def test_every_replay_draws_a_fresh_dropout_mask():
    batch = _batches(1)[0]
    losses = {}
    for p in (0.0, 0.3):
        _, opt, step = _model_and_step(p, 0.0)  # lr 0: only dropout can change the loss
        captured = dt.CapturedStep(step, opt, warmup=1)
        losses[p] = torch.stack([captured(batch) for _ in range(5)]).cpu()
    assert torch.equal(losses[0.0], losses[0.0][:1].expand(5))
    assert len(set(losses[0.3][1:].tolist())) == 4  # four replays, four masks


@cuda
@pytest.mark.gpu
def test_a_batch_of_another_shape_is_refused_after_capture():
    batches = _batches(2)
    _, opt, step = _model_and_step(0.0, 1e-3)
    captured = dt.CapturedStep(step, opt, warmup=1)
    captured(batches[0])
    captured(batches[1])  # captured here
    short = {k: v[:, :8] for k, v in batches[0].items()}
    with pytest.raises(DeltaConfigError, match=r"batch shapes \{ids: \(2, 8\) int64, labels: \(2, 8\) int64\} "
                                                 r"differ from the captured ones \{ids: \(2, 16\) int64"):
        captured(short)
