"""P-Tuning v2: numerics against PEFT, training, counting, folding, checkpoints, generation, errors.

The tiny models and helpers come from ``test_prefix.py`` (P-Tuning v2 reuses the Prefix-Tuning
machinery).
"""

from __future__ import annotations

import copy
import re

import pytest
import torch

import deltatune.api as api
from deltatune.checkpoint import load_delta, save_delta
from deltatune.errors import DeltaConfigError, DeltaConfigTypeError
from deltatune.freeze import freeze_delta, trainable_summary
from deltatune.methods import get_method
from deltatune.methods.prefix import PrefixConfig, fold, fold_prefix
from deltatune.methods.ptuning_v2 import PrefixEncoder, PTuningV2Config
from tests.methods.test_prefix import (
    ARCHS,
    CAUSAL,
    HIDDEN,
    KV,
    LAYERS,
    base_state,
    build,
    gen_kwargs,
    greedy,
    logits,
    make_batch,
    peft_prefix_model,
    positions,
    prefix_count,
    train,
)


@pytest.mark.parametrize(
    "arch,projection",
    [("gpt2", False), ("gpt2", True), ("llama", False), ("bert", False), ("bert", True)],
)
def test_outputs_match_peft(arch: str, projection: bool) -> None:
    """PEFT's prefix tuning with the same weights (positions aligned, see test_prefix.py)."""
    n, proj = 4, 12
    model = build(arch)
    ref_base = copy.deepcopy(model)
    api.apply(model, PTuningV2Config(pre_seq_len=n, prefix_projection=projection, projection_dim=proj, dropout=0.0))
    enc = model.ptuning_encoder.default
    assert isinstance(enc, PrefixEncoder)
    ref = peft_prefix_model(ref_base, arch, n, projection, proj, enc)
    batch = make_batch(arch)
    mask = batch["attention_mask"]
    pos = positions(mask) if arch in CAUSAL else torch.arange(7).expand(2, -1)
    with torch.no_grad():
        theirs = ref(input_ids=batch["input_ids"], attention_mask=mask, position_ids=pos - n).logits
    torch.testing.assert_close(logits(model, batch), theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_train_disable_and_only_delta_changes(arch: str) -> None:
    model = build(arch)
    batch = make_batch(arch)
    base = logits(model, batch)
    api.apply(model, PTuningV2Config(pre_seq_len=4, prefix_projection=True, projection_dim=16))
    assert (logits(model, batch) - base).abs().max() > 1e-4
    with api.disable_adapters(model):
        assert torch.equal(logits(model, batch), base)
    before_base = base_state(model, "ptuning_encoder")
    before_delta = {n: p.detach().clone() for n, p in model.ptuning_encoder.named_parameters()}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"ptuning_encoder.{n}" for n in before_delta
    }
    losses = train(model, batch)
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        if n in before_base:
            assert torch.equal(p, before_base[n]), n
    for n, p in model.ptuning_encoder.named_parameters():
        assert not torch.equal(p, before_delta[n]), n


@pytest.mark.parametrize("arch", ARCHS)
def test_trainable_counts(arch: str) -> None:
    n, proj = 6, 20
    out = LAYERS * 2 * KV[arch]
    direct = build(arch)
    api.apply(direct, PTuningV2Config(pre_seq_len=n))
    assert trainable_summary(direct).trainable == n * out
    projected = build(arch)
    api.apply(projected, PTuningV2Config(pre_seq_len=n, prefix_projection=True, projection_dim=proj))
    assert trainable_summary(projected).trainable == prefix_count(n, HIDDEN, proj, out)
    fold(projected)
    assert trainable_summary(projected).trainable == n * out


@pytest.mark.parametrize("arch", ARCHS)
def test_fold_and_checkpoints(arch: str, tmp_path) -> None:
    model = build(arch)
    api.apply(model, PTuningV2Config(pre_seq_len=4, prefix_projection=True, projection_dim=16))
    batch = make_batch(arch)
    train(model, batch, steps=2)
    want = logits(model, batch)
    save_delta(model, tmp_path / "projected")
    fresh = load_delta(build(arch), tmp_path / "projected")
    assert torch.equal(logits(fresh, batch), want)
    fold_prefix(model)
    assert api.get_config(model).prefix_projection is False
    assert model.ptuning_encoder.default.mlp is None
    assert torch.equal(logits(model, batch), want)
    save_delta(model, tmp_path / "folded")
    folded = load_delta(build(arch), tmp_path / "folded")
    assert torch.equal(logits(folded, batch), want)


