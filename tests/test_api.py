"""Targeting, config loading, freezing, named adapters, checkpoint integrity and error messages."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

import deltatune as dt
from deltatune.checkpoint import _meta_digest
from deltatune.methods.lora import LoraLayer
from tests.tiny_models import example_input, gpt2, llama, mlp, run


def lora_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, LoraLayer))


# -- target syntax ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "targets,expected",
    [
        (["q_proj"], ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]),
        (["model.layers.1.self_attn.q_proj"], ["model.layers.1.self_attn.q_proj"]),
        (["*.layers.0.*_proj"], None),  # wildcard: every projection of layer 0
        ("model\\.layers\\.1\\.mlp\\.(up|down)_proj", ["model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"]),
        (["re:.*\\.0\\.self_attn\\.(q|v)_proj"], ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]),
    ],
)
def test_target_syntax(targets, expected):
    model = dt.apply(llama(), dt.LoraConfig(target_modules=targets, r=2))
    names = dt.targeted_modules(model)
    if expected is None:
        assert len(names) == 7 and all(".layers.0." in n for n in names)
    else:
        assert sorted(names) == expected
    assert sorted(names) == sorted(lora_names(model))


def test_all_linear_skips_output_head():
    model = dt.apply(llama(), dt.LoraConfig(target_modules="all-linear", r=2))
    names = dt.targeted_modules(model)
    assert len(names) == 14 and "lm_head" not in names
    model = dt.apply(gpt2(), dt.LoraConfig(target_modules="all-linear", r=2))
    assert len(dt.targeted_modules(model)) == 8  # c_attn, c_proj, c_fc, mlp.c_proj per layer (Conv1D)


def test_exclude_and_layers_to_transform():
    model = dt.apply(llama(), dt.LoraConfig(target_modules=["q_proj", "v_proj"], exclude_modules=["model.layers.0.self_attn.v_proj"], r=2))
    assert dt.targeted_modules(model) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    model = dt.apply(llama(), dt.LoraConfig(target_modules=["q_proj"], layers_to_transform=[1], r=2))
    assert dt.targeted_modules(model) == ["model.layers.1.self_attn.q_proj"]
    model = dt.apply(gpt2(), dt.LoraConfig(target_modules=["c_attn"], layers_to_transform=0, layers_pattern="h", r=2))
    assert dt.targeted_modules(model) == ["transformer.h.0.attn.c_attn"]


def test_default_targets_for_known_architectures():
    assert dt.targeted_modules(dt.apply(llama(), dt.LoraConfig(r=2))) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    with pytest.raises(dt.DeltaConfigError, match="target_modules must be given for Sequential"):
        dt.apply(mlp(), dt.LoraConfig(r=2))


def test_no_match_names_closest_modules():
    with pytest.raises(dt.TargetNotFoundError, match=r"\['q_prj'\] matched no module of LlamaForCausalLM; closest module names: \['q_proj'"):
        dt.apply(llama(), dt.LoraConfig(target_modules=["q_prj"]))
    # one bad entry among good ones is not silently ignored
    with pytest.raises(dt.TargetNotFoundError, match=r"\['nonexistent'\] matched no module"):
        dt.apply(llama(), dt.LoraConfig(target_modules=["q_proj", "nonexistent"]))
    with pytest.raises(dt.TargetNotFoundError, match="selects no module"):
        dt.apply(llama(), dt.LoraConfig(target_modules=["q_proj"], layers_to_transform=[7]))


def test_unsupported_module_type_named():
    model = llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(dt.UnsupportedModuleError, match="LoRA cannot wrap module 'model.layers.0.self_attn' of type LlamaAttention"):
        dt.apply(model, dt.LoraConfig(target_modules=["q_proj", "model.layers.0.self_attn"]))
    assert not lora_names(model), "nothing may change before all checks pass"
    assert model.state_dict().keys() == before.keys()
    with pytest.raises(dt.UnsupportedModuleError, match="grouped conv"):
        dt.apply(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), dt.LoraConfig(target_modules=["0"]))


# -- config ---------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file_round_trip(tmp_path, suffix):
    cfg = dt.LoraConfig(r=4, alpha=32, dropout=0.1, target_modules=["c_attn"], enable_lora={"c_attn": [True, False, True]},
                        rank_pattern={"c_fc": 2}, use_rslora=True)
    path = tmp_path / f"cfg{suffix}"
    cfg.save(path)
    loaded = dt.load_config(path)
    assert isinstance(loaded, dt.LoraConfig) and loaded == cfg
    assert dt.load_config(cfg.to_dict()) == cfg


def test_load_config_recipe_with_delta_section(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("model: smollm2-135m\ndelta:\n  method: lora\n  r: 4\n  alpha: 32\n  target_modules: [q_proj, v_proj]\n")
    assert dt.load_config(path) == dt.LoraConfig(r=4, alpha=32, target_modules=["q_proj", "v_proj"])


@pytest.mark.parametrize(
    "kwargs,exc,message",
    [
        ({"r": 0}, dt.DeltaConfigError, "LoraConfig.r must be a positive int, got 0"),
        ({"r": 2.0}, dt.DeltaConfigTypeError, r"LoraConfig.r must be a positive int, got 2.0 \(float\)"),
        ({"r": True}, dt.DeltaConfigTypeError, r"LoraConfig.r must be a positive int, got True \(bool\)"),
        ({"alpha": 0}, dt.DeltaConfigError, "LoraConfig.alpha must be a number > 0, got 0.0"),
        ({"alpha": "8"}, dt.DeltaConfigTypeError, "LoraConfig.alpha must be a number > 0, got '8'"),
        ({"dropout": 1.0}, dt.DeltaConfigError, r"LoraConfig.dropout must be a number in \[0, 1\), got 1.0"),
        ({"dropout": -0.1}, dt.DeltaConfigError, r"LoraConfig.dropout must be a number in \[0, 1\), got -0.1"),
        ({"init": "xavier"}, dt.DeltaConfigError, "LoraConfig.init must be one of 'kaiming', 'gaussian', 'random', got 'xavier'"),
        ({"bias": "some"}, dt.DeltaConfigError, "LoraConfig.bias must be one of 'none', 'all', 'lora_only', got 'some'"),
        ({"target_modules": []}, dt.DeltaConfigError, "LoraConfig.target_modules must be a non-empty str"),
        ({"target_modules": [1]}, dt.DeltaConfigTypeError, r"LoraConfig.target_modules\[0\] must be a str, got 1"),
        ({"layers_to_transform": [-1]}, dt.DeltaConfigError, r"LoraConfig.layers_to_transform\[0\] must be an int >= 0, got -1"),
        ({"rank_pattern": {"q": 0}}, dt.DeltaConfigError, r"LoraConfig.rank_pattern\['q'\] must be a positive int, got 0"),
        ({"enable_lora": {"c_attn": [False, False]}}, dt.DeltaConfigError, "must enable at least one slice"),
        ({"enable_lora": {"c_attn": [1, 0]}}, dt.DeltaConfigTypeError, "must be a non-empty list of bool"),
        ({"use_dora": "yes"}, dt.DeltaConfigTypeError, "LoraConfig.use_dora must be a bool, got 'yes'"),
    ],
)
def test_config_validation_messages(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        dt.LoraConfig(**kwargs)


def test_config_errors_are_value_and_type_errors():
    assert issubclass(dt.DeltaConfigError, ValueError)
    assert issubclass(dt.DeltaConfigTypeError, TypeError) and issubclass(dt.DeltaConfigTypeError, dt.DeltaConfigError)
    with pytest.raises(dt.DeltaConfigError, match=r"unknown LoraConfig field\(s\) \['rank'\]"):
        dt.load_config({"method": "lora", "rank": 4})
    with pytest.raises(dt.DeltaConfigError, match="method must be one of"):
        dt.load_config({"method": "lorax"})
    with pytest.raises(dt.DeltaConfigError, match="config path must be an existing file, got 'missing.yaml'"):
        dt.load_config("missing.yaml")


def test_fused_slices_must_divide_outputs():
    with pytest.raises(dt.DeltaConfigError, match="has 5 slices but the layer has 96 outputs"):
        dt.apply(gpt2(), dt.LoraConfig(target_modules=["c_attn"], enable_lora={"c_attn": [True] * 5}))


def test_fused_slices_leave_disabled_slice_untouched():
    model = dt.apply(gpt2(), dt.LoraConfig(target_modules=["c_attn"], r=2, enable_lora={"c_attn": [True, False, True]}))
    layer = model.get_submodule("transformer.h.0.attn.c_attn")
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    delta = layer.get_delta_weight("default")  # Conv1D layout (in, out)
    assert delta.shape == (32, 96)
    assert torch.count_nonzero(delta[:, 32:64]) == 0
    assert torch.count_nonzero(delta[:, :32]) > 0 and torch.count_nonzero(delta[:, 64:]) > 0
    x = torch.randn(2, 5, 32)
    expected = layer.base_layer(x) + x @ delta
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


# -- freezing -------------------------------------------------------------------------------
def test_freeze_delta_include_exclude():
    model = dt.apply(llama(), dt.LoraConfig(target_modules=["q_proj", "v_proj"], r=2))
    dt.freeze_delta(model, "lora", exclude=["*lm_head*"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "lm_head.weight" in trainable
    assert all("lora_" in n or n == "lm_head.weight" for n in trainable)
    dt.freeze_delta(model, "lora", include=["*layers.0*"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any("layers.0" in n for n in trainable)
    with pytest.raises(dt.DeltaConfigError, match="exclude pattern '\\*classifier\\*' matches no parameter"):
        dt.freeze_delta(model, "lora", exclude=["*classifier*"])
    with pytest.raises(dt.DeltaConfigError, match="match both include and exclude"):
        dt.freeze_delta(model, "lora", include=["*q_proj*"], exclude=["*layers.0*"])
    with pytest.raises(dt.DeltaConfigError, match="mode must be one of"):
        dt.freeze_delta(model, "lorra")
    with pytest.raises(dt.DeltaConfigError, match="the model has no \\['lora'\\] parameters"):
        dt.freeze_delta(llama(), "lora")


def test_trainable_summary_table():
    model = dt.apply(mlp(), dt.LoraConfig(target_modules=["0"], r=2))
    s = dt.trainable_summary(model)
    assert s.trainable == 2 * 16 + 32 * 2
    assert s.total == 16 * 32 + 32 + 32 * 8 + 8 + s.trainable
    assert s.percent == pytest.approx(100 * s.trainable / s.total)
    text = str(s)
    assert s.rows == [("0", s.trainable, 16 * 32 + 32 + s.trainable)]  # adapter counted under its module
    assert f"trainable%: {s.percent:.4f}" in text


# -- named adapters -------------------------------------------------------------------------
def test_multiple_adapters_switch_disable_delete():
    base = llama()
    x = example_input("llama")
    y0 = run(base, x)
    model = dt.apply(copy.deepcopy(base), dt.LoraConfig(target_modules=["q_proj"], r=2, init="random"), "a")
    dt.apply(model, dt.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, init="random"), "b")
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    base_weight = q.base_layer.weight
    assert dt.active_adapters(model) == ["b"] and dt.adapter_names(model) == ["a", "b"]
    yb = run(model, x)
    dt.set_active_adapter(model, "a")
    ya = run(model, x)
    assert not torch.allclose(ya, yb)
    assert q.base_layer.weight is base_weight, "switching never reloads the base"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".a." in n for n in trainable)
    with dt.disable_adapters(model):
        assert torch.equal(run(model, x), y0)
    assert torch.equal(run(model, x), ya)
    dt.merge(model)
    with dt.disable_adapters(model):
        torch.testing.assert_close(run(model, x), y0, atol=1e-5, rtol=0)
    torch.testing.assert_close(run(model, x), ya, atol=1e-5, rtol=0)
    dt.unmerge(model)
    dt.delete_adapter(model, "a")
    assert dt.adapter_names(model) == ["b"] and dt.active_adapters(model) == ["b"]
    assert not any(".a." in n for n, _ in model.named_parameters())
    torch.testing.assert_close(run(model, x), yb, atol=1e-5, rtol=0)  # merge/unmerge of "a" rounded the base
    with pytest.raises(dt.AdapterNotFoundError, match="adapter 'a' not found on the model; adapters: \\['b'\\]"):
        dt.set_active_adapter(model, "a")
    with pytest.raises(dt.DeltaConfigError, match="adapter name 'b' is already used"):
        dt.apply(model, dt.LoraConfig(target_modules=["q_proj"]), "b")


def test_modules_to_save_head_trained_and_saved(tmp_path):
    from tests.tiny_models import bert

    base = bert()
    x = example_input("bert")
    model = dt.apply(copy.deepcopy(base), dt.LoraConfig(target_modules=["query"], r=2, modules_to_save=["classifier"]))
    head = model.get_submodule("classifier")
    assert all(p.requires_grad for p in head.modules_to_save["default"].parameters())
    assert not any(p.requires_grad for p in head.base_layer.parameters())
    with torch.no_grad():
        head.modules_to_save["default"].weight.add_(1.0)
    y = run(model, x)
    dt.save_delta(model, tmp_path / "d")
    assert torch.equal(run(dt.load_delta(copy.deepcopy(base), tmp_path / "d"), x), y)
    with pytest.raises(dt.DeltaConfigError, match="both targets of the method and in modules_to_save"):
        dt.apply(copy.deepcopy(base), dt.LoraConfig(target_modules=["query", "classifier"], modules_to_save=["classifier"]))


# -- checkpoints ----------------------------------------------------------------------------
def _saved(tmp_path):
    model = dt.apply(mlp(), dt.LoraConfig(target_modules=["0", "2"], r=2, init="random"))
    dt.save_delta(model, tmp_path / "d")
    return model, tmp_path / "d"


def test_checkpoint_detects_corruption(tmp_path):
    _, d = _saved(tmp_path)
    data = bytearray((d / "delta.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (d / "delta.safetensors").write_bytes(bytes(data))
    with pytest.raises(dt.CheckpointError, match="the file is corrupt or was only partly written"):
        dt.load_delta(mlp(), d)


def test_checkpoint_reports_config_and_shape_mismatch(tmp_path):
    _, d = _saved(tmp_path)
    other = dt.apply(mlp(), dt.LoraConfig(target_modules=["0", "2"], r=3))
    with pytest.raises(dt.CheckpointError, match=r"different config than the checkpoint .*'r': \(3, 2\)"):
        dt.load_delta(other, d)
    meta = json.loads((d / "delta_config.json").read_text())
    meta["config"]["r"] = 3
    (d / "delta_config.json").write_text(json.dumps(meta))
    with pytest.raises(dt.CheckpointError, match=r"delta_config.json' was changed after it was written"):
        dt.load_delta(mlp(), d)
    meta["meta_sha256"] = _meta_digest(meta)  # a consistent (re-hashed) config that does not fit the tensors
    (d / "delta_config.json").write_text(json.dumps(meta))
    with pytest.raises(dt.CheckpointError, match=r"shape mismatches: \['0.lora_A.weight: checkpoint \(2, 16\) vs model \(3, 16\)"):
        dt.load_delta(mlp(), d)


def test_checkpoint_missing_files_and_dir(tmp_path):
    _, d = _saved(tmp_path)
    (d / "delta.safetensors").unlink()
    with pytest.raises(dt.CheckpointError, match=r"is not a complete delta checkpoint: missing \['delta.safetensors'\]"):
        dt.load_delta(mlp(), d)
    with pytest.raises(dt.DeltaConfigError, match="directory must be an existing delta checkpoint directory"):
        dt.load_delta(mlp(), tmp_path / "nope")


def test_save_is_atomic_on_interrupt(tmp_path, monkeypatch):
    model, d = _saved(tmp_path)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    with torch.no_grad():
        model[0].lora_B["default"].weight.add_(1)
    import deltatune.io_utils as io

    real_replace = io.os.replace

    def boom(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(io.os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        dt.save_delta(model, d)
    monkeypatch.setattr(io.os, "replace", real_replace)
    after = {p.name: p.read_bytes() for p in d.iterdir()}
    assert after == before, "an interrupted save leaves the old checkpoint intact and no temp files"
    dt.load_delta(mlp(), d)


def test_peft_import_errors(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(dt.CheckpointError, match="import_peft reads LoRA adapters only; .* has peft_type 'IA3'"):
        dt.import_peft(mlp(), tmp_path)
    with pytest.raises(dt.DeltaConfigError, match="directory must hold a PEFT adapter_config.json"):
        dt.import_peft(mlp(), tmp_path / "none")


def test_apply_rejects_bad_arguments():
    with pytest.raises(dt.DeltaConfigTypeError, match="model must be a torch.nn.Module, got 'x'"):
        dt.apply("x", dt.LoraConfig(target_modules=["0"]))
    with pytest.raises(dt.DeltaConfigTypeError, match="config must be a DeltaConfig"):
        dt.apply(mlp(), 3)
    with pytest.raises(dt.DeltaConfigError, match="name must be a non-empty str without '.', got 'a.b'"):
        dt.apply(mlp(), dt.LoraConfig(target_modules=["0"]), "a.b")


def test_apply_without_activating_keeps_the_active_adapter():
    base = llama()
    x = example_input("llama")
    model = dt.apply(copy.deepcopy(base), dt.LoraConfig(target_modules=["q_proj"], r=2, init="random"), "a")
    ya = run(model, x)
    dt.apply(model, dt.LoraConfig(target_modules=["v_proj"], r=2, init="random"), "b", activate=False)
    assert dt.active_adapters(model) == ["a"]
    assert torch.equal(run(model, x), ya), "the inactive adapter 'b' must not compute"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".a." in n for n in trainable)


def test_merge_of_stacked_methods_is_exact_and_reversible():
    """IA3 wrapping LoRA on one layer: merging innermost-first keeps outputs, unmerge restores the base."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8))
    x = torch.randn(3, 8)
    w0 = base[0].weight.detach().clone()
    model = dt.apply(base, dt.LoraConfig(target_modules=["0"], r=2, init="random"), "lora")
    dt.apply(model, dt.IA3Config(target_modules=["0"]), "ia3")
    with torch.no_grad():
        model[0].ia3_scale["ia3"].uniform_(0.5, 1.5)
    dt.set_active_adapter(model, ["lora", "ia3"])
    y = model(x)
    dt.merge(model)
    torch.testing.assert_close(model(x), y, atol=1e-5, rtol=0)
    dt.unmerge(model)
    torch.testing.assert_close(unwrap_weight(model), w0, atol=1e-6, rtol=0)


