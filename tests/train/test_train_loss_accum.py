"""Default loss (shift, ignore_index, label smoothing), collation, and token-weighted accumulation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _train_utils import lm_examples, tiny_llama, tiny_lm, trainable_state
from _train_utils import single_thread as _single_thread  # noqa: F401
from torch import nn

from deltatune.errors import DeltaConfigError
from deltatune.train import PadCollator, TrainConfig, Trainer, logits_loss_sum
from deltatune.train.losses import count_loss_tokens


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_logits_loss_sum_equals_cross_entropy(smoothing):
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    labels = torch.randint(0, 11, (3, 6))
    labels[0, 4:] = -100
    labels[2, 1] = -100
    total, n = logits_loss_sum(logits, labels, label_smoothing=smoothing)
    ref = F.cross_entropy(
        logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100, label_smoothing=smoothing
    )
    assert int(n) == int((labels[:, 1:] != -100).sum()) == count_loss_tokens(labels)
    torch.testing.assert_close(total / n, ref)


def test_logits_loss_sum_without_shift():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    total, n = logits_loss_sum(logits, labels, shift=False)
    torch.testing.assert_close(total / n, F.cross_entropy(logits.reshape(-1, 7), labels.reshape(-1)))
    assert int(n) == 10 == count_loss_tokens(labels, shift=False)


def test_pad_collator_pad_to_multiple_of():
    batch = PadCollator(pad_token_id=2, pad_to_multiple_of=4)([{"input_ids": [5, 6, 7, 8, 9]}, {"input_ids": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 2, 2, 2], [8, 2, 2, 2, 2, 2, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1] * 5 + [0] * 3, [1] + [0] * 7]
    assert batch["labels"].tolist() == [[5, 6, 7, 8, 9] + [-100] * 3, [8] + [-100] * 7]
    assert PadCollator(pad_to_multiple_of=4)([{"input_ids": [1, 2, 3, 4]}])["input_ids"].shape == (1, 4)
    with pytest.raises(DeltaConfigError, match=r"pad_to_multiple_of must be a positive int, got 0"):
        PadCollator(pad_to_multiple_of=0)


def test_pad_collator():
    batch = PadCollator(pad_token_id=2)([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]
    given = PadCollator()([{"input_ids": [1, 2], "labels": [-100, 2]}, {"input_ids": [3], "labels": [3]}])
    assert given["labels"].tolist() == [[-100, 2], [3, -100]]
    cls = PadCollator()([{"x": torch.ones(2), "label": 1}, {"x": torch.zeros(2), "label": 0}])
    assert cls["label"].tolist() == [1, 0] and cls["x"].shape == (2, 2)
    with pytest.raises(DeltaConfigError, match="same keys"):
        PadCollator()([{"input_ids": [1]}, {"input_ids": [1], "labels": [1]}])


def _captured_grads(trainer):
    grads = []
    trainer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: grads.append([p.grad.detach().clone() for g in opt.param_groups for p in g["params"]])
    )
    return grads


def _run(model, data, loss_fn=None, **kw):
    cfg = TrainConfig(lr=1e-2, scheduler="constant", max_grad_norm=None, shuffle=False, progress_bar=False, **kw)
    tr = Trainer(model, cfg, data, loss_fn=loss_fn)
    grads = _captured_grads(tr)
    tr.train()
    return tr, grads


def test_grad_accumulation_equals_one_big_batch_llama():
    data = lm_examples(8, seed=3, min_len=2, max_len=12)  # very different lengths: weighting matters
    runs = {}
    for bs, acc in [(4, 1), (2, 2), (1, 4)]:
        tr, grads = _run(tiny_llama(), data, batch_size=bs, grad_accum_steps=acc, max_steps=2)
        runs[(bs, acc)] = (trainable_state(tr.model), grads)

    # reference: gradient of the mean token loss of the first 4 examples as one batch, by hand
    ref_model = tiny_llama()
    batch = PadCollator()(data[:4])
    logits = ref_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))
    loss.backward()
    ref_grads = [p.grad for g in param_order(ref_model) for p in g]

    for key, (weights, grads) in runs.items():
        assert len(grads) == 2, key
        for got, ref in zip(grads[0], ref_grads, strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
        # Adam divides by sqrt(v): where a gradient entry is ~0, float-rounding differences of the
        # summation order are amplified, so the weights are compared to 1% of one lr step.
        for name, w in weights.items():
            torch.testing.assert_close(w, runs[(4, 1)][0][name], rtol=0, atol=1e-4)

    # a naive mean of micro-batch means is a different objective (so the test above can fail)
    micro_means = []
    for i in range(2):
        b = PadCollator()(data[2 * i : 2 * i + 2])
        with torch.no_grad():
            lg = tiny_llama()(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        micro_means.append(F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), b["labels"][:, 1:].reshape(-1)))
    assert abs(float(sum(micro_means) / 2) - loss.detach().item()) > 1e-3


def param_order(model):
    """The trainer's parameter order: decayed group then non-decayed group."""
    from deltatune.train import param_groups

    return [g["params"] for g in param_groups(model, 0.0)]


def _cls_loss(model, batch):
    logits = model(batch["x"])
    return F.cross_entropy(logits, batch["label"]), batch["label"].numel()


def test_custom_loss_fn_accumulation_with_uneven_micro_batches():
    g = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(6, generator=g), "label": int(torch.randint(0, 3, (1,), generator=g))} for _ in range(6)]

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    # one optimiser step over all 6 examples: micro-batches 4 + 2 vs one batch of 6
    tr_a, grads_a = _run(model(), data, _cls_loss, batch_size=4, grad_accum_steps=2, max_steps=1, log_every=1)
    tr_b, grads_b = _run(model(), data, _cls_loss, batch_size=6, grad_accum_steps=1, max_steps=1, log_every=1)
    ref = model()
    xs = torch.stack([d["x"] for d in data])
    ys = torch.tensor([d["label"] for d in data])
    F.cross_entropy(ref(xs), ys).backward()
    ref_grads = [p.grad for grp in param_order(ref) for p in grp]
    for ga, gb, gr in zip(grads_a[0], grads_b[0], ref_grads, strict=True):
        torch.testing.assert_close(ga, gr, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(gb, gr, rtol=1e-5, atol=1e-7)
    # the logged loss is the mean over all 6 examples, before the update
    with torch.no_grad():
        full_loss = F.cross_entropy(model()(xs), ys).item()
    assert tr_a.log_history[0]["loss"] == pytest.approx(full_loss, rel=1e-5)
    assert tr_a.log_history[0]["loss_tokens"] == 6


def test_label_smoothing_is_used_in_training_loss():
    data = lm_examples(4, seed=5)
    tr, _ = _run(tiny_lm(), data, batch_size=4, max_steps=1, log_every=1, label_smoothing=0.2)
    batch = PadCollator()(data)
    with torch.no_grad():
        logits = tiny_lm()(batch["input_ids"]).logits
    ref = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), label_smoothing=0.2
    )
    assert tr.log_history[0]["loss"] == pytest.approx(float(ref), rel=1e-6)


def test_default_loss_needs_labels():
    data = [(torch.zeros(3), 1)] * 4
    tr = Trainer(tiny_lm(), TrainConfig(progress_bar=False, max_steps=1), data)
    with pytest.raises(DeltaConfigError, match="the default loss needs batches that are dicts with a 'labels' entry"):
        tr.train()
