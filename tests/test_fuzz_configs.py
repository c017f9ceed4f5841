"""Property-based fuzzing (Hypothesis) of method configs and recipe dictionaries.

* A valid config (drawn from each field's valid values) applies to a tiny Llama and runs.
* The same config with one field replaced by an invalid value, or an unknown key added, raises a
  ``DeltaError`` subclass, either when the config is built (no model involved) or from ``apply``
  with the model left exactly as it was (modules, parameters, ``requires_grad``).
* A recipe dict with a valid change loads and keeps the value; with an invalid change,
  ``load_recipe`` raises a ``DeltaError`` (it loads no model).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import deltatune as dt
from deltatune.config import config_from_dict
from deltatune.errors import DeltaError
from deltatune.recipes import load_recipe
from tests.recipe_fixtures import recipe_dict, tiny_assets
from tests.tiny_models import example_input, llama, run

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
given, settings, HealthCheck = hypothesis.given, hypothesis.settings, hypothesis.HealthCheck

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BASE = llama()
X = example_input("llama")
Y = run(BASE, X)

# Junk that no field of its kind accepts.
BAD_INT = [0, -1, 1.5, "4", True, None, [2], float("nan")]
BAD_FLOAT = [float("nan"), float("inf"), -1.0, "0.1", True, None, [0.1]]
BAD_BOOL = ["false", "true", 1, 0, None, "no"]
BAD_CHOICE = ["bogus", "", 3, None, ["kaiming"]]
BAD_TARGETS = [[], "", ["nope_proj"], ["re:("], ["re:q_proj("], 5, [5], ["q_proj", ""], {"q_proj": 1}]
BAD_PATTERN_TABLE = [{"nope_proj": 2}, [1], "q_proj", {"re:(": 2}, {5: 2}]


def _subset(items):
    return st.lists(st.sampled_from(items), min_size=1, max_size=len(items), unique=True)


def _probability():
    return st.floats(min_value=0.0, max_value=0.5, allow_nan=False)


def _lora():
    @st.composite
    def build(draw):
        targets = draw(_subset(PROJ))
        cfg = {"method": "lora", "target_modules": targets, "r": draw(st.integers(1, 8)),
               "alpha": draw(st.floats(0.5, 32.0)), "dropout": draw(_probability()),
               "use_rslora": draw(st.booleans()), "init": draw(st.sampled_from(["kaiming", "gaussian", "random"])),
               "bias": "none"}
        if draw(st.booleans()):
            cfg["rank_pattern"] = {draw(st.sampled_from(targets)): draw(st.integers(1, 8))}
        if draw(st.booleans()):
            cfg["alpha_pattern"] = {draw(st.sampled_from(targets)): draw(st.floats(0.5, 16.0))}
        if draw(st.booleans()):
            cfg["layers_to_transform"] = draw(_subset([0, 1]))
        return cfg

    bad = {"target_modules": BAD_TARGETS, "r": BAD_INT, "alpha": BAD_FLOAT, "dropout": [*BAD_FLOAT, 1.0, 2.0],
           "use_rslora": BAD_BOOL, "init": BAD_CHOICE, "bias": BAD_CHOICE, "rank_pattern": BAD_PATTERN_TABLE,
           "alpha_pattern": BAD_PATTERN_TABLE, "layers_to_transform": [[], [-1], ["0"], [0.5], "all", [7]]}
    return build(), bad


def _ia3():
    @st.composite
    def build(draw):
        targets = draw(_subset(["k_proj", "v_proj", "down_proj", "up_proj"]))
        ff = [t for t in targets if t in ("down_proj", "up_proj") and draw(st.booleans())]
        return {"method": "ia3", "target_modules": targets, "feedforward_modules": ff or None}

    return build(), {"target_modules": BAD_TARGETS, "feedforward_modules": [["nope_proj"], 5, ["re:("], [""]]}


def _adapter(method: str):
    size_key = "bottleneck_size" if method == "adapter" else "reduction_factor"

    @st.composite
    def build(draw):
        cfg = {"method": method, size_key: draw(st.integers(1, 16)), "dropout": draw(_probability())}
        if method == "low_rank_adapter":
            cfg["low_rank_size"] = draw(st.integers(1, 2))
        return cfg

    bad = {size_key: BAD_INT, "dropout": [*BAD_FLOAT, 1.0], "mode": BAD_CHOICE, "non_linearity": BAD_CHOICE,
           "placement": ["bogus", 3, ""]}
    return build(), bad


def _prefix():
    @st.composite
    def build(draw):
        return {"method": "prefix", "prefix_token_num": draw(st.integers(1, 4)), "mid_dim": draw(st.integers(1, 16)),
                "reparameterize": draw(st.booleans()), "dropout": draw(_probability())}

    return build(), {"prefix_token_num": BAD_INT, "mid_dim": BAD_INT, "reparameterize": BAD_BOOL,
                     "dropout": [*BAD_FLOAT, 1.0]}


def _ptuning():
    @st.composite
    def build(draw):
        return {"method": "ptuning_v2", "pre_seq_len": draw(st.integers(1, 4)),
                "prefix_projection": draw(st.booleans()), "projection_dim": draw(st.integers(1, 16))}

    return build(), {"pre_seq_len": BAD_INT, "prefix_projection": BAD_BOOL, "projection_dim": BAD_INT}


METHODS = {"lora": _lora(), "ia3": _ia3(), "adapter": _adapter("adapter"),
           "low_rank_adapter": _adapter("low_rank_adapter"), "prefix": _prefix(), "ptuning_v2": _ptuning()}


def _fingerprint(model: torch.nn.Module) -> tuple:
    return ([n for n, _ in model.named_modules()],
            [(n, p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()])


def _same(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and len(a[1]) == len(b[1]) and all(
        n1 == n2 and g1 == g2 and torch.equal(t1, t2) for (n1, g1, t1), (n2, g2, t2) in zip(a[1], b[1]))


def _is_refused(cfg_dict: dict) -> str:
    """'config' or 'apply' when the config is refused (as a DeltaError) at that stage; '' when it applies.
    Any other exception fails the test. A refusal by apply must leave the model untouched."""
    try:
        cfg = config_from_dict(cfg_dict)
    except DeltaError:
        return "config"
    model = copy.deepcopy(BASE)
    before = _fingerprint(model)
    try:
        dt.apply(model, cfg)
    except DeltaError:
        assert _same(_fingerprint(model), before), f"apply({cfg_dict}) raised but changed the model"
        assert dt.adapter_names(model) == []
        return "apply"
    out = run(model, X)
    assert out.shape == Y.shape and bool(torch.isfinite(out).all())
    assert dt.adapter_names(model) == ["default"]
    assert any(p.requires_grad for p in model.parameters())
    return ""


@pytest.mark.parametrize("method", sorted(METHODS))
def test_valid_configs_apply(method):
    valid, _ = METHODS[method]

    @SETTINGS
    @given(valid)
    def check(cfg):
        assert _is_refused(cfg) == "", f"a valid {method} config was refused: {cfg}"

    check()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_invalid_configs_raise_delta_errors_before_touching_the_model(method):
    valid, bad = METHODS[method]

    @st.composite
    def broken(draw):
        cfg = dict(draw(valid))
        if draw(st.integers(0, 9)) == 0:
            cfg[draw(st.sampled_from(["rr", "target_module", "alpah", "lr"]))] = 1  # an unknown key
        else:
            field = draw(st.sampled_from(sorted(bad)))
            cfg[field] = draw(st.sampled_from(bad[field]))
        return cfg

    @SETTINGS
    @given(broken())
    def check(cfg):
        assert _is_refused(cfg) in ("config", "apply"), f"an invalid {method} config was accepted: {cfg}"

    check()


# -- recipes -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def recipe_base(tmp_path_factory):
    model_dir, data_dir = tiny_assets()
    return recipe_dict(model_dir, data_dir, tmp_path_factory.mktemp("run"))


GOOD_RECIPE_CHANGES = {
    ("train", "lr"): st.floats(1e-6, 1.0),
    ("train", "max_steps"): st.integers(1, 1000),
    ("train", "batch_size"): st.integers(1, 64),
    ("train", "grad_accum_steps"): st.integers(1, 8),
    ("generate", "num_beams"): st.integers(1, 8),
    ("delta", "r"): st.integers(1, 16),
    ("delta", "alpha"): st.floats(0.5, 64.0),
    (None, "name"): st.from_regex(r"[a-z][a-z0-9_-]{0,12}", fullmatch=True),
}
BAD_RECIPE_CHANGES = {
    ("train", "lr"): [-1.0, 0.0, "fast", None, float("nan"), [1e-3]],
    ("train", "max_steps"): [0, -5, 1.5, "10"],
    ("train", "batch_size"): [0, "8", 2.5],
    ("train", "lrr"): [1e-3],
    ("generate", "num_beams"): [0, -1, "4", 1.5],
    ("delta", "r"): BAD_INT,
    ("delta", "method"): ["lorax", 5, None],
    ("delta", "target_modules"): [[], ["re:("], 5, ""],
    ("data", "dataset"): ["nope", 3],
    ("model", "nme"): ["x"],
    (None, "name"): ["../../escaped", "a/b", "..", 5],
    (None, "extra_section"): [{}],
}


def _changed(base: dict, where: tuple, value) -> dict:
    raw = copy.deepcopy(base)
    section, key = where
    if section is None:
        raw[key] = value
    else:
        raw[section] = {**(raw.get(section) or {}), key: value}
    return raw


@SETTINGS
@given(where=st.sampled_from(sorted(GOOD_RECIPE_CHANGES, key=str)), data=st.data())
def test_valid_recipe_changes_load(recipe_base, where, data):
    value = data.draw(GOOD_RECIPE_CHANGES[where])
    recipe = load_recipe(_changed(recipe_base, where, value), check_data=False)
    section, key = where
    got = getattr(recipe, key) if section is None else (
        recipe.delta_config().to_dict()[key] if section == "delta" else getattr(getattr(recipe, section), key))
    assert got == value or (isinstance(value, float) and math.isclose(got, value))
    model = dt.apply(copy.deepcopy(BASE), recipe.delta_config())  # the recipe's method config applies
    assert dt.adapter_names(model) == ["default"]


@SETTINGS
@given(where=st.sampled_from(sorted(BAD_RECIPE_CHANGES, key=str)), data=st.data())
def test_invalid_recipe_changes_raise_delta_errors(recipe_base, where, data):
    value = data.draw(st.sampled_from(BAD_RECIPE_CHANGES[where]))
    raw = _changed(recipe_base, where, value)
    try:
        recipe = load_recipe(raw, check_data=False)
    except DeltaError:
        return
    # accepted by the loader only if the method config is refused when applied (patterns need a model)
    model = copy.deepcopy(BASE)
    before = _fingerprint(model)
    with pytest.raises(DeltaError):
        dt.apply(model, recipe.delta_config())
    assert _same(_fingerprint(model), before)
