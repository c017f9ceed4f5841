"""The default LoRA fast path inside real models: gradient checkpointing and torch.compile give the
same losses and gradients as plain eager execution."""

from __future__ import annotations

import copy

import pytest
import torch

import deltatune as dt
from tests.tiny_models import example_input, llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _loss_and_grads(model, ids, seed):
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_gradient_checkpointing_with_dropout_matches_eager():
    """Checkpointed layers recompute LoRA with the same dropout masks (seeds from the restored RNG)."""
    model = dt.apply(llama(), dt.LoraConfig(target_modules=TARGETS, r=4, dropout=0.2, init="random")).train()
    ckpt = copy.deepcopy(model)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = example_input("llama")["input_ids"]
    loss_a, grads_a = _loss_and_grads(model, ids, seed=3)
    loss_b, grads_b = _loss_and_grads(ckpt, ids, seed=3)
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=0)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    model = dt.apply(llama(), dt.LoraConfig(target_modules=TARGETS, r=4, init="random")).train()
    compiled = copy.deepcopy(model)
    compiled_fn = torch.compile(compiled, backend="aot_eager")
    ids = example_input("llama")["input_ids"]
    loss_a, grads_a = _loss_and_grads(model, ids, seed=0)
    torch.manual_seed(0)
    loss_b = compiled_fn(input_ids=ids, labels=ids).loss
    loss_b.backward()
    torch.testing.assert_close(loss_a, loss_b.detach(), atol=1e-5, rtol=1e-5)
    for n, p in compiled.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads_a[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
