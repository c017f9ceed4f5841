"""Bottleneck adapters: identity at init, training, save/load, counts, named adapters, validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deltatune import api
from deltatune.checkpoint import load_delta, save_delta
from deltatune.errors import (
    DeltaConfigError,
    DeltaConfigTypeError,
    TargetNotFoundError,
    UnsupportedModuleError,
)
from deltatune.freeze import trainable_summary
from deltatune.methods import get_method
from deltatune.methods.adapter import AdapterConfig, AdapterLayer, ParamCache, param_cache, placement_targets
from deltatune.methods.base import DeltaLayer, logical_param_name

METHOD = get_method("adapter")

# insertions per layer for the default (houlsby) and pfeiffer placements
EXPECTED_TARGETS = {
    "gpt2": ["transformer.h.{i}.attn.c_proj", "transformer.h.{i}.mlp.c_proj"],
    "llama": ["model.layers.{i}.self_attn.o_proj", "model.layers.{i}.mlp.down_proj"],
    "bert": ["bert.encoder.layer.{i}.attention.output.dense", "bert.encoder.layer.{i}.output.dense"],
}


def _targets(arch: str, layers: int, pfeiffer: bool = False) -> list[str]:
    pats = EXPECTED_TARGETS[arch][1:] if pfeiffer else EXPECTED_TARGETS[arch]
    return [p.format(i=i) for i in range(layers) for p in pats]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("placement", [None, "pfeiffer"])
def test_placement_targets(tiny, arch, placement):
    model = tiny.model(arch)
    api.apply(model, AdapterConfig(bottleneck_size=4, placement=placement))
    assert api.targeted_modules(model) == _targets(arch, tiny.layers, pfeiffer=placement == "pfeiffer")
    for name in api.targeted_modules(model):
        assert isinstance(model.get_submodule(name), AdapterLayer)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_exact_identity_with_zero_init_scale(tiny, arch):
    model = tiny.model(arch)
    batch = tiny.batch(arch)
    with torch.no_grad():
        ref = model(**batch).logits
        api.apply(model, AdapterConfig(bottleneck_size=8, init_scale=0.0))
        out = model(**batch).logits
    assert torch.equal(out, ref)


def test_near_identity_bound_per_insertion():
    """|adapter(h) - h| <= 2 * init_scale * ||act(W_down h)||_1 elementwise (truncated-normal up-projection)."""
    torch.manual_seed(0)
    lin = nn.Linear(32, 32)
    model = nn.Sequential(lin)
    scale = 1e-3
    api.apply(model, AdapterConfig(bottleneck_size=16, init_scale=scale, target_modules=["0"]))
    layer = model[0]
    x = torch.randn(5, 32)
    with torch.no_grad():
        h = lin(x)
        out = model(x)
        a = F.gelu(F.linear(h, layer.adapter_down["default"].weight, layer.adapter_down["default"].bias))
        bound = 2 * scale * a.abs().sum(-1, keepdim=True)
        ref = h + F.linear(a, layer.adapter_up["default"].weight)  # plain-torch reference
    assert layer.adapter_up["default"].weight.abs().max() <= 2 * scale
    assert ((out - h).abs() <= bound + 1e-7).all()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert (out - h).abs().max() > 0  # not exactly identity with init_scale > 0


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_default_init_close_to_base(tiny, arch):
    model = tiny.model(arch)
    batch = tiny.batch(arch)
    with torch.no_grad():
        ref = model(**batch).logits
        api.apply(model, AdapterConfig(bottleneck_size=8))
        out = model(**batch).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-2)


@pytest.mark.parametrize(("arch", "mode"), [("gpt2", "dense"), ("llama", "layer"), ("bert", "layer")])
def test_training_changes_only_adapter(tiny, arch, mode):
    model = tiny.model(arch)
    batch = tiny.batch(arch)
    api.apply(model, AdapterConfig(bottleneck_size=8, non_linearity="relu", mode=mode))
    before = tiny.base_state(model, METHOD.is_delta_param)
    delta_before = {n: p.detach().clone() for n, p in model.named_parameters() if METHOD.is_delta_param(n)}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(delta_before)
    losses = tiny.train(model, batch, steps=3)
    assert losses[-1] < losses[0]
    after = tiny.base_state(model, METHOD.is_delta_param)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    changed = [n for n, p in model.named_parameters() if n in delta_before and not torch.equal(p, delta_before[n])]
    assert changed


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_save_load_round_trip(tiny, arch, tmp_path):
    model = tiny.model(arch)
    batch = tiny.batch(arch)
    api.apply(model, AdapterConfig(bottleneck_size=8, non_linearity="tanh", dropout=0.1))
    tiny.train(model, batch, steps=2)
    model.eval()
    with torch.no_grad():
        want = model(**batch).logits
    save_delta(model, tmp_path / "ad")
    fresh = tiny.model(arch)
    load_delta(fresh, tmp_path / "ad")
    fresh.eval()
    with torch.no_grad():
        got = fresh(**batch).logits
    assert torch.equal(got, want)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_trainable_count_formula(tiny, arch, placement):
    model = tiny.model(arch)
    base_total = sum(p.numel() for p in model.parameters())
    b = 6
    api.apply(model, AdapterConfig(bottleneck_size=b, placement=placement))
    per_layer = 2 if placement == "houlsby" else 1
    h = tiny.hidden
    expected = tiny.layers * per_layer * (2 * h * b + b + h)
    s = trainable_summary(model)
    assert s.trainable == expected
    assert s.total == base_total + expected


def test_layer_mode_on_tuple_returning_module(tiny):
    """GPT-2 attention returns a tuple; the adapter adapts its first element only."""
    model = tiny.model("gpt2")
    batch = tiny.batch("gpt2")
    attn = model.transformer.h[0].attn
    captured = {}
    hook = attn.register_forward_hook(lambda m, i, o: captured.setdefault("base", o))
    with torch.no_grad():
        model(**batch)
    hook.remove()
    api.apply(model, AdapterConfig(bottleneck_size=4, init_scale=0.1, target_modules=["h.0.attn"]))
    wrapper = model.transformer.h[0].attn
    assert isinstance(wrapper, AdapterLayer)
    assert wrapper.hidden_size["default"] == tiny.hidden  # inferred from model.config.hidden_size
    out_box = {}
    hook = wrapper.register_forward_hook(lambda m, i, o: out_box.setdefault("out", o))
    with torch.no_grad():
        model(**batch)
    hook.remove()
    base_out, out = captured["base"], out_box["out"]
    assert isinstance(out, tuple) and len(out) == len(base_out)
    with torch.no_grad():
        ref = wrapper.adapt("default", base_out[0])
    torch.testing.assert_close(out[0], ref)
    assert not torch.equal(out[0], base_out[0])
    for a, b in zip(out[1:], base_out[1:]):
        assert (a is None and b is None) or torch.equal(a, b)


def test_adapter_formula_against_plain_torch():
    torch.manual_seed(1)
    lin = nn.Linear(12, 10)
    model = nn.Sequential(lin)
    api.apply(model, AdapterConfig(bottleneck_size=3, non_linearity="silu", init_scale=0.5, target_modules="0",
                                   mode="dense"))
    layer = model[0]
    with torch.no_grad():
        layer.adapter_down["default"].bias.normal_()
        layer.adapter_up["default"].bias.normal_()
    x = torch.randn(4, 12)
    d, u = layer.adapter_down["default"], layer.adapter_up["default"]
    h = x @ lin.weight.T + lin.bias
    ref = h + F.silu(h @ d.weight.T + d.bias) @ u.weight.T + u.bias
    torch.testing.assert_close(model(x), ref)


def test_named_adapters_switch_disable_delete(tiny):
    model = tiny.model("llama")
    batch = tiny.batch("llama")
    with torch.no_grad():
        base = model(**batch).logits
    api.apply(model, AdapterConfig(bottleneck_size=4, init_scale=0.2), name="a")
    api.apply(model, AdapterConfig(bottleneck_size=6, init_scale=0.2, placement="pfeiffer"), name="b")
    assert api.adapter_names(model) == ["a", "b"]
    assert api.active_adapters(model) == ["b"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".b." in n for n in trainable)
    with torch.no_grad():
        out_b = model(**batch).logits
        api.set_active_adapter(model, "a")
        out_a = model(**batch).logits
        assert all(".a." in n for n, p in model.named_parameters() if p.requires_grad)
        with api.disable_adapters(model):
            assert torch.equal(model(**batch).logits, base)
        assert torch.equal(model(**batch).logits, out_a)
    assert not torch.equal(out_a, out_b) and not torch.equal(out_a, base)
    api.delete_adapter(model, "a")
    assert api.adapter_names(model) == ["b"]
    assert not any(".a." in n for n, _ in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, out_b, rtol=0, atol=0)
    api.delete_adapter(model, "b")
    assert not any(isinstance(m, DeltaLayer) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base)


def test_unload_gives_back_base(tiny):
    model = tiny.model("gpt2")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    api.apply(model, AdapterConfig(bottleneck_size=4))
    tiny.train(model, tiny.batch("gpt2"), steps=2)
    api.unload(model)
    new = model.state_dict()
    assert new.keys() == state.keys()
    assert all(torch.equal(new[k], state[k]) for k in state)


def test_merge_refused(tiny):
    model = tiny.model("gpt2")
    api.apply(model, AdapterConfig(bottleneck_size=4))
    with pytest.raises(DeltaConfigError, match=r"method 'adapter' \(at 'transformer\.h\.0\.attn\.c_proj'\) cannot be merged"):
        api.merge(model)
    layer = model.transformer.h[0].attn.c_proj
    with pytest.raises(DeltaConfigError, match=r"^method 'adapter' cannot be merged into the base weights$"):
        layer.merge()


# -- validation ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        ({"bottleneck_size": 0}, DeltaConfigError, "AdapterConfig.bottleneck_size must be a positive int, got 0"),
        ({"bottleneck_size": 2.5}, DeltaConfigTypeError,
         "AdapterConfig.bottleneck_size must be a positive int, got 2.5 (float)"),
        ({"bottleneck_size": True}, DeltaConfigTypeError,
         "AdapterConfig.bottleneck_size must be a positive int, got True (bool)"),
        ({"non_linearity": "swish"}, DeltaConfigError,
         "AdapterConfig.non_linearity must be one of 'gelu', 'gelu_tanh', 'relu', 'silu', 'tanh', got 'swish'"),
        ({"dropout": 1.0}, DeltaConfigError, "AdapterConfig.dropout must be a number in [0, 1), got 1.0"),
        ({"dropout": -0.1}, DeltaConfigError, "AdapterConfig.dropout must be a number in [0, 1), got -0.1"),
        ({"dropout": "0.1"}, DeltaConfigTypeError, "AdapterConfig.dropout must be a number in [0, 1), got '0.1' (str)"),
        ({"init_scale": -1e-3}, DeltaConfigError, "AdapterConfig.init_scale must be a number >= 0, got -0.001"),
        ({"mode": "parallel"}, DeltaConfigError, "AdapterConfig.mode must be one of 'dense', 'layer', got 'parallel'"),
        ({"placement": "after"}, DeltaConfigError,
         "AdapterConfig.placement must be one of 'houlsby', 'pfeiffer', None, got 'after'"),
        ({"placement": "houlsby", "target_modules": ["c_proj"]}, DeltaConfigError,
         "AdapterConfig.placement must be None when target_modules is given (placement only picks default "
         "targets), got placement='houlsby' with target_modules=['c_proj']"),
        ({"hidden_size": 0}, DeltaConfigError, "AdapterConfig.hidden_size must be a positive int, got 0"),
    ],
)
def test_config_validation(kwargs, exc, message):
    with pytest.raises(exc) as info:
        AdapterConfig(**kwargs)
    assert str(info.value) == message


def test_dense_mode_rejects_non_linear_before_touching(tiny):
    model = tiny.model("bert")
    with pytest.raises(UnsupportedModuleError) as info:
        api.apply(model, AdapterConfig(mode="dense", target_modules=["attention.output.dense", "intermediate"]))
    assert str(info.value) == (
        "AdapterConfig.mode 'dense' wraps linear layers only (nn.Linear, transformers Conv1D); "
        "'bert.encoder.layer.0.intermediate' is BertIntermediate; use mode='layer' to adapt any module's output"
    )
    assert not any(isinstance(m, DeltaLayer) for m in model.modules())
    assert api.adapter_names(model) == []


def test_dense_hidden_size_mismatch(tiny):
    model = tiny.model("gpt2")
    with pytest.raises(DeltaConfigError) as info:
        api.apply(model, AdapterConfig(mode="dense", hidden_size=16, target_modules=["mlp.c_fc"]))
    assert str(info.value) == (
        "AdapterConfig.hidden_size must equal the output width 128 of 'transformer.h.0.mlp.c_fc' in mode 'dense', got 16"
    )
    assert not any(isinstance(m, DeltaLayer) for m in model.modules())


def test_unknown_architecture_needs_targets():
    model = nn.Sequential(nn.Linear(4, 4))
    assert placement_targets(model, "houlsby") is None
    with pytest.raises(DeltaConfigError) as info:
        api.apply(model, AdapterConfig())
    assert str(info.value) == (
        "AdapterConfig.target_modules must be given for Sequential (model_type None); placement defaults "
        "exist for ['bert', 'gpt2', 'llama', 'mistral', 'qwen2', 'roberta'], got None"
    )


def test_width_not_inferable():
    class Box(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Sequential(nn.Linear(4, 4), nn.ReLU())

        def forward(self, x):
            return self.inner(x)

    model = Box()
    with pytest.raises(DeltaConfigError) as info:
        api.apply(model, AdapterConfig(target_modules=["inner"]))
    assert str(info.value) == (
        "cannot infer the adapter width for 'inner' (Sequential); set AdapterConfig.hidden_size (a positive int), got None"
    )
    api.apply(model, AdapterConfig(target_modules=["inner"], hidden_size=4, bottleneck_size=2))
    assert model(torch.randn(3, 4)).shape == (3, 4)


def test_unknown_target_is_reported(tiny):
    model = tiny.model("gpt2")
    with pytest.raises(TargetNotFoundError, match=r"\['c_projj'\] matched no module"):
        api.apply(model, AdapterConfig(target_modules=["c_projj"]))


def test_param_names_follow_contract(tiny):
    model = tiny.model("bert")
    api.apply(model, AdapterConfig(bottleneck_size=4))
    names = [logical_param_name(n) for n, p in model.named_parameters() if p.requires_grad]
    assert "bert.encoder.layer.0.output.dense.adapter_down.default.weight" in names
    assert all(METHOD.is_delta_param(n) for n in names)


def _cast_linear(seed: int = 0):
    from deltatune.methods.adapter import _CastLinear

    torch.manual_seed(seed)
    layer = _CastLinear(12, 5)  # fp32 weights
    with torch.no_grad():
        layer.bias.normal_()
    return layer


def _cast_formula(layer, x):
    return F.linear(x, layer.weight.to(x.dtype), layer.bias.to(x.dtype))


def test_cast_linear_keeps_its_casts_without_gradients_and_never_a_stale_one(tmp_path):
    import pickle

    layer = _cast_linear()
    x = torch.randn(3, 12).bfloat16()
    with torch.no_grad():
        first = layer(x)
        assert torch.equal(first, _cast_formula(layer, x))
        kept = param_cache(layer).entry[1]
        assert kept[0].dtype == torch.bfloat16 and len(kept) == 2
        assert torch.equal(layer(x), first) and param_cache(layer).entry[1] is kept  # reused
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1)
    layer(x.float()).square().sum().backward()  # with gradients (and fp32): no cast kept
    assert param_cache(layer).entry[1] is kept
    opt.step()  # in place: the version counters move
    with torch.no_grad():
        assert torch.equal(layer(x), _cast_formula(layer, x)) and not torch.equal(layer(x), first)
        layer.load_state_dict(_cast_linear(seed=1).state_dict())
        assert torch.equal(layer(x), _cast_formula(layer, x))
    out = layer(x)  # gradients on: the weights get them through the casts
    out.float().sum().backward()
    assert layer.weight.grad is not None
    copy = pickle.loads(pickle.dumps(layer))
    assert param_cache(copy).entry is None and param_cache(layer).entry is not None
    with torch.no_grad():
        assert torch.equal(copy(x), layer(x))


def test_adapter_decode_step_dispatches_no_casts(monkeypatch, decode_step_ops):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    api.apply(model, AdapterConfig(bottleneck_size=8))
    n_inserted = sum(isinstance(m, AdapterLayer) for m in model.modules())
    assert n_inserted == 4  # after attention and after the MLP of 2 layers
    cached = decode_step_ops(model)
    monkeypatch.setattr(ParamCache, "key", staticmethod(lambda params, dt: None))  # nothing kept
    uncached = decode_step_ops(model)
    # each insertion casts two weights and two biases on every step without the cache, none with it
    assert uncached.count("aten::to") - cached.count("aten::to") == 4 * n_inserted
    assert len(uncached) - len(cached) == 4 * n_inserted
    # adapters in the model's dtype: an insertion adds its two linears, the activation and the residual add
    monkeypatch.undo()
    base = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    n_base = len(decode_step_ops(base))
    api.apply(base, AdapterConfig(bottleneck_size=8, dropout=0.1))
    base.to(torch.bfloat16).eval()
    added = decode_step_ops(base)
    assert len(added) - n_base == 4 * n_inserted

