"""The one ``--set section.key=value`` override parser of every subcommand (run, finetune, generate,
evaluate, sweep, perplexity, align; ``info`` imports :func:`parse_override`).

:func:`parse_override` turns one ``KEY=VALUE`` argument into a key path and a YAML value (``1e-3`` is a
float, ``true`` a bool, ``[q_proj, v_proj]`` a list, ``null`` None; text that is not YAML, such as
``" ||"``, is kept verbatim). :func:`apply_overrides` applies a list of them to a raw YAML mapping
under an :class:`OverrideSchema`: which top-level keys exist, which of them hold a mapping, and which
of those are fixed-schema sections whose keys take plain values. The schemas of the data-to-text
recipe (:data:`RECIPE_SCHEMA`), the sweep configs (:mod:`deltatune.sweep`) and the perplexity config
(:mod:`deltatune.tasks.lm`) are instances; the keys inside a section are checked once, by the loader
of the config (:func:`deltatune.tasks.loader.load_recipe`, the task configs' ``from_dict``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from ..errors import DeltaConfigError, DeltaConfigTypeError
from ..io_utils import yaml_load
from ..validation import check_type
from .layout import descend
from .spec import MAPPING_SECTIONS, SECTIONS

__all__ = ["RECIPE_SCHEMA", "OverrideSchema", "apply_overrides", "parse_override"]


@dataclass(frozen=True)
class OverrideSchema:
    """What ``--set`` may address in one kind of config.

    Attributes:
        what: the config's name in messages (``"recipe"``, ``"sweep config"`` ...).
        keys: the top-level keys.
        mapping_keys: the top-level keys that hold a mapping (``KEY.SUB=VALUE`` goes inside them).
        fixed_sections: mapping keys whose keys take values, not sub-keys (``train``, ``data`` ...);
            in the other mapping keys (``delta``, ``methods``) deeper paths are allowed.
        rewrite: maps a key path (and its value) before it is applied: the old flat layout's paths of a
            task (:func:`deltatune.tasks.layout.legacy_override`); ``None`` keeps paths as given.
    """

    what: str
    keys: tuple[str, ...]
    mapping_keys: tuple[str, ...]
    fixed_sections: tuple[str, ...]
    rewrite: Callable[[list[str], Any], list[str]] | None = None


#: ``--set`` in a data-to-text recipe: ``train.lr=1e-3``, ``delta.rank_pattern.q_proj=8``, ``output_dir=runs/x``.
RECIPE_SCHEMA = OverrideSchema(
    "recipe", SECTIONS, MAPPING_SECTIONS, tuple(s for s in MAPPING_SECTIONS if s != "delta")
)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse one ``--set`` argument ``"a.b=value"`` into ``(["a", "b"], value)``.

    The value is parsed as YAML (``1e-3`` is a float too); text that is not valid YAML (``" ||"``) is
    taken verbatim as a string. An empty value is ``None``.
    """
    check_type("override", text, str, "a str 'section.key=value'")
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise DeltaConfigError(f"--set expects KEY=VALUE (e.g. train.lr=1e-3), got {text!r}")
    parts = key.split(".")
    if any(not p for p in parts):
        raise DeltaConfigError(f"--set key {key!r} has an empty component (in {text!r})")
    try:
        value = yaml_load(raw) if raw.strip() else None
    except yaml.constructor.ConstructorError as exc:  # valid syntax, refused content (a duplicate key)
        raise DeltaConfigError(f"--set {text!r}: {exc.problem}") from None
    except yaml.YAMLError:
        value = raw  # not YAML (e.g. " ||"): the text itself, verbatim
    return parts, value


def apply_overrides(
    raw: Mapping[str, Any],
    overrides: Sequence[str | tuple[Sequence[str], Any]],
    schema: OverrideSchema = RECIPE_SCHEMA,
) -> dict[str, Any]:
    """Return a copy of ``raw`` with ``--set``-style overrides applied, in order.

    Keys are ``section.key`` (``train.lr``), a top-level key (``output_dir``, ``name``), a whole
    section given as a YAML mapping (``delta={method: bitfit}``) or, inside a section that is not
    fixed (``delta``, ``methods``), deeper paths (``delta.rank_pattern.q_proj=8``). An unknown
    top-level key raises ``DeltaConfigError`` naming it and listing the known ones; a section's own
    keys are checked by the config's loader. An item may also be an already-parsed ``(key path, value)``
    pair (programmatic overrides: the value is used as it is).
    """
    check_type(f"raw {schema.what}", raw, Mapping, "a mapping")
    if isinstance(overrides, str) or not isinstance(overrides, Sequence):
        raise DeltaConfigTypeError(f"overrides must be a list of 'key=value' strings, got {overrides!r}")
    out = copy.deepcopy(dict(raw))
    for item in overrides:
        if isinstance(item, tuple):
            parts, value = [str(p) for p in item[0]], item[1]
            text = f"{'.'.join(parts)}={value!r}"
        else:
            parts, value = parse_override(item)
            text = item
        if schema.rewrite is not None:
            parts = schema.rewrite(parts, value)
        top = parts[0]
        if top not in schema.keys:
            raise DeltaConfigError(
                f"--set {text!r}: unknown {schema.what} key {top!r}; known keys: {', '.join(schema.keys)}"
            )
        if len(parts) == 1:
            if top in schema.mapping_keys and not isinstance(value, Mapping):
                raise DeltaConfigError(
                    f"--set {text!r}: {top!r} is a section; set one of its keys ({top}.KEY=VALUE) or give a "
                    f"YAML mapping, got {value!r}"
                )
            out[top] = value
            continue
        if top not in schema.mapping_keys:
            raise DeltaConfigError(f"--set {text!r}: {top!r} is not a section, write {top}=VALUE")
        if top in schema.fixed_sections and len(parts) > 2:
            raise DeltaConfigError(f"--set {text!r}: {'.'.join(parts[:2])!r} takes a value, not sub-keys")
        node = descend(out, [top], lambda k, v, text=text: DeltaConfigError(
            f"--set {text!r}: {schema.what} section {k!r} is not a mapping ({v!r})"))
        node = descend(node, parts[1:-1], lambda k, v, text=text: DeltaConfigError(
            f"--set {text!r}: {k!r} holds {v!r}, not a mapping"))
        node[parts[-1]] = value
    return out
