"""The fused LoRA and cross-entropy kernels on a CUDA device, in bf16, against an fp64 reference.

Skipped without CUDA (CI). Tolerance: relative error ``||out - ref|| / ||ref||`` below 1e-2, the
bf16 band (8 mantissa bits, fp32 accumulation); fp32 on the GPU may use TF32 matmuls, so it gets 2e-3.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deltatune.kernels import dropout_mask, linear_cross_entropy, lora_linear, lora_linear_multi

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TOL = {torch.bfloat16: 1e-2, torch.float32: 2e-3}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_lora_linear_cuda_matches_fp64(dtype, p):
    g = torch.Generator(device="cuda").manual_seed(1234)
    n, d_in, d_out, r, s = 4096, 576, 1536, 16, 2.0
    x = torch.randn(n, d_in, device="cuda", generator=g)
    W = torch.randn(d_out, d_in, device="cuda", generator=g) / d_in**0.5
    b = torch.randn(d_out, device="cuda", generator=g)
    A = torch.randn(r, d_in, device="cuda", generator=g) / d_in**0.5
    B = torch.randn(d_out, r, device="cuda", generator=g)
    dy = torch.randn(n, d_out, device="cuda", generator=g)
    seed = 987654321
    # reference in fp64 from the same (rounded) inputs, with the kernel's own dropout mask
    xr, Ar, Br = (t.to(dtype).double().requires_grad_() for t in (x, A, B))
    Wr, br = W.to(dtype).double(), b.to(dtype).double()
    xd = xr * dropout_mask((n, d_in), p, seed, "cuda") / (1 - p) if p else xr
    ref = xr @ Wr.t() + br + s * (xd @ Ar.t()) @ Br.t()
    ref.backward(dy.to(dtype).double())

    xk, Ak, Bk = (t.to(dtype).requires_grad_() for t in (x, A, B))
    out = lora_linear(xk, W.to(dtype), b.to(dtype), Ak, Bk, s, p, True, seed=seed)
    out.backward(dy.to(dtype))
    assert out.dtype == dtype
    assert _rel(out, ref) < TOL[dtype]
    for got, want in ((xk.grad, xr.grad), (Ak.grad, Ar.grad), (Bk.grad, Br.grad)):
        assert _rel(got, want) < TOL[dtype]


def test_lora_linear_multi_cuda_autocast_matches_fp64():
    """q/k/v sharing one input under bf16 autocast, fp32 adapter weights (the training setting)."""
    g = torch.Generator(device="cuda").manual_seed(7)
    n, d, r = 2048, 576, 8
    outs = [576, 192, 192]
    x = torch.randn(n, d, device="cuda", generator=g)
    Ws = [torch.randn(o, d, device="cuda", generator=g) / d**0.5 for o in outs]
    As = [torch.randn(r, d, device="cuda", generator=g, requires_grad=True) for _ in outs]
    Bs = [torch.randn(o, r, device="cuda", generator=g, requires_grad=True) for o in outs]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ys = lora_linear_multi(x, Ws, [None] * 3, As, Bs, [0.5] * 3, 0.0, True)
    assert all(y.dtype == torch.bfloat16 for y in ys)
    sum(y.float().square().mean() for y in ys).backward()
    bf = lambda t: t.detach().to(torch.bfloat16).double()  # noqa: E731
    As_r = [bf(a).requires_grad_() for a in As]
    Bs_r = [bf(b).requires_grad_() for b in Bs]
    ys_r = [bf(x) @ bf(W).t() + 0.5 * (bf(x) @ a.t()) @ b.t() for W, a, b in zip(Ws, As_r, Bs_r)]
    sum(y.square().mean() for y in ys_r).backward()
    for y, yr in zip(ys, ys_r):
        assert _rel(y, yr) < 1e-2
    for a, ar in zip(As + Bs, As_r + Bs_r):
        assert a.grad.dtype == torch.float32
        assert _rel(a.grad, ar.grad) < 2e-2


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_linear_cross_entropy_cuda_bf16_matches_fp64(eps):
    g = torch.Generator(device="cuda").manual_seed(3)
    n, h, v = 4096, 576, 49152
    hid = torch.randn(n, h, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(v, h, device="cuda", generator=g) / h**0.5).to(torch.bfloat16).requires_grad_()
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    y[::7] = -100
    loss = linear_cross_entropy(hid, w, y, label_smoothing=eps)
    loss.backward()
    hr, wr = hid.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = F.cross_entropy(hr @ wr.t(), y, ignore_index=-100, label_smoothing=eps)
    ref.backward()
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) / ref.item() < 1e-3
    assert _rel(hid.grad, hr.grad) < 1e-2
    assert _rel(w.grad, wr.grad) < 1e-2
