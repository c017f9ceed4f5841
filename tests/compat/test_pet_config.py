"""MindFormers pet_config -> deltatune configs: every mapped key, the seed's examples (pointed at a
Llama's module names) through dt.load_config / recipes / `deltatune run`, and every bad input."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import deltatune as dt
from deltatune.cli import main
from deltatune.compat import pet_config as pc
from deltatune.errors import DeltaConfigError, DeltaConfigTypeError, TargetNotFoundError
from tests.recipe_fixtures import recipe_dict, tiny_assets, write_recipe
from tests.tiny_models import llama

# the seed's three examples (MindFormers docs), with target_modules pointed at Llama/SmolLM2 names
LORA = {"pet_type": "lora", "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.1,
        "target_modules": ".*q_proj|.*k_proj|.*v_proj"}
PTUNING2 = {"pet_type": "ptuning2", "pre_seq_len": 16, "prefix_projection": True, "projection_dim": 128,
            "dropout_rate": 0.01}
PREFIX = {"pet_type": "prefixtuning", "prefix_token_num": 32, "mid_dim": 512, "dropout_rate": 0.05}


@pytest.fixture(autouse=True)
def _fresh_announcements():
    pc._PRINTED.clear()
    yield
    pc._PRINTED.clear()


@pytest.mark.parametrize(
    ("pet", "cls", "fields"),
    [
        (LORA, dt.LoraConfig, {"r": 8, "alpha": 16.0, "dropout": 0.1, "target_modules": ".*q_proj|.*k_proj|.*v_proj"}),
        (PTUNING2, dt.PTuningV2Config, {"pre_seq_len": 16, "prefix_projection": True, "projection_dim": 128,
                                        "dropout": 0.01}),
        (PREFIX, dt.PrefixConfig, {"prefix_token_num": 32, "mid_dim": 512, "dropout": 0.05}),
        ({"pet_type": "adapter", "bottleneck_size": 4, "non_linearity": "relu", "target_modules": "o_proj"},
         dt.AdapterConfig, {"bottleneck_size": 4, "non_linearity": "relu", "target_modules": "o_proj"}),
        ({"pet_type": "adapter", "bottleneck_size": 4, "non_linearity": "gelu"},
         dt.AdapterConfig, {"bottleneck_size": 4, "non_linearity": "gelu_tanh"}),
        ({"pet_type": "adapter"}, dt.AdapterConfig, {"bottleneck_size": 64, "non_linearity": "gelu_tanh"}),
        ({"pet_type": "low_rank_adapter", "reduction_factor": 4, "low_rank_size": 2,
          "low_rank_w_init": "xavier_normal", "non_linearity": "gelu", "target_modules": ["down_proj"]},
         dt.LowRankAdapterConfig, {"reduction_factor": 4, "low_rank_size": 2, "low_rank_w_init": "xavier_normal",
                                   "non_linearity": "gelu_tanh", "target_modules": ["down_proj"],
                                   "identity_init": False}),
        ({"pet_type": "bitfit", "target_modules": "q_proj"}, dt.BitFitConfig, {"target_modules": "q_proj"}),
        ({"pet_type": "LoRA", "lora_rank": 2, "freeze_exclude": ["*lm_head*"], "freeze_include": []},
         dt.LoraConfig, {"r": 2, "modules_to_save": ["*lm_head*"]}),
    ],
)
def test_every_mapped_key(pet, cls, fields):
    config = dt.config_from_dict(pet)
    assert type(config) is cls
    for name, value in fields.items():
        assert getattr(config, name) == value, name
    # every other field keeps our default
    defaults = cls()
    for name in set(config.to_dict()) - set(fields) - {"method"}:
        assert getattr(config, name) == getattr(defaults, name), name


def test_mapping_printed_once(capsys):
    dt.config_from_dict(LORA)
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "MindFormers pet_config -> LoraConfig:",
        "  pet_type 'lora' -> method 'lora'",
        "  lora_rank -> r = 8",
        "  lora_alpha -> alpha = 16",
        "  lora_dropout -> dropout = 0.1",
        "  target_modules -> target_modules = '.*q_proj|.*k_proj|.*v_proj'",
    ]
    dt.config_from_dict(LORA)
    assert capsys.readouterr().err == ""
    dt.config_from_dict({"pet_type": "adapter"})
    assert "(not given) -> non_linearity = 'gelu_tanh' (MindPet's default gelu, the tanh approximation)" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("pet", [LORA, PTUNING2, PREFIX], ids=["lora", "ptuning2", "prefixtuning"])
def test_whole_mindformers_yaml_and_wrapped_forms(tmp_path, pet):
    doc = {"seed": 0, "model": {"model_config": {"type": "LlamaConfig", "num_layers": 2, "pet_config": pet},
                                "arch": {"type": "LlamaForCausalLM"}},
           "runner_config": {"epochs": 1}}
    path = tmp_path / "run_llama.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    want = dt.config_from_dict(pet).to_dict()
    assert dt.load_config(path).to_dict() == want
    (tmp_path / "p.json").write_text(json.dumps({"pet_config": pet}), encoding="utf-8")
    assert dt.load_config(tmp_path / "p.json").to_dict() == want
    assert dt.load_config({"pet_config": pet}).to_dict() == want


@pytest.mark.parametrize("pet", [LORA, PTUNING2, PREFIX], ids=["lora", "ptuning2", "prefixtuning"])
def test_seed_examples_train_on_a_tiny_llama(pet):
    model = llama().train()
    config = dt.load_config({"model": {"model_config": {"pet_config": pet}}})
    dt.apply(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "prefix_encoder" in n or "ptuning_encoder" in n
                             for n, p in model.named_parameters() if p.requires_grad)
    before = [p.detach().clone() for p in trainable]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert any(not torch.equal(b, p) for b, p in zip(before, trainable))


def test_deltatune_run_with_a_pet_config_recipe(tmp_path, capsys):
    model_dir, data_dir = tiny_assets()
    pet = {"pet_type": "lora", "lora_rank": 2, "lora_alpha": 4, "lora_dropout": 0.0,
           "target_modules": ".*q_proj|.*v_proj"}
    recipe = recipe_dict(model_dir, data_dir, tmp_path / "run", delta=pet,
                         train={"max_steps": 2, "eval_every": 2}, generate={"num_beams": 1, "max_new_tokens": 3})
    cfg = write_recipe(tmp_path / "pet.yaml", recipe)
    code = main(["run", str(cfg), "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "lora_rank -> r = 2" in err
    saved = json.loads((tmp_path / "run" / "delta" / "delta_config.json").read_text())
    assert json.dumps(saved).count('"r": 2') >= 1 and '"alpha": 4' in json.dumps(saved)
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["delta"]["method"] == "lora" and resolved["delta"]["r"] == 2
    assert resolved["delta"]["target_modules"] == ".*q_proj|.*v_proj"


def test_mindformers_layer_names_say_so_and_name_the_modules():
    model = llama()
    config = dt.config_from_dict({"pet_type": "lora", "lora_rank": 8, "target_modules": ".*dense1|.*dense2|.*dense3"})
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TargetNotFoundError, match=(
        r"\['dense1', 'dense2', 'dense3'\] are MindFormers layer names, which mean nothing in a Hugging Face "
        r"model; the linear layers of this model are named \['down_proj', 'gate_proj', 'k_proj', 'lm_head', "
        r"'o_proj', 'q_proj', 'up_proj', 'v_proj'\]; write target_modules with these")):
        dt.apply(model, config)
    assert list(model.state_dict()) == list(state)
    config = dt.config_from_dict({"pet_type": "lora", "lora_rank": 8, "target_modules": ".*wq|.*wv"})
    with pytest.raises(TargetNotFoundError, match=r"\['wq', 'wv'\] are MindFormers layer names"):
        dt.apply(model, config)
    assert not any(p.requires_grad is False for p in model.parameters())  # nothing frozen either


@pytest.mark.parametrize(
    ("data", "exc", "message"),
    [
        ({"pet_type": "slora", "lora_rank": 8}, DeltaConfigError,
         "pet_config.pet_type must be one of ['adapter', 'bitfit', 'lora', 'low_rank_adapter', 'prefixtuning', "
         "'ptuning2'] (MindFormers types deltatune maps), got 'slora'"),
        ({"pet_type": 3}, DeltaConfigError, "pet_config.pet_type must be one of"),
        ({"pet_config": {"lora_rank": 8}}, DeltaConfigError,
         "pet_config needs a 'pet_type' key, one of ['adapter', 'bitfit', 'lora', 'low_rank_adapter', "
         "'prefixtuning', 'ptuning2']; got keys ['lora_rank']"),
        ({"pet_type": "lora", "lora_rank": 8, "param_init_type": "float16"}, DeltaConfigError,
         "pet_config key(s) ['param_init_type'] have no deltatune counterpart for pet_type 'lora'; known keys: "
         "['freeze_exclude', 'freeze_include', 'lora_alpha', 'lora_dropout', 'lora_rank', 'pet_type', "
         "'target_modules']"),
        ({"pet_type": "prefixtuning", "pre_seq_len": 8}, DeltaConfigError,
         "pet_config key(s) ['pre_seq_len'] have no deltatune counterpart for pet_type 'prefixtuning'"),
        ({"pet_type": "lora", "freeze_include": ["*dense*"]}, DeltaConfigError,
         "pet_config.freeze_include has no deltatune counterpart unless empty (deltatune freezes every parameter "
         "that is not the delta's already), got ['*dense*']"),
        ({"pet_type": "lora", "lora_rank": 0}, DeltaConfigError, "LoraConfig.r must be a positive int, got 0"),
        ({"pet_type": "lora", "lora_dropout": 1.0}, DeltaConfigError,
         "LoraConfig.dropout must be a number in [0, 1), got 1.0"),
        ({"pet_type": "ptuning2", "prefix_projection": "yes"}, DeltaConfigTypeError,
         "PTuningV2Config.prefix_projection must be a bool, got 'yes' (str)"),
        ({"pet_config": [1, 2]}, DeltaConfigError, "config needs a 'method' key"),
    ],
)
def test_bad_pet_configs(data, exc, message):
    with pytest.raises(exc) as info:
        dt.config_from_dict(data)
    assert str(info.value).startswith(message)


def test_bad_pet_config_in_a_recipe_is_refused_before_any_work(tmp_path):
    from deltatune.recipes import load_recipe

    model_dir, data_dir = tiny_assets()
    recipe = recipe_dict(model_dir, data_dir, tmp_path / "run", delta={"pet_type": "lora", "lora_rnk": 8})
    with pytest.raises(DeltaConfigError, match=r"pet_config key\(s\) \['lora_rnk'\] have no deltatune counterpart"):
        load_recipe(write_recipe(tmp_path / "bad.yaml", recipe))
    assert not (tmp_path / "run").exists()
