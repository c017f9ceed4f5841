"""BitFit: only the selected biases train; save/load through extra_trainable; validation."""

from __future__ import annotations

import pytest
import torch

from deltatune import api
from deltatune.checkpoint import delta_state_dict, load_delta, save_delta
from deltatune.errors import DeltaConfigError, DeltaConfigTypeError, TargetNotFoundError
from deltatune.freeze import freeze_delta, trainable_summary
from deltatune.methods import get_method
from deltatune.methods.bitfit import BitFitConfig, bias_parameters
from deltatune.methods.lora import LoraConfig

METHOD = get_method("bitfit")


def expected_bias_count(arch: str, tiny) -> int:
    """Bias parameters of the tiny models, from the architecture (not from the model)."""
    h, inter, layers = tiny.hidden, tiny.inter, tiny.layers
    if arch == "gpt2":  # ln_1, c_attn (3h), attn c_proj, ln_2, c_fc (4h), mlp c_proj per block; ln_f
        return layers * (h + 3 * h + h + h + 4 * h + h) + h
    # bert: embeddings LayerNorm; per layer q,k,v,attn out dense, attn LN, intermediate, out dense, out LN;
    # pooler dense; classifier (3 labels)
    return h + layers * (3 * h + h + h + inter + h + h) + h + 3


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_all_biases_train_and_output_unchanged_at_init(tiny, arch):
    model = tiny.model(arch)
    batch = tiny.batch(arch)
    with torch.no_grad():
        ref = model(**batch).logits
    api.apply(model, BitFitConfig())
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, ref)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    assert trainable_summary(model).trainable == expected_bias_count(arch, tiny)
    assert METHOD.num_params(model) == expected_bias_count(arch, tiny)


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_training_changes_only_biases(tiny, arch):
    model = tiny.model(arch)
    batch = tiny.batch(arch)
    api.apply(model, BitFitConfig())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = tiny.train(model, batch, steps=3)
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        if n.endswith(".bias"):
            continue
        assert torch.equal(p, before[n]), n
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n.endswith(".bias"))


def test_bias_patterns_and_target_modules(tiny):
    model = tiny.model("bert")
    api.apply(model, BitFitConfig(bias_patterns=["*attention.self.query.bias", "*classifier.bias"]))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [
        "bert.encoder.layer.0.attention.self.query.bias",
        "bert.encoder.layer.1.attention.self.query.bias",
        "classifier.bias",
    ]
    model2 = tiny.model("bert")
    api.apply(model2, BitFitConfig(target_modules=["intermediate.dense"], layers_to_transform=[1]))
    assert [n for n, p in model2.named_parameters() if p.requires_grad] == [
        "bert.encoder.layer.1.intermediate.dense.bias"
    ]
    assert api.targeted_modules(model2) == ["bert.encoder.layer.1.intermediate.dense"]


def test_freeze_delta_leaves_exactly_the_biases(tiny):
    model = tiny.model("gpt2")
    api.apply(model, BitFitConfig(bias_patterns="*attn*"))
    for p in model.parameters():
        p.requires_grad_(True)
    freeze_delta(model, "bitfit")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"transformer.h.{i}.attn.{m}.bias" for i in range(2) for m in ("c_attn", "c_proj")}


def test_freeze_delta_bitfit_without_bitfit_applied_raises(tiny):
    """No BitFit record: nothing would train, so freeze_delta refuses (it used to freeze everything silently)."""
    model = tiny.model("gpt2")
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(DeltaConfigError, match=r"mode 'bitfit': the model has no 'bitfit' adapter, so nothing would "
                       r"train; apply a 'bitfit' config first, or use deltatune.compat.mindpet.freeze_delta"):
        freeze_delta(model, "bitfit")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_save_load_round_trip(tiny, arch, tmp_path):
    model = tiny.model(arch)
    batch = tiny.batch(arch)
    api.apply(model, BitFitConfig())
    tiny.train(model, batch, steps=2)
    with torch.no_grad():
        want = model(**batch).logits
    state = delta_state_dict(model)
    assert set(state) == {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    save_delta(model, tmp_path / "bf")
    fresh = tiny.model(arch)
    with torch.no_grad():
        assert not torch.equal(fresh(**batch).logits, want)
    load_delta(fresh, tmp_path / "bf")
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, want)


