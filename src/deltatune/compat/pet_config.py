"""MindFormers' ``pet_config`` section, mapped to deltatune configs.

A MindFormers model YAML carries its delta-tuning settings under ``model.model_config.pet_config``::

    pet_config:
      pet_type: lora
      lora_rank: 8
      lora_alpha: 16
      lora_dropout: 0.1
      target_modules: ".*q_proj|.*v_proj"

:func:`from_pet_config` turns such a mapping (or a whole MindFormers YAML, or ``{"pet_config": ...}``)
into the matching deltatune config; :func:`deltatune.load_config`, a recipe's ``delta:`` section and
the CLI (which use it) accept the same. The mapping is printed once per distinct ``pet_config`` in a
process (``lora_rank -> r = 8``). A key with no counterpart, an unknown ``pet_type`` or a bad value
is a :class:`~deltatune.errors.DeltaConfigError` naming it, raised before anything is applied.

The mapping (``PET_TYPES`` and ``KEYS`` below):

========================  ====================  ==========================================================
pet_type                  deltatune method      keys
========================  ====================  ==========================================================
``lora``                  ``lora``              lora_rank -> r, lora_alpha -> alpha, lora_dropout -> dropout,
                                                target_modules
``prefixtuning``          ``prefix``            prefix_token_num, mid_dim, dropout_rate -> dropout
``ptuning2``              ``ptuning_v2``        pre_seq_len, prefix_projection, projection_dim,
                                                dropout_rate -> dropout
``adapter``               ``adapter``           bottleneck_size, non_linearity, target_modules
``low_rank_adapter``      ``low_rank_adapter``  reduction_factor, low_rank_size, low_rank_w_init,
                                                non_linearity, target_modules
``bitfit``                ``bitfit``            target_modules
========================  ====================  ==========================================================

and for every type ``freeze_exclude`` -> ``modules_to_save`` (parameters kept trainable; the
wildcards are matched against module names) and ``freeze_include`` (only empty: deltatune already
freezes every parameter that is not the delta's). Two values change on the way, as MindPet computes
them: ``non_linearity: gelu`` becomes ``"gelu_tanh"`` (MindSpore's GELU is the tanh approximation),
and a Low-Rank Adapter gets ``identity_init=False`` (MindPet initialises both factors of both
projections with ``low_rank_w_init``).

``target_modules`` is MindFormers' regex string; deltatune matches it against the full module name
(``".*q_proj|.*v_proj"``). MindFormers' own layer names (``dense1``, ``wq``...) exist in no Hugging
Face model: applying such a config raises :class:`~deltatune.errors.TargetNotFoundError` saying so and
naming the model's linear layers.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import DeltaConfigError, DeltaConfigTypeError
from ..methods import make_config
from ..methods.base import DeltaConfig

__all__ = ["KEYS", "PET_TYPES", "find_pet_config", "from_pet_config", "is_pet_config", "map_pet_config"]

#: MindFormers ``pet_type`` -> deltatune method name.
PET_TYPES: dict[str, str] = {
    "lora": "lora",
    "prefixtuning": "prefix",
    "ptuning2": "ptuning_v2",
    "adapter": "adapter",
    "low_rank_adapter": "low_rank_adapter",
    "bitfit": "bitfit",
}

#: per ``pet_type``: MindFormers key -> deltatune field.
KEYS: dict[str, dict[str, str]] = {
    "lora": {"lora_rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "target_modules"},
    "prefixtuning": {"prefix_token_num": "prefix_token_num", "mid_dim": "mid_dim", "dropout_rate": "dropout"},
    "ptuning2": {
        "pre_seq_len": "pre_seq_len",
        "prefix_projection": "prefix_projection",
        "projection_dim": "projection_dim",
        "dropout_rate": "dropout",
    },
    "adapter": {"bottleneck_size": "bottleneck_size", "non_linearity": "non_linearity", "target_modules": "target_modules"},
    "low_rank_adapter": {
        "reduction_factor": "reduction_factor",
        "low_rank_size": "low_rank_size",
        "low_rank_w_init": "low_rank_w_init",
        "non_linearity": "non_linearity",
        "target_modules": "target_modules",
    },
    "bitfit": {"target_modules": "target_modules"},
}
_COMMON = ("pet_type", "freeze_include", "freeze_exclude")

# values MindPet computes differently from our defaults: deltatune field -> (transform, note)
_VALUE_MAPS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "non_linearity": (
        lambda v: "gelu_tanh" if v == "gelu" else v,
        "MindSpore's gelu is the tanh approximation",
    ),
}
# fields set for a pet_type whatever the YAML says: MindPet's initialisation
_FIXED: dict[str, dict[str, tuple[Any, str]]] = {
    "low_rank_adapter": {"identity_init": (False, "MindPet initialises every factor with low_rank_w_init")},
    "adapter": {"non_linearity": ("gelu_tanh", "MindPet's default gelu, the tanh approximation")},
}

_PRINTED: set[str] = set()


def is_pet_config(data: Any) -> bool:
    """Does ``data`` look like a MindFormers ``pet_config`` (or a YAML holding one) rather than a deltatune config?"""
    return isinstance(data, Mapping) and "method" not in data and find_pet_config(data) is not None


def find_pet_config(data: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The ``pet_config`` mapping in ``data``: ``data`` itself (a ``pet_type`` key), ``data["pet_config"]``,
    or ``data["model"]["model_config"]["pet_config"]`` (a whole MindFormers model YAML); None if absent."""
    if "pet_type" in data:
        return data
    if isinstance(data.get("pet_config"), Mapping):
        return data["pet_config"]
    model = data.get("model")
    model_config = model.get("model_config") if isinstance(model, Mapping) else None
    if isinstance(model_config, Mapping) and isinstance(model_config.get("pet_config"), Mapping):
        return model_config["pet_config"]
    return None


