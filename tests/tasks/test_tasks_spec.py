"""The shared tasks layer: every file in configs/ loads through the loader of its kind; a YAML file given to
the wrong loader names the right subcommand; one full-fine-tuning name; one lr rule; one --set parser."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import deltatune as dt
from deltatune.errors import DeltaConfigError
from deltatune.methods.lora import LoraConfig
from deltatune.sweep import load_sweep
from deltatune.tasks import classification, spec
from deltatune.tasks.lm import PerplexityConfig, load_perplexity_config
from deltatune.tasks.loader import load_recipe
from deltatune.tasks.overrides import apply_overrides
from deltatune.tasks.spec import FULL, WrongCommandError, config_kind
from deltatune.train import AdamW, TrainConfig
from tests.tasks._tasks_helpers import write_glue, write_wikitext

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ALL_CONFIGS = sorted(CONFIGS.rglob("*.yaml"))
#: the override a config needs to validate, and the error it gives without it (documented in the file)
NEEDS = {"dart_lora.yaml": (["data.allow_dev_training=true"], "needs data.allow_dev_training: true")}


def test_configs_folder_is_found():
    assert len(ALL_CONFIGS) >= 30 and CONFIGS / "e2e_cpu.yaml" in ALL_CONFIGS


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_validates_through_the_loader_of_its_kind(path, tmp_path):
    kind = config_kind(spec.read_yaml(path))
    if kind == "data-to-text":
        over, error = NEEDS.get(path.name, ([], None))
        if error is not None:
            with pytest.raises(DeltaConfigError, match=error):
                load_recipe(path, check_data=False)
        r = load_recipe(path, over, check_data=False)
        assert r.name == spec.read_yaml(path).get("name", path.stem)
        assert r.method in classification.sweep_method_names()
        assert load_recipe(r.to_dict(), check_data=False).to_dict() == r.to_dict()  # config.yaml round trip
    elif kind == "data-to-text-sweep":
        data = tmp_path / "data"
        (data / "e2e").mkdir(parents=True)
        for name in ("trainset.csv", "devset.csv", "testset_w_refs.csv"):
            (data / "e2e" / name).write_text("mr,ref\n", encoding="utf-8")
        s = load_sweep(path, overrides=[f"data.data_dir={data}", "eval.metrics=[BLEU]"])
        assert s.kind == "data-to-text" and s.methods and s.seeds
    elif kind == "classification":
        task = spec.read_yaml(path)["data"]["dataset"]
        s = load_sweep(path, overrides={"data.data_dir": str(write_glue(tmp_path, task))})
        assert s.kind == "classification" and s.base["data"]["dataset"] == task
    else:
        assert kind == "perplexity", f"{path}: no loader knows this file"
        cfg = load_perplexity_config(path, [f"data.data_dir={write_wikitext(tmp_path)}"])
        assert isinstance(cfg, PerplexityConfig) and cfg.delta["method"] == "lora"


def test_wrong_loader_names_the_right_subcommand():
    sst2, e2e, wiki = CONFIGS / "glue" / "sst2_cpu.yaml", CONFIGS / "e2e_cpu.yaml", CONFIGS / "wikitext_lora.yaml"
    with pytest.raises(WrongCommandError) as exc:
        load_recipe(sst2, check_data=False)
    assert str(exc.value) == (
        f"{sst2} is a classification sweep config, which `deltatune run` does not take: use `deltatune sweep {sst2}`"
    )
    with pytest.raises(WrongCommandError) as exc:
        load_sweep(e2e)
    assert str(exc.value) == (
        f"{e2e} is a data-to-text recipe (one run), which `deltatune sweep` does not take: use `deltatune run {e2e}` "
        f"(to sweep methods over a recipe, give it a 'sweep: {{methods: [...], seeds: [...]}}' section)"
    )
    with pytest.raises(WrongCommandError) as exc:
        load_perplexity_config(e2e)
    assert str(exc.value) == (
        f"{e2e} is a data-to-text recipe (one run), which `deltatune perplexity` does not take: use "
        f"`deltatune run {e2e}`"
    )
    with pytest.raises(WrongCommandError) as exc:
        load_recipe(wiki, command="finetune", check_data=False)
    assert str(exc.value) == (
        f"{wiki} is a perplexity config, which `deltatune finetune` does not take: use `deltatune perplexity {wiki}`"
    )
    assert issubclass(WrongCommandError, DeltaConfigError)


def test_full_fine_tuning_has_one_name():
    assert classification.FULL is spec.FULL == "full"
    assert not hasattr(classification, "FULL_METHOD")
    assert classification.sweep_method_names()[0] == FULL


def test_lr_must_be_positive_in_train_config_and_adamw():
    p = torch.nn.Parameter(torch.zeros(2))
    for lr in (0, -1e-3):
        with pytest.raises(DeltaConfigError, match=rf"^lr must be a number > 0, got {float(lr)}$"):
            TrainConfig(lr=lr)
        with pytest.raises(DeltaConfigError, match=rf"^lr must be a number > 0, got {float(lr)}$"):
            AdamW([p], lr=lr)
    assert AdamW([p], lr=1e-3).param_groups[0]["lr"] == TrainConfig(lr=1e-3).lr


def test_one_override_parser_for_every_kind(tmp_path):
    data = write_wikitext(tmp_path)
    cfg = load_perplexity_config(
        CONFIGS / "wikitext_lora.yaml",
        [f"data.data_dir={data}", "eval.max_tokens=64", "train.lr=0.5", "delta.r=2", "train.seed=3"],
        output_dir=tmp_path / "out",
        progress=False,
    )
    assert (cfg.eval_max_tokens, cfg.train["lr"], cfg.delta["r"], cfg.output_dir) == (64, 0.5, 2, str(tmp_path / "out"))
    assert cfg.train["epochs"] == 1 and cfg.progress is False and cfg.train["progress_bar"] is False
    assert cfg.seed == 3 and "seed" not in cfg.train
    # the old flat paths reach the same fields through the one mapping
    old = load_perplexity_config(
        CONFIGS / "wikitext_lora.yaml",
        [f"data_dir={data}", "eval_max_tokens=64", "train.lr=0.5", "delta.r=2", "seed=3"],
        output_dir=tmp_path / "out",
        progress=False,
    )
    assert old == cfg
    with pytest.raises(DeltaConfigError, match=r"^--set 'evl_split=test': unknown perplexity config key 'evl_split'; "):
        load_perplexity_config(CONFIGS / "wikitext_lora.yaml", ["evl_split=test"])
    with pytest.raises(DeltaConfigError, match=r"^--set 'eval.stride.x=1': 'eval.stride' takes a value, not sub-keys$"):
        load_perplexity_config(CONFIGS / "wikitext_lora.yaml", ["eval.stride.x=1"])
    with pytest.raises(DeltaConfigError, match=r"^unknown key 'eval.strid' in perplexity config section 'eval'; known "
                                               r"keys: split, max_tokens, max_length, stride, batch_size$"):
        load_perplexity_config(CONFIGS / "wikitext_lora.yaml", [f"data.data_dir={data}", "eval.strid=1"])
    # the same function applies a recipe's --set
    assert apply_overrides({"train": {"lr": 1.0}}, ["train.lr=2"]) == {"train": {"lr": 2}}
    assert apply_overrides({}, ["delta.rank_pattern.q_proj=2"]) == {"delta": {"rank_pattern": {"q_proj": 2}}}
    with pytest.raises(DeltaConfigError, match=r"^--set 'train.lr=2': recipe section 'train' is not a mapping \(5\)$"):
        apply_overrides({"train": 5}, ["train.lr=2"])
    with pytest.raises(DeltaConfigError, match=r"^--set 'delta.rank_pattern.q_proj=2': 'rank_pattern' holds 3, not a "
                                               r"mapping$"):
        apply_overrides({"delta": {"rank_pattern": 3}}, ["delta.rank_pattern.q_proj=2"])


def test_recipe_delta_config_is_built_and_validated_once(monkeypatch):
    """load_recipe builds the LoRA config once; Recipe.delta_config() hands back that object while the
    recipe's delta is unchanged, and apply does not check it again."""
    calls: list[int] = []
    real = LoraConfig.validate
    monkeypatch.setattr(LoraConfig, "validate", lambda self: (calls.append(1), real(self))[1])
    r = load_recipe(CONFIGS / "e2e_cpu.yaml", check_data=False)
    assert len(calls) == 1
    cfg = r.delta_config()
    assert isinstance(cfg, LoraConfig) and cfg is r.delta_config() and len(calls) == 1
    model = torch.nn.Sequential()
    model.add_module("q_proj", torch.nn.Linear(4, 4))
    model.add_module("v_proj", torch.nn.Linear(4, 4))
    dt.apply(model, cfg)
    assert len(calls) == 1
    r.delta["r"] = 8  # the dict changed: a new config, built from it (and validated)
    assert r.delta_config().r == 8 and len(calls) == 2