def test_biases_found_through_other_wrappers(tiny, tmp_path):
    """With LoRA wrapping c_attn, BitFit still finds its bias (now at c_attn.base_layer.bias) and
    never the adapter's own parameters."""
    model = tiny.model("gpt2")
    api.apply(model, LoraConfig(r=2), name="lora")
    api.apply(model, BitFitConfig(bias_patterns="*c_attn.bias"), name="bf")
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [f"transformer.h.{i}.attn.c_attn.base_layer.bias" for i in range(2)]
    names = [real for real, _, _ in bias_parameters(model)]
    assert not any("lora_" in n for n in names)
    tiny.train(model, tiny.batch("gpt2"), steps=1)
    save_delta(model, tmp_path / "bf", adapter_name="bf")
    assert set(delta_state_dict(model, "bf")) == {f"transformer.h.{i}.attn.c_attn.bias" for i in range(2)}


def _trained_bitfit(tiny, arch):
    """A tiny model with BitFit trained 2 steps; returns (model, state before, state after training)."""
    model = tiny.model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    api.apply(model, BitFitConfig())
    tiny.train(model, tiny.batch(arch), steps=2)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(not torch.equal(trained[k], before[k]) for k in trained)
    return model, before, trained


def _equal_states(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_delete_restores_original_biases(tiny):
    model, before, _ = _trained_bitfit(tiny, "bert")
    api.delete_adapter(model, "default")
    assert api.adapter_names(model) == []
    assert _equal_states(model.state_dict(), before)


def test_merge_and_unload_keeps_trained_biases_and_no_bookkeeping(tiny):
    model, _, trained = _trained_bitfit(tiny, "gpt2")
    api.merge_and_unload(model)
    assert not [k for k in model.__dict__ if k.startswith("_deltatune")]  # no saved originals left behind
    assert api.adapter_names(model) == []
    assert _equal_states(model.state_dict(), trained)


def test_llama_has_no_biases(tiny):
    model = tiny.model("llama")
    with pytest.raises(DeltaConfigError) as info:
        api.apply(model, BitFitConfig())
    assert str(info.value) == (
        "BitFit needs bias parameters, but the 'llama' model (LlamaForCausalLM) has no bias parameters; "
        "use another method (e.g. 'lora' or 'ia3')"
    )
    assert api.adapter_names(model) == []
    assert all(p.requires_grad for p in model.parameters())  # untouched


def test_only_one_bitfit_adapter(tiny):
    model = tiny.model("gpt2")
    api.apply(model, BitFitConfig(), name="a")
    with pytest.raises(DeltaConfigError) as info:
        api.apply(model, BitFitConfig(), name="b")
    assert str(info.value) == (
        "a model holds at most one BitFit adapter (it trains the model's own biases); 'a' is already one, "
        "delete it before adding 'b'"
    )


def test_validation_messages(tiny):
    with pytest.raises(DeltaConfigTypeError) as info:
        BitFitConfig(bias_patterns=3)
    assert str(info.value) == "BitFitConfig.bias_patterns must be a str or a list of str, got 3 (int)"
    with pytest.raises(DeltaConfigError) as info:
        BitFitConfig(bias_patterns=[])
    assert str(info.value) == (
        "BitFitConfig.bias_patterns must be a non-empty str or a non-empty list of non-empty str, got []"
    )
    model = tiny.model("gpt2")
    with pytest.raises(TargetNotFoundError) as info:
        api.apply(model, BitFitConfig(bias_patterns=["*attn*", "*nothing*"]))
    assert str(info.value).startswith(
        "BitFitConfig.bias_patterns entry ['*nothing*'] matched no bias parameter; bias names look like "
        "['transformer.h.0.ln_1.bias'"
    )
    with pytest.raises(DeltaConfigError) as info:
        api.apply(model, BitFitConfig(layers_to_transform=[0]))
    assert str(info.value) == (
        "BitFitConfig.target_modules must be given with exclude_modules / layers_to_transform "
        "(use target_modules='*' for the whole model), got None"
    )
    with pytest.raises(DeltaConfigError) as info:
        api.apply(model, BitFitConfig(target_modules=["attn"]))
    assert str(info.value) == (
        "BitFitConfig.target_modules=['attn'] selects modules of the 'gpt2' model that have no bias parameters"
    )
    assert api.adapter_names(model) == []
