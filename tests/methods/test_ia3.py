"""(IA)³: exact identity at init, formula and PEFT reference, training, merge/unmerge/unload,
GPT-2 fused k/v slices, named adapters, save/load, validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from deltatune import api
from deltatune.checkpoint import load_delta, save_delta
from deltatune.errors import DeltaConfigError, DeltaConfigTypeError, UnsupportedModuleError
from deltatune.freeze import trainable_summary
from deltatune.methods import get_method
from deltatune.methods.base import DeltaLayer
from deltatune.methods.ia3 import IA3Config, IA3Layer

METHOD = get_method("ia3")

EXPECTED = {  # (target, feed-forward?) per layer for the default config
    "llama": [("model.layers.{i}.self_attn.k_proj", False), ("model.layers.{i}.self_attn.v_proj", False),
              ("model.layers.{i}.mlp.down_proj", True)],
    "gpt2": [("transformer.h.{i}.attn.c_attn", False), ("transformer.h.{i}.mlp.c_proj", True)],
    "bert": [("bert.encoder.layer.{i}.attention.self.key", False),
             ("bert.encoder.layer.{i}.attention.self.value", False),
             ("bert.encoder.layer.{i}.output.dense", True)],
}


def _randomise(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if METHOD.is_delta_param(n):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_defaults_exact_at_init_and_counts(tiny, arch):
    model = tiny.model(arch)
    batch = tiny.batch(arch)
    with torch.no_grad():
        ref = model(**batch).logits
    api.apply(model, IA3Config())
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, ref)
    want = [(t.format(i=i), ff) for i in range(tiny.layers) for t, ff in EXPECTED[arch]]
    assert api.targeted_modules(model) == [t for t, _ in want]
    h, inter = tiny.hidden, tiny.inter
    kv = 16 if arch == "llama" else h  # llama: 2 kv heads of dim 8
    ffn_in = 4 * h if arch == "gpt2" else inter
    expected = tiny.layers * (2 * kv + ffn_in)
    for name, ff in want:
        layer = model.get_submodule(name)
        assert isinstance(layer, IA3Layer) and layer.is_feedforward["default"] is ff
    assert trainable_summary(model).trainable == expected
    assert METHOD.num_params(tiny.model(arch), IA3Config()) == expected


def test_formula_linear_output_and_input_scaling():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    w0, b0, w1, b1 = (t.detach().clone() for t in (model[0].weight, model[0].bias, model[1].weight, model[1].bias))
    api.apply(model, IA3Config(target_modules=["0", "1"], feedforward_modules="1"))
    _randomise(model)
    s0, s1 = model[0].ia3_scale["default"], model[1].ia3_scale["default"]
    assert s0.shape == (5,) and s1.shape == (5,)
    x = torch.randn(3, 6)
    h = (x @ w0.T + b0) * s0
    ref = (h * s1) @ w1.T + b1
    torch.testing.assert_close(model(x), ref)


def test_matches_peft_on_llama(tiny):
    peft = pytest.importorskip("peft")
    ours = tiny.model("llama")
    theirs = peft.get_peft_model(
        tiny.model("llama"),
        peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    )
    api.apply(ours, IA3Config())
    _randomise(ours)
    ours_vec = {n.replace(".ia3_scale.default", ""): p for n, p in ours.named_parameters() if "ia3_scale" in n}
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if ".ia3_l." in n:
                key = n.removeprefix("base_model.model.").replace(".ia3_l.default", "")
                p.copy_(ours_vec[key].view(p.shape))
    batch = tiny.batch("llama")
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, rtol=1e-5, atol=1e-5)


def test_gpt2_fused_slices_scale_only_k_and_v(tiny):
    model = tiny.model("gpt2")
    h = tiny.hidden
    attn = model.transformer.h[0].attn.c_attn
    w, b = attn.weight.detach().clone(), attn.bias.detach().clone()
    api.apply(model, IA3Config())
    layer = model.transformer.h[0].attn.c_attn
    assert layer.ia3_scale["default"].shape == (2 * h,)
    _randomise(model)
    x = torch.randn(2, 3, h)
    s = layer.ia3_scale["default"]
    full = torch.cat([torch.ones(h), s])
    ref = (x @ w + b) * full  # Conv1D: weight (in, out)
    out = layer(x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(out[..., :h], (x @ w + b)[..., :h], rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_training_changes_only_vectors(tiny, arch):
    model = tiny.model(arch)
    batch = tiny.batch(arch)
    api.apply(model, IA3Config())
    before = tiny.base_state(model, METHOD.is_delta_param)
    assert all(METHOD.is_delta_param(n) for n, p in model.named_parameters() if p.requires_grad)
    losses = tiny.train(model, batch, steps=3)
    assert losses[-1] < losses[0]
    after = tiny.base_state(model, METHOD.is_delta_param)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_merge_unmerge_unload(tiny, arch):
    model = tiny.model(arch)
    batch = tiny.batch(arch)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    api.apply(model, IA3Config())
    _randomise(model)
    with torch.no_grad():
        unmerged = model(**batch).logits
        api.merge(model)
        assert all(layer.merged for _, layer in _layers(model))
        torch.testing.assert_close(model(**batch).logits, unmerged, rtol=0, atol=1e-5)
        with api.disable_adapters(model):  # unmerges for the duration
            base_out = model(**batch).logits
        torch.testing.assert_close(model(**batch).logits, unmerged, rtol=0, atol=1e-5)
        api.unmerge(model)
        for k, v in _base_weights(model).items():
            torch.testing.assert_close(v, base_state[k], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(model(**batch).logits, unmerged, rtol=0, atol=1e-5)
    api.unload(model)  # after a merge/unmerge round trip the weights are equal up to rounding only
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, base_out, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_unload_without_merge_is_bit_exact(tiny, arch):
    model = tiny.model(arch)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    api.apply(model, IA3Config())
    tiny.train(model, tiny.batch(arch), steps=1)
    api.unload(model)
    assert not any(isinstance(m, DeltaLayer) for m in model.modules())
    new = model.state_dict()
    assert new.keys() == base_state.keys()
    assert all(torch.equal(new[k], base_state[k]) for k in base_state)


def test_merge_and_unload_equivalence(tiny):
    model = tiny.model("gpt2")
    batch = tiny.batch("gpt2")
    api.apply(model, IA3Config())
    _randomise(model)
    with torch.no_grad():
        want = model(**batch).logits
        api.merge_and_unload(model)
        assert not any(isinstance(m, DeltaLayer) for m in model.modules())
        torch.testing.assert_close(model(**batch).logits, want, rtol=0, atol=1e-5)


def test_merge_refuses_zero_entries(tiny):
    model = tiny.model("llama")
    api.apply(model, IA3Config())
    k = model.model.layers[0].self_attn.k_proj
    w = k.base_layer.weight.detach().clone()
    with torch.no_grad():
        k.ia3_scale["default"][3] = 0.0
    with pytest.raises(DeltaConfigError) as info:
        k.merge()
    assert str(info.value) == (
        "adapter 'default' has (IA)³ entries equal to 0, which could not be unmerged; not merged"
    )
    assert torch.equal(k.base_layer.weight, w) and not k.merged


def test_named_adapters(tiny, tmp_path):
    model = tiny.model("bert")
    batch = tiny.batch("bert")
    with torch.no_grad():
        base = model(**batch).logits
    api.apply(model, IA3Config(), name="a")
    api.apply(model, IA3Config(target_modules=["query"]), name="b")
    _randomise(model)
    with torch.no_grad():
        out_b = model(**batch).logits
        api.set_active_adapter(model, "a")
        out_a = model(**batch).logits
        assert not torch.equal(out_a, out_b)
        with api.disable_adapters(model):
            assert torch.equal(model(**batch).logits, base)
        api.set_active_adapter(model, ["a", "b"])  # both: products of the vectors
        both = model(**batch).logits
        assert not torch.equal(both, out_a) and not torch.equal(both, out_b)
    save_delta(model, tmp_path / "a", adapter_name="a")
    api.delete_adapter(model, "a")
    assert api.adapter_names(model) == ["b"]
    assert not any(n.endswith("ia3_scale.a") for n, _ in model.named_parameters())
    assert any(n.endswith("ia3_scale.b") for n, _ in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, out_b, rtol=0, atol=0)
    load_delta(model, tmp_path / "a", adapter_name="a")
    api.set_active_adapter(model, "a")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, out_a)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_save_load_round_trip(tiny, arch, tmp_path):
    model = tiny.model(arch)
    batch = tiny.batch(arch)
    api.apply(model, IA3Config())
    tiny.train(model, batch, steps=2)
    with torch.no_grad():
        want = model(**batch).logits
    save_delta(model, tmp_path / "ia3")
    fresh = tiny.model(arch)
    load_delta(fresh, tmp_path / "ia3")
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, want)


def _layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, IA3Layer)]


def _base_weights(model):
    from deltatune.methods.base import logical_param_name

    return {logical_param_name(n): p for n, p in model.named_parameters() if not METHOD.is_delta_param(n)}


# -- validation ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        ({"feedforward_modules": ["down_proj"]}, DeltaConfigError,
         "IA3Config.feedforward_modules must be None when target_modules is None (the architecture default "
         "picks both), got ['down_proj']"),
        ({"target_modules": ["x"], "feedforward_modules": [1]}, DeltaConfigTypeError,
         "IA3Config.feedforward_modules[0] must be a str, got 1 (int)"),
        ({"fused_slices": [True]}, DeltaConfigTypeError,
         "IA3Config.fused_slices must be a dict {pattern: [bool, ...]}, got [True] (list)"),
        ({"fused_slices": {"c_attn": [1, 0]}}, DeltaConfigTypeError,
         "IA3Config.fused_slices['c_attn'] must be a non-empty list of bool, got [1, 0]"),
        ({"fused_slices": {"c_attn": [False, False]}}, DeltaConfigError,
         "IA3Config.fused_slices['c_attn'] must enable at least one slice, got [False, False]"),
    ],
)
def test_config_validation(kwargs, exc, message):
    with pytest.raises(exc) as info:
        IA3Config(**kwargs)
    assert str(info.value) == message


def test_apply_time_validation_before_touching(tiny):
    model = tiny.model("llama")
    cases = [
        (IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"]), DeltaConfigError,
         "IA3Config.feedforward_modules entries ['down_proj'] match none of the target modules "
         "['model.layers.0.self_attn.k_proj', 'model.layers.1.self_attn.k_proj']; every feed-forward module must "
         "also be a target"),
        (IA3Config(target_modules=["k_proj", "mlp"]), UnsupportedModuleError,
         "(IA)³ cannot wrap module 'model.layers.0.mlp' of type LlamaMLP; supported: Linear, transformers Conv1D"),
        (IA3Config(target_modules=["k_proj"], fused_slices={"k_proj": [True, True, False]}), DeltaConfigError,
         "IA3Config.fused_slices for 'model.layers.0.self_attn.k_proj' has 3 slices but the layer has 16 outputs, "
         "which is not divisible by 3"),
        (IA3Config(target_modules=["k_proj"], fused_slices={"v_proj": [True, False]}), DeltaConfigError,
         "IA3Config.fused_slices keys ['v_proj'] match none of the target modules "
         "['model.layers.0.self_attn.k_proj', 'model.layers.1.self_attn.k_proj']"),
        (IA3Config(target_modules=["down_proj"], feedforward_modules=["down_proj"],
                   fused_slices={"down_proj": [True, False]}), DeltaConfigError,
         "IA3Config.fused_slices applies to output-scaled modules; 'model.layers.0.mlp.down_proj' is a "
         "feed-forward module"),
    ]
    for cfg, exc, message in cases:
        with pytest.raises(exc) as info:
            api.apply(model, cfg)
        assert str(info.value) == message
        assert not any(isinstance(m, DeltaLayer) for m in model.modules())
        assert api.adapter_names(model) == []
    with pytest.raises(DeltaConfigError) as info:
        api.apply(nn.Sequential(nn.Linear(2, 2)), IA3Config())
    assert str(info.value) == (
        "IA3Config.target_modules must be given for Sequential (no default is known for this architecture; known: "
        "['bert', 'gpt2', 'llama', 'mistral', 'qwen2', 'roberta']), got None"
    )
