"""AdamW (bias-correction switch) against hand-written updates; weight-decay groups; LR schedules."""

from __future__ import annotations

import io
import math

import pytest
import torch
from _train_utils import single_thread as _single_thread  # noqa: F401
from _train_utils import tiny_lm
from torch import nn

from deltatune.errors import DeltaConfigError
from deltatune.train import AdamW, build_scheduler, lr_factor, param_groups
from deltatune.train.schedules import resolve_warmup_steps


def _reference_adamw(p0, grads, lr, b1, b2, eps, wd, bias_correction):
    """Plain-python-loop AdamW written from the paper's equations, in float64."""
    p = p0.double().clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        p = p - lr * wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        if bias_correction:
            m_hat = m / (1 - b1**t)
            v_hat = v / (1 - b2**t)
            p = p - lr * m_hat / (v_hat.sqrt() + eps)
        else:
            p = p - lr * m / (v.sqrt() + eps)
    return p


@pytest.mark.parametrize("bias_correction", [True, False])
def test_adamw_matches_hand_reference(bias_correction):
    torch.manual_seed(0)
    p0 = torch.randn(5, 7, dtype=torch.float64)
    grads = [torch.randn(5, 7, dtype=torch.float64) for _ in range(6)]
    lr, b1, b2, eps, wd = 0.01, 0.8, 0.95, 1e-6, 0.1
    param = nn.Parameter(p0.clone())
    opt = AdamW([param], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, bias_correction=bias_correction)
    for g in grads:
        param.grad = g.clone()
        opt.step()
    expected = _reference_adamw(p0, grads, lr, b1, b2, eps, wd, bias_correction)
    torch.testing.assert_close(param.detach(), expected, rtol=1e-12, atol=1e-12)


def test_bias_correction_changes_the_update():
    torch.manual_seed(0)
    p0 = torch.randn(4, 4)
    grads = [torch.randn(4, 4) for _ in range(3)]
    on = _reference_adamw(p0, grads, 0.01, 0.9, 0.999, 1e-8, 0.0, True)
    off = _reference_adamw(p0, grads, 0.01, 0.9, 0.999, 1e-8, 0.0, False)
    assert (on - off).abs().max() > 1e-3  # the switch is not a no-op


def test_adamw_with_bias_correction_equals_torch_adamw():
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(3, 8))
    b = nn.Parameter(a.detach().clone())
    ours = AdamW([a], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    ref = torch.optim.AdamW([b], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05, foreach=False)
    for _ in range(5):
        g = torch.randn(3, 8)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_adamw_state_dict_round_trip_weights_only():
    p = nn.Parameter(torch.randn(3))
    opt = AdamW([p], lr=0.1, bias_correction=False)
    p.grad = torch.ones(3)
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    q = nn.Parameter(p.detach().clone())
    opt2 = AdamW([q], lr=0.1, bias_correction=False)
    opt2.load_state_dict(sd)
    p.grad = q.grad = torch.full((3,), 0.5)
    opt.step()
    opt2.step()
    assert torch.equal(p, q)


@pytest.mark.parametrize("bias_correction", [True, False])
def test_capturable_adamw_equals_the_default_update_under_a_schedule(bias_correction):
    torch.manual_seed(0)
    a = [nn.Parameter(torch.randn(3, 8)), nn.Parameter(torch.randn(5))]
    b = [nn.Parameter(p.detach().clone()) for p in a]
    kw = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.05, bias_correction=bias_correction)
    ref, cap = AdamW(a, **kw), AdamW(b, capturable=True, **kw)
    scheds = [build_scheduler(o, "linear", 2, 6) for o in (ref, cap)]
    for _ in range(6):
        for p, q in zip(a, b):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        ref.step()
        cap.step()
        for sch in scheds:
            sch.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
    step = cap.state[b[0]]["step"]
    assert isinstance(step, torch.Tensor) and step.device == b[0].device and float(step) == 6.0


def test_capturable_adamw_reads_lr_from_its_device_copy_and_sync_lr_refreshes_it():
    p = nn.Parameter(torch.zeros(2))
    opt = AdamW([p], lr=0.5, capturable=True)
    p.grad = torch.ones(2)
    opt.step()  # creates the device copy of the learning rate
    (copy,) = opt._lr_on_device.values()
    assert float(copy) == 0.5
    opt.param_groups[0]["lr"] = 0.25
    assert float(copy) == 0.5  # a replay would still read 0.5 ...
    opt.sync_lr()
    assert float(copy) == 0.25  # ... until sync_lr copies the new value


