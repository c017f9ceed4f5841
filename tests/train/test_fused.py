"""fuse_llama (pure-torch backend on CPU): outputs and gradients equal the unfused model; the options' errors."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from _train_utils import lm_examples, tiny_llama
from _train_utils import single_thread as _single_thread  # noqa: F401

import deltatune as dt
from deltatune.errors import DeltaConfigError
from deltatune.train import TrainConfig, Trainer, fuse_llama
from deltatune.train import fused as fused_mod
from deltatune.train.fused import apply_fused_kernels, liger_available, rms_norm, swiglu


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rms_norm_and_swiglu_functions_equal_the_formulas(dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=dtype, requires_grad=True)
    w = torch.randn(16, dtype=dtype, requires_grad=True)
    xf = x.float()
    ref = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    out = rms_norm(x, w, 1e-6)
    torch.testing.assert_close(out, ref)
    dy = torch.randn_like(out)
    # (statistics in fp32 as in transformers, also for fp64 inputs: fp32 rounding)
    torch.testing.assert_close(torch.autograd.grad(out, (x, w), dy), torch.autograd.grad(ref, (x, w), dy),
                               rtol=1e-6, atol=1e-6)
    g = torch.randn(4, 8, dtype=dtype, requires_grad=True)
    u = torch.randn(4, 8, dtype=dtype, requires_grad=True)
    out, ref = swiglu(g, u), torch.nn.functional.silu(g) * u
    torch.testing.assert_close(out, ref)
    dy = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, (g, u), dy), torch.autograd.grad(ref, (g, u), dy))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_swiglu_is_bitwise_the_unfused_expression(dtype):
    # the CPU default under fused_kernels="auto" relies on this: outputs and both gradients to the bit
    torch.manual_seed(1)
    g = (torch.randn(6, 7, 40) * 4).to(dtype).requires_grad_(True)  # also large |gate| (sigmoid saturated)
    u = torch.randn(6, 7, 40, dtype=dtype, requires_grad=True)
    out, ref = swiglu(g, u), torch.nn.functional.silu(g) * u
    assert torch.equal(out, ref)
    dy = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (g, u), dy), torch.autograd.grad(ref, (g, u), dy)):
        assert torch.equal(a, b)
    # only the gradient asked for is formed
    ref = torch.nn.functional.silu(g) * u.detach()
    assert torch.equal(torch.autograd.grad(swiglu(g, u.detach()), g, dy)[0], torch.autograd.grad(ref, g, dy)[0])


def _lora_llama():
    model = tiny_llama(seed=4)
    dt.apply(model, dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj"]))
    for n, p in model.named_parameters():  # the norms train too, so their weight gradients are compared
        if "norm" in n:
            p.requires_grad_(True)
        if "lora_B" in n:  # non-zero B: lora_A gets gradients too
            torch.nn.init.normal_(p, std=0.1)
    return model


def test_fused_torch_model_equals_unfused_outputs_and_gradients(monkeypatch):
    model = _lora_llama()
    fused = copy.deepcopy(model)
    calls = {"rope": 0}
    rope = fused_mod._rope_torch

    def counting_rope(*a, **k):
        calls["rope"] += 1
        return rope(*a, **k)

    monkeypatch.setattr(fused_mod, "_torch_ops", lambda: {"rms_norm": rms_norm, "swiglu": swiglu, "rope": counting_rope})
    assert fuse_llama(fused, "torch") == {"rms_norm": 5, "swiglu": 2, "rope": 2}  # 2 blocks x 2 + final norm
    ids = torch.randint(3, 32, (2, 11))
    ref = model(input_ids=ids).logits
    out = fused(input_ids=ids).logits
    assert calls["rope"] == 2  # the fused RoPE ran in both attention modules
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    dy = torch.randn_like(ref)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    g_ref = torch.autograd.grad(ref, [p for p in model.parameters() if p.requires_grad], dy)
    g_out = torch.autograd.grad(out, [p for p in fused.parameters() if p.requires_grad], dy)
    for n, a, b in zip(names, g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()), msg=n)
        assert float(b.abs().max()) > 0, n
    # the unfused model (same classes) still runs the original RoPE: no call counted
    model(input_ids=ids)
    assert calls["rope"] == 2
    assert fuse_llama(fused, "torch") == {"rms_norm": 5, "swiglu": 2, "rope": 2}  # already fused: unchanged
    # an unfused model still pickles with the RoPE stand-in in place (and computes the same)
    clone = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(clone(input_ids=ids).logits, ref)
    assert calls["rope"] == 2


def _train_fused(choice):
    """Three CPU Trainer steps of the LoRA Llama with ``fused_kernels=choice``: (what the Trainer used, the
    model, the train losses, the trained tensors)."""
    model = _lora_llama()
    cfg = TrainConfig(progress_bar=False, tensorboard=False, device="cpu", lr=5e-3, batch_size=4, max_steps=3,
                      log_every=1, shuffle=False, fused_kernels=choice)
    tr = Trainer(model, cfg, lm_examples(12, seed=2, min_len=3, max_len=12))
    tr.train()
    losses = [r["loss"] for r in tr.log_history if r["split"] == "train"]
    return tr.fused_kernels, model, losses, [p.detach().clone() for p in model.parameters() if p.requires_grad]


def test_trainer_with_fused_torch_trains_as_unfused():
    used, _, losses, _ = _train_fused("torch")
    ref_used, _, ref, _ = _train_fused("none")
    assert (used, ref_used) == ("torch", "none")
    assert losses == pytest.approx(ref, rel=1e-5)


def test_auto_on_cpu_fuses_swiglu_only_and_trains_bitwise_as_unfused():
    used, model, losses, params = _train_fused("auto")
    ref_used, ref_model, ref_losses, ref_params = _train_fused("none")
    assert (used, ref_used) == ("torch-swiglu", "none")
    assert getattr(model, fused_mod._MARK) == {"rms_norm": 0, "swiglu": 2, "rope": 0}
    assert not hasattr(ref_model, fused_mod._MARK)
    assert losses == ref_losses and len(losses) == 3
    assert all(torch.equal(a, b) for a, b in zip(params, ref_params))
    # the other sites can still be fused later (by any backend); the fused MLPs are left as they are
    assert fuse_llama(model, "torch") == {"rms_norm": 5, "swiglu": 2, "rope": 2}


def test_errors():
    with pytest.raises(DeltaConfigError, match=r"^fuse_llama backend must be 'liger' or 'torch', got 'triton'$"):
        fuse_llama(tiny_llama(), "triton")
    with pytest.raises(DeltaConfigError, match=r"^fuse_llama sites must be a non-empty subset of \['rms_norm', "
                                                r"'swiglu', 'rope'\], got \['swiglu', 'mlp'\]$"):
        fuse_llama(tiny_llama(), "torch", sites=("swiglu", "mlp"))
    with pytest.raises(DeltaConfigError, match=r"got \[\]$"):
        fuse_llama(tiny_llama(), "torch", sites=())
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=1))
    with pytest.raises(DeltaConfigError, match=r"fused kernels need a Llama-style model .* got GPT2LMHeadModel "
                                                r"with model_type 'gpt2'"):
        fuse_llama(gpt2, "torch")
    assert apply_fused_kernels(gpt2, "auto", torch.device("cpu")) == "none"
    with pytest.raises(DeltaConfigError, match=r"fused_kernels must be one of"):
        TrainConfig(fused_kernels="triton")
    with pytest.raises(DeltaConfigError, match=r"cuda_graph=True does not take fused_kernels='compile'"):
        TrainConfig(cuda_graph=True, fused_kernels="compile")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_liger_refused_without_cuda():
    assert liger_available() == "CUDA is not available"
    with pytest.raises(DeltaConfigError, match=r"^fused_kernels='liger' cannot run here: CUDA is not available; "):
        Trainer(tiny_llama(), TrainConfig(progress_bar=False, device="cpu", fused_kernels="liger"), lm_examples(2))
    assert apply_fused_kernels(tiny_llama(), "auto", torch.device("cpu")) == "torch-swiglu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or bool(liger_available()), reason="needs CUDA + liger-kernel")
def test_liger_bf16_equals_unfused_on_gpu():
    """Within bf16 tolerance, measured against the fp32 model: liger's bf16 error is no larger than twice the
    unfused bf16 model's (outputs and every trainable gradient, relative Frobenius norms). One bf16 ulp of a
    logit of magnitude 10 is 0.06, so an absolute tolerance on the bf16 logits tests rounding, not fusion."""
    ref32 = _lora_llama().cuda()
    model = copy.deepcopy(ref32).to(torch.bfloat16)
    fused = copy.deepcopy(model)
    fuse_llama(fused, "liger")
    ids = torch.randint(3, 32, (2, 64), device="cuda")
    outs = [m(input_ids=ids).logits.float() for m in (ref32, model, fused)]
    dy = torch.randn_like(outs[0])
    grads = [torch.autograd.grad(o, [p for p in m.parameters() if p.requires_grad], dy)
             for o, m in zip(outs, (ref32, model, fused))]

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))

    e_unfused, e_fused = rel(outs[1], outs[0]), rel(outs[2], outs[0])
    assert e_fused <= 2 * e_unfused + 1e-3, (e_fused, e_unfused)
    for g32, g16, gl in zip(*grads):
        e_unfused, e_fused = rel(g16, g32), rel(gl, g32)
        assert e_fused <= 2 * e_unfused + 1e-2, (e_fused, e_unfused)
