"""LoRA dropout inside the Triton A-side kernels (:mod:`deltatune.kernels.dropout_triton`).

Each kernel is checked against the float64 formula with the kernel's own keep mask (``keep_mask``), the
whole LoRA Function against a float64 autograd reference, and the properties the Trainer relies on: the
mask rate, reproducibility from ``torch.manual_seed``, recomputation under ``torch.utils.checkpoint``, a
fresh mask per CUDA-graph replay, and that the backward keeps no dropped copy and no mask.

Runs on CUDA with triton installed, or on the CPU under the Triton interpreter
(``TRITON_INTERPRET=1 python -m pytest tests/kernels/test_dropout_triton.py`` with triton installed; the
interpreter has no bfloat16 matmul, so bf16 runs on CUDA only). Skipped otherwise (CI).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch.utils.checkpoint import checkpoint

from deltatune.kernels import dropout_triton as T
from deltatune.kernels import lora_linear, lora_linear_multi

pytestmark = pytest.mark.skipif(
    not T.TRITON_DROPOUT, reason="needs triton with CUDA, or TRITON_INTERPRET=1 with triton installed"
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16] if DEV == "cuda" else [torch.float32, torch.float16]
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all()
    return float((a - b).abs().max() / b.abs().max())


RNGS = [T.RngSetting(24, 10), T.RngSetting(16, 10), T.RngSetting(16, 7)]


def _philox4x32(seed: int, ctr: np.ndarray, rounds: int) -> list[np.ndarray]:
    """Philox4x32 (Salmon et al. 2011) on counters ``(ctr_lo, ctr_hi, 0, 0)`` with key ``(seed_lo, seed_hi)``,
    written out in numpy: the reference for the kernels' masks."""
    m32 = np.uint64(0xFFFFFFFF)
    c = [ctr & m32, ctr >> np.uint64(32), np.zeros_like(ctr), np.zeros_like(ctr)]
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    ra, rb = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(rounds):
        pa, pb = ra * c[0], rb * c[2]  # 64-bit products of 32-bit numbers (no overflow)
        c = [(pb >> np.uint64(32)) ^ c[1] ^ k0, pb & m32, (pa >> np.uint64(32)) ^ c[3] ^ k1, pa & m32]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & m32, (k1 + np.uint64(0xBB67AE85)) & m32
    return c


