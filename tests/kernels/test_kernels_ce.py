"""linear_cross_entropy / causal_lm_loss against F.cross_entropy and HF's ForCausalLMLoss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deltatune.errors import DeltaConfigError, DeltaConfigTypeError
from deltatune.kernels import causal_lm_loss, default_chunk_size, linear_cross_entropy


def _setup(n=10, h=6, v=7, dtype=torch.float64, bias=False, w_grad=False, seed=0, n_ignored=2):
    torch.manual_seed(seed)
    hid = torch.randn(n, h, dtype=dtype, requires_grad=True)
    w = torch.randn(v, h, dtype=dtype, requires_grad=w_grad)
    b = torch.randn(v, dtype=dtype, requires_grad=True) if bias else None
    labels = torch.randint(0, v, (n,))
    labels[torch.randperm(n)[:n_ignored]] = -100
    return hid, w, b, labels


def _ref(hid, w, b, labels, **kw):
    logits = hid @ w.t()
    if b is not None:
        logits = logits + b
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels, **kw)


def _inputs(hid, w, b):
    return [t for t in (hid, w, b) if t is not None and t.requires_grad]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("chunk", [1, 3, None])  # 3 does not divide N=10
@pytest.mark.parametrize("w_grad,bias", [(False, False), (True, False), (False, True), (True, True)])
def test_value_and_grad_match_f_cross_entropy_fp64(reduction, eps, chunk, w_grad, bias):
    hid, w, b, labels = _setup(bias=bias, w_grad=w_grad)
    loss = linear_cross_entropy(
        hid, w, labels, bias=b, label_smoothing=eps, reduction=reduction, chunk_size=chunk
    )
    ref = _ref(hid, w, b, labels, label_smoothing=eps, reduction=reduction)
    assert loss.shape == ref.shape and loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(loss)
    ins = _inputs(hid, w, b)
    for a, c in zip(torch.autograd.grad(loss, ins, g), torch.autograd.grad(ref, ins, g)):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fp32_within_1e6(reduction):
    hid, w, b, labels = _setup(n=13, h=8, v=11, dtype=torch.float32, bias=True, w_grad=True, seed=1)
    loss = linear_cross_entropy(
        hid, w, labels, bias=b, reduction=reduction, label_smoothing=0.05, chunk_size=4
    )
    ref = _ref(hid, w, b, labels, reduction=reduction, label_smoothing=0.05)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    g = torch.rand_like(loss)
    ins = _inputs(hid, w, b)
    for a, c in zip(torch.autograd.grad(loss, ins, g), torch.autograd.grad(ref, ins, g)):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_all_labels_ignored_matches_pytorch(eps):
    hid, w, b, labels = _setup(w_grad=True, bias=True)
    labels = torch.full_like(labels, -100)
    for reduction in ("mean", "sum", "none"):
        loss = linear_cross_entropy(
            hid, w, labels, bias=b, label_smoothing=eps, reduction=reduction, chunk_size=4
        )
        ref = _ref(hid, w, b, labels, label_smoothing=eps, reduction=reduction)
        torch.testing.assert_close(loss, ref, equal_nan=True)
        if reduction == "mean":
            assert torch.isnan(loss)
        g = torch.ones_like(loss)
        ins = _inputs(hid, w, b)
        for a, c in zip(torch.autograd.grad(loss, ins, g), torch.autograd.grad(ref, ins, g)):
            torch.testing.assert_close(a, c, rtol=0, atol=0, equal_nan=True)
            assert not a.isnan().any() and not a.any()


def test_custom_ignore_index_and_int32_labels():
    hid, w, _, labels = _setup(n_ignored=0)
    labels = labels.to(torch.int32)
    labels[3] = 5  # treat class 5 as ignored
    loss = linear_cross_entropy(hid, w, labels, ignore_index=5, chunk_size=3)
    ref = _ref(hid, w, None, labels.long(), ignore_index=5)
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-12)


def test_bf16_inputs_fp32_loss_and_bf16_grads():
    torch.manual_seed(2)
    hid = torch.randn(37, 32, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(50, 32, dtype=torch.bfloat16) * 0.3).requires_grad_()
    labels = torch.randint(0, 50, (37,))
    labels[::5] = -100
    loss = linear_cross_entropy(hid, w, labels, chunk_size=8)
    assert loss.dtype == torch.float32
    ref = _ref(hid, w, None, labels)  # F.cross_entropy on the bf16 logits upcast to fp32 (HF recipe)
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-4)
    gh, gw = torch.autograd.grad(loss, (hid, w))
    rh, rw = torch.autograd.grad(ref, (hid, w))
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    # dweight is accumulated in fp32 over 5 chunks (the reference sums in one bf16 matmul)
    torch.testing.assert_close(gh.float(), rh.float(), rtol=0, atol=1e-2 * rh.abs().max().item())
    torch.testing.assert_close(gw.float(), rw.float(), rtol=0, atol=1e-2 * rw.abs().max().item())


def test_never_saves_full_logits():
    n, h, v = 64, 8, 500
    hid, w, _, labels = _setup(n=n, h=h, v=v, dtype=torch.float32, w_grad=True)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    for reduction in ("mean", "none"):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            linear_cross_entropy(hid, w, labels, reduction=reduction, chunk_size=16)
        assert saved and all(torch.Size(s).numel() < n * v for s in saved), saved
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _ref(hid, w, None, labels)
    assert any(torch.Size(s).numel() >= n * v for s in saved)  # the plain path does keep (N, V)


def test_no_grad_and_detached_inputs():
    hid, w, _, labels = _setup()
    ref = _ref(hid, w, None, labels)
    with torch.no_grad():
        loss = linear_cross_entropy(hid, w, labels, chunk_size=4)
    torch.testing.assert_close(loss, ref.detach(), rtol=0, atol=1e-12)
    assert not loss.requires_grad


def test_default_chunk_size():
    assert default_chunk_size(10, 7) == 10
    assert default_chunk_size(100_000, 128_256) == 256  # 2**25 // 128256 = 261 rows, down to a multiple of 128
    assert default_chunk_size(100_000, 49_152) == 640  # 682 -> 640
    assert default_chunk_size(100_000, 2**20) == 32  # under 128 rows: not rounded
    assert default_chunk_size(5, 2**30) == 1


def test_errors():
    hid, w, _, labels = _setup()
    with pytest.raises(
        DeltaConfigError, match=r"labels must be in \[0, 7\) or equal ignore_index \(-100\), got 9"
    ):
        linear_cross_entropy(hid, w, torch.tensor([9] + [0] * 9))
    with pytest.raises(DeltaConfigError, match="reduction must be one of 'mean', 'sum', 'none', got 'avg'"):
        linear_cross_entropy(hid, w, labels, reduction="avg")
    with pytest.raises(DeltaConfigError, match=r"weight must have shape \(V, 6\) matching hidden"):
        linear_cross_entropy(hid, torch.randn(7, 5), labels)
    with pytest.raises(DeltaConfigError, match=r"labels must have shape \(10,\), got shape \(9,\)"):
        linear_cross_entropy(hid, w, labels[:9])
    with pytest.raises(DeltaConfigError, match="chunk_size must be a positive int, got 0"):
        linear_cross_entropy(hid, w, labels, chunk_size=0)
    with pytest.raises(DeltaConfigError, match=r"label_smoothing must be a number in \[0, 1\], got 1.5"):
        linear_cross_entropy(hid, w, labels, label_smoothing=1.5)
    with pytest.raises(DeltaConfigError, match="labels must be an integer tensor"):
        linear_cross_entropy(hid, w, labels.double())
    with pytest.raises(DeltaConfigTypeError, match="hidden must be a torch.Tensor"):
        linear_cross_entropy(hid.tolist(), w, labels)


# ---------------------------------------------------------------- causal LM loss
def _hf_loss(logits, labels, vocab, **kw):
    from transformers.loss.loss_utils import ForCausalLMLoss

    return ForCausalLMLoss(logits, labels, vocab, **kw)


@pytest.mark.parametrize("num_items", [None, 13])
def test_causal_lm_loss_matches_hf(num_items):
    torch.manual_seed(3)
    bsz, t, h, v = 2, 9, 8, 19
    hs = torch.randn(bsz, t, h, requires_grad=True)
    w = torch.randn(v, h) * 0.3
    labels = torch.randint(0, v, (bsz, t))
    labels[0, :3] = -100  # masked prompt
    loss = causal_lm_loss(hs, w, labels, num_items_in_batch=num_items, chunk_size=5)
    ref = _hf_loss(hs @ w.t(), labels, v, num_items_in_batch=num_items)  # HF computes in fp32
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        torch.autograd.grad(loss, hs)[0], torch.autograd.grad(ref, hs)[0], rtol=0, atol=1e-6
    )


def test_causal_lm_loss_none_and_shift():
    torch.manual_seed(4)
    hs = torch.randn(2, 5, 4, dtype=torch.float64)
    w = torch.randn(6, 4, dtype=torch.float64)
    labels = torch.randint(0, 6, (2, 5))
    per_pos = causal_lm_loss(hs, w, labels, reduction="none")
    assert per_pos.shape == (2, 5)
    assert (per_pos[:, -1] == 0).all()
    expected = F.cross_entropy(
        (hs[:, :-1] @ w.t()).reshape(-1, 6), labels[:, 1:].reshape(-1), reduction="none"
    )
    torch.testing.assert_close(per_pos[:, :-1].reshape(-1), expected, rtol=0, atol=1e-12)


def test_causal_lm_loss_errors():
    hs, w = torch.randn(2, 5, 4), torch.randn(6, 4)
    with pytest.raises(DeltaConfigError, match=r"labels must have shape \(2, 5\), got shape \(2, 4\)"):
        causal_lm_loss(hs, w, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(DeltaConfigError, match=r"hidden_states must be a 3-D tensor \(B, T, H\)"):
        causal_lm_loss(hs[0], w, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(DeltaConfigError, match="num_items_in_batch needs reduction='mean'"):
        causal_lm_loss(hs, w, torch.zeros(2, 5, dtype=torch.long), reduction="sum", num_items_in_batch=3)


def test_autocast_bf16_with_fp32_trainable_weight():
    torch.manual_seed(5)
    hid = torch.randn(21, 16, requires_grad=True)
    w = (torch.randn(30, 16) * 0.3).requires_grad_()
    labels = torch.randint(0, 30, (21,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hid, w, labels, chunk_size=4)
        ref = F.cross_entropy((hid @ w.t()).float(), labels)  # bf16 matmul, fp32 loss
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-4)
    got = torch.autograd.grad(loss, (hid, w))
    exp = torch.autograd.grad(ref, (hid, w))
    for a, c in zip(got, exp):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, c, rtol=0, atol=1e-2 * c.abs().max().item())
