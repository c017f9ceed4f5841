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


@pytest.mark.parametrize("dropout", [0.2, 0.0])
def test_gradient_checkpointing_matches_eager(dropout):
    """Checkpointed layers recompute LoRA (grouped q/k/v and gate/up included) with the same dropout
    masks (seeds from the restored RNG), or none."""
    model = dt.apply(llama(), dt.LoraConfig(target_modules=TARGETS, r=4, dropout=dropout, init="random")).train()
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


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_dynamo_traces_a_lora_model_in_one_graph(dropout):
    """Grouped projections, the fast path and its dropout trace without a graph break."""
    model = dt.apply(llama(), dt.LoraConfig(target_modules=TARGETS, r=4, dropout=dropout, init="random")).train()
    assert model.model.layers[0].self_attn.q_proj.__dict__.get("_shared_group") is not None
    ids = example_input("llama")["input_ids"]
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda i: model.model(input_ids=i, use_cache=False).last_hidden_state)(ids)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


# ---------------------------------------------------------------- group outputs computed ahead
def _formula(layer, x):
    """The plain LoRA formula for the layer's active adapter (no dropout)."""
    name = layer.active_adapters[0]
    base = layer.base_layer
    A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
    return torch.nn.functional.linear(x, base.weight, base.bias) + layer.scaling[name] * (x @ A.T) @ B.T


def _qkv_model(**kw):
    cfg = dict(target_modules=["q_proj", "k_proj", "v_proj"], r=4, init="random")
    cfg.update(kw)
    model = dt.apply(llama(), dt.LoraConfig(**cfg)).train()
    attn = model.model.layers[0].self_attn
    return model, attn, attn.q_proj._shared_group


def test_group_computes_members_in_one_node_and_hands_each_output_once():
    _, attn, group = _qkv_model()
    x = torch.randn(2, 3, 32, requires_grad=True)
    q, k = attn.q_proj(x), attn.k_proj(x)
    assert q.grad_fn is k.grad_fn  # one autograd node for the group
    k_again = attn.k_proj(x)  # already handed out: computed afresh
    assert k_again.grad_fn is not q.grad_fn
    v = attn.v_proj(x)
    for layer, y in ((attn.q_proj, q), (attn.k_proj, k), (attn.k_proj, k_again), (attn.v_proj, v)):
        torch.testing.assert_close(y, _formula(layer, x), atol=1e-6, rtol=0)
    assert group.enabled
    # a normal round hands out every output computed ahead
    x = torch.randn(2, 3, 32)
    outs = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]
    assert not group._pending and group._wasted == 0
    for layer, y in zip((attn.q_proj, attn.k_proj, attn.v_proj), outs):
        torch.testing.assert_close(y, _formula(layer, x), atol=1e-6, rtol=0)


def test_group_never_serves_stale_outputs():
    _, attn, group = _qkv_model()
    x1, x2 = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    # the first member called twice with different inputs, then a sibling with the first input
    attn.q_proj(x1)
    attn.q_proj(x2)
    torch.testing.assert_close(attn.k_proj(x1), _formula(attn.k_proj, x1), atol=1e-6, rtol=0)
    # a member called alone, repeatedly
    for _ in range(3):
        torch.testing.assert_close(attn.v_proj(x2), _formula(attn.v_proj, x2), atol=1e-6, rtol=0)
    # the input changed in place between the calls
    attn.q_proj(x1)
    with torch.no_grad():
        x1.mul_(2)
    torch.testing.assert_close(attn.k_proj(x1), _formula(attn.k_proj, x1), atol=1e-6, rtol=0)
    # a parameter changed in place between the calls
    attn.q_proj(x2)
    with torch.no_grad():
        attn.v_proj.lora_B["default"].weight.add_(1.0)
    torch.testing.assert_close(attn.v_proj(x2), _formula(attn.v_proj, x2), atol=1e-6, rtol=0)
    # eval / train and disable between the calls
    attn.q_proj(x1)
    attn.k_proj.eval()
    torch.testing.assert_close(attn.k_proj(x1), _formula(attn.k_proj, x1), atol=1e-6, rtol=0)
    attn.k_proj.train()
    attn.q_proj(x1)
    attn.v_proj.disabled = True
    torch.testing.assert_close(attn.v_proj(x1), attn.v_proj.base_layer(x1), atol=0, rtol=0)
    attn.v_proj.disabled = False