def test_capturable_adamw_resumes_from_a_default_state_dict():
    torch.manual_seed(1)
    p = nn.Parameter(torch.randn(4))
    ref = AdamW([p], lr=0.1)
    p.grad = torch.ones(4)
    ref.step()  # step count 1, as a Python int
    q = nn.Parameter(p.detach().clone())
    cap = AdamW([q], lr=0.1, capturable=True)
    buf = io.BytesIO()  # through a file, as a resume does (load_state_dict keeps same-device tensors)
    torch.save(ref.state_dict(), buf)
    buf.seek(0)
    cap.load_state_dict(torch.load(buf, weights_only=True))
    assert cap.param_groups[0]["capturable"] is True  # the checkpoint's False does not win
    p.grad = q.grad = torch.full((4,), -0.5)
    ref.step()
    cap.step()
    torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)  # float32 bias corrections vs Python floats
    assert float(cap.state[q]["step"]) == 2.0


def test_adamw_validates():
    with pytest.raises(DeltaConfigError, match=r"eps must be a number > 0, got 0\.0"):
        AdamW([nn.Parameter(torch.zeros(1))], eps=0.0)


def test_weight_decay_groups_rule():
    model = tiny_lm()

    class MyNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(2, 2))

    model.extra_norm = MyNorm()
    groups = param_groups(model, 0.1)
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert groups[0]["names"] == ["proj.weight", "head.weight"]
    assert groups[1]["names"] == ["norm.weight", "norm.bias", "proj.bias", "head.bias", "extra_norm.scale"]
    # the frozen embedding is not optimised at all
    assert all("embed" not in n for g in groups for n in g["names"])


def test_weight_decay_not_applied_to_biases_in_trainer_optimizer():
    from _train_utils import lm_examples

    from deltatune.train import TrainConfig, Trainer

    model = tiny_lm()
    tr = Trainer(model, TrainConfig(weight_decay=0.3, progress_bar=False), lm_examples(4))
    by_name = {n: g["weight_decay"] for g in tr.optimizer.param_groups for n in g["names"]}
    assert by_name["head.weight"] == 0.3 and by_name["head.bias"] == 0.0 and by_name["norm.weight"] == 0.0


# ---------------------------------------------------------------------------- schedules
def _formula(kind, s, warmup, total):
    if s < warmup:
        return (s + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (s - warmup) / (total - warmup)
    return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_schedule_drives_optimizer_lr(kind):
    total, warmup, base = 10, 3, 0.2
    p = nn.Parameter(torch.zeros(2))
    opt = AdamW([p], lr=base)
    sched = build_scheduler(opt, kind, warmup, total)
    seen = []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones(2)
        opt.step()
        sched.step()
    expected = [base * _formula(kind, s, warmup, total) for s in range(total)]
    assert seen == pytest.approx(expected, rel=1e-12)


def test_schedule_landmarks():
    # warmup ramps to exactly 1 at its last step; linear / cosine are 1 right after warmup and
    # halfway through the decay they are 0.5
    assert lr_factor("linear", 0, 4, 12) == 0.25
    assert lr_factor("linear", 3, 4, 12) == 1.0
    assert lr_factor("linear", 4, 4, 12) == 1.0
    assert lr_factor("linear", 8, 4, 12) == 0.5
    assert lr_factor("cosine", 8, 4, 12) == pytest.approx(0.5)
    assert lr_factor("linear", 11, 4, 12) == 1 / 8
    assert lr_factor("cosine", 11, 4, 12) == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert lr_factor("constant", 100, 0, 10) == 1.0


def test_warmup_ratio_rounds_up():
    assert resolve_warmup_steps(0, 0.1, 25) == 3
    assert resolve_warmup_steps(5, 0.0, 25) == 5
    assert resolve_warmup_steps(50, 0.0, 25) == 25


def test_build_scheduler_validates():
    opt = AdamW([nn.Parameter(torch.zeros(1))])
    with pytest.raises(DeltaConfigError, match="scheduler must be one of"):
        build_scheduler(opt, "poly", 0, 10)
    with pytest.raises(DeltaConfigError, match="total_steps must be a positive int, got 0"):
        build_scheduler(opt, "linear", 0, 0)
