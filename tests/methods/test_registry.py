"""The method registry builds configs, and a config is validated once on its way to the model
(:func:`deltatune.methods.make_config`, :meth:`DeltaConfig.ensure_valid`, :func:`deltatune.apply`)."""

from __future__ import annotations

import re

import pytest
import torch.nn as nn

import deltatune as dt
from deltatune.config import config_from_dict
from deltatune.errors import DeltaConfigError, DeltaConfigTypeError
from deltatune.methods import make_config
from deltatune.methods.lora import LoraConfig


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


@pytest.fixture
def count_validations(monkeypatch):
    """Counts LoraConfig.validate calls (the original still runs)."""
    calls: list[int] = []
    real = LoraConfig.validate

    def counting(self: LoraConfig) -> None:
        calls.append(1)
        real(self)

    monkeypatch.setattr(LoraConfig, "validate", counting)
    return calls


def test_make_config_builds_the_registered_class():
    cfg = make_config({"method": "lora", "r": 4, "alpha": 8, "target_modules": ["0"]})
    assert type(cfg) is LoraConfig
    assert (cfg.r, cfg.alpha, cfg.target_modules) == (4, 8.0, ["0"])
    assert make_config(cfg) is cfg
    assert dt.make_config is make_config


def test_dict_to_model_validates_once(count_validations):
    cfg = make_config({"method": "lora", "r": 4, "target_modules": ["0", "2"]})
    assert len(count_validations) == 1
    dt.apply(mlp(), cfg)
    assert len(count_validations) == 1  # apply does not check an unchanged config again
    dt.apply(mlp(), {"method": "lora", "r": 4, "target_modules": ["0"]})
    assert len(count_validations) == 2  # a dict given to apply: built (and checked) once


def test_changed_config_is_validated_again(count_validations):
    cfg = LoraConfig(r=4, target_modules=["0"])
    cfg.target_modules.append("re:(")  # edited in place after it was built
    with pytest.raises(DeltaConfigError, match=re.escape(
            "LoraConfig.target_modules entry 're:(' is not a valid regular expression: missing ), unterminated "
            "subpattern at position 0")):
        dt.apply(mlp(), cfg)
    cfg.target_modules = ["0"]
    cfg.r = 0
    with pytest.raises(DeltaConfigError, match=r"^LoraConfig\.r must be a positive int, got 0$"):
        make_config(cfg)
    cfg.r = 2
    model = dt.apply(mlp(), cfg)
    assert model[0].r["default"] == 2
    calls = len(count_validations)
    make_config(cfg)
    assert len(count_validations) == calls  # valid and unchanged since: not checked again


def test_copies_and_replacements_keep_the_rule(count_validations):
    cfg = LoraConfig(r=4)
    other = cfg.replace(r=8)  # a new config: validated when built
    assert len(count_validations) == 2
    assert other.r == 8 and cfg.r == 4
    again = config_from_dict(other.to_dict())
    assert again == other and len(count_validations) == 3


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        (3, DeltaConfigTypeError,
         "config must be a DeltaConfig (e.g. LoraConfig) or a mapping with a 'method' key, got int"),
        ({"r": 4}, DeltaConfigError,
         "config needs a 'method' key, one of ['adapter', 'bitfit', 'ia3', 'lora', 'low_rank_adapter', 'prefix', "
         "'ptuning_v2']; got keys ['r']"),
        ({"method": "lorax"}, DeltaConfigError,
         "method must be one of ['adapter', 'bitfit', 'ia3', 'lora', 'low_rank_adapter', 'prefix', 'ptuning_v2'], "
         "got 'lorax'"),
        ({"method": "lora", "rank": 4}, DeltaConfigError,
         "unknown LoraConfig field(s) ['rank']; expected some of ['adapter_dtype', 'alpha', 'alpha_pattern', 'bias', "
         "'dropout', 'enable_lora', 'exclude_modules', 'fan_in_fan_out', 'init', 'layers_pattern', "
         "'layers_to_transform', 'modules_to_save', 'r', 'rank_pattern', 'target_modules', 'use_dora', "
         "'use_rslora']"),
    ],
)
def test_make_config_refuses_bad_specs(spec, error, message):
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        make_config(spec)


def test_public_module_helpers():
    """api.adapter_record and inject.replace_module are the public names the other modules use."""
    from deltatune.api import adapter_record
    from deltatune.inject import replace_module

    model = dt.apply(mlp(), LoraConfig(r=2, target_modules=["0"]), "a")
    record = adapter_record(model, "a")
    assert (record.method, record.targets) == ("lora", ["0"])
    with pytest.raises(dt.AdapterNotFoundError, match=r"^adapter 'b' not found on the model; adapters: \['a'\]$"):
        adapter_record(model, "b")
    new = nn.Linear(8, 2)
    replace_module(model, "2", new)
    assert model[2] is new