@pytest.mark.parametrize("arch", CAUSAL)
def test_generation(arch: str) -> None:
    model = build(arch)
    api.apply(model, PTuningV2Config(pre_seq_len=3, dropout=0.0))
    batch = make_batch(arch)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    cached = greedy(model, ids, mask, 6, use_cache=True)
    assert torch.equal(cached, greedy(model, ids, mask, 6, use_cache=False))
    with torch.no_grad():
        hf = model.generate(input_ids=ids, attention_mask=mask, **gen_kwargs())[:, ids.shape[1]:]
    assert torch.equal(hf, cached)
    for i in range(2):
        real = ids[i : i + 1, mask[i].bool()]
        assert torch.equal(greedy(model, real, torch.ones_like(real), 6, use_cache=True)[0], cached[i])
    with api.disable_adapters(model):
        assert not torch.equal(greedy(model, ids, mask, 6, use_cache=True), cached)


def test_with_a_prefix_tuning_adapter_on_the_same_model() -> None:
    """The two methods keep separate parameters (delta prefixes 'prefix_' / 'ptuning_'); both active
    concatenate their prefixes in holder order (prefix_encoder first)."""
    model = build("llama")
    batch = make_batch("llama")
    api.apply(model, PrefixConfig(prefix_token_num=3, mid_dim=16), name="p")
    out_p = logits(model, batch)
    api.apply(model, PTuningV2Config(pre_seq_len=2, dropout=0.0), name="v")
    out_v = logits(model, batch)
    assert not torch.equal(out_p, out_v)
    assert all(n.startswith("ptuning_encoder.v.") for n, p in model.named_parameters() if p.requires_grad)
    assert not any(get_method("prefix").is_delta_param(n) for n, _ in model.ptuning_encoder.named_parameters(
        prefix="ptuning_encoder"))
    freeze_delta(model, "prefix")
    assert all(n.startswith("prefix_encoder.p.") for n, p in model.named_parameters() if p.requires_grad)
    api.set_active_adapter(model, "p")
    assert torch.equal(logits(model, batch), out_p)
    api.set_active_adapter(model, ["v", "p"])
    both = logits(model, batch)
    with torch.no_grad():
        joined = torch.cat([model.prefix_encoder.p(), model.ptuning_encoder.v()])
    ref = build("llama")
    api.apply(ref, PTuningV2Config(pre_seq_len=5, dropout=0.0))
    with torch.no_grad():
        ref.ptuning_encoder.default.embedding.weight.copy_(joined)
    torch.testing.assert_close(both, logits(ref, batch), rtol=0, atol=1e-6)
    api.delete_adapter(model, "v")
    assert "ptuning_encoder" not in model._modules and "prefix_encoder" in model._modules
    assert torch.equal(logits(model, batch), out_p)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"pre_seq_len": 0}, DeltaConfigError, "PTuningV2Config.pre_seq_len must be a positive int, got 0"),
        ({"pre_seq_len": "8"}, DeltaConfigTypeError, "PTuningV2Config.pre_seq_len must be a positive int, got '8' (str)"),
        ({"prefix_projection": 1}, DeltaConfigTypeError, "PTuningV2Config.prefix_projection must be a bool, got 1 (int)"),
        ({"projection_dim": 0}, DeltaConfigError, "PTuningV2Config.projection_dim must be a positive int, got 0"),
        ({"dropout": 1}, DeltaConfigError, "PTuningV2Config.dropout must be a number in [0, 1), got 1.0"),
        ({"target_modules": "q_proj"}, DeltaConfigError,
         "PTuningV2Config.target_modules must be None (P-Tuning v2 adds prefixes to every attention layer), "
         "got 'q_proj'"),
    ],
)
def test_config_validation(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        PTuningV2Config(**kwargs)


def test_unsupported_model_names_the_method() -> None:
    import torch.nn as nn

    with pytest.raises(DeltaConfigError, match=re.escape("P-Tuning v2 needs a transformers model with a config")):
        api.apply(nn.Linear(3, 3), PTuningV2Config())
