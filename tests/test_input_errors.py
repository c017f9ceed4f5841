"""Inputs that used to be silently ignored or crash deep inside: module patterns that match nothing,
invalid regexes, missing adapters, malformed PEFT adapters, out-of-range labels. Each is a named
DeltaError whose message names the culprit, raised before the model is touched."""

from __future__ import annotations

import json
import pickle
import re

import pytest
import torch

import deltatune as dt
from deltatune.methods.rdrop import RDropLoss
from tests.tiny_models import gpt2, llama, mlp


def _names(model):
    return [n for n, _ in model.named_modules()]


# -- patterns that match nothing -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value"),
    [("rank_pattern", {"q_prj": 16}), ("alpha_pattern", {"q_prj": 16.0}), ("rank_pattern", {"re:.*k_proj": 4}),
     ("alpha_pattern", {"*.o_proj": 2.0})],
)
def test_pattern_keys_matching_no_adapted_module(field, value):
    model = llama()
    before = _names(model)
    cfg = dt.LoraConfig(target_modules=["q_proj", "v_proj"], **{field: value})
    with pytest.raises(dt.TargetNotFoundError, match=rf"LoraConfig\.{field} key\(s\) \[{re.escape(repr(list(value)[0]))}\] match none of the adapted modules \['model\.layers\.0\.self_attn\.q_proj'"):
        dt.apply(model, cfg)
    assert _names(model) == before and dt.adapter_names(model) == []


def test_enable_lora_key_matching_nothing():
    model = gpt2()
    cfg = dt.LoraConfig(target_modules=["c_attn"], enable_lora={"k_prj": [True, False, True]})
    with pytest.raises(dt.TargetNotFoundError, match=r"LoraConfig\.enable_lora key\(s\) \['k_prj'\] match none"):
        dt.apply(model, cfg)
    assert dt.adapter_names(model) == []


def test_pattern_keys_that_match_apply():
    model = dt.apply(llama(), dt.LoraConfig(target_modules=["q_proj", "v_proj"], r=2, rank_pattern={"v_proj": 4},
                                            alpha_pattern={"re:.*layers\\.1\\..*q_proj": 3.0}))
    layer = model.get_submodule("model.layers.0.self_attn.v_proj")
    assert layer.r["default"] == 4
    assert model.get_submodule("model.layers.1.self_attn.q_proj").alpha["default"] == 3.0
    assert model.get_submodule("model.layers.0.self_attn.q_proj").alpha["default"] == 8.0


# -- invalid regexes -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_modules": ["re:q_proj("]}, r"LoraConfig\.target_modules entry 're:q_proj\(' is not a valid regular expression: missing \)"),
        ({"target_modules": ".*(q|v_proj"}, r"LoraConfig\.target_modules entry 're:\.\*\(q\|v_proj' is not a valid regular expression"),
        ({"target_modules": ["q_proj"], "exclude_modules": ["re:[a-"]}, r"LoraConfig\.exclude_modules entry 're:\[a-' is not a valid"),
        ({"target_modules": ["q_proj"], "modules_to_save": ["re:*head"]}, r"LoraConfig\.modules_to_save entry 're:\*head' is not a valid"),
        ({"target_modules": ["q_proj"], "rank_pattern": {"re:(": 2}}, r"LoraConfig\.rank_pattern entry 're:\(' is not a valid"),
    ],
)
def test_invalid_regex_is_a_config_error(kwargs, message):
    with pytest.raises(dt.DeltaConfigError, match=message):
        dt.LoraConfig(**kwargs)


def test_invalid_regex_in_other_methods_and_valid_neighbours():
    with pytest.raises(dt.DeltaConfigError, match=r"IA3Config\.target_modules entry 're:\(k' is not a valid regular expression"):
        dt.IA3Config(target_modules=["re:(k"], feedforward_modules=[])
    dt.LoraConfig(target_modules="q_proj|v_proj")  # a valid single-string regex
    dt.LoraConfig(target_modules=["*.q_proj", "re:.*v_proj"])  # glob and regex entries


# -- adapters that are not there ------------------------------------------------------------------
def test_freeze_delta_with_missing_adapter():
    model = dt.apply(mlp(), dt.LoraConfig(target_modules=["0"], r=2))
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(dt.AdapterNotFoundError, match=r"adapter_name 'missing' is not a \['lora'\] adapter on the model; adapters on the model: \{'default': 'lora'\}"):
        dt.freeze_delta(model, "lora", adapter_name="missing")
    with pytest.raises(dt.AdapterNotFoundError, match=r"adapter_name \['x', 'y'\] is not"):
        dt.freeze_delta(model, "lora", adapter_name=["default", "x", "y"])
    with pytest.raises(dt.AdapterNotFoundError, match=r"adapter_name 'default' is not a \['ia3'\] adapter"):
        dt.freeze_delta(model, "ia3", adapter_name="default")  # there, but of another method
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    dt.freeze_delta(model, "lora", adapter_name="default")
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == [
        "0.lora_A.default.weight", "0.lora_B.default.weight"]