def test_group_respects_grad_mode_and_gives_formula_gradients():
    _, attn, _ = _qkv_model()
    x = torch.randn(2, 3, 32, requires_grad=True)
    with torch.no_grad():
        attn.q_proj(x)
    k = attn.k_proj(x)  # grad mode changed: must not take the no-grad output
    assert k.requires_grad
    x_ref = x.detach().clone().requires_grad_()
    params = [attn.k_proj.lora_A["default"].weight, attn.k_proj.lora_B["default"].weight]
    g = torch.randn_like(k)
    got = torch.autograd.grad(k, [x, *params], g)
    exp = torch.autograd.grad(_formula(attn.k_proj, x_ref), [x_ref, *params], g)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    # under no_grad a computed-ahead output carries no graph
    with torch.no_grad():
        q, k = attn.q_proj(x), attn.k_proj(x)
    assert not q.requires_grad and not k.requires_grad


def test_group_follows_adapter_switches_and_merges():
    model, attn, _ = _qkv_model()
    dt.apply(model, dt.LoraConfig(target_modules=["q_proj", "k_proj", "v_proj"], r=2, init="random"), "second")
    layers = (attn.q_proj, attn.k_proj, attn.v_proj)
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        attn.q_proj(x)  # computes the group ahead for "default"
        dt.set_active_adapter(model, "second")
        for layer in layers:
            torch.testing.assert_close(layer(x), _formula(layer, x), atol=1e-6, rtol=0)
        # two active adapters: base + both updates
        dt.set_active_adapter(model, ["default", "second"])
        for layer in layers:
            both = _formula(layer, x)  # base + "default"
            d = layer.lora_B["second"].weight @ layer.lora_A["second"].weight
            both = both + layer.scaling["second"] * x @ d.T
            torch.testing.assert_close(layer(x), both, atol=1e-5, rtol=0)
        dt.set_active_adapter(model, "default")
        expected = [_formula(layer, x) for layer in layers]
        attn.q_proj(x)
        attn.k_proj.merge()
        got = [layer(x) for layer in layers]
        attn.k_proj.unmerge()
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_group_stops_computing_ahead_when_members_read_different_inputs():
    """Cross-attention style: k/v read another tensor than q; results stay exact and the group gives up."""
    _, attn, group = _qkv_model()
    for _ in range(3):
        x, enc = torch.randn(2, 3, 32), torch.randn(2, 5, 32)
        outs = [attn.q_proj(x), attn.k_proj(enc), attn.v_proj(enc)]
        for layer, inp, y in zip((attn.q_proj, attn.k_proj, attn.v_proj), (x, enc, enc), outs):
            torch.testing.assert_close(y, _formula(layer, inp), atol=1e-6, rtol=0)
    assert not group.enabled and not group._pending


def test_grouped_model_matches_ungrouped_with_dropout_in_eval_and_formula():
    """Whole model: grouped outputs and gradients equal the ungrouped fast path and the plain ops path."""
    import deltatune.methods.lora as L

    model = dt.apply(llama(), dt.LoraConfig(target_modules=TARGETS, r=4, init="random")).train()
    plain = copy.deepcopy(model)
    for module in plain.modules():
        module.__dict__.pop("_shared_group", None)
    ids = example_input("llama")["input_ids"]
    loss_a, grads_a = _loss_and_grads(model, ids, seed=0)
    loss_b, grads_b = _loss_and_grads(plain, ids, seed=0)
    old = L.FAST_PATH
    L.FAST_PATH = False
    try:
        loss_c, grads_c = _loss_and_grads(plain, ids, seed=0)
    finally:
        L.FAST_PATH = old
    for loss, grads in ((loss_b, grads_b), (loss_c, grads_c)):
        torch.testing.assert_close(loss_a, loss, atol=1e-6, rtol=0)
        for n in grads_a:
            torch.testing.assert_close(grads_a[n], grads[n], atol=1e-6, rtol=1e-5, msg=n)
