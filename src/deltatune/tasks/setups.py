"""What ``deltatune info --config FILE`` shows: the method setups a config would apply, per method.

:func:`config_setups` reads any config of :mod:`deltatune.tasks` (a bare method config, a data-to-text
recipe or sweep, a classification config or sweep, a perplexity config or sweep; sectioned or old flat
layout) and returns one :class:`InfoSetup` per method: the method config its pipeline would build,
the model it names, what the model is loaded as and, for classification, the head. Nothing is loaded.
``--set`` takes method-config fields (``r=16``, ``delta.r=16``: every method shown;
``methods.NAME.config.r=16``: one method of a sweep) and the config's own keys (``model.name_or_path=X``,
``model.pooling=cls``, ``data.dataset=stsb``; old flat paths too), applied by the one override parser.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..compat.pet_config import is_pet_config
from ..config import config_from_dict
from ..data import glue_task
from ..errors import DataFormatError, DeltaConfigError
from ..io_utils import load_json_file, load_yaml_file
from .classification import CLASSIFICATION_SCHEMA, DEFAULT_METHOD_CONFIGS, sweep_method_names
from .layout import LAYOUTS, SWEEP_SECTIONS, flatten, task_of, to_sections
from .lm import PERPLEXITY_SCHEMA
from .overrides import RECIPE_SCHEMA, OverrideSchema, apply_overrides, parse_override
from .spec import FULL

__all__ = ["InfoSetup", "config_setups"]

_SCHEMAS: dict[str, OverrideSchema] = {
    "classification": CLASSIFICATION_SCHEMA,
    "perplexity": PERPLEXITY_SCHEMA,
    "data-to-text": RECIPE_SCHEMA,
}


@dataclasses.dataclass
class InfoSetup:
    """One method of an ``info`` config: what its pipeline would apply, to which model, loaded how."""

    label: str  # where it comes from: "delta", "methods.lora", ...
    method: str  # a registered method or "full"
    config: Any  # the DeltaConfig; None for full fine-tuning
    model: str | None = None  # the model the config names (None: a bare method config)
    task: str | None = None  # what the pipeline loads the model as (None: not fixed by the config)
    dtype: str | None = None
    num_labels: int | None = None  # classification configs: the head's size ...
    pooling: str | None = None  # ... and the pooling (tasks.heads.build_classifier)
    head_dropout: float = 0.1


def config_setups(path: str, overrides: Sequence[str] = (), method: str | None = None) -> list[InfoSetup]:
    """The setups of the config file ``path`` with ``overrides`` (``--set``) applied: one for a method
    config, a recipe or a perplexity config, one per method of a sweep or a classification config
    (``method`` picks one). Nothing is loaded.

    Raises:
        DeltaConfigError: a missing file, a config info cannot read, an unknown method or key.
        DataFormatError: invalid YAML / JSON.
    """
    p = Path(path)
    if not p.is_file():
        raise DeltaConfigError(f"--config must be an existing YAML/JSON file, got {path!r}")
    data = load_json_file(p, "--config") if p.suffix == ".json" else load_yaml_file(p, "--config")
    if not isinstance(data, dict):
        raise DataFormatError(f"{p}, line 1: expected a mapping with a 'method' key, got {type(data).__name__}")
    kind = None if "method" in data or is_pet_config(data) else task_of(data)
    if kind in LAYOUTS:  # a classification or perplexity config: read in the sectioned layout
        data = to_sections(data, LAYOUTS[kind])
    schema = _SCHEMAS.get(kind or "")
    fields: dict[str, Any] = {}  # --set KEY=VALUE / delta.KEY=VALUE: every method shown
    per_method: dict[str, dict[str, Any]] = {}  # --set methods.NAME.config.KEY=VALUE
    config_sets: list[str] = []  # --set model.name_or_path=..., data.dataset=... : the config's own keys
    for text_ in overrides:
        parts, value = parse_override(text_)
        if len(parts) == 4 and parts[0] == "methods" and parts[2] == "config":
            per_method.setdefault(parts[1], {})[parts[3]] = value
            continue
        if schema is not None and parts[0] != "delta":
            mapped = schema.rewrite(parts, value) if schema.rewrite is not None else parts
            if mapped[0] in schema.keys and mapped[0] not in ("delta", "methods"):
                config_sets.append(text_)
                continue
        if parts[0] == "delta":
            parts = parts[1:]
        if len(parts) != 1:
            raise DeltaConfigError(
                f"--set {text_!r}: info takes method-config fields (r=16 or delta.r=16; in a sweep config "
                f"methods.NAME.config.r=16) and the config's own keys (model.name_or_path=NAME, ...)"
            )
        fields[parts[0]] = value
    if config_sets:
        data = apply_overrides(data, config_sets, schema)  # type: ignore[arg-type]
    if kind in LAYOUTS:
        flatten(data, LAYOUTS[kind], extra_top=SWEEP_SECTIONS)  # the one check of the layout's keys

    def build(m: str, given: Mapping[str, Any], where: str, defaults: Mapping[str, Any] = {}) -> Any:
        if m == FULL:
            extra = sorted({*given, *fields})
            if extra:
                raise DeltaConfigError(f"{where}: full fine-tuning takes no method-config fields, got {extra}")
            return None
        return config_from_dict({**defaults, **given, **fields})

    recipe_sweep = kind != "classification" and isinstance(data.get("delta"), Mapping) and isinstance(
        data.get("methods"), Mapping
    )
    is_sweep = kind == "classification"
    if not is_sweep and not recipe_sweep and per_method:
        raise DeltaConfigError(f"--set methods.NAME.config.KEY=VALUE needs a sweep config, got {path!r}")
    if is_sweep:
        model_spec = data.get("model") or {}
        task_name = (data.get("data") or {}).get("dataset")
        if task_name == "csv":
            raise DeltaConfigError(
                f"info cannot size the head of {path!r}: a csv task counts its labels from the data files; "
                f"use a GLUE task config"
            )
        info = glue_task(task_name)
        common = {"model": model_spec.get("name_or_path", "minilm-l6"), "dtype": model_spec.get("dtype"),
                  "num_labels": info.num_labels, "pooling": model_spec.get("pooling", "auto"),
                  "head_dropout": model_spec.get("head_dropout", 0.1)}
        known = sweep_method_names()
        given = data.get("methods") or {}
        if not isinstance(given, Mapping):
            raise DataFormatError(f"{p}: 'methods' must be a mapping method -> {{lr, config}}, got {given!r}")
        delta = dict(data.get("delta") or {})
        own = {k: v for k, v in delta.items() if k != "method"}
        if delta and "methods" not in data and "sweep" not in data:  # one classification run
            names = [delta.get("method")]
            configs = {delta.get("method"): own}
        else:
            listed = (data.get("sweep") or {}).get("methods") or []
            names = list(dict.fromkeys([*given, *listed])) or known
            configs = {m: {**(own if delta.get("method") == m else {}), **((given.get(m) or {}).get("config") or {})}
                       for m in names}
        for m in [*names, *per_method]:
            if m not in known:
                raise DeltaConfigError(f"{path}: unknown method {m!r}; known methods: {', '.join(known)}")
        if method is not None:
            if method not in known:
                raise DeltaConfigError(f"--method must be one of {', '.join(known)}, got {method!r}")
            names = [method]
            configs.setdefault(method, {})
        _check_shown(per_method, names)
        out = []
        for m in names:
            mine = {**configs[m], **per_method.get(m, {})}
            cfg = build(m, mine if m == FULL else {**mine, "method": m}, f"{path} methods.{m}", DEFAULT_METHOD_CONFIGS.get(m, {}))
            out.append(InfoSetup(f"methods.{m}", m, cfg, **common))
        return out
    if recipe_sweep:  # a data-to-text / perplexity recipe with a sweep: the recipe's delta, then each method
        model, dtype = _model_of(data)
        base = dict(data["delta"])
        names = list(dict.fromkeys([*data["methods"], *((data.get("sweep") or {}).get("methods") or [])]))
        if method is not None:
            if method not in names:
                raise DeltaConfigError(f"--method {method!r}: {path} sweeps the methods {names}")
            names = [method]
        _check_shown(per_method, names)
        out = []
        for m in names:
            own = {**((data["methods"].get(m) or {}).get("config") or {}), **per_method.get(m, {})}
            given = {**base, **own} if m == base.get("method") else {**own, "method": m}
            cfg = build(m, {} if m == FULL else given, f"{path} methods.{m}")
            out.append(InfoSetup(f"methods.{m}", m, cfg, model, "causal-lm", dtype))
        return out
    if "method" in data or is_pet_config(data) or not isinstance(data.get("delta"), Mapping):
        delta, model, task, dtype, where = data, None, None, None, "--config"
    else:  # a recipe (model: {name_or_path}) or a perplexity config (model: NAME)
        delta, where, task = data["delta"], "delta", "causal-lm"
        model, dtype = _model_of(data)
    if "method" not in delta and not is_pet_config(delta):
        raise DeltaConfigError(
            f"{path} is not a config info reads: a method config has a 'method' key, a recipe or perplexity config "
            f"a 'delta' section, a classification config data.dataset (a GLUE task); got keys {sorted(data)}"
        )
    name = delta.get("method")
    given = {k: v for k, v in delta.items() if k != "method"} if name == FULL else dict(delta)
    cfg = build(str(name), given, f"{path} {where}")
    m = FULL if cfg is None else cfg.method
    if method is not None and method != m:
        raise DeltaConfigError(f"--method {method!r}: {path} has the one method {m!r}")
    return [InfoSetup(where, m, cfg, model, task, dtype)]


def _check_shown(per_method: Mapping[str, Any], names: Sequence[str]) -> None:
    """``--set methods.NAME.config...`` must name one of the methods ``info`` shows."""
    missing = sorted(set(per_method) - set(names))
    if missing:
        raise DeltaConfigError(f"--set methods.{missing[0]}.config...: {missing[0]!r} is not among the methods shown {list(names)}")


def _model_of(data: Mapping[str, Any]) -> tuple[Any, Any]:
    """(model name or path, dtype) a recipe or perplexity config names (``model: NAME`` or ``model: {...}``)."""
    spec = data.get("model")
    if isinstance(spec, Mapping):
        return spec.get("name_or_path"), spec.get("dtype")
    return spec, data.get("dtype")