# -- PEFT adapters ---------------------------------------------------------------------------------
def _peft_dir(tmp_path, **config_changes):
    model = dt.apply(mlp(), dt.LoraConfig(target_modules=["0", "2"], r=2, init="random"))
    d = dt.export_peft(model, tmp_path / "peft")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(config_changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"peft_type": "LORA", "r": 2,', r"adapter_config\.json '.*adapter_config\.json', line 1, column \d+: invalid JSON"),
        ('["LORA", 2]', r"adapter_config\.json' must hold a JSON object, got list"),
        ('{"peft_type": "LORA", "r": 2, "r": 4}', r"duplicate key 'r'"),
    ],
)
def test_peft_config_files(tmp_path, text, message):
    d = _peft_dir(tmp_path)
    (d / "adapter_config.json").write_text(text)
    model = mlp()
    with pytest.raises(dt.CheckpointError, match=message):
        dt.import_peft(model, d)
    assert dt.adapter_names(model) == []


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"use_rslora": "false"}, r"field 'use_rslora' must be a JSON boolean \(true/false\), got 'false'"),
        ({"use_dora": 1}, r"field 'use_dora' must be a JSON boolean \(true/false\), got 1"),
        ({"fan_in_fan_out": "no"}, r"field 'fan_in_fan_out' must be a JSON boolean"),
        ({"rank_pattern": [1]}, r"field 'rank_pattern' must be a JSON object, got \[1\]"),
        ({"r": 0}, r"does not describe a valid LoRA adapter: LoraConfig\.r must be a positive int, got 0"),
        ({"lora_alpha": "8"}, r"does not describe a valid LoRA adapter: LoraConfig\.alpha must be"),
    ],
)
def test_peft_config_fields(tmp_path, changes, message):
    d = _peft_dir(tmp_path, **changes)
    with pytest.raises(dt.CheckpointError, match=message):
        dt.import_peft(mlp(), d)


def test_peft_config_without_r(tmp_path):
    d = _peft_dir(tmp_path)
    cfg = json.loads((d / "adapter_config.json").read_text())
    del cfg["r"]
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(dt.CheckpointError, match=r"adapter_config\.json' has no 'r' field \(the LoRA rank\)"):
        dt.import_peft(mlp(), d)


def test_peft_use_rslora_true_still_imports(tmp_path):
    src = dt.apply(mlp(), dt.LoraConfig(target_modules=["0", "2"], r=2, use_rslora=True, init="random"))
    d = dt.export_peft(src, tmp_path / "p")
    x = torch.randn(3, 16)
    assert torch.equal(dt.import_peft(mlp(), d)(x), src(x))


def test_peft_weights_files(tmp_path):
    d = _peft_dir(tmp_path)
    w = d / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-5])
    with pytest.raises(dt.CheckpointError, match=r"adapter_model\.safetensors' is not a valid safetensors file"):
        dt.import_peft(mlp(), d)
    w.unlink()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (d / "adapter_model.bin").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(dt.CheckpointError, match=r"adapter_model\.bin' cannot be read as a plain tensor dict \(weights_only=True refused it"):
        dt.import_peft(mlp(), d)
    torch.save([torch.zeros(2)], d / "adapter_model.bin")
    with pytest.raises(dt.CheckpointError, match=r"adapter_model\.bin' must hold a dict of tensors, got list"):
        dt.import_peft(mlp(), d)
    (d / "adapter_model.bin").unlink()
    with pytest.raises(dt.CheckpointError, match=r"has neither adapter_model\.safetensors nor adapter_model\.bin"):
        dt.import_peft(mlp(), d)


# -- labels ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [5, -2, 100])
def test_rdrop_label_out_of_range(bad):
    logits = torch.randn(4, 5)
    labels = torch.tensor([0, 0, bad, bad])  # interleaved copies: rows (0, 1), (2, 3)
    with pytest.raises(dt.DeltaConfigError, match=rf"labels must be -100 \(ignored\) or a class in \[0, 5\) for logits with 5 classes, got {bad}"):
        RDropLoss()(logits, labels)


def test_rdrop_ignored_and_edge_labels_are_fine():
    logits = torch.randn(4, 5)
    out = RDropLoss(alpha=0.0, layout="concat")(logits, torch.tensor([4, -100, 4, -100]))
    ce = torch.nn.functional.cross_entropy
    torch.testing.assert_close(out, 0.5 * (ce(logits[0:1], torch.tensor([4])) + ce(logits[2:3], torch.tensor([4]))))
