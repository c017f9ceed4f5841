"""R-Drop loss against a hand-written formula (F.cross_entropy + F.kl_div both directions)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deltatune.errors import DeltaConfigError, DeltaConfigTypeError
from deltatune.methods.rdrop import RDropLoss, rdrop_repeat, rdrop_split


def reference(z1, z2, y, alpha, ignore_index=-100, reduction="mean", kl_reduction="sum"):
    """CE averaged over both passes + the KL term over counted positions: MindPet's
    ``alpha / 4 * sum(KL(P2||P1) + KL(P1||P2))`` (kl_reduction "sum"), or ``alpha * mean(pair average)``."""
    z1, z2, y = z1.reshape(-1, z1.shape[-1]), z2.reshape(-1, z2.shape[-1]), y.reshape(-1)
    keep = y != ignore_index
    z1, z2, y = z1[keep], z2[keep], y[keep]
    red = "sum" if reduction == "sum" else "mean"
    ce = 0.5 * (F.cross_entropy(z1, y, reduction=red) + F.cross_entropy(z2, y, reduction=red))
    lp1, lp2 = F.log_softmax(z1, -1), F.log_softmax(z2, -1)
    kl_21 = F.kl_div(lp1, lp2, reduction="none", log_target=True).sum(-1)  # KL(P2 || P1)
    kl_12 = F.kl_div(lp2, lp1, reduction="none", log_target=True).sum(-1)  # KL(P1 || P2)
    if kl_reduction == "sum":
        return ce + alpha / 4 * (kl_21 + kl_12).sum()
    kl = 0.5 * (kl_21 + kl_12)
    return ce + alpha * (kl.sum() if reduction == "sum" else kl.mean())


@pytest.mark.parametrize("kl_reduction", ["sum", "mean"])
@pytest.mark.parametrize("layout", ["interleave", "concat"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_classification_matches_formula(layout, reduction, kl_reduction):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 5, generator=g)
    labels = torch.tensor([0, 3, -100, 1])
    z1, z2 = (logits[0::2], logits[1::2]) if layout == "interleave" else (logits[:4], logits[4:])
    loss = RDropLoss(alpha=4.0, reduction=reduction, layout=layout, kl_reduction=kl_reduction)(logits, labels)
    torch.testing.assert_close(loss, reference(z1, z2, labels, 4.0, reduction=reduction, kl_reduction=kl_reduction))
    # duplicated labels give the same value
    dup = labels.repeat_interleave(2) if layout == "interleave" else torch.cat([labels, labels])
    torch.testing.assert_close(
        RDropLoss(reduction=reduction, layout=layout, kl_reduction=kl_reduction)(logits, dup), loss
    )


def test_default_is_mindpet_batch_sum_and_mean_form_differs():
    """The default sums the KL over the batch (MindPet); the mean form equals it only at 2 pairs."""
    g = torch.Generator().manual_seed(3)
    for pairs in (2, 4, 8):
        logits = torch.randn(2 * pairs, 6, generator=g)
        labels = torch.randint(0, 6, (pairs,), generator=g)
        z1, z2 = logits[0::2], logits[1::2]
        lp1, lp2 = F.log_softmax(z1, -1), F.log_softmax(z2, -1)
        kl = (lp2.exp() * (lp2 - lp1)).sum() + (lp1.exp() * (lp1 - lp2)).sum()
        want = F.cross_entropy(logits, labels.repeat_interleave(2)) + kl / 4 * 4.0
        got = RDropLoss(alpha=4.0)(logits, labels)
        torch.testing.assert_close(got, want)
        mean_form = RDropLoss(alpha=4.0, kl_reduction="mean")(logits, labels)
        if pairs == 2:
            torch.testing.assert_close(mean_form, got)
        else:
            assert (got - mean_form).abs() > 1e-3


def test_causal_lm_shift_and_ignore_index():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 6, 7, generator=g)  # (2B, T, V) interleaved
    labels = torch.randint(0, 7, (2, 6), generator=g)
    labels[0, 3] = -1
    labels[1, 5] = -1
    loss = RDropLoss(alpha=2.5, ignore_index=-1)(logits, labels)
    z1, z2 = logits[0::2, :-1], logits[1::2, :-1]
    torch.testing.assert_close(loss, reference(z1, z2, labels[:, 1:], 2.5, ignore_index=-1))
    loss_mean = RDropLoss(alpha=2.5, ignore_index=-1, kl_reduction="mean")(logits, labels)
    torch.testing.assert_close(loss_mean, reference(z1, z2, labels[:, 1:], 2.5, ignore_index=-1, kl_reduction="mean"))
    # no shift (token classification)
    loss_ns = RDropLoss(alpha=2.5, ignore_index=-1, shift_labels=False)(logits, labels)
    torch.testing.assert_close(loss_ns, reference(logits[0::2], logits[1::2], labels, 2.5, ignore_index=-1))


def test_reduction_none_and_zero_alpha():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 5, 9, generator=g)
    labels = torch.randint(0, 9, (2, 5), generator=g)
    labels[1, 2] = -100
    per = RDropLoss(reduction="none")(logits, labels)
    assert per.shape == (2, 4)
    assert per[1, 1] == 0  # label position 2 after the shift
    summed = RDropLoss(reduction="sum")(logits, labels)
    torch.testing.assert_close(per.sum(), summed)
    per_mean = RDropLoss(reduction="none", kl_reduction="mean")(logits, labels)
    torch.testing.assert_close(per_mean.sum() / 7, RDropLoss(kl_reduction="mean")(logits, labels))
    ce_only = RDropLoss(alpha=0.0)(logits, labels)
    z1, z2, y = logits[0::2, :-1].reshape(-1, 9), logits[1::2, :-1].reshape(-1, 9), labels[:, 1:].reshape(-1)
    torch.testing.assert_close(ce_only, 0.5 * (F.cross_entropy(z1, y) + F.cross_entropy(z2, y)))


def test_identical_passes_have_zero_kl():
    logits = torch.randn(3, 4).repeat_interleave(2, dim=0)
    labels = torch.tensor([1, 2, 0])
    torch.testing.assert_close(RDropLoss(alpha=10.0)(logits, labels), F.cross_entropy(logits[0::2], labels))


def test_gradient_flows_and_ignored_rows_get_none():
    logits = torch.randn(6, 4, requires_grad=True)
    labels = torch.tensor([1, -100, 3])
    RDropLoss()(logits, labels).backward()
    grad = logits.grad
    assert torch.isfinite(grad).all()
    assert grad[[0, 1, 4, 5]].abs().sum() > 0
    assert torch.equal(grad[[2, 3]], torch.zeros(2, 4))


def test_all_ignored_gives_zero():
    logits = torch.randn(4, 3, requires_grad=True)
    loss = RDropLoss()(logits, torch.tensor([-100, -100]))
    assert loss.item() == 0.0
    loss.backward()


def test_rdrop_repeat_layouts():
    batch = {"input_ids": torch.tensor([[1, 2], [3, 4]]), "flag": True, "scalar": torch.tensor(3.0)}
    inter = rdrop_repeat(batch)
    assert torch.equal(inter["input_ids"], torch.tensor([[1, 2], [1, 2], [3, 4], [3, 4]]))
    assert inter["flag"] is True and torch.equal(inter["scalar"], torch.tensor(3.0))
    cat = rdrop_repeat(batch, layout="concat")
    assert torch.equal(cat["input_ids"], torch.tensor([[1, 2], [3, 4], [1, 2], [3, 4]]))
    a, b = rdrop_split(inter["input_ids"])
    assert torch.equal(a, b) and torch.equal(a, batch["input_ids"])
    a, b = rdrop_split(cat["input_ids"], "concat")
    assert torch.equal(a, b) and torch.equal(a, batch["input_ids"])


def test_end_to_end_with_dropout(tiny):
    """Two dropout passes of a tiny BERT differ, the loss exceeds the CE part, and training works."""
    import transformers

    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(
        transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                vocab_size=64, num_labels=3, hidden_dropout_prob=0.3)
    ).train()
    batch = rdrop_repeat(tiny.batch("bert"))
    labels = batch.pop("labels")
    logits = model(**batch).logits
    assert not torch.equal(logits[0::2], logits[1::2])
    loss = RDropLoss()(logits, labels)
    ce = RDropLoss(alpha=0.0)(logits, labels)
    assert loss > ce
    loss.backward()
    assert model.classifier.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        ({"alpha": -1}, DeltaConfigError, "RDropLoss.alpha must be a number >= 0, got -1.0"),
        ({"alpha": "4"}, DeltaConfigTypeError, "RDropLoss.alpha must be a number >= 0, got '4' (str)"),
        ({"reduction": "avg"}, DeltaConfigError, "RDropLoss.reduction must be one of 'mean', 'sum', 'none', got 'avg'"),
        ({"ignore_index": 1.5}, DeltaConfigTypeError, "RDropLoss.ignore_index must be an int, got 1.5 (float)"),
        ({"layout": "stack"}, DeltaConfigError, "RDropLoss.layout must be one of 'interleave', 'concat', got 'stack'"),
        ({"shift_labels": 1}, DeltaConfigTypeError, "RDropLoss.shift_labels must be a bool, got 1 (int)"),
        ({"kl_reduction": "batchmean"}, DeltaConfigError,
         "RDropLoss.kl_reduction must be one of 'sum', 'mean', got 'batchmean'"),
    ],
)
def test_constructor_validation(kwargs, exc, message):
    with pytest.raises(exc) as info:
        RDropLoss(**kwargs)
    assert str(info.value) == message


def test_call_validation():
    loss = RDropLoss()
    with pytest.raises(DeltaConfigError) as info:
        loss(torch.randn(3, 4), torch.tensor([0]))
    assert str(info.value) == (
        "R-Drop needs an even batch dimension (each row twice, see rdrop_repeat), got shape (3, 4)"
    )
    with pytest.raises(DeltaConfigError) as info:
        loss(torch.randn(4, 5), torch.tensor([0, 1, 2]))
    assert str(info.value) == "labels must have shape (2,) (or the duplicated (4,)) for logits of shape (4, 5), got (3,)"
    with pytest.raises(DeltaConfigError) as info:
        loss(torch.randn(4, 5), torch.tensor([0, 1, 2, 3]))
    assert str(info.value) == "labels of the two copies differ; duplicate the batch with rdrop_repeat"
    with pytest.raises(DeltaConfigTypeError) as info:
        loss(torch.randn(4, 5), torch.tensor([0.0, 1.0]))
    assert str(info.value) == "labels must be an integer tensor, got dtype torch.float32"
    with pytest.raises(DeltaConfigError) as info:
        loss(torch.randn(4), torch.tensor([0, 1]))
    assert str(info.value) == "logits must have shape (2B, C) or (2B, T, V), got (4,)"
    with pytest.raises(DeltaConfigError) as info:
        rdrop_repeat({"a": torch.zeros(2, 3), "b": torch.zeros(3)})
    assert str(info.value) == "batch tensors must share their first (batch) dimension, got sizes {'a': 2, 'b': 3}"
    with pytest.raises(DeltaConfigError) as info:
        rdrop_repeat({"a": torch.zeros(2)}, layout="x")
    assert str(info.value) == "layout must be one of 'interleave', 'concat', got 'x'"
