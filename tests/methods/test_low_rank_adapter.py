"""Low-rank adapters: factorised projections, identity init, training, save/load, counts, validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deltatune import api
from deltatune.checkpoint import load_delta, save_delta
from deltatune.errors import DeltaConfigError, DeltaConfigTypeError
from deltatune.freeze import trainable_summary
from deltatune.methods import get_method
from deltatune.methods.adapter import AdapterConfig, ParamCache, param_cache
from deltatune.methods.base import DeltaLayer
from deltatune.methods.low_rank_adapter import LowRankAdapterConfig, LowRankAdapterLayer, LowRankAdapterMethod

METHOD = get_method("low_rank_adapter")


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_identity_at_init_and_placement(tiny, arch):
    model = tiny.model(arch)
    batch = tiny.batch(arch)
    with torch.no_grad():
        ref = model(**batch).logits
        api.apply(model, LowRankAdapterConfig(reduction_factor=4, low_rank_size=2))
        out = model(**batch).logits
    assert torch.equal(out, ref)
    # same placement as the adapter method (houlsby: attention output and FFN output)
    other = tiny.model(arch)
    api.apply(other, AdapterConfig(bottleneck_size=2))
    assert api.targeted_modules(model) == api.targeted_modules(other)


def test_forward_matches_plain_torch_formula():
    torch.manual_seed(0)
    lin = nn.Linear(16, 16)
    model = nn.Sequential(lin)
    api.apply(model, LowRankAdapterConfig(reduction_factor=4, low_rank_size=2, identity_init=False,
                                          non_linearity="tanh", target_modules="0"))
    layer = model[0]
    d, u = layer.low_rank_adapter_down["default"], layer.low_rank_adapter_up["default"]
    assert d.w_left.shape == (16, 2) and d.w_right.shape == (2, 4)
    assert u.w_left.shape == (4, 2) and u.w_right.shape == (2, 16)
    with torch.no_grad():
        d.bias.normal_()
        u.bias.normal_()
    x = torch.randn(3, 16)
    h = F.linear(x, lin.weight, lin.bias)
    w_down = d.w_left @ d.w_right
    w_up = u.w_left @ u.w_right
    ref = h + torch.tanh(h @ w_down + d.bias) @ w_up + u.bias
    torch.testing.assert_close(model(x), ref)
    assert torch.linalg.matrix_rank(w_down.detach()) == 2


@pytest.mark.parametrize("init", ["xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal"])
def test_inits(init):
    model = nn.Sequential(nn.Linear(64, 64))
    api.apply(model, LowRankAdapterConfig(reduction_factor=2, low_rank_size=4, low_rank_w_init=init,
                                          target_modules="0"))
    d = model[0].low_rank_adapter_down["default"]
    u = model[0].low_rank_adapter_up["default"]
    assert d.w_left.std() > 0 and d.w_right.std() > 0 and u.w_left.std() > 0
    assert torch.equal(u.w_right, torch.zeros_like(u.w_right))
    if init == "xavier_uniform":  # bound sqrt(6 / (fan_in + fan_out)) for a (64, 4) tensor
        assert d.w_left.abs().max() <= (6 / (64 + 4)) ** 0.5


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_training_changes_only_delta(tiny, arch):
    model = tiny.model(arch)
    batch = tiny.batch(arch)
    api.apply(model, LowRankAdapterConfig(reduction_factor=4, low_rank_size=2))
    before = tiny.base_state(model, METHOD.is_delta_param)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(METHOD.is_delta_param(n) for n in trainable)
    losses = tiny.train(model, batch, steps=3)
    assert losses[-1] < losses[0]
    after = tiny.base_state(model, METHOD.is_delta_param)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_count_formula(tiny, arch):
    model = tiny.model(arch)
    rf, k = 4, 3
    api.apply(model, LowRankAdapterConfig(reduction_factor=rf, low_rank_size=k, placement="houlsby"))
    h = tiny.hidden
    b = h // rf
    per = 2 * k * (h + b) + b + h
    assert per == LowRankAdapterMethod.num_params(h, rf, k)
    assert trainable_summary(model).trainable == tiny.layers * 2 * per


def test_save_load_round_trip(tiny, tmp_path):
    model = tiny.model("gpt2")
    batch = tiny.batch("gpt2")
    api.apply(model, LowRankAdapterConfig(reduction_factor=8, low_rank_size=1, placement="pfeiffer"))
    tiny.train(model, batch, steps=2)
    with torch.no_grad():
        want = model(**batch).logits
    save_delta(model, tmp_path / "lr")
    fresh = tiny.model("gpt2")
    load_delta(fresh, tmp_path / "lr")
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, want)


def test_coexists_with_adapter_and_named(tiny):
    """A low-rank adapter and a bottleneck adapter on the same module stay separate methods."""
    model = tiny.model("llama")
    batch = tiny.batch("llama")
    with torch.no_grad():
        base = model(**batch).logits
    api.apply(model, LowRankAdapterConfig(reduction_factor=4, identity_init=False), name="lr")
    api.apply(model, AdapterConfig(bottleneck_size=4, init_scale=0.0), name="ad")
    o = model.model.layers[0].self_attn.o_proj
    assert type(o).__name__ == "AdapterLayer" and isinstance(o.base_layer, LowRankAdapterLayer)
    assert o.adapter_names == ["ad"] and o.base_layer.adapter_names == ["lr"]
    with torch.no_grad():
        api.set_active_adapter(model, "lr")
        out_lr = model(**batch).logits
        assert not torch.equal(out_lr, base)
        with api.disable_adapters(model):
            assert torch.equal(model(**batch).logits, base)
    api.delete_adapter(model, "lr")
    api.delete_adapter(model, "ad")
    assert not any(isinstance(m, DeltaLayer) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base)


def test_merge_refused(tiny):
    model = tiny.model("bert")
    api.apply(model, LowRankAdapterConfig(reduction_factor=4))
    with pytest.raises(DeltaConfigError, match=r"method 'low_rank_adapter' \(at '.*'\) cannot be merged"):
        api.merge(model)


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        ({"reduction_factor": 0}, DeltaConfigError, "LowRankAdapterConfig.reduction_factor must be a positive int, got 0"),
        ({"reduction_factor": 2.0}, DeltaConfigTypeError,
         "LowRankAdapterConfig.reduction_factor must be a positive int, got 2.0 (float)"),
        ({"low_rank_size": -1}, DeltaConfigError, "LowRankAdapterConfig.low_rank_size must be a positive int, got -1"),
        ({"low_rank_w_init": "orthogonal"}, DeltaConfigError,
         "LowRankAdapterConfig.low_rank_w_init must be one of 'xavier_uniform', 'xavier_normal', 'kaiming_uniform', "
         "'kaiming_normal', got 'orthogonal'"),
        ({"identity_init": 1}, DeltaConfigTypeError, "LowRankAdapterConfig.identity_init must be a bool, got 1 (int)"),
        ({"non_linearity": "elu"}, DeltaConfigError,
         "LowRankAdapterConfig.non_linearity must be one of 'gelu', 'gelu_tanh', 'relu', 'silu', 'tanh', got 'elu'"),
        ({"dropout": 1}, DeltaConfigError, "LowRankAdapterConfig.dropout must be a number in [0, 1), got 1.0"),
        ({"mode": "x"}, DeltaConfigError, "LowRankAdapterConfig.mode must be one of 'dense', 'layer', got 'x'"),
        ({"hidden_size": 16, "reduction_factor": 32}, DeltaConfigError,
         "LowRankAdapterConfig.reduction_factor must be <= the hidden size 16 of hidden_size, got 32"),
        ({"hidden_size": 16, "reduction_factor": 4, "low_rank_size": 5}, DeltaConfigError,
         "LowRankAdapterConfig.low_rank_size must be <= the bottleneck size 4 (hidden 16 // reduction_factor 4) "
         "of hidden_size, got 5"),
    ],
)
def test_config_validation(kwargs, exc, message):
    with pytest.raises(exc) as info:
        LowRankAdapterConfig(**kwargs)
    assert str(info.value) == message


def test_reduction_factor_larger_than_hidden_before_touching(tiny):
    model = tiny.model("gpt2")
    with pytest.raises(DeltaConfigError) as info:
        api.apply(model, LowRankAdapterConfig(reduction_factor=64))
    assert str(info.value) == (
        "LowRankAdapterConfig.reduction_factor must be <= the hidden size 32 of 'transformer.h.0.attn.c_proj', got 64"
    )
    assert not any(isinstance(m, DeltaLayer) for m in model.modules())
    with pytest.raises(DeltaConfigError, match=r"low_rank_size must be <= the bottleneck size 2 \(hidden 32 // "
                                               r"reduction_factor 16\) of 'transformer.h.0.attn.c_proj', got 3"):
        api.apply(model, LowRankAdapterConfig(reduction_factor=16, low_rank_size=3))
    assert api.adapter_names(model) == []


def test_low_rank_linear_without_gradients_uses_the_composed_matrix():
    from deltatune.methods.low_rank_adapter import LowRankLinear

    torch.manual_seed(5)
    layer = LowRankLinear(12, 4, 2, dtype=torch.float64)
    for t in (layer.w_left, layer.w_right, layer.bias):
        torch.nn.init.normal_(t)
    x = torch.randn(3, 7, 12, dtype=torch.float64)
    factored = (x @ layer.w_left) @ layer.w_right + layer.bias
    calls = []
    real_linear = torch.nn.functional.linear
    with torch.no_grad():
        torch.nn.functional.linear = lambda *a: (calls.append(1), real_linear(*a))[1]
        try:
            torch.testing.assert_close(layer(x), factored)
        finally:
            torch.nn.functional.linear = real_linear
        assert calls == [1]  # the composed path
        layer.w_right.mul_(2.0)  # an in-place update (what an optimiser step does) is seen at once
        torch.testing.assert_close(layer(x), (x @ layer.w_left) @ layer.w_right + layer.bias)
    out = layer(x)  # with gradients: the factored path, and the factors get gradients
    out.sum().backward()
    assert layer.w_left.grad is not None and layer.w_right.grad is not None


def _uncached(layer, x):
    """The composed formula without any cache."""
    dt = x.dtype
    return F.linear(x, (layer.w_left @ layer.w_right).to(dt).t(), layer.bias.to(dt))


def _random_low_rank_linear(seed=7, dtype=torch.float32):
    from deltatune.methods.low_rank_adapter import LowRankLinear

    torch.manual_seed(seed)
    layer = LowRankLinear(12, 5, 2, dtype=dtype)
    with torch.no_grad():
        for t in (layer.w_left, layer.w_right, layer.bias):
            t.normal_()
    return layer


def test_composed_cache_is_reused_and_never_stale():
    layer = _random_low_rank_linear()
    x = torch.randn(3, 4, 12)
    with torch.no_grad():
        first = layer(x)
        cached_w = param_cache(layer).entry[1][0]
        assert torch.equal(first, _uncached(layer, x))
        assert torch.equal(layer(x), first) and param_cache(layer).entry[1][0] is cached_w  # reused, not recomputed

    # an optimiser step (in place, under no_grad) bumps the version counters
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1)
    layer(x).square().sum().backward()  # with gradients: the factored path, no cache involved
    opt.step()
    with torch.no_grad():
        assert torch.equal(layer(x), _uncached(layer, x))
        assert not torch.equal(layer(x), first)
        # load_state_dict copies in place
        other = _random_low_rank_linear(seed=8)
        layer.load_state_dict(other.state_dict())
        assert torch.equal(layer(x), _uncached(other, x))
        # .to(dtype) swaps the storages; so does .to() back (the old addresses are held by the cache)
        layer.to(torch.float64)
        x64 = x.double()
        assert torch.equal(layer(x64), _uncached(layer, x64))
        layer.to(torch.float32)
        layer.w_right.mul_(3.0)
        assert torch.equal(layer(x), _uncached(layer, x))
        # a bf16 input: the composed pair in bf16, cached per dtype
        xb = x.bfloat16()
        assert torch.equal(layer(xb), _uncached(layer, xb))
        assert torch.equal(layer(x), _uncached(layer, x))
        # a replaced parameter (same shape) is a different tensor
        layer.w_left = nn.Parameter(torch.randn(12, 2))
        assert torch.equal(layer(x), _uncached(layer, x))
        layer.bias.data = torch.randn(5)  # .data assignment: another storage
        assert torch.equal(layer(x), _uncached(layer, x))


def test_no_cache_while_training_and_frozen_factors_still_pass_gradients_to_the_input():
    layer = _random_low_rank_linear()
    x = torch.randn(3, 12, requires_grad=True)
    out = layer(x)  # gradients enabled, factors trainable: the factored path
    assert param_cache(layer).entry is None
    out.sum().backward()
    assert layer.w_left.grad is not None and layer.w_right.grad is not None and layer.bias.grad is not None
    ref_grad = x.grad.clone()
    x.grad = None
    layer.requires_grad_(False)  # frozen adapter, trainable input: the composed (cached) path
    out = layer(x)
    assert param_cache(layer).entry is not None
    out.sum().backward()
    torch.testing.assert_close(x.grad, ref_grad)
    assert torch.equal(out.detach(), _uncached(layer, x.detach()))


def test_cached_layer_pickles_without_its_cache(tmp_path):
    import pickle

    layer = _random_low_rank_linear()
    x = torch.randn(2, 12)
    with torch.no_grad():
        ref = layer(x)
    assert param_cache(layer).entry is not None
    copy = pickle.loads(pickle.dumps(layer))
    assert param_cache(copy).entry is None and param_cache(layer).entry is not None
    with torch.no_grad():
        assert torch.equal(copy(x), ref)
    torch.save(layer, tmp_path / "layer.pt")
    loaded = torch.load(tmp_path / "layer.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)


def test_decode_step_dispatches_fewer_ops_with_the_cache(monkeypatch, decode_step_ops):
    from transformers import LlamaConfig, LlamaForCausalLM

    from deltatune.methods.low_rank_adapter import LowRankLinear

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    base = LlamaForCausalLM(cfg).eval()
    n_base = len(decode_step_ops(base))
    model = LlamaForCausalLM(cfg).eval()
    model.load_state_dict(base.state_dict())
    api.apply(model, LowRankAdapterConfig(reduction_factor=4, identity_init=False))
    n_inserted = sum(isinstance(m, LowRankLinear) for m in model.modules())
    assert n_inserted == 8  # down and up after attention and MLP of 2 layers
    cached = decode_step_ops(model)
    monkeypatch.setattr(ParamCache, "key", staticmethod(lambda params, dt: None))  # no caching: composed each call
    uncached = decode_step_ops(model)
    # uncached, every projection forms w_left @ w_right (one aten::matmul each), cached none does
    assert uncached.count("aten::matmul") - cached.count("aten::matmul") == n_inserted
    assert len(cached) - n_base <= len(uncached) - n_base - n_inserted
    assert len(cached) > n_base


def test_inference_tensors_are_not_cached_and_still_correct():
    with torch.inference_mode():
        layer = _random_low_rank_linear()  # parameters made in inference mode: no version counter
        x = torch.randn(2, 12)
        assert torch.equal(layer(x), _uncached(layer, x))
        assert param_cache(layer).entry is None
        layer.w_left.mul_(2.0)
        assert torch.equal(layer(x), _uncached(layer, x))
    plain = _random_low_rank_linear()
    with torch.inference_mode():  # normal parameters used in inference mode: cached, and still exact
        x = torch.randn(2, 12)
        assert torch.equal(plain(x), _uncached(plain, x)) and param_cache(plain).entry is not None
    with torch.no_grad():
        plain.bias.add_(1.0)
        assert torch.equal(plain(x.clone()), _uncached(plain, x.clone()))
    with torch.inference_mode():
        plain(x)  # caches inference tensors
    plain.requires_grad_(False)  # frozen, with a trainable input: the composed path with gradients
    xg = torch.randn(2, 12, requires_grad=True)
    plain(xg).sum().backward()
    assert xg.grad is not None