def _reference_mask(n: int, k: int, seed: int, p: float, rng: T.RngSetting) -> np.ndarray:
    """The keep mask as ``keep_mask``'s docstring defines it, from :func:`_philox4x32`."""
    rows, cols = np.arange(n, dtype=np.uint64)[:, None], np.arange(k, dtype=np.uint64)[None, :]
    per = 4 if rng.bits == 24 else 8
    groups = (k + per - 1) // per
    ctr = rows * np.uint64(groups) + cols // np.uint64(per)
    outs = _philox4x32(seed, ctr, rng.rounds)
    if rng.bits == 24:
        which = (cols % np.uint64(4)).astype(np.int64)
        num = np.choose(np.broadcast_to(which, (n, k)), outs) >> np.uint64(8)
    else:
        which = ((cols // np.uint64(2)) % np.uint64(4)).astype(np.int64)
        word = np.choose(np.broadcast_to(which, (n, k)), outs)
        num = np.where(cols % np.uint64(2) == 0, word & np.uint64(0xFFFF), word >> np.uint64(16))
    return num >= np.uint64(T.threshold(p, rng))


@pytest.mark.parametrize("rng", RNGS, ids=str)
def test_keep_mask_equals_the_philox_reference(rng):
    seed = T.draw_seed(torch.device(DEV))
    n, k, p = 70, 136, 0.3  # neither a multiple of the tile
    got = T.keep_mask(n, k, seed, p, rng).cpu().numpy()
    assert np.array_equal(got, _reference_mask(n, k, int(seed.item()), p, rng))


@pytest.mark.parametrize("rng", RNGS, ids=str)
def test_keep_mask_rate_and_reproducibility(rng):
    torch.manual_seed(0)
    seed = T.draw_seed(torch.device(DEV))
    n, k, p = 256, 200, 0.3
    q = T.keep_probability(p, rng)
    m = T.keep_mask(n, k, seed, p, rng)
    assert m.shape == (n, k) and m.dtype == torch.bool
    sigma = (p * (1 - p) / (n * k)) ** 0.5
    assert abs(m.float().mean().item() - q) < 5 * sigma
    assert torch.equal(m, T.keep_mask(n, k, seed.clone(), p, rng))
    other = T.keep_mask(n, k, T.draw_seed(torch.device(DEV)), p, rng)
    assert not torch.equal(m, other)
    # columns and rows are not correlated with the tile layout: every column's rate is near q
    col = m.float().mean(0)
    assert (col - q).abs().max() < 6 * (p * (1 - p) / n) ** 0.5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,r,rng", [(70, 100, 5, RNGS[0]), (130, 64, 16, RNGS[1]), (64, 200, 48, RNGS[2])])
def test_kernels_equal_the_formula(dtype, n, k, r, rng):
    g = torch.Generator(device=DEV).manual_seed(n + k + r)
    p = 0.3
    q = T.keep_probability(p, rng)
    x = torch.randn(n, k, device=DEV, generator=g).to(dtype)
    A = torch.randn(r, k, device=DEV, generator=g).to(dtype)
    dxa = torch.randn(n, r, device=DEV, generator=g).to(dtype)
    dx0 = torch.randn(n, k, device=DEV, generator=g).to(dtype)
    seed = T.draw_seed(torch.device(DEV))
    keep = T.keep_mask(n, k, seed, p, rng).double()
    xd = x.double() * keep / q
    assert _rel(T.dropped_xa(x, A, seed, p, rng), xd @ A.double().t()) < TOL[dtype]
    dA = T.dropped_grad_A(dxa, x, seed, p, rng)
    assert dA.dtype == torch.float32
    assert _rel(dA, dxa.double().t() @ xd) < max(TOL[dtype], 1e-5)
    dx = dx0.clone()
    assert T.add_dropped_grad_x(dx, dxa, A, seed, p, rng) is dx
    want = dx0.double() + (dxa.double() @ A.double()) * keep / q
    assert _rel(dx, want) < TOL[dtype]


@pytest.mark.parametrize("tile_set", [
    {"xa": T.Tile(32, 128, 4), "da": T.Tile(16, 16, 2), "dx": T.Tile(128, 32, 8)},
    {"xa": T.Tile(16, 32, 1), "da": T.Tile(128, 64, 8), "dx": T.Tile(16, 16, 4)},
])
def test_other_tiles_give_the_same_mask_and_formula(monkeypatch, tile_set):
    """``DELTATUNE_DROPOUT_TILES`` changes the kernels' tiles, not the mask: results equal the formula."""
    monkeypatch.setattr(T, "TILES", tile_set)
    g = torch.Generator(device=DEV).manual_seed(1)
    n, k, r, p = 90, 136, 8, 0.2
    x, A = torch.randn(n, k, device=DEV, generator=g), torch.randn(r, k, device=DEV, generator=g)
    dxa, dx0 = torch.randn(n, r, device=DEV, generator=g), torch.randn(n, k, device=DEV, generator=g)
    seed = T.draw_seed(torch.device(DEV))
    xd = x.double() * T.keep_mask(n, k, seed, p).double() / T.keep_probability(p)
    assert _rel(T.dropped_xa(x, A, seed, p), xd @ A.double().t()) < 1e-5
    assert _rel(T.dropped_grad_A(dxa, x, seed, p), dxa.double().t() @ xd) < 1e-5
    want = dx0.double() + (dxa.double() @ A.double()) * (xd != 0) / T.keep_probability(p)
    assert _rel(T.add_dropped_grad_x(dx0.clone(), dxa, A, seed, p), want) < 1e-5


def _multi(dtype, p=0.25, seed_draw=True):
    g = torch.Generator(device=DEV).manual_seed(5)
    k = 80
    x = torch.randn(2, 37, k, device=DEV, generator=g).to(dtype).requires_grad_()
    Ws = [torch.randn(o, k, device=DEV, generator=g).to(dtype) for o in (24, 16)]
    As = [torch.randn(r, k, device=DEV, generator=g).to(dtype).requires_grad_() for r in (4, 8)]
    Bs = [torch.randn(o, r, device=DEV, generator=g).to(dtype).requires_grad_() for o, r in ((24, 4), (16, 8))]
    return x, Ws, As, Bs


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_function_with_fused_dropout_equals_fp64(dtype):
    x, Ws, As, Bs = _multi(dtype)
    p, sc = 0.25, [2.0, 0.5]
    torch.manual_seed(11)
    ys = lora_linear_multi(x, Ws, None, As, Bs, sc, p, True)
    weights = [torch.arange(y.shape[-1], device=DEV, dtype=torch.float64) for y in ys]
    sum((y.double() * w).sum() for y, w in zip(ys, weights)).backward()
    torch.manual_seed(11)  # the Function's first random draw is the mask seed
    keep = T.keep_mask(74, 80, T.draw_seed(torch.device(DEV)), p).double().view(2, 37, 80)
    xr = x.detach().double().requires_grad_()
    Ar = [a.detach().double().requires_grad_() for a in As]
    Br = [b.detach().double().requires_grad_() for b in Bs]
    xd = xr * keep / T.keep_probability(p)
    yr = [xr @ w.double().t() + s * (xd @ a.t()) @ b.t() for w, a, b, s in zip(Ws, Ar, Br, sc)]
    sum((y * w).sum() for y, w in zip(yr, weights)).backward()
    for got, want in [*zip(ys, yr), (x.grad, xr.grad), *zip([a.grad for a in As + Bs], [a.grad for a in Ar + Br])]:
        assert _rel(got, want) < TOL[dtype] * 3


def test_same_manual_seed_same_result_and_checkpoint_recomputes_the_mask():
    x, Ws, As, Bs = _multi(torch.float32)

    def run(use_ckpt: bool):
        for t in (x, *As, *Bs):
            t.grad = None
        torch.manual_seed(3)
        f = lambda inp: lora_linear(inp, Ws[0], None, As[0], Bs[0], 2.0, 0.5, True)  # noqa: E731
        y = checkpoint(f, x, use_reentrant=False) if use_ckpt else f(x)
        y.square().sum().backward()
        return y.detach().clone(), x.grad.clone(), As[0].grad.clone()

    a, b, c = run(False), run(False), run(True)
    for u, v, w in zip(a, b, c):
        assert torch.equal(u, v)
        assert torch.equal(u, w)


def test_backward_keeps_no_dropped_copy_and_no_mask():
    x, Ws, As, Bs = _multi(torch.float32)
    sizes: list[tuple[int, torch.dtype]] = []

    def pack(t):
        sizes.append((t.numel(), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lora_linear_multi(x, Ws, None, As, Bs, [1.0, 1.0], 0.25, True)
    big = [s for s in sizes if s[0] >= x.numel()]
    assert big == [(x.numel(), torch.float32)]  # x itself, once
    assert (1, torch.int64) in sizes  # the seed


def test_switch_off_with_the_environment_variable(monkeypatch):
    x = torch.randn(4, 8, device=DEV)
    assert T.usable(x, torch.float32)
    monkeypatch.setenv("DELTATUNE_TRITON_DROPOUT", "0")
    assert not T.usable(x, torch.float32)
    monkeypatch.delenv("DELTATUNE_TRITON_DROPOUT")
    assert not T.usable(x, torch.float64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs a CUDA device")
def test_cuda_graph_replay_draws_a_fresh_mask():
    x, Ws, As, Bs = _multi(torch.bfloat16)
    static_x = x.detach().clone()
    A, B = As[0].detach(), Bs[0].detach()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            lora_linear(static_x, Ws[0], None, A, B, 2.0, 0.5, True)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = lora_linear(static_x, Ws[0], None, A, B, 2.0, 0.5, True)
    graph.replay()
    first = out.clone()
    graph.replay()
    assert not torch.equal(first, out)


def test_recomputed_xa_equals_saved_xa():
    """``recompute_xa`` (xa formed again in the backward) regenerates the same mask from the saved seed."""
    from deltatune.kernels.lora_autograd import run_lora

    x, Ws, As, Bs = _multi(torch.float32)
    plan = ((0, 0, 24, 0, 4),)
    grads = []
    for recompute in (False, True):
        for t in (x, As[0], Bs[0]):
            t.grad = None
        torch.manual_seed(8)
        y = run_lora(x, As[0], [Ws[0]], [None], [Bs[0]], plan, [2.0], 0.3, True, None, False, recompute_xa=recompute)[0]
        y.square().sum().backward()
        grads.append((y.detach().clone(), x.grad.clone(), As[0].grad.clone(), Bs[0].grad.clone()))
    for a, b in zip(*grads):
        assert torch.equal(a, b)
