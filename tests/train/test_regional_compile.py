"""compile_blocks: every transformer block compiled in place, same outputs and gradients as eager."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.errors import DeltaConfigError
from deltatune.kernels import causal_lm_loss
from deltatune.train import compile_blocks

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_compiled_blocks_match_eager_loss_and_gradients():
    from tests.tiny_models import llama

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = dt.apply(llama(), dt.LoraConfig(r=4, alpha=8, target_modules=TARGETS, init="random")).train()
    model.config.use_cache = False
    eager = copy.deepcopy(model)
    names = compile_blocks(model, backend="aot_eager")
    assert names == [f"model.layers.{i}" for i in range(len(model.model.layers))]
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    assert model.model.layers[0].self_attn.q_proj.__class__ is eager.model.layers[0].self_attn.q_proj.__class__
    assert list(model.state_dict()) == list(eager.state_dict())  # compiled in place: same keys
    ids = torch.randint(3, 64, (2, 12))
    losses = []
    for m in (model, eager):
        loss = causal_lm_loss(m.model(input_ids=ids).last_hidden_state, m.lm_head.weight, ids)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    grads = [(n, p.grad) for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None for _, g in grads)
    for (n, g), (_, h) in zip(grads, [(n, p.grad) for n, p in eager.named_parameters() if p.requires_grad]):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-6, msg=n)


def test_model_without_blocks_is_refused():
    with pytest.raises(DeltaConfigError, match=r"compile_blocks found no transformer blocks in Sequential"):
        compile_blocks(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