def map_pet_config(pet_config: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The deltatune config dict for ``pet_config`` and the mapping lines (``"lora_rank -> r = 8"``).

    Raises :class:`DeltaConfigError` for a missing/unknown ``pet_type`` or a key with no counterpart.
    """
    if not isinstance(pet_config, Mapping):
        raise DeltaConfigTypeError(f"pet_config must be a mapping, got {type(pet_config).__name__}")
    pet_type = pet_config.get("pet_type")
    if pet_type is None:
        raise DeltaConfigError(f"pet_config needs a 'pet_type' key, one of {sorted(PET_TYPES)}; got keys {sorted(pet_config)}")
    if not isinstance(pet_type, str) or pet_type.lower() not in PET_TYPES:
        raise DeltaConfigError(
            f"pet_config.pet_type must be one of {sorted(PET_TYPES)} (MindFormers types deltatune maps), got {pet_type!r}"
        )
    pet_type = pet_type.lower()
    keys = KEYS[pet_type]
    unknown = sorted(k for k in pet_config if k not in keys and k not in _COMMON)
    if unknown:
        raise DeltaConfigError(
            f"pet_config key(s) {unknown} have no deltatune counterpart for pet_type {pet_type!r}; "
            f"known keys: {sorted([*keys, *_COMMON])}"
        )
    method = PET_TYPES[pet_type]
    out: dict[str, Any] = {"method": method}
    lines = [f"pet_type {pet_type!r} -> method {method!r}"]
    for key, field in keys.items():
        if key not in pet_config:
            continue
        value = pet_config[key]
        note = ""
        if field in _VALUE_MAPS:
            fn, why = _VALUE_MAPS[field]
            mapped = fn(value)
            if mapped != value:
                note = f" (from {value!r}: {why})"
            value = mapped
        out[field] = value
        lines.append(f"{key} -> {field} = {value!r}{note}")
    for field, (value, why) in _FIXED.get(pet_type, {}).items():
        if field not in out:
            out[field] = value
            lines.append(f"(not given) -> {field} = {value!r} ({why})")
    include = pet_config.get("freeze_include")
    if include:
        raise DeltaConfigError(
            f"pet_config.freeze_include has no deltatune counterpart unless empty (deltatune freezes every "
            f"parameter that is not the delta's already), got {include!r}"
        )
    exclude = pet_config.get("freeze_exclude")
    if exclude:
        if isinstance(exclude, str):
            exclude = [exclude]
        out["modules_to_save"] = list(exclude)
        lines.append(f"freeze_exclude -> modules_to_save = {list(exclude)!r} (trained in full and saved with the delta)")
    return out, lines


def from_pet_config(data: Mapping[str, Any], *, announce: bool = True) -> DeltaConfig:
    """The deltatune config for a ``pet_config`` mapping, ``{"pet_config": ...}`` or a whole MindFormers YAML.

    The mapping is printed (to stderr) once per distinct ``pet_config`` when ``announce`` is true.
    """
    if not isinstance(data, Mapping):
        raise DeltaConfigTypeError(f"pet_config must be a mapping, got {type(data).__name__}")
    pet = find_pet_config(data)
    if pet is None:
        raise DeltaConfigError(
            "no MindFormers pet_config found: expected a 'pet_type' key, a 'pet_config' mapping or "
            f"model.model_config.pet_config; got keys {sorted(data)}"
        )
    mapped, lines = map_pet_config(pet)
    config = make_config(mapped)
    key = repr(sorted((k, repr(v)) for k, v in pet.items()))
    if announce and key not in _PRINTED:
        _PRINTED.add(key)
        print(f"MindFormers pet_config -> {type(config).__name__}:\n  " + "\n  ".join(lines), file=sys.stderr)
    return config
