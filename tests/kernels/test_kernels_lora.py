"""lora_linear & friends against the plain autograd formula, on the unfused dropout path
(``torch.native_dropout`` and a saved mask). Where triton runs, the Triton dropout path is turned off here;
it has its own tests in ``test_dropout_triton.py``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from deltatune.errors import DeltaConfigError, DeltaConfigTypeError
from deltatune.kernels import (
    dropout_mask,
    fused_lora_A,
    lora_linear,
    lora_linear_multi,
    lora_merged_linear,
    pack_mask,
    saved_mask,
    unpack_mask,
)
from deltatune.kernels.lora_autograd import run_lora


@pytest.fixture(autouse=True)
def _unfused_dropout(monkeypatch):
    monkeypatch.setenv("DELTATUNE_TRITON_DROPOUT", "0")


def _native_mask(shape, p, dtype, seed):
    """The keep-mask ``torch.native_dropout`` draws for ``shape`` right after ``torch.manual_seed(seed)``
    (what the kernels use when no ``seed`` is passed)."""
    torch.manual_seed(seed)
    return torch.native_dropout(torch.ones(shape, dtype=dtype), p, True)[1]


def _ref(x, W, b, A, B, s, p, seed, fifo=False, mask=None):
    """Plain formula; dropout via the exposed mask helper (or the given keep-mask)."""
    if p > 0:
        m = mask if mask is not None else dropout_mask(x.reshape(-1, x.shape[-1]).shape, p, seed, x.device)
        m = m.reshape(x.shape)
        xd = x * m / (1 - p)
    else:
        xd = x
    base = x @ W if fifo else x @ W.t()
    if b is not None:
        base = base + b
    return base + s * ((xd @ A.t()) @ B.t())


def _params(in_f, out, r, dtype, bias=True, fifo=False, adapter_dtype=None):
    adapter_dtype = adapter_dtype or dtype
    W = torch.randn(out, in_f, dtype=dtype)
    if fifo:
        W = W.t().contiguous()
    b = torch.randn(out, dtype=dtype) if bias else None
    A = (torch.randn(r, in_f, dtype=adapter_dtype) / in_f**0.5).requires_grad_()
    B = torch.randn(out, r, dtype=adapter_dtype).requires_grad_()
    return W, b, A, B


def _grads(y, inputs, g):
    return torch.autograd.grad(y, inputs, g)


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("fifo", [False, True])
@pytest.mark.parametrize("shape", [(5,), (2, 3), (2, 2, 3)])
def test_lora_linear_matches_formula_fp64(p, bias, fifo, shape):
    torch.manual_seed(0)
    in_f, out, r = 12, 10, 4
    W, b, A, B = _params(in_f, out, r, torch.float64, bias, fifo)
    x = torch.randn(*shape, in_f, dtype=torch.float64, requires_grad=True)
    y = lora_linear(x, W, b, A, B, 0.75, p, True, fan_in_fan_out=fifo, seed=123)
    ref = _ref(x, W, b, A, B, 0.75, p, 123, fifo)
    assert y.shape == (*shape, out)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-10)
    g = torch.randn_like(y)
    for got, exp in zip(_grads(y, (x, A, B), g), _grads(ref, (x, A, B), g)):
        torch.testing.assert_close(got, exp, rtol=0, atol=1e-10)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_lora_linear_fp32_within_1e6(p):
    torch.manual_seed(1)
    in_f, out, r = 16, 8, 4
    W, b, A, B = _params(in_f, out, r, torch.float32)
    W, b = W * 0.1, b * 0.1
    x = (torch.randn(3, 4, in_f) * 0.1).requires_grad_()
    y = lora_linear(x, W, b, A, B, 0.5, p, True, seed=7)
    ref = _ref(x, W, b, A, B, 0.5, p, 7)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-6)
    g = torch.randn_like(y) * 0.1
    for got, exp in zip(_grads(y, (x, A, B), g), _grads(ref, (x, A, B), g)):
        torch.testing.assert_close(got, exp, rtol=0, atol=1e-6)


def test_lora_linear_bf16_vs_fp64_reference():
    torch.manual_seed(2)
    in_f, out, r = 64, 48, 8
    W, b, A, B = _params(in_f, out, r, torch.bfloat16)
    x = torch.randn(4, 6, in_f, dtype=torch.bfloat16, requires_grad=True)
    y = lora_linear(x, W, b, A, B, 2.0, 0.2, True, seed=3)
    assert y.dtype == torch.bfloat16
    leaves = [t.detach().double().requires_grad_() for t in (x, A, B)]
    ref = _ref(leaves[0], W.double(), b.double(), leaves[1], leaves[2], 2.0, 0.2, 3)
    # bf16 has an 8-bit mantissa: tolerance relative to the output scale
    scale = ref.abs().max().item()
    torch.testing.assert_close(y.double(), ref.detach(), rtol=0, atol=2e-2 * scale)
    g = torch.randn_like(y)
    for got, exp in zip(_grads(y, (x, A, B), g), _grads(ref, leaves, g.double())):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), exp, rtol=0, atol=2e-2 * exp.abs().max().item())


@pytest.mark.parametrize("multi", [False, True])
def test_seed_none_uses_the_default_generator_mask_in_forward_and_backward(multi):
    torch.manual_seed(5)
    W, b, A, B = _params(8, 6, 2, torch.float64)
    W2, b2, A2, B2 = _params(8, 5, 3, torch.float64)
    x = torch.randn(7, 8, dtype=torch.float64, requires_grad=True)
    mask = _native_mask((7, 8), 0.5, torch.float64, 42)
    torch.manual_seed(42)
    if multi:  # the grouped form: one mask for all projections
        ys = lora_linear_multi(x, [W, W2], [b, b2], [A, A2], [B, B2], [1.0, 0.5], 0.5, True)
        refs = [_ref(x, W, b, A, B, 1.0, 0.5, None, mask=mask), _ref(x, W2, b2, A2, B2, 0.5, 0.5, None, mask=mask)]
        leaves = (x, A, B, A2, B2)
    else:
        ys = [lora_linear(x, W, b, A, B, 1.0, 0.5, True)]
        refs = [_ref(x, W, b, A, B, 1.0, 0.5, None, mask=mask)]
        leaves = (x, A, B)
    gs = [torch.randn_like(y) for y in ys]
    for y, ref in zip(ys, refs):
        torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    for got, exp in zip(_grads(ys, leaves, gs), _grads(refs, leaves, gs)):
        torch.testing.assert_close(got, exp, rtol=0, atol=1e-12)
    torch.manual_seed(43)
    y_other = lora_linear(x, W, b, A, B, 1.0, 0.5, True)  # another generator state: another mask
    assert not torch.allclose(ys[0], y_other)


def test_dropout_mask_statistics_and_determinism():
    m1 = dropout_mask((200, 500), 0.3, 11, "cpu")
    m2 = dropout_mask((200, 500), 0.3, 11, "cpu")
    m3 = dropout_mask((200, 500), 0.3, 12, "cpu")
    assert m1.dtype == torch.bool
    assert torch.equal(m1, m2)
    assert not torch.equal(m1, m3)
    assert abs(m1.float().mean().item() - 0.7) < 0.01
    assert dropout_mask((10,), 0.0, 1, "cpu").all()


def test_training_false_disables_dropout():
    torch.manual_seed(6)
    W, b, A, B = _params(8, 6, 2, torch.float64)
    x = torch.randn(5, 8, dtype=torch.float64)
    y = lora_linear(x, W, b, A, B, 1.0, 0.9, False, seed=1)
    torch.testing.assert_close(y, _ref(x, W, b, A, B, 1.0, 0.0, None), rtol=0, atol=1e-12)


def test_trainable_bias_gets_gradient_and_frozen_weight_none():
    torch.manual_seed(7)
    W, b, A, B = _params(8, 6, 2, torch.float64)
    b.requires_grad_()
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    y = lora_linear(x, W, b, A, B, 1.0, 0.0, True)
    ref = _ref(x, W, b, A, B, 1.0, 0.0, None)
    g = torch.randn_like(y)
    torch.testing.assert_close(_grads(y, (b,), g)[0], _grads(ref, (b,), g)[0], rtol=0, atol=1e-12)


def test_weight_requires_grad_is_refused_but_allowed_without_grad():
    W, b, A, B = _params(8, 6, 2, torch.float32)
    W.requires_grad_()
    x = torch.randn(3, 8)
    with pytest.raises(DeltaConfigError, match=r"weight must be frozen \(requires_grad=False\)"):
        lora_linear(x, W, b, A, B, 1.0, 0.0, True)
    with torch.no_grad():
        y = lora_linear(x, W, b, A, B, 1.0, 0.0, True)
        torch.testing.assert_close(y, _ref(x, W, b, A, B, 1.0, 0.0, None))


def test_argument_errors():
    W, b, A, B = _params(8, 6, 2, torch.float32)
    x = torch.randn(3, 8)
    with pytest.raises(DeltaConfigError, match=r"dropout_p must be a number in \[0, 1\), got 1.0"):
        lora_linear(x, W, b, A, B, 1.0, 1.0, True)
    with pytest.raises(DeltaConfigTypeError, match="training must be a bool"):
        lora_linear(x, W, b, A, B, 1.0, 0.0, 1)
    with pytest.raises(DeltaConfigTypeError, match="scaling must be a finite number"):
        lora_linear(x, W, b, A, B, "2", 0.0, True)
    with pytest.raises(DeltaConfigError, match=r"lora_A must have shape \(r, 8\), got shape \(2, 7\)"):
        lora_linear(x, W, b, torch.randn(2, 7), B, 1.0, 0.0, True)
    with pytest.raises(DeltaConfigError, match=r"lora_B must have shape \(6, 2\), got shape \(6, 3\)"):
        lora_linear(x, W, b, A, torch.randn(6, 3), 1.0, 0.0, True)
    with pytest.raises(DeltaConfigError, match=r"weight must have shape \(out_features, in_features\)"):
        lora_linear(torch.randn(3, 6), W, b, A, B, 1.0, 0.0, True)
    with pytest.raises(DeltaConfigError, match=r"bias must have shape \(6,\) or be None, got shape \(5,\)"):
        lora_linear(x, W, torch.randn(5), A, B, 1.0, 0.0, True)
    with pytest.raises(DeltaConfigTypeError, match="x must be a torch.Tensor"):
        lora_linear([1.0], W, b, A, B, 1.0, 0.0, True)


def test_no_grad_path_equals_formula():
    torch.manual_seed(8)
    W, b, A, B = _params(8, 6, 2, torch.float64)
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    with torch.no_grad():
        y = lora_linear(x, W, b, A, B, 0.5, 0.4, True, seed=9)
    torch.testing.assert_close(y, _ref(x, W, b, A, B, 0.5, 0.4, 9), rtol=0, atol=1e-12)


def test_recompute_xa_variant_matches():
    torch.manual_seed(9)
    W, b, A, B = _params(8, 6, 2, torch.float64)
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    plan = ((0, 0, 6, 0, 2),)
    y = run_lora(x, A, [W], [b], [B], plan, [0.5], 0.3, True, 4, False, recompute_xa=True)[0]
    ref = _ref(x, W, b, A, B, 0.5, 0.3, 4)
    g = torch.randn_like(y)
    for got, exp in zip(_grads(y, (x, A, B), g), _grads(ref, (x, A, B), g)):
        torch.testing.assert_close(got, exp, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- dtypes and saved tensors
class _SavedLog:
    def __init__(self):
        self.items: list[tuple[tuple[int, ...], torch.dtype, int, int]] = []

    def pack(self, t):
        self.items.append(
            (tuple(t.shape), t.dtype, t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        )
        return t

    def unpack(self, t):
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def unique_bytes(self, exclude_ptrs=()) -> int:
        seen = {}
        for _, _, ptr, nbytes in self.items:
            if ptr not in exclude_ptrs:
                seen[ptr] = nbytes
        return sum(seen.values())


def test_fp32_master_adapters_with_bf16_activations():
    torch.manual_seed(10)
    in_f, out, r = 32, 24, 4
    W = torch.randn(out, in_f, dtype=torch.bfloat16)
    A = (torch.randn(r, in_f) / 6).requires_grad_()  # fp32 masters
    B = torch.randn(out, r).requires_grad_()
    x = torch.randn(3, 5, in_f, dtype=torch.bfloat16, requires_grad=True)
    log = _SavedLog()
    with log.hooks():
        y = lora_linear(x, W, None, A, B, 1.0, 0.1, True, seed=2)
    assert y.dtype == torch.bfloat16
    x_sized = [it for it in log.items if int(torch.tensor(it[0]).prod()) == x.numel()]
    assert not [it for it in x_sized if it[1] == torch.float32], log.items
    # the dropped input in bf16 (never upcast) and, besides it, only the keep-mask packed to bits
    assert [it[1] for it in x_sized] == [torch.bfloat16], log.items
    assert [(it[0], it[1]) for it in log.items if it[1] == torch.uint8] == [((15, in_f // 8), torch.uint8)]
    y.backward(torch.randn_like(y))
    assert A.grad.dtype == torch.float32 and B.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    # reference: the same computation with bf16 copies of the adapters, fp64 arithmetic
    Ad, Bd = A.detach().bfloat16().double().requires_grad_(), B.detach().bfloat16().double().requires_grad_()
    xd = x.detach().double().requires_grad_()
    ref = _ref(xd, W.double(), None, Ad, Bd, 1.0, 0.1, 2)
    torch.manual_seed(11)
    torch.testing.assert_close(y.double(), ref.detach(), rtol=0, atol=2e-2 * ref.abs().max().item())


def test_autocast_cpu_bf16_casts_down_once_and_grads_in_param_dtype():
    torch.manual_seed(12)
    in_f, out, r = 32, 16, 4
    W, b, A, B = _params(in_f, out, r, torch.float32)
    x = torch.randn(6, in_f, requires_grad=True)
    log = _SavedLog()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with log.hooks():
            y = lora_linear(x, W, b, A, B, 1.0, 0.0, True)
        ref = F.linear(x, W, b) + F.linear(F.linear(x, A), B)  # plain ops under autocast
    assert y.dtype == torch.bfloat16 and ref.dtype == torch.bfloat16
    x_sized = [it for it in log.items if it[0] == tuple(x.shape)]
    assert len(x_sized) == 1 and x_sized[0][1] == torch.bfloat16  # one down-cast copy, never fp32
    torch.testing.assert_close(y.float(), ref.float(), rtol=0, atol=3e-2 * ref.abs().max().item())
    g = torch.randn_like(y)
    gx, gA, gB = torch.autograd.grad(y, (x, A, B), g)
    assert gx.dtype == torch.float32 and gA.dtype == torch.float32 and gB.dtype == torch.float32
    rx, rA, rB = torch.autograd.grad(ref, (x, A, B), g)
    for got, exp in ((gx, rx), (gA, rA), (gB, rB)):
        torch.testing.assert_close(got, exp, rtol=0, atol=3e-2 * exp.abs().max().item())


def test_saves_strictly_less_than_peft_style_composition():
    """Behaviour: bytes kept for backward (parameters excluded) vs lora_B(lora_A(dropout(x))) + base(x)."""
    torch.manual_seed(13)
    in_f, out, r = 64, 64, 8
    for adapter_dtype in (torch.float32, torch.bfloat16):
        W = torch.randn(out, in_f, dtype=torch.bfloat16)
        A = torch.randn(r, in_f, dtype=adapter_dtype, requires_grad=True)
        B = torch.randn(out, r, dtype=adapter_dtype, requires_grad=True)
        x = torch.randn(8, 16, in_f, dtype=torch.bfloat16, requires_grad=True)
        params = {t.untyped_storage().data_ptr() for t in (W, A, B)}
        ours, naive = _SavedLog(), _SavedLog()
        with ours.hooks():
            lora_linear(x, W, None, A, B, 2.0, 0.1, True)
        with naive.hooks():
            xa = F.dropout(x.to(A.dtype), 0.1, True)  # PEFT casts x to the adapter dtype
            F.linear(x, W) + F.linear(F.linear(xa, A), B).to(x.dtype) * 2.0
        ours_b, naive_b = ours.unique_bytes(params), naive.unique_bytes(params)
        assert ours_b < naive_b, (adapter_dtype, ours_b, naive_b)
        # ours keeps the dropped x (bf16) instead of x, its mask packed to bits, the (N, r) product and, for
        # fp32 adapters, B's bf16 copy (out x r: the backward does not cast it again)
        b_copy = out * r * 2 if adapter_dtype != torch.bfloat16 else 0
        assert ours_b == x.numel() * 2 + x.numel() // 8 + x.numel() // in_f * r * 2 + b_copy


# ---------------------------------------------------------------- checkpointing and compile
def test_gradient_checkpointing_regenerates_the_same_mask():
    torch.manual_seed(14)
    W, b, A, B = _params(16, 12, 4, torch.float64)
    W2 = torch.randn(12, 12, dtype=torch.float64)
    A2 = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    B2 = torch.randn(12, 4, dtype=torch.float64, requires_grad=True)
    x0 = torch.randn(3, 5, 16, dtype=torch.float64)

    def block(x):
        h = torch.tanh(lora_linear(x, W, b, A, B, 1.0, 0.5, True))
        return lora_linear(h, W2, None, A2, B2, 0.5, 0.5, True)

    grads = []
    for use_ckpt in (False, True):
        x = x0.clone().requires_grad_()
        torch.manual_seed(100)
        y = checkpoint(block, x, use_reentrant=False) if use_ckpt else block(x)
        grads.append((y.detach(), *torch.autograd.grad(y.square().sum(), (x, A, B, A2, B2))))
    for a, c in zip(*grads):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["eager", pytest.param("aot_eager", marks=pytest.mark.slow)])
def test_torch_compile_does_not_break(backend):
    torch.manual_seed(15)
    W, b, A, B = _params(8, 6, 2, torch.float32)

    def fn(x, A, B):
        return lora_linear(x, W, b, A, B, 0.5, 0.2, True, seed=21)

    compiled = torch.compile(fn, backend=backend)
    x = torch.randn(2, 3, 8, requires_grad=True)
    y = compiled(x, A, B)
    ref = _ref(x, W, b, A, B, 0.5, 0.2, 21)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    for got, exp in zip(_grads(y, (x, A, B), g), _grads(ref, (x, A, B), g)):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- grouped variants
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_linear_multi_qkv_matches_separate_formulas(p):
    torch.manual_seed(16)
    in_f = 16
    outs, ranks = [16, 8, 8], [4, 2, 4]
    Ws = [torch.randn(o, in_f, dtype=torch.float64) for o in outs]
    bs = [torch.randn(8, dtype=torch.float64) if o == 8 else None for o in outs]
    As = [torch.randn(r, in_f, dtype=torch.float64, requires_grad=True) for r in ranks]
    Bs = [torch.randn(o, r, dtype=torch.float64, requires_grad=True) for o, r in zip(outs, ranks)]
    sc = [0.5, 1.0, 2.0]
    x = torch.randn(2, 6, in_f, dtype=torch.float64, requires_grad=True)
    log = _SavedLog()
    with log.hooks():
        ys = lora_linear_multi(x, Ws, bs, As, Bs, sc, p, True, seed=77)
    n_rows = x.numel() // in_f
    x_sized = [it for it in log.items if int(torch.tensor(it[0]).prod()) == x.numel() and it[1] == x.dtype]
    assert len(x_sized) == 1  # x (dropped copy when p > 0) saved once for all three
    masks = [it for it in log.items if it[1] in (torch.bool, torch.uint8)]
    assert [it[:2] for it in masks] == ([((n_rows, in_f // 8), torch.uint8)] if p else [])  # one shared mask
    refs = [_ref(x, W, b, A, B, s, p, 77) for W, b, A, B, s in zip(Ws, bs, As, Bs, sc)]
    gs = [torch.randn_like(r) for r in refs]
    for y, r in zip(ys, refs):
        torch.testing.assert_close(y, r, rtol=0, atol=1e-10)
    got = torch.autograd.grad(ys, (x, *As, *Bs), gs)
    exp = torch.autograd.grad(refs, (x, *As, *Bs), gs)
    for a, c in zip(got, exp):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-10)


def test_lora_linear_multi_errors():
    W = torch.randn(4, 8)
    A, B = torch.randn(2, 8), torch.randn(4, 2)
    x = torch.randn(3, 8)
    with pytest.raises(DeltaConfigError, match="must have the same length, got 2, 1, 1"):
        lora_linear_multi(x, [W, W], None, [A], [B], 1.0, 0.0, True)
    with pytest.raises(
        DeltaConfigError, match=r"scalings must be a float or a list of 1 floats, got \[1.0, 2.0\]"
    ):
        lora_linear_multi(x, [W], None, [A], [B], [1.0, 2.0], 0.0, True)
    with pytest.raises(DeltaConfigError, match=r"lora_Bs\[0\] must have shape \(4, 2\)"):
        lora_linear_multi(x, [W], None, [A], [torch.randn(4, 3)], 1.0, 0.0, True)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fused_lora_A_matches_separate_products(p):
    torch.manual_seed(17)
    As = [torch.randn(r, 12, dtype=torch.float64, requires_grad=True) for r in (3, 1, 2)]
    x = torch.randn(4, 3, 12, dtype=torch.float64, requires_grad=True)
    parts = fused_lora_A(x, As, p, True, seed=5)
    m = dropout_mask((12, 12), p, 5, "cpu").reshape(x.shape) if p else torch.ones_like(x, dtype=torch.bool)
    xd = x * m / (1 - p)
    refs = [xd @ A.t() for A in As]
    gs = [torch.randn_like(r) for r in refs]
    for a, c in zip(parts, refs):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-12)
    for a, c in zip(torch.autograd.grad(parts, (x, *As), gs), torch.autograd.grad(refs, (x, *As), gs)):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-12)


def _merged_ref(x, W, b, A, Bs, enable, sizes, s, p, seed, fifo=False):
    m = dropout_mask((x.numel() // x.shape[-1], x.shape[-1]), p, seed, "cpu").reshape(x.shape) if p else None
    xd = x * m / (1 - p) if p else x
    y = x @ W if fifo else x @ W.t()
    if b is not None:
        y = y + b
    k = sum(enable)
    r = A.shape[0] // k
    pieces, j, o = [], 0, 0
    for sz, e in zip(sizes, enable):
        piece = y[..., o : o + sz]
        if e:
            piece = piece + s * (xd @ A[j * r : (j + 1) * r].t()) @ Bs[j].t()
            j += 1
        pieces.append(piece)
        o += sz
    return torch.cat(pieces, dim=-1)


@pytest.mark.parametrize("fifo", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_lora_merged_linear_q_and_v_only(fifo, p):
    torch.manual_seed(18)
    in_f, d, r = 12, 6, 2
    W = torch.randn(3 * d, in_f, dtype=torch.float64)
    if fifo:
        W = W.t().contiguous()
    b = torch.randn(3 * d, dtype=torch.float64)
    A = torch.randn(2 * r, in_f, dtype=torch.float64, requires_grad=True)
    B = torch.randn(2 * d, r, dtype=torch.float64, requires_grad=True)  # loralib layout: stacked
    x = torch.randn(2, 4, in_f, dtype=torch.float64, requires_grad=True)
    enable = [True, False, True]
    y = lora_merged_linear(x, W, b, A, B, enable, 0.5, p, True, fan_in_fan_out=fifo, seed=31)
    ref = _merged_ref(x, W, b, A, [B[:d], B[d:]], enable, [d] * 3, 0.5, p, 31, fifo)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-10)
    # the disabled (k) slice is exactly the base projection
    base = (x @ W if fifo else x @ W.t()) + b
    torch.testing.assert_close(y[..., d : 2 * d], base[..., d : 2 * d], rtol=0, atol=1e-12)
    g = torch.randn_like(y)
    for a, c in zip(_grads(y, (x, A, B), g), _grads(ref, (x, A, B), g)):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-10)


def test_lora_merged_linear_uneven_splits_and_list_of_B():
    torch.manual_seed(19)
    in_f, r = 10, 3
    sizes = [8, 4, 4]  # GQA-style fused qkv
    W = torch.randn(16, in_f, dtype=torch.float64)
    A = torch.randn(2 * r, in_f, dtype=torch.float64, requires_grad=True)
    Bq = torch.randn(8, r, dtype=torch.float64, requires_grad=True)
    Bk = torch.randn(4, r, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, in_f, dtype=torch.float64, requires_grad=True)
    enable = [True, True, False]
    y = lora_merged_linear(x, W, None, A, [Bq, Bk], enable, 2.0, 0.0, True, out_splits=sizes)
    ref = _merged_ref(x, W, None, A, [Bq, Bk], enable, sizes, 2.0, 0.0, None)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-10)
    g = torch.randn_like(y)
    for a, c in zip(_grads(y, (x, A, Bq, Bk), g), _grads(ref, (x, A, Bq, Bk), g)):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-10)


def test_lora_merged_linear_errors():
    W = torch.randn(12, 8)
    A, B = torch.randn(4, 8), torch.randn(8, 2)
    x = torch.randn(3, 8)
    with pytest.raises(DeltaConfigError, match="enable_lora must enable at least one slice"):
        lora_merged_linear(x, W, None, A, B, [False, False, False], 1.0, 0.0, True)
    with pytest.raises(
        DeltaConfigError, match=r"out_features \(12\) must be divisible by len\(enable_lora\) \(5\)"
    ):
        lora_merged_linear(x, W, None, A, B, [True] * 5, 1.0, 0.0, True)
    with pytest.raises(
        DeltaConfigError, match=r"out_splits must sum to out_features \(12\), got \[4, 4, 5\]"
    ):
        lora_merged_linear(x, W, None, A, B, [True, False, True], 1.0, 0.0, True, out_splits=[4, 4, 5])
    with pytest.raises(DeltaConfigError, match=r"lora_B must have shape \(8, 2\) \(enabled slices stacked\)"):
        lora_merged_linear(x, W, None, A, torch.randn(12, 2), [True, False, True], 1.0, 0.0, True)
    with pytest.raises(DeltaConfigTypeError, match=r"enable_lora\[1\] must be a bool, got 0"):
        lora_merged_linear(x, W, None, A, B, [True, 0, True], 1.0, 0.0, True)


def test_torch_compile_traces_dropout_without_graph_break_or_recompiling():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    torch.manual_seed(22)
    W, b, A, B = _params(8, 6, 2, torch.float32)
    counter = CompileCounter()

    @torch.compile(backend=counter)
    def fn(x):
        return lora_linear(torch.tanh(x), W, b, A, B, 0.5, 0.3, True) * 2

    x = torch.randn(4, 8)
    outs = []
    for step in range(3):
        torch.manual_seed(step)
        outs.append(fn(x))
    for step, out in enumerate(outs):
        mask = _native_mask((4, 8), 0.3, torch.float32, step)
        torch.testing.assert_close(
            out, 2 * _ref(torch.tanh(x), W, b, A, B, 0.5, 0.3, None, mask=mask), rtol=1e-5, atol=1e-6
        )
    assert not torch.allclose(outs[0], outs[1])  # a fresh mask per call
    assert counter.frame_count == 1  # one graph: dropout is traced, compiled once, not once per call


@pytest.mark.parametrize("shape", [(5, 16), (3, 4, 8), (2, 64), (7, 12)])
def test_pack_mask_round_trip(shape):
    m = torch.rand(shape, generator=torch.Generator().manual_seed(3)) > 0.3
    packed = pack_mask(m)
    if shape[-1] % 8:
        assert packed is m  # not a multiple of 8: kept as bool
    else:
        assert packed.dtype == torch.uint8 and tuple(packed.shape) == (*shape[:-1], shape[-1] // 8)
        # little-endian bits: element 8k + j of a row is bit j of byte k
        assert int(packed.reshape(-1)[0]) == sum(int(b) << j for j, b in enumerate(m.reshape(-1, 8)[0].tolist()))
    assert torch.equal(unpack_mask(packed), m)



@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("fifo", [False, True])
def test_named_entry_points_match_the_checked_kernels(p, fifo):
    """lora_projection / lora_projections (the LoRA layers' entry, LoraProjection fields) compute exactly
    what lora_linear / lora_linear_multi compute: outputs and gradients, same dropout mask."""
    from deltatune.kernels import LoraProjection, lora_projection, lora_projections

    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    params = [_params(16, out, r, torch.float64, bias=i != 1, fifo=fifo) for i, (out, r) in enumerate([(12, 4), (8, 2)])]
    projs = [LoraProjection(W, b, A, B, 0.5 + i, p, fifo) for i, (W, b, A, B) in enumerate(params)]
    g = torch.randn(2, 5, 12, dtype=torch.float64)

    torch.manual_seed(1)
    y = lora_projection(x, projs[0])
    got = _grads(y, (x, params[0][2], params[0][3]), g)
    torch.manual_seed(1)
    y_ref = lora_linear(x, *params[0], 0.5, p, True, fan_in_fan_out=fifo)
    want = _grads(y_ref, (x, params[0][2], params[0][3]), g)
    torch.testing.assert_close(y, y_ref, atol=0, rtol=0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)

    gs = [g, torch.randn(2, 5, 8, dtype=torch.float64)]
    torch.manual_seed(2)
    ys = lora_projections(x, projs)
    got = torch.autograd.grad(ys, [x] + [t for prm in params for t in prm[2:]], gs)
    torch.manual_seed(2)
    ys_ref = lora_linear_multi(x, [prm[0] for prm in params], [prm[1] for prm in params], [prm[2] for prm in params],
                               [prm[3] for prm in params], [0.5, 1.5], p, True, fan_in_fan_out=fifo)
    want = torch.autograd.grad(ys_ref, [x] + [t for prm in params for t in prm[2:]], gs)
    for a, b in zip(list(ys) + list(got), list(ys_ref) + list(want)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_projections_computed_together_must_share_dropout_and_layout():
    from deltatune.kernels import LoraProjection, lora_projections

    W, b, A, B = _params(8, 4, 2, torch.float32)
    with pytest.raises(DeltaConfigError, match=(
            r"^projections computed together must share dropout_p and fan_in_fan_out, got "
            r"\[\(0\.0, False\), \(0\.1, False\)\]$")):
        lora_projections(torch.randn(3, 8), [LoraProjection(W, b, A, B, 1.0, 0.0, False),
                                             LoraProjection(W, b, A, B, 1.0, 0.1, False)])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_saved_mask_packs_on_cpu_and_keeps_bytes_on_cuda(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    m = torch.rand(4, 6, 16, device=device) >= 0.3
    kept = saved_mask(m)
    if device == "cpu":
        assert kept.dtype == torch.uint8 and tuple(kept.shape) == (4, 6, 2)
    else:
        assert kept is m
    assert torch.equal(unpack_mask(kept), m)
