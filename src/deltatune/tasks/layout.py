"""The one config layout of the classification / regression and perplexity tasks, and the one mapping
of the old flat files onto it.

Every task reads the sectioned layout of the data-to-text recipe (:mod:`deltatune.tasks.spec`)::

    name: sst2_cpu                 # top-level run fields: name, output_dir, num_threads
    output_dir: runs/sweep/sst2_cpu
    num_threads: 1
    model: {name_or_path: minilm-l6, dtype: null, pooling: mean, head_dropout: 0.1}
    data: {dataset: sst2, data_dir: ../shared/data, max_length: 64, max_train_examples: 800, ...}
    delta: {method: lora, r: 8}    # one run's method (a sweep: the base of its own method)
    train: {seed: 42, device: cpu, epochs: 1, batch_size: 16, lr: 2.0e-3, ...}   # TrainConfig fields
    eval: {...}                    # perplexity: split, max_tokens, max_length, stride, batch_size
    methods: {lora: {lr: 2.0e-3, config: {r: 8}}}   # a sweep: per-method lr / config / train
    sweep: {methods: [full, lora], seeds: [1]}

This module owns, per task, the table :data:`LAYOUTS` (:class:`TaskLayout`): the top-level keys, the
sections with their known keys (the one list of known keys and the one check of them,
:func:`flatten`), and which field of the task's dataclass
(:class:`~deltatune.tasks.classification.ClassificationConfig`,
:class:`~deltatune.tasks.lm.PerplexityConfig`) each key fills. The same table, read backwards, maps the
flat layout of earlier releases (``model: minilm-l6``, ``task: sst2``, ``data_dir``, ``pooling``,
``max_length``, ``seed``, ``device`` at the top, ``method`` / ``method_config``) onto the sections:
:func:`to_sections` for a file, :func:`legacy_override` for a ``--set`` path; it is the only place
that knows the old names. :func:`task_of` tells which task a YAML mapping configures, in either layout.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..data import DATA_TO_TEXT_DATASETS, GLUE_TASKS
from ..errors import DeltaConfigError, DeltaConfigTypeError
from ..validation import check_choice

__all__ = [
    "CLASSIFICATION",
    "LAYOUTS",
    "PERPLEXITY",
    "PERPLEXITY_DATASETS",
    "SWEEP_SECTIONS",
    "TaskLayout",
    "flatten",
    "legacy_override",
    "task_of",
    "to_sections",
]

#: ``data.dataset`` of a perplexity config (WikiText-2, the one language-modelling corpus shipped).
PERPLEXITY_DATASETS = ("wikitext-2",)
#: The sections only a sweep has (per-method settings, methods and seeds).
SWEEP_SECTIONS = ("methods", "sweep")
#: Sections whose keys are not fixed here: ``delta`` (a method config), ``train`` (TrainConfig fields,
#: checked by :class:`~deltatune.train.TrainConfig`).
_OPEN = ("delta", "train")


@dataclass(frozen=True)
class TaskLayout:
    """The sectioned layout of one task.

    Attributes:
        task: ``"classification"`` or ``"perplexity"``.
        what: the config's name in messages.
        top: top-level keys that take a value (``name``, ``output_dir``, ``num_threads`` ...).
        sections: section -> its known keys (``delta`` and ``train`` are open: their keys are checked by
            the method config and :class:`~deltatune.train.TrainConfig`).
        fields: ``"section.key"`` (or a top-level key) -> the field of the task's dataclass it fills;
            ``train`` keys not listed fill the ``train`` dict, ``delta`` fills ``delta`` (perplexity) or
            ``method`` and ``method_config`` (classification).
        defaults: values the mapping of a flat file adds (``data.dataset`` of a perplexity config).
    """

    task: str
    what: str
    top: tuple[str, ...]
    sections: dict[str, tuple[str, ...]]
    fields: dict[str, str]
    defaults: dict[str, Any]

    def known_paths(self) -> list[str]:
        """Every key of the layout: top-level keys, then ``section.key``."""
        return [*self.top, *(f"{s}.{k}" for s, keys in self.sections.items() for k in keys)]

    def legacy_paths(self) -> dict[str, tuple[str, ...]]:
        """Old flat key -> its path in the sections (the table read backwards)."""
        out: dict[str, tuple[str, ...]] = {}
        for path, field in self.fields.items():
            if "." in path and field not in ("method",):
                out.setdefault(field, tuple(path.split(".")))
        out["method"] = ("delta", "method")
        out["method_config"] = ("delta",)
        return out


_RUN_TOP = ("name", "output_dir", "num_threads")
_TRAIN_RUN_FIELDS = {"train.seed": "seed", "train.device": "device"}

CLASSIFICATION = TaskLayout(
    task="classification",
    what="classification config",
    top=(*_RUN_TOP, "save_delta", "progress"),
    sections={
        "model": ("name_or_path", "dtype", "pooling", "head_dropout"),
        "data": ("dataset", "data_dir", "csv", "max_length", "max_train_examples", "max_eval_examples", "subset_seed"),
        "delta": (),
        "train": (),
    },
    fields={
        **{k: k for k in (*_RUN_TOP, "save_delta", "progress")},
        "model.name_or_path": "model",
        "model.dtype": "dtype",
        "model.pooling": "pooling",
        "model.head_dropout": "head_dropout",
        "data.dataset": "task",
        "data.data_dir": "data_dir",
        "data.csv": "csv",
        "data.max_length": "max_length",
        "data.max_train_examples": "max_train_examples",
        "data.max_eval_examples": "max_eval_examples",
        "data.subset_seed": "subset_seed",
        **_TRAIN_RUN_FIELDS,
    },
    defaults={},
)

PERPLEXITY = TaskLayout(
    task="perplexity",
    what="perplexity config",
    top=(*_RUN_TOP, "progress"),
    sections={
        "model": ("name_or_path", "dtype"),
        "data": ("dataset", "data_dir", "train_max_tokens", "block_size"),
        "eval": ("split", "max_tokens", "max_length", "stride", "batch_size"),
        "delta": (),
        "train": (),
    },
    fields={
        **{k: k for k in (*_RUN_TOP, "progress")},
        "model.name_or_path": "model",
        "model.dtype": "dtype",
        "data.dataset": "dataset",
        "data.data_dir": "data_dir",
        "data.train_max_tokens": "train_max_tokens",
        "data.block_size": "block_size",
        "eval.split": "eval_split",
        "eval.max_tokens": "eval_max_tokens",
        "eval.max_length": "max_length",
        "eval.stride": "stride",
        "eval.batch_size": "eval_batch_size",
        **_TRAIN_RUN_FIELDS,
    },
    defaults={"data.dataset": "wikitext-2"},
)

LAYOUTS: dict[str, TaskLayout] = {"classification": CLASSIFICATION, "perplexity": PERPLEXITY}

#: Flat keys that only the old perplexity files have at the top (they tell the task of a flat file).
_FLAT_PERPLEXITY = ("eval_split", "eval_max_tokens", "stride", "eval_batch_size", "train_max_tokens", "block_size")
_RECIPE_SECTIONS = ("delta", "data", "generate", "eval", "export")


def _is_glue_or_csv(name: Any) -> bool:
    return isinstance(name, str) and (name == "csv" or name.lower().replace("-", "").replace("_", "") in GLUE_TASKS)


def task_of(raw: Mapping[str, Any]) -> str | None:
    """The task a YAML mapping configures, in the sectioned or the flat layout: ``"data-to-text"``,
    ``"classification"``, ``"perplexity"`` or ``None`` when nothing identifies it."""
    data = raw.get("data") if isinstance(raw.get("data"), Mapping) else {}
    ev = raw.get("eval") if isinstance(raw.get("eval"), Mapping) else {}
    dataset = data.get("dataset")
    if (
        raw.get("task") == "perplexity"
        or any(k in raw for k in _FLAT_PERPLEXITY)
        or dataset in PERPLEXITY_DATASETS
        or (dataset is None and any(k in data for k in ("block_size", "train_max_tokens")))
        or (dataset is None and any(k in ev for k in ("stride", "max_tokens")))
    ):
        return "perplexity"
    if "task" in raw or _is_glue_or_csv(dataset):
        return "classification"
    if isinstance(dataset, str) and dataset not in DATA_TO_TEXT_DATASETS:
        return None  # a dataset no task knows: the loader of the subcommand names the ones it takes
    if any(k in raw for k in _RECIPE_SECTIONS) or isinstance(raw.get("model"), Mapping):
        return "data-to-text"
    return None


def descend(node: dict[str, Any], keys: Sequence[str], not_mapping: Callable[[str, Any], Exception]) -> dict[str, Any]:
    """The mapping at ``node[keys[0]][keys[1]]...``, with an empty one made where a key is missing; raises
    ``not_mapping(key, value)`` where a value on the way is not a mapping."""
    for k in keys:
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise not_mapping(k, nxt)
        node = nxt
    return node


def _put(out: dict[str, Any], path: tuple[str, ...], value: Any, old: str) -> None:
    node = descend(out, path[:-1], lambda _k, v: DeltaConfigTypeError(
        f"{'.'.join(path[:-1])} must be a mapping, got {v!r}"))
    key = path[-1]
    if key in node and node[key] != value:
        raise DeltaConfigError(
            f"{old!r} (the flat layout's name of {'.'.join(path)}) and {'.'.join(path)} are both given, with "
            f"different values ({value!r} and {node[key]!r}); give {'.'.join(path)} only"
        )
    node[key] = copy.deepcopy(value)


def to_sections(raw: Mapping[str, Any], layout: TaskLayout) -> dict[str, Any]:
    """``raw`` in the sectioned layout: the one mapping of the old flat layout (a sectioned mapping is
    returned as a copy). Keys it does not know are kept, for :func:`flatten` to report."""
    legacy = layout.legacy_paths()
    out: dict[str, Any] = {}
    flat: list[tuple[str, Any]] = []
    for key, value in raw.items():
        if key in layout.sections and (isinstance(value, Mapping) or (value is None and key != "model")):
            out.setdefault(key, {})  # (an empty section stays, for flatten to check)
            for k, v in (value or {}).items():
                _put(out, (key, k), v, f"{key}.{k}")
        elif key in layout.top or key in SWEEP_SECTIONS or key not in (*legacy, "task", "model"):
            out[key] = copy.deepcopy(value)
        else:
            flat.append((key, value))
    for key, value in flat:
        if key == "task":
            if layout.task == "perplexity":
                if value != "perplexity":
                    raise DeltaConfigError(f"{layout.what}: task must be 'perplexity', got {value!r}")
                continue
            _put(out, ("data", "dataset"), value, key)
        elif key == "model":
            _put(out, ("model", "name_or_path"), value, key)
        elif key == "method_config":
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise DeltaConfigTypeError(f"method_config must be a mapping of method config fields, got {value!r}")
            for k, v in value.items():
                _put(out, ("delta", k), v, f"method_config.{k}")
        else:
            _put(out, legacy[key], value, key)
    if flat:
        for path, value in layout.defaults.items():
            parts = tuple(path.split("."))
            if (out.get(parts[0]) or {}).get(parts[1]) is None:
                _put(out, parts, value, path)
    if isinstance(out.get("data"), dict) and "dataset" in out["data"]:  # the task's name first
        out["data"] = {"dataset": out["data"]["dataset"], **out["data"]}
    order = [*layout.top, *layout.sections, *SWEEP_SECTIONS]
    return {k: out[k] for k in sorted(out, key=lambda k: order.index(k) if k in order else len(order))}


def legacy_override(parts: list[str], value: Any, layout: TaskLayout) -> list[str]:
    """A ``--set`` key path in the sections: an old flat path (``max_train_examples``, ``seed``,
    ``method_config.r``, ``model=NAME``, ``task=cola``) is mapped as :func:`to_sections` maps the file."""
    top = parts[0]
    if top == "model" and len(parts) == 1 and not isinstance(value, Mapping):
        return ["model", "name_or_path"]
    if top == "task" and layout.task == "classification":
        return ["data", "dataset", *parts[1:]]
    legacy = layout.legacy_paths()
    if top in legacy and top not in layout.sections and top not in layout.top:
        return [*legacy[top], *parts[1:]]
    return list(parts)


def flatten(raw: Mapping[str, Any], layout: TaskLayout, *, extra_top: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields of the task's dataclass from a sectioned mapping: the one check of the layout's keys
    (an unknown top-level or section key raises ``DeltaConfigError`` listing the known ones).
    ``extra_top`` keys are accepted and dropped (a sweep's ``methods`` / ``sweep`` after the sweep read them)."""
    out: dict[str, Any] = {}
    known_top = [*layout.top, *layout.sections]
    for key, value in raw.items():
        if key in extra_top:
            continue
        if key in layout.top:
            if key != "name":  # the run's name labels it (a sweep's runs, messages); no field of its own
                out[layout.fields[key]] = value
            continue
        if key not in layout.sections:
            raise DeltaConfigError(
                f"unknown {layout.what} key {key!r}; known keys: {', '.join(known_top)}"
                + (f" (and, in a sweep, {', '.join(SWEEP_SECTIONS)})" if key in SWEEP_SECTIONS else "")
            )
        if value is None:
            continue
        if not isinstance(value, Mapping):
            raise DeltaConfigTypeError(
                f"{layout.what} section {key!r} must be a mapping, got {value!r} ({type(value).__name__})"
            )
        if key == "delta":
            _flatten_delta(out, dict(value), layout)
            continue
        known = layout.sections[key]
        for k, v in value.items():
            path = f"{key}.{k}"
            if path in layout.fields:
                out[layout.fields[path]] = v
            elif key in _OPEN:
                out.setdefault(key, {})[k] = v
            else:
                raise DeltaConfigError(
                    f"unknown key {path!r} in {layout.what} section {key!r}; known keys: {', '.join(known)}"
                )
    if layout.task == "perplexity" and "dataset" in out:
        check_choice("data.dataset", out.pop("dataset"), PERPLEXITY_DATASETS)
    return out


def _flatten_delta(out: dict[str, Any], delta: dict[str, Any], layout: TaskLayout) -> None:
    if layout.task == "perplexity":
        out["delta"] = delta
        return
    if "method" not in delta:
        raise DeltaConfigError(f"delta.method is required (a method name or 'full'); got keys {sorted(delta)}")
    out["method"] = delta.pop("method")
    out["method_config"] = delta
