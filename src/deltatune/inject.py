"""Finding target modules by name (exact, suffix, wildcard, regex, "all-linear") and replacing them.

Owns the target-spec syntax (:func:`match_pattern`, :func:`check_patterns`), target selection
(:func:`select_targets`) and :func:`replace_module`. Imports only :mod:`deltatune.errors` and
:mod:`deltatune.delta_layer` (to see through wrappers).

Names are *logical*: the module paths of the original model, unaffected by delta wrappers
(``...q_proj`` stays ``...q_proj`` even when the module there is a LoRA wrapper whose original
layer sits at ``...q_proj.base_layer``).
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch.nn as nn

from .delta_layer import DeltaLayer, unwrap
from .errors import DeltaConfigError, TargetNotFoundError

__all__ = [
    "ModuleSlot",
    "iter_module_slots",
    "match_pattern",
    "layer_index",
    "select_targets",
    "is_gpt2_conv1d",
    "is_linear_like",
    "output_layer_names",
    "replace_module",
]

_REGEX_CHARS = set("^$()[]{}+?|\\*")
DEFAULT_LAYER_PATTERNS = ("layers", "h", "layer", "blocks", "block")


@dataclass
class ModuleSlot:
    """A module in the logical tree, with the real parent and attribute that hold it."""

    name: str
    module: nn.Module
    parent: nn.Module | None
    attr: str | None


def iter_module_slots(model: nn.Module) -> Iterator[ModuleSlot]:
    """Yield every module under its logical name; delta wrappers are yielded but not entered,
    except for their base layer's children (which keep the logical prefix)."""

    def visit(prefix: str, module: nn.Module, parent: nn.Module | None, attr: str | None) -> Iterator[ModuleSlot]:
        yield ModuleSlot(prefix, module, parent, attr)
        inner = module
        while isinstance(inner, DeltaLayer):
            inner = inner.base_layer
        for child_name, child in inner.named_children():
            yield from visit(f"{prefix}.{child_name}" if prefix else child_name, child, inner, child_name)

    yield from visit("", model, None, None)


def _pattern_kind(pattern: str) -> tuple[str, str]:
    if pattern.startswith("re:"):
        return "regex", pattern[3:]
    if any(c in pattern for c in "*?["):
        return "glob", pattern
    return "name", pattern


def match_pattern(name: str, pattern: str) -> bool:
    """Does logical module ``name`` match one entry of a target list?"""
    kind, pat = _pattern_kind(pattern)
    if kind == "regex":
        try:
            return re.fullmatch(pat, name) is not None
        except re.error as exc:  # configs check their patterns; this catches any other caller's
            raise DeltaConfigError(f"module pattern {pattern!r} is not a valid regular expression: {exc}") from None
    if kind == "glob":
        return fnmatch.fnmatchcase(name, pat) or fnmatch.fnmatchcase(name, "*." + pat)
    return name == pat or name.endswith("." + pat)


def normalise_patterns(spec: str | Sequence[str] | None) -> list[str] | None:
    """Turn a config's target spec into a list of list-style entries."""
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec == "all-linear":
            return ["all-linear"]
        if any(c in _REGEX_CHARS for c in spec):
            return ["re:" + spec]
        return [spec]
    return list(spec)


def check_patterns(field: str, spec: str | Sequence[str] | None) -> None:
    """Every regex entry of a target spec (``"re:..."``, or a single string with regex syntax) must
    compile; raises :class:`~deltatune.errors.DeltaConfigError` naming ``field``, the entry and the error."""
    for entry in normalise_patterns(spec) or []:
        kind, pat = _pattern_kind(entry)
        if kind != "regex":
            continue
        try:
            re.compile(pat)
        except re.error as exc:
            raise DeltaConfigError(f"{field} entry {entry!r} is not a valid regular expression: {exc}") from None


def layer_index(name: str, patterns: Sequence[str] | None = None) -> int | None:
    """The layer number in a name like ``model.layers.3.mlp`` (None when there is none)."""
    for pat in patterns or DEFAULT_LAYER_PATTERNS:
        m = re.search(rf"(?:^|\.){re.escape(pat)}\.(\d+)(?:\.|$)", name)
        if m:
            return int(m.group(1))
    return None


def is_gpt2_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D`` (a linear layer with its weight stored ``(in, out)``)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear or transformers' GPT-2 Conv1D."""
    return isinstance(module, nn.Linear) or is_gpt2_conv1d(module)