def unwrap_weight(model):
    from deltatune.methods.base import unwrap

    return unwrap(model[0]).weight


def test_switching_with_merged_adapters_changes_nothing():
    model = dt.apply(llama(), dt.LoraConfig(target_modules=["k_proj"], r=2, init="random"), "a")
    dt.apply(model, dt.LoraConfig(target_modules=["k_proj", "q_proj"], r=2, init="random"), "b", activate=False)
    dt.merge(model)
    with pytest.raises(dt.DeltaConfigError, match=r"cannot switch adapters while adapters \['a'\] are merged"):
        dt.set_active_adapter(model, "b")
    assert dt.active_adapters(model) == ["a"]
    assert all(layer.active_adapters == (["a"] if "k_proj" in n else []) for n, layer in
               ((n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)))
    with pytest.raises(dt.DeltaConfigError, match="cannot delete adapter 'b' while adapters"):
        dt.delete_adapter(model, "b")


def test_failed_apply_and_failed_load_leave_no_adapter(tmp_path):
    model = gpt2()
    before = [n for n, _ in model.named_modules()]
    with pytest.raises(dt.DeltaConfigError, match="has 5 slices"):
        dt.apply(model, dt.LoraConfig(target_modules=["c_fc", "c_attn"], enable_lora={"c_attn": [True] * 5}))
    assert [n for n, _ in model.named_modules()] == before and dt.adapter_names(model) == []
    saved = dt.apply(mlp(), dt.LoraConfig(target_modules=["0", "2"], r=2))
    dt.save_delta(saved, tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "delta_config.json").read_text())
    meta["config"]["r"] = 3
    meta["meta_sha256"] = _meta_digest(meta)
    (tmp_path / "d" / "delta_config.json").write_text(json.dumps(meta))
    fresh = mlp()
    with pytest.raises(dt.CheckpointError, match="shape mismatches"):
        dt.load_delta(fresh, tmp_path / "d")
    assert dt.adapter_names(fresh) == [] and not lora_names(fresh)


def test_fan_in_fan_out_on_a_plain_linear_is_refused():
    with pytest.raises(dt.DeltaConfigError, match="fan_in_fan_out=True needs weights stored"):
        dt.apply(mlp(), dt.LoraConfig(target_modules=["0"], fan_in_fan_out=True))


def test_model_with_grouped_lora_pickles_after_a_forward():
    import pickle

    model = dt.apply(llama(), dt.LoraConfig(target_modules=["q_proj", "k_proj", "v_proj"], r=2))
    run(model, example_input("llama"))
    clone = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(run(clone, example_input("llama")), run(model, example_input("llama")))