def output_layer_names(model: nn.Module) -> set[str]:
    """Names of the output projection(s) (tied LM head, classifier) that "all-linear" leaves out."""
    names: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = None
    if callable(get_out):
        try:
            out = get_out()
        except (NotImplementedError, AttributeError):
            out = None
    for slot in iter_module_slots(model):
        leaf = slot.name.rsplit(".", 1)[-1]
        if (out is not None and slot.module is out) or leaf in ("lm_head", "score", "classifier", "cls", "qa_outputs"):
            names.add(slot.name)
    return names


def _closest(names: list[str], patterns: Sequence[str]) -> list[str]:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names if n})
    out: list[str] = []
    for p in patterns:
        probe = p[3:] if p.startswith("re:") else p
        probe = probe.rsplit(".", 1)[-1].strip("*")
        out += difflib.get_close_matches(probe, leaves, n=5, cutoff=0.4)
    seen: list[str] = []
    for c in out + leaves[:10]:
        if c not in seen:
            seen.append(c)
    return seen[:10]


#: layer names of MindFormers / MindSpore model zoos (seed 003's examples) that Hugging Face models never use
_MINDFORMERS_LAYER_NAMES = ("dense1", "dense2", "dense3", "wq", "wk", "wv", "wo", "w1", "w2", "w3", "w_qkv",
                            "query_key_value", "dense_h_to_4h", "dense_4h_to_h")


def _foreign_names_hint(patterns: Sequence[str], slots: list[ModuleSlot]) -> str:
    """A note when unmatched patterns use MindFormers layer names, listing the linear layers that exist."""
    foreign = [n for n in _MINDFORMERS_LAYER_NAMES if any(re.search(rf"(?<![A-Za-z0-9_]){n}(?![A-Za-z0-9_])", p)
                                                           for p in patterns)]
    if not foreign:
        return ""
    linear = sorted({s.name.rsplit(".", 1)[-1] for s in slots if is_linear_like(unwrap(s.module))})
    return (
        f". {foreign} are MindFormers layer names, which mean nothing in a Hugging Face model; the linear "
        f"layers of this model are named {linear}; write target_modules with these"
    )


def select_targets(
    model: nn.Module,
    target_modules: str | Sequence[str] | None,
    *,
    exclude_modules: str | Sequence[str] | None = None,
    layers_to_transform: Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
    what: str = "target_modules",
    skip: set[str] | None = None,
) -> list[ModuleSlot]:
    """Resolve a target spec to module slots, in model order.

    Raises :class:`TargetNotFoundError` when an entry matches no module (naming the closest
    module names), so a typo is never silently ignored.
    """
    patterns = normalise_patterns(target_modules) or []
    excludes = normalise_patterns(exclude_modules) or []
    lp = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    slots = [s for s in iter_module_slots(model) if s.name and s.parent is not None]
    names = [s.name for s in slots]
    out_names = output_layer_names(model) if "all-linear" in patterns else set()

    def hit(slot: ModuleSlot, pattern: str) -> bool:
        if pattern == "all-linear":
            return is_linear_like(unwrap(slot.module)) and slot.name not in out_names
        return match_pattern(slot.name, pattern)

    unmatched = [p for p in patterns if not any(hit(s, p) for s in slots)]
    if unmatched:
        raise TargetNotFoundError(
            f"{what} entr{'y' if len(unmatched) == 1 else 'ies'} {unmatched} matched no module of "
            f"{type(model).__name__}; closest module names: {_closest(names, unmatched)}"
            + _foreign_names_hint(unmatched, slots)
        )
    bad_ex = [p for p in excludes if not any(match_pattern(s.name, p) for s in slots)]
    if bad_ex:
        raise TargetNotFoundError(
            f"exclude_modules entr{'y' if len(bad_ex) == 1 else 'ies'} {bad_ex} matched no module of "
            f"{type(model).__name__}; closest module names: {_closest(names, bad_ex)}"
        )
    chosen: list[ModuleSlot] = []
    for slot in slots:
        if skip and slot.name in skip:
            continue
        if not any(hit(slot, p) for p in patterns):
            continue
        if any(match_pattern(slot.name, p) for p in excludes):
            continue
        if layers_to_transform is not None:
            idx = layer_index(slot.name, lp)
            if idx is None or idx not in layers_to_transform:
                continue
        chosen.append(slot)
    if not chosen:
        raise TargetNotFoundError(
            f"{what}={list(patterns)} with exclude_modules={excludes or None}, "
            f"layers_to_transform={list(layers_to_transform) if layers_to_transform is not None else None} "
            f"selects no module of {type(model).__name__}; closest module names: {_closest(names, patterns)}"
        )
    return chosen


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` in place of the module at ``path`` (its real dotted path under ``model``)."""
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, new)
