"""YAML recipes for data-to-text fine-tuning: schema, overrides, and the train → generate → score → report pipeline.

A recipe is a YAML mapping with these top-level keys (every section and key is checked; an unknown
one raises :class:`~deltatune.errors.DeltaConfigError` listing the known ones)::

    name: e2e_lora                  # optional; default: the file name without extension
    output_dir: runs/e2e_lora       # the run directory; default runs/<name> (relative to the CWD)
    num_threads: null               # torch CPU threads (torch.set_num_threads); null: torch's default
    model:                          # see ModelSpec
      name_or_path: smollm2-135m
      dtype: null                   # float32 (null), bfloat16, float16
      chat_template: false          # format the prompt as a chat turn with the tokenizer's template
    delta:                          # a method config (any registered method), {method: full}, or a
                                    # MindFormers pet_config (pet_type: lora, lora_rank: 8, ...)
      method: lora
      r: 4
      alpha: 32
    data:                           # see DataSpec
      dataset: e2e                  # e2e | webnlg | dart
      data_dir: ../shared/data
      sample_fraction: 1.0          # stratified share of the training inputs kept
    train: {...}                    # TrainConfig fields (deltatune.train.TrainConfig.from_dict)
    generate: {...}                 # GenerationConfig fields (deltatune.generate.GenerationConfig)
    eval: {...}                     # see EvalSpec: split to decode and score, sampling, metrics

``data.data_dir`` (default ``../shared/data``; or ``$DELTATUNE_DATA_DIR`` when the recipe does not
set it) is resolved, when relative, against the current directory, then the recipe file's directory,
then that directory's parent (so ``configs/*.yaml`` of a checkout find ``<checkout>/../shared/data``).
The resolved absolute path goes into the run's ``config.yaml``.

Training on a split other than ``train`` (DART ships no train split) is refused unless
``data.allow_dev_training: true``; then, when the training split is also the validation split, a
stratified ``data.dev_holdout_fraction`` of it is held out for the validation loss and never trained
on. Training on the split that is decoded and scored (``eval.split``) is always refused.

Overrides: ``apply_overrides(raw, ["train.lr=1e-3", "eval.max_examples=50"])`` (the CLI's
``--set``); values are parsed as YAML, so ``1e-3`` is a float, ``true`` a bool, ``[q_proj, v_proj]``
a list and ``null`` None.

A run directory ends up holding: ``config.yaml`` (the resolved recipe), ``train_log.jsonl`` (and
TensorBoard events), ``checkpoint-<step>/`` directories, ``delta/`` (the final delta checkpoint;
``model/`` for full fine-tuning), ``train_summary.json``, ``predictions.txt`` (one output per line),
``references.txt`` (the references of each input, groups separated by a blank line: the official E2E
scorer's formats), ``sources.txt``, ``categories.txt`` (each input's category),
``generation_info.json``, ``metrics.json``, ``report.md`` and the PNG plots.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._version import format_versions, software_versions
from .errors import (
    CheckpointError,
    DataFormatError,
    DeltaConfigError,
    DeltaConfigTypeError,
    MissingPackageError,
)
from .io_utils import atomic_write_text, read_text_file, yaml_load
from .preflight import check_applicable
from .validation import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_run_name,
    check_str_list,
    check_type,
)

__all__ = [
    "DATA_DIR_ENV_VAR",
    "DataSpec",
    "EvalSpec",
    "ModelSpec",
    "Recipe",
    "RunData",
    "apply_overrides",
    "evaluate_run",
    "export_run_gguf",
    "finetune",
    "format_scores",
    "generate_predictions",
    "load_recipe",
    "parse_override",
    "prepare_data",
    "run_recipe",
    "write_references",
]

#: Environment variable used as ``data.data_dir`` when a recipe does not set it.
DATA_DIR_ENV_VAR = "DELTATUNE_DATA_DIR"
DEFAULT_DATA_DIR = "../shared/data"
FULL_METHOD = "full"
SECTIONS = ("name", "output_dir", "num_threads", "model", "delta", "data", "train", "generate", "eval", "export")
_MAPPING_SECTIONS = ("model", "delta", "data", "train", "generate", "eval", "export")
E2E_METRIC_NAMES = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
#: what eval.metrics may list: the E2E five and TER (WebNLG/DART)
METRIC_CHOICES = (*E2E_METRIC_NAMES, "TER")
_JAVA_METRICS = ("METEOR", "ROUGE_L", "CIDEr")

# run-directory file names
CONFIG_FILE = "config.yaml"
PREDICTIONS_FILE = "predictions.txt"
REFERENCES_FILE = "references.txt"
SOURCES_FILE = "sources.txt"
CATEGORIES_FILE = "categories.txt"
GENERATION_INFO_FILE = "generation_info.json"
TRAIN_SUMMARY_FILE = "train_summary.json"
RUN_INFO_FILE = "run_info.json"
DELTA_DIR = "delta"
MODEL_DIR = "model"


# ================================================================================================
# schema


def _from_mapping(cls: type, section: str, data: Any) -> Any:
    """Build a section dataclass from a mapping, rejecting unknown keys with the known ones listed."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise DeltaConfigTypeError(f"recipe section {section!r} must be a mapping, got {data!r} ({type(data).__name__})")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in known]
    if unknown:
        raise DeltaConfigError(
            f"unknown key(s) {', '.join(repr(f'{section}.{k}') for k in unknown)} in recipe section {section!r}; "
            f"known keys: {', '.join(known)}"
        )
    return cls(**dict(data))


@dataclass
class ModelSpec:
    """The ``model`` section.

    Attributes:
        name_or_path: a registered model name (``smollm2-135m``), a local Hugging Face directory or a
            ``.gguf`` file (see :func:`deltatune.models.load`).
        dtype: ``None``/``"float32"``, ``"bfloat16"`` or ``"float16"`` (the weights' dtype).
        chat_template: format each prompt as a user turn with the tokenizer's chat template (the
            target then ends with the template's end-of-turn token); ``False`` uses the LoRA-paper
            format ``<source> ||<reference><eos>``.
        system_prompt: system message for the chat template (only with ``chat_template``).
    """

    name_or_path: str = "smollm2-135m"
    dtype: str | None = None
    chat_template: bool = False
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        check_type("model.name_or_path", self.name_or_path, str, "a registered model name or a path")
        if not self.name_or_path:
            raise DeltaConfigError("model.name_or_path must be a non-empty str, got ''")
        if self.dtype is not None:
            check_choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        check_bool("model.chat_template", self.chat_template)
        if self.system_prompt is not None:
            check_type("model.system_prompt", self.system_prompt, str, "None or a str")
            if not self.chat_template:
                raise DeltaConfigError("model.system_prompt needs model.chat_template: true, got chat_template: false")


@dataclass
class DataSpec:
    """The ``data`` section.

    Attributes:
        dataset: ``"e2e"``, ``"webnlg"`` or ``"dart"``.
        data_dir: the folder holding ``e2e/``, ``webnlg2017/``, ``dart/`` (see the module docstring).
        format: file format, ``"auto"`` or a format of :func:`deltatune.data.load_data_to_text`.
        train_split / dev_split: the training split and the validation-loss split (``None``: no
            validation loss).
        sample_fraction: stratified share (by category) of the training inputs kept, in (0, 1].
        dev_fraction: stratified share of the validation inputs kept, in (0, 1].
        seed: seed of the samplings.
        max_length: longest training feature in tokens (prompts are cut from the left; also the
            longest generation prompt).
        prompt_template / separator / target_prefix / add_bos: the prompt format, as in
            :func:`deltatune.data.build_causal_lm_features`.
        expand_references: one training feature per reference (``False``: per input).
        allow_dev_training: allow a training split other than ``train`` (see the module docstring).
        dev_holdout_fraction: with ``train_split == dev_split``, the stratified share of that split
            held out for the validation loss.
    """

    dataset: str = "e2e"
    data_dir: str | None = None
    format: str = "auto"
    train_split: str = "train"
    dev_split: str | None = "dev"
    sample_fraction: float = 1.0
    dev_fraction: float = 1.0
    seed: int = 0
    max_length: int = 256
    prompt_template: str = "{source}"
    separator: str = " ||"
    target_prefix: str | None = None
    add_bos: bool = False
    expand_references: bool = True
    allow_dev_training: bool = False
    dev_holdout_fraction: float = 0.1

    def __post_init__(self) -> None:
        from .data import DATA_TO_TEXT_DATASETS, DATA_TO_TEXT_FILES

        check_choice("data.dataset", self.dataset, DATA_TO_TEXT_DATASETS)
        if self.data_dir is not None:
            check_type("data.data_dir", self.data_dir, (str, os.PathLike), "a directory path")
            self.data_dir = os.fspath(self.data_dir)
        check_choice("data.format", self.format, ("auto", *DATA_TO_TEXT_FILES[self.dataset][1]))
        splits = ("train", "dev", "test")
        check_choice("data.train_split", self.train_split, splits)
        if self.dev_split is not None:
            check_choice("data.dev_split", self.dev_split, splits)
        self.sample_fraction = check_float("data.sample_fraction", self.sample_fraction, low=0, high=1, low_inclusive=False)
        self.dev_fraction = check_float("data.dev_fraction", self.dev_fraction, low=0, high=1, low_inclusive=False)
        check_int("data.seed", self.seed, minimum=0)
        check_int("data.max_length", self.max_length, minimum=8)
        check_type("data.prompt_template", self.prompt_template, str, "a str containing '{source}'")
        if "{source}" not in self.prompt_template:
            raise DeltaConfigError(f"data.prompt_template must contain '{{source}}', got {self.prompt_template!r}")
        check_type("data.separator", self.separator, str, "a str")
        if self.target_prefix is not None:
            check_type("data.target_prefix", self.target_prefix, str, "None or a str")
        check_bool("data.add_bos", self.add_bos)
        check_bool("data.expand_references", self.expand_references)
        check_bool("data.allow_dev_training", self.allow_dev_training)
        self.dev_holdout_fraction = check_float(
            "data.dev_holdout_fraction", self.dev_holdout_fraction, low=0, high=1, low_inclusive=False, high_inclusive=False
        )
        if self.train_split != "train" and not self.allow_dev_training:
            raise DeltaConfigError(
                f"data.train_split is {self.train_split!r}: training on a split other than 'train' needs "
                f"data.allow_dev_training: true (refused by default so that no evaluation split is trained on "
                f"silently; with it, when data.train_split equals data.dev_split, a stratified "
                f"data.dev_holdout_fraction={self.dev_holdout_fraction:g} of that split is held out for the "
                f"validation loss)"
                + (
                    "; DART v1.1.1 train is not shipped in the shared data folder, which is why configs/dart_lora.yaml "
                    "trains on dev"
                    if self.dataset == "dart"
                    else ""
                )
            )


@dataclass
class EvalSpec:
    """The ``eval`` section: what is decoded and scored after training.

    Attributes:
        split: the split to decode and score (``"test"`` by default; must differ from the training split).
        sample_fraction: stratified share (by category) of that split's inputs decoded, in (0, 1].
        max_examples: decode at most this many inputs (taken from the stratified sample in file order).
        batch_size: prompts per generation batch (beam search runs ``batch_size * num_beams`` rows).
        metrics: which metrics to compute: BLEU, NIST, METEOR, ROUGE_L, CIDEr (the last three need
            Java) and TER. WebNLG runs are also scored on the seen / unseen / all split.
        merge: fold a mergeable delta (LoRA, IA3) into the weights before decoding (faster, same outputs
            up to rounding).
        seed: seed of the sampling (default: ``data.seed``).
    """

    split: str = "test"
    sample_fraction: float = 1.0
    max_examples: int | None = None
    batch_size: int = 8
    metrics: list[str] = field(default_factory=lambda: list(E2E_METRIC_NAMES))
    merge: bool = True
    seed: int | None = None

    def __post_init__(self) -> None:
        check_choice("eval.split", self.split, ("train", "dev", "test"))
        self.sample_fraction = check_float("eval.sample_fraction", self.sample_fraction, low=0, high=1, low_inclusive=False)
        if self.max_examples is not None:
            check_int("eval.max_examples", self.max_examples, minimum=1)
        check_int("eval.batch_size", self.batch_size, minimum=1)
        self.metrics = check_str_list("eval.metrics", self.metrics)
        for i, m in enumerate(self.metrics):
            check_choice(f"eval.metrics[{i}]", m, METRIC_CHOICES)
        check_bool("eval.merge", self.merge)
        if self.seed is not None:
            check_int("eval.seed", self.seed, minimum=0)


@dataclass
class Recipe:
    """A validated recipe (build it with :func:`load_recipe`).

    ``delta`` is the method config dict (``{"method": "full"}`` for full fine-tuning); ``train`` and
    ``generate`` are the built :class:`~deltatune.train.TrainConfig` and
    :class:`~deltatune.generate.GenerationConfig`; ``source`` is the YAML file it came from.
    """

    name: str
    output_dir: str
    model: ModelSpec
    delta: dict[str, Any]
    data: DataSpec
    train: Any
    generate: Any
    eval: EvalSpec
    source: str | None = None
    num_threads: int | None = None
    export: Any = None  # deltatune.export_gguf.ExportSpec; None: no export

    @property
    def method(self) -> str:
        """The delta method's name (``"full"`` for full fine-tuning)."""
        return str(self.delta["method"])

    @property
    def is_full(self) -> bool:
        """True for full fine-tuning."""
        return self.method == FULL_METHOD

    @property
    def run_dir(self) -> Path:
        """The run directory."""
        return Path(self.output_dir)

    def delta_config(self) -> Any:
        """The method config object (``None`` for full fine-tuning)."""
        if self.is_full:
            return None
        from .config import config_from_dict

        return config_from_dict(self.delta)

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain YAML-able data (what ``config.yaml`` holds)."""
        train = self.train.to_dict()
        train.pop("output_dir", None)
        gen = dataclasses.asdict(self.generate)
        return {
            "name": self.name,
            "output_dir": self.output_dir,
            "num_threads": self.num_threads,
            "model": dataclasses.asdict(self.model),
            "delta": _plain(self.delta_config().to_dict() if not self.is_full else dict(self.delta)),
            "data": dataclasses.asdict(self.data),
            "train": _plain(train),
            "generate": _plain(gen),
            "eval": dataclasses.asdict(self.eval),
            "export": dataclasses.asdict(self.export) if self.export is not None else {"gguf": None, "quant": None},
        }

    def to_yaml(self) -> str:
        """:meth:`to_dict` as YAML text."""
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


# ================================================================================================
# loading, overrides, validation


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise DeltaConfigError(f"recipe must be an existing YAML file, got {os.fspath(path)!r}")
    if path.suffix not in (".yaml", ".yml"):
        raise DeltaConfigError(f"recipe file must end in .yaml or .yml, got {os.fspath(path)!r}")
    try:
        data = yaml_load(read_text_file(path, "recipe"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "line 1"
        raise DataFormatError(f"{path}, {where}: invalid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise DataFormatError(f"{path}, line 1: a recipe must be a YAML mapping, got {type(data).__name__}")
    return data


def _section_keys(section: str) -> list[str] | None:
    """Known keys of a fixed-schema section (``None`` for ``delta``, whose keys depend on the method)."""
    from .export_gguf import ExportSpec
    from .generate import GenerationConfig
    from .train import TrainConfig

    classes = {"model": ModelSpec, "data": DataSpec, "eval": EvalSpec, "generate": GenerationConfig, "export": ExportSpec}
    if section == "train":
        return [k for k in TrainConfig.known_keys() if k != "output_dir"]
    if section in classes:
        return [f.name for f in dataclasses.fields(classes[section])]
    return None


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse one ``--set`` argument ``"a.b=value"`` into ``(["a", "b"], value)``.

    The value is parsed as YAML (``1e-3`` is a float too); text that is not valid YAML (``" ||"``) is
    taken verbatim as a string. An empty value is ``None``.
    """
    import yaml

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


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of the raw recipe mapping with ``--set``-style overrides applied, in order.

    Keys are ``section.key`` (``train.lr``), a top-level key (``output_dir``, ``name``), a whole
    section given as a YAML mapping (``delta={method: bitfit}``) or, inside ``delta``, deeper paths
    (``delta.rank_pattern.q_proj=8``). An unknown section or key raises ``DeltaConfigError`` naming
    it and listing the known ones.
    """
    import copy

    check_type("raw recipe", raw, Mapping, "a mapping")
    if isinstance(overrides, str) or not isinstance(overrides, Sequence):
        raise DeltaConfigTypeError(f"overrides must be a list of 'key=value' strings, got {overrides!r}")
    out = copy.deepcopy(dict(raw))
    for text in overrides:
        parts, value = parse_override(text)
        top = parts[0]
        if top not in SECTIONS:
            raise DeltaConfigError(f"--set {text!r}: unknown recipe key {top!r}; known keys: {', '.join(SECTIONS)}")
        if len(parts) == 1:
            if top in _MAPPING_SECTIONS and not isinstance(value, Mapping):
                raise DeltaConfigError(
                    f"--set {text!r}: {top!r} is a section; set one of its keys ({top}.KEY=VALUE) or give a "
                    f"YAML mapping, got {value!r}"
                )
            out[top] = value
            continue
        if top not in _MAPPING_SECTIONS:
            raise DeltaConfigError(f"--set {text!r}: {top!r} is not a section, write {top}=VALUE")
        known = _section_keys(top)
        if known is not None:
            if parts[1] not in known:
                raise DeltaConfigError(
                    f"--set {text!r}: unknown key {'.'.join(parts[:2])!r}; known {top} keys: {', '.join(known)}"
                )
            if len(parts) > 2:
                raise DeltaConfigError(f"--set {text!r}: {'.'.join(parts[:2])!r} takes a value, not sub-keys")
        node = out.get(top)
        if node is None:
            node = out[top] = {}
        if not isinstance(node, dict):
            raise DeltaConfigError(f"--set {text!r}: recipe section {top!r} is not a mapping ({node!r})")
        for p in parts[1:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise DeltaConfigError(f"--set {text!r}: {p!r} holds {nxt!r}, not a mapping")
            node = nxt
        node[parts[-1]] = value
    return out


def _resolve_data_dir(value: str | None, base: Path | None) -> str:
    chosen = value if value is not None else os.environ.get(DATA_DIR_ENV_VAR) or DEFAULT_DATA_DIR
    path = Path(chosen).expanduser()
    if path.is_absolute():
        candidates = [path]
    else:
        candidates = [Path.cwd() / path]
        if base is not None:
            candidates += [base / path, base.parent / path]
    for c in candidates:
        if c.is_dir():
            return os.fspath(c.resolve())
    raise DeltaConfigError(
        f"data.data_dir must be an existing directory, got {chosen!r} (looked in: "
        + ", ".join(os.fspath(c) for c in dict.fromkeys(candidates))
        + f"); set data.data_dir or ${DATA_DIR_ENV_VAR}"
    )


def _check_delta(delta: Any) -> dict[str, Any]:
    if delta is None:
        raise DeltaConfigError(
            "recipe needs a 'delta' section with a 'method' key (a registered method, or 'full' for full fine-tuning)"
        )
    if not isinstance(delta, Mapping):
        raise DeltaConfigTypeError(f"recipe section 'delta' must be a mapping, got {delta!r} ({type(delta).__name__})")
    delta = dict(delta)
    from .methods import method_names

    method = delta.get("method")
    if method is None:
        from .compat.pet_config import from_pet_config, is_pet_config

        if is_pet_config(delta):  # a MindFormers pet_config in the delta section
            return from_pet_config(delta).to_dict()
    if method == FULL_METHOD:
        extra = sorted(k for k in delta if k != "method")
        if extra:
            raise DeltaConfigError(f"delta.method 'full' (full fine-tuning) takes no other keys, got {extra}")
        return delta
    if method is None:
        raise DeltaConfigError(
            f"delta.method is required: one of {method_names() + [FULL_METHOD]}; got keys {sorted(delta)}"
        )
    if not isinstance(method, str) or method not in method_names():
        raise DeltaConfigError(f"delta.method must be one of {method_names() + [FULL_METHOD]}, got {method!r}")
    from .config import config_from_dict

    return config_from_dict(delta).to_dict()


def _check_java(metrics: Sequence[str]) -> None:
    need = [m for m in metrics if m in _JAVA_METRICS]
    if need and shutil.which("java") is None:
        from .metrics.e2e import JAVA_INSTALL_HINT

        raise MissingPackageError(
            f"eval.metrics {need} need Java (the METEOR/PTB-tokeniser jars of pycocoevalcap), but no 'java' is on "
            f"PATH; install it ({JAVA_INSTALL_HINT}) or set eval.metrics: [BLEU, NIST]"
        )


def load_recipe(
    source: str | os.PathLike | Mapping[str, Any],
    overrides: Sequence[str] = (),
    *,
    output_dir: str | os.PathLike | None = None,
    check_data: bool = True,
) -> Recipe:
    """Read, override and validate a recipe; nothing is loaded or written.

    Args:
        source: a YAML file or an already-parsed mapping.
        overrides: ``--set`` strings (see :func:`apply_overrides`).
        output_dir: replaces the recipe's ``output_dir``.
        check_data: also check that the data directory and the split files exist (and the Java
            needed by the requested metrics).

    Raises:
        DeltaConfigError: any invalid or unknown key or value, a missing data file (DART train, for
            instance, with the way out spelled out), training on the evaluated split.
        MissingPackageError: metrics that need Java without Java.
        DataFormatError: invalid YAML.
    """
    from .generate import GenerationConfig
    from .train import TrainConfig

    base: Path | None = None
    if isinstance(source, Mapping):
        raw = dict(source)
        default_name = "recipe"
    else:
        check_type("recipe", source, (str, os.PathLike), "a YAML file path or a mapping")
        path = Path(source)
        raw = _read_yaml(path)
        base = path.resolve().parent
        default_name = path.stem
    raw = apply_overrides(raw, list(overrides))
    unknown = [k for k in raw if k not in SECTIONS]
    if unknown:
        raise DeltaConfigError(
            f"unknown recipe key(s) {', '.join(repr(k) for k in unknown)}; known keys: {', '.join(SECTIONS)}"
        )
    name = raw.get("name") or default_name
    check_run_name("name", name)
    num_threads = raw.get("num_threads")
    if num_threads is not None:
        check_int("num_threads", num_threads, minimum=1)
    model = _from_mapping(ModelSpec, "model", raw.get("model"))
    delta = _check_delta(raw.get("delta"))
    from .export_gguf import ExportSpec

    export = _from_mapping(ExportSpec, "export", raw.get("export"))
    if export.gguf == "adapter" and delta["method"] != "lora":
        raise DeltaConfigError(
            f"export.gguf 'adapter' writes a llama.cpp LoRA adapter and needs delta.method 'lora', got "
            f"{delta['method']!r}; use export.gguf: merged"
        )
    data = _from_mapping(DataSpec, "data", raw.get("data"))
    ev = _from_mapping(EvalSpec, "eval", raw.get("eval"))
    if ev.seed is None:
        ev.seed = data.seed

    train_raw = raw.get("train") or {}
    if not isinstance(train_raw, Mapping):
        raise DeltaConfigTypeError(f"recipe section 'train' must be a mapping, got {train_raw!r}")
    if "output_dir" in train_raw:
        raise DeltaConfigError("train.output_dir is not used in a recipe: set the top-level output_dir instead")
    out = output_dir if output_dir is not None else raw.get("output_dir") or os.path.join("runs", name)
    check_type("output_dir", out, (str, os.PathLike), "a directory path")
    out = os.fspath(out)
    if not out:
        raise DeltaConfigError("output_dir must be a non-empty directory path, got ''")
    known_train = _section_keys("train") or []
    unknown = [k for k in train_raw if k not in known_train]
    if unknown:
        raise DeltaConfigError(
            f"unknown key(s) {', '.join(repr(f'train.{k}') for k in unknown)} in recipe section 'train'; "
            f"known keys: {', '.join(known_train)}"
        )
    try:
        train = TrainConfig.from_dict({**dict(train_raw), "output_dir": out})
    except DeltaConfigError as exc:
        raise type(exc)(f"recipe section 'train': {exc}") from None

    gen_raw = raw.get("generate") or {}
    gen_keys = _section_keys("generate") or []
    if not isinstance(gen_raw, Mapping):
        raise DeltaConfigTypeError(f"recipe section 'generate' must be a mapping, got {gen_raw!r}")
    unknown = [k for k in gen_raw if k not in gen_keys]
    if unknown:
        raise DeltaConfigError(
            f"unknown key(s) {', '.join(repr(f'generate.{k}') for k in unknown)} in recipe section 'generate'; "
            f"known keys: {', '.join(gen_keys)}"
        )
    generate = GenerationConfig(**dict(gen_raw))

    if ev.split == data.train_split:
        raise DeltaConfigError(
            f"eval.split and data.train_split are both {ev.split!r}: the decoded and scored split must not be trained on"
        )
    if check_data:
        _check_model_source(model.name_or_path)
        data.data_dir = _resolve_data_dir(data.data_dir, base)
        _check_splits(data, ev)
        _check_java(ev.metrics)
    elif data.data_dir is None:
        data.data_dir = DEFAULT_DATA_DIR
    return Recipe(
        name=name,
        output_dir=out,
        model=model,
        delta=delta,
        data=data,
        train=train,
        generate=generate,
        eval=ev,
        source=None if base is None else os.fspath(Path(source)),  # type: ignore[arg-type]
        num_threads=num_threads,
        export=export,
    )


def _check_model_source(name_or_path: str) -> None:
    from .models import list_models

    if name_or_path in list_models() or Path(name_or_path).expanduser().exists():
        return
    raise DeltaConfigError(
        f"model.name_or_path must be a registered model ({', '.join(list_models())}) or an existing Hugging Face "
        f"directory or .gguf file, got {name_or_path!r}"
    )


def _check_splits(data: DataSpec, ev: EvalSpec) -> None:
    from .data import data_to_text_path

    wanted = [("data.train_split", data.train_split), ("eval.split", ev.split)]
    if data.dev_split is not None:
        wanted.append(("data.dev_split", data.dev_split))
    for key, split in wanted:
        try:
            data_to_text_path(data.dataset, split, data.data_dir, data.format)  # type: ignore[arg-type]
        except DeltaConfigError as exc:
            hint = ""
            if data.dataset == "dart" and split == "train":
                hint = (
                    "; DART v1.1.1 train is not shipped there. To fine-tune on DART anyway, train on its dev split "
                    "explicitly: data.train_split: dev and data.allow_dev_training: true (a stratified "
                    "data.dev_holdout_fraction of dev is then held out for the validation loss; test is scored)"
                )
            raise DeltaConfigError(f"{key}={split!r}: {exc}{hint}") from None


# ================================================================================================
# data


@dataclass
class RunData:
    """The examples a run uses: training, validation-loss and evaluation (decoded and scored) inputs."""

    train: list[Any]
    dev: list[Any]
    eval: list[Any]


def _subset(examples: list[Any], fraction: float, seed: int) -> list[Any]:
    from .data import stratified_sample

    return list(examples) if fraction >= 1.0 else stratified_sample(examples, fraction, seed=seed)


def prepare_data(recipe: Recipe, *, need_train: bool = True) -> RunData:
    """Load and sample the recipe's splits (see :class:`DataSpec` and :class:`EvalSpec`).

    Raises:
        DeltaConfigError: a split that comes out empty, or evaluation inputs without references.
    """
    from .data import load_data_to_text, stratified_sample

    d, ev = recipe.data, recipe.eval
    cache: dict[str, list[Any]] = {}

    def load(split: str) -> list[Any]:
        if split not in cache:
            cache[split] = load_data_to_text(d.dataset, split, d.data_dir, d.format)  # type: ignore[arg-type]
        return cache[split]

    train: list[Any] = []
    dev: list[Any] = []
    if need_train:
        pool = load(d.train_split)
        if d.dev_split is not None and d.dev_split == d.train_split:
            held = stratified_sample(pool, d.dev_holdout_fraction, seed=d.seed)
            held_ids = {id(e) for e in held}
            dev = _subset(held, d.dev_fraction, d.seed)
            pool = [e for e in pool if id(e) not in held_ids]
        elif d.dev_split is not None:
            dev = _subset(load(d.dev_split), d.dev_fraction, d.seed)
        train = [e for e in _subset(pool, d.sample_fraction, d.seed) if e.references]
        if not train:
            raise DeltaConfigError(
                f"the training split {d.train_split!r} of {d.dataset} has no example with references after sampling "
                f"(data.sample_fraction={d.sample_fraction:g})"
            )
        dev = [e for e in dev if e.references]
    items = load(ev.split)
    seed = ev.seed if ev.seed is not None else d.seed
    items = _subset(items, ev.sample_fraction, seed)
    if ev.max_examples is not None and len(items) > ev.max_examples:
        rng = random.Random(seed)
        keep = sorted(rng.sample(range(len(items)), ev.max_examples))
        items = [items[i] for i in keep]
    missing = sum(1 for e in items if not e.references)
    if missing:
        raise DeltaConfigError(
            f"eval.split={ev.split!r} of {d.dataset} has {missing} input(s) without references; it cannot be scored "
            f"(use a split with references, e.g. E2E testset_w_refs.csv)"
        )
    if not items:
        raise DeltaConfigError(f"eval.split={ev.split!r} of {d.dataset} holds no input")
    return RunData(train=train, dev=dev, eval=items)


def _feature_kwargs(recipe: Recipe) -> dict[str, Any]:
    d, m = recipe.data, recipe.model
    return {
        "prompt_template": d.prompt_template,
        "separator": d.separator,
        "add_bos": d.add_bos,
        "use_chat_template": m.chat_template,
        "system_prompt": m.system_prompt,
    }


# ================================================================================================
# run directory


_ARTEFACTS = (
    CONFIG_FILE,
    "train_log.jsonl",
    TRAIN_SUMMARY_FILE,
    RUN_INFO_FILE,
    PREDICTIONS_FILE,
    REFERENCES_FILE,
    SOURCES_FILE,
    CATEGORIES_FILE,
    GENERATION_INFO_FILE,
    "metrics.json",
    "report.md",
    "plot_loss.png",
    "plot_val_ppl.png",
    "plot_lr.png",
)


def _prepare_run_dir(recipe: Recipe, overwrite: bool) -> Path:
    run_dir = recipe.run_dir
    resuming = recipe.train.resume_from is not None
    if run_dir.exists() and not run_dir.is_dir():
        raise DeltaConfigError(f"output_dir must be a directory, got the file {os.fspath(run_dir)!r}")
    if run_dir.is_dir() and (run_dir / "train_log.jsonl").exists() and not resuming:
        if not overwrite:
            raise DeltaConfigError(
                f"output_dir {os.fspath(run_dir)!r} already holds a run (train_log.jsonl); pass --overwrite "
                f"(overwrite=True) to replace it, --set train.resume_from=latest to resume it, or choose another "
                f"--output-dir"
            )
        from .train.checkpoint import cleanup_stale_checkpoints, list_checkpoints, remove_checkpoint

        cleanup_stale_checkpoints(run_dir)  # ForeignFileError, before anything is deleted, for checkpoints not ours
        for name in _ARTEFACTS:
            (run_dir / name).unlink(missing_ok=True)
        for sub in (DELTA_DIR, MODEL_DIR, "tensorboard"):
            shutil.rmtree(run_dir / sub, ignore_errors=True)
        for ckpt in list_checkpoints(run_dir):  # only complete checkpoints: the ones the Trainer wrote
            remove_checkpoint(ckpt)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    def default(o: Any) -> Any:
        return str(o)

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    atomic_write_text(path, json.dumps(clean(dict(data)), indent=2, default=default) + "\n")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(read_text_file(path, path.name))
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{path}, line {exc.lineno}: invalid JSON ({exc.msg})") from None
    return data if isinstance(data, dict) else {}


def write_references(path: str | os.PathLike, references: Sequence[Sequence[str]]) -> None:
    """Write references in the official E2E scorer's format: one reference per line, the references of
    one input consecutive, inputs separated by one blank line (atomically)."""
    groups = []
    for i, refs in enumerate(references):
        lines = [" ".join(r.split()) for r in refs]
        if not lines or any(not r for r in lines):
            raise DeltaConfigError(f"references[{i}] must be a non-empty list of non-empty str, got {refs!r}")
        groups.append("\n".join(lines))
    atomic_write_text(path, "\n\n".join(groups) + "\n")


def _write_lines(path: Path, lines: Sequence[str]) -> None:
    atomic_write_text(path, "".join(" ".join(line.split()) + "\n" for line in lines))


# ================================================================================================
# pipeline steps


def _set_threads(recipe: Recipe) -> None:
    if recipe.num_threads is not None:
        import torch

        torch.set_num_threads(recipe.num_threads)


def _load_model(recipe: Recipe) -> tuple[Any, Any]:
    from .models import load

    _set_threads(recipe)
    return load(recipe.model.name_or_path, task="causal-lm", dtype=recipe.model.dtype)


def _device(recipe: Recipe) -> Any:
    import torch

    dev = recipe.train.device
    if dev == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(dev)


def _trainable_info(model: Any) -> dict[str, Any]:
    from .freeze import trainable_summary

    s = trainable_summary(model)
    return {"trainable_params": s.trainable, "total_params": s.total, "trainable_percent": s.percent}


def _rank() -> int:
    """This process's rank under torchrun (0 when not distributed)."""
    return int(os.environ.get("RANK", "0"))


def _check_placement(recipe: Recipe) -> None:
    """Checks of the training placement that need the machine (run before any work)."""
    recipe.train.check_cuda_graph_device()
    if recipe.is_full and recipe.train.distributed == "fsdp":
        raise DeltaConfigError(
            "train.distributed must be 'none' or 'ddp' for full fine-tuning recipes (method: full), got 'fsdp'; "
            "FSDP recipes train a delta method"
        )


def _apply_delta(recipe: Recipe, model: Any) -> None:
    if recipe.is_full:
        model.requires_grad_(True)
        return
    import torch

    from .api import apply

    # the adapter's initial weights depend on the seed alone (identical on every rank, and the same
    # under torchrun as in one process), not on whatever consumed random numbers before
    torch.manual_seed(recipe.train.seed)
    apply(model, recipe.delta_config())


def _save_final(recipe: Recipe, model: Any, tokenizer: Any, run_dir: Path) -> Path:
    if not recipe.is_full:
        from .checkpoint import save_delta

        return save_delta(model, run_dir / DELTA_DIR)
    final = run_dir / MODEL_DIR
    tmp = run_dir / f".tmp-{MODEL_DIR}-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        old = run_dir / f".tmp-{MODEL_DIR}-old-{uuid.uuid4().hex[:8]}"
        if final.exists():  # move the previous model aside (one rename) instead of deleting it first
            os.rename(final, old)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return final


#: padding multiple of training batches when their steps are captured as CUDA graphs: sequences up to
#: 128 tokens then come in at most 8 shapes (Trainer.MAX_CUDA_GRAPHS)
CUDA_GRAPH_PAD_MULTIPLE = 16


def train_collator(pad_token_id: int, train: Any) -> Any:
    """The collate function of a recipe's training batches (``train``: its
    :class:`~deltatune.train.TrainConfig`): dynamic padding, rounded up to :data:`CUDA_GRAPH_PAD_MULTIPLE`
    when the steps may be captured as CUDA graphs (``train.may_capture()``: ``cuda_graph`` true, or ``"auto"``
    on a CUDA device; few batch shapes)."""
    from .data import CausalLMCollator

    return CausalLMCollator(
        pad_token_id=pad_token_id, pad_to_multiple_of=CUDA_GRAPH_PAD_MULTIPLE if train.may_capture() else None
    )


def _finetune(recipe: Recipe, model: Any, tokenizer: Any, data: RunData, run_dir: Path, progress: bool) -> dict[str, Any]:
    from .data import build_causal_lm_features
    from .train import Trainer

    kw = _feature_kwargs(recipe)
    d = recipe.data
    feats = build_causal_lm_features(
        data.train, tokenizer, max_length=d.max_length, target_prefix=d.target_prefix,
        expand_references=d.expand_references, **kw,
    )
    dev_feats = (
        build_causal_lm_features(data.dev, tokenizer, max_length=d.max_length, target_prefix=d.target_prefix, **kw)
        if data.dev
        else None
    )
    _apply_delta(recipe, model)
    info = _trainable_info(model)
    info.update(
        {
            "method": recipe.method,
            "model": recipe.model.name_or_path,
            "dataset": d.dataset,
            "train_examples": len(data.train),
            "train_features": len(feats),
            "dev_examples": len(data.dev),
            "versions": software_versions(),
        }
    )
    if _rank() == 0:
        _write_json(run_dir / RUN_INFO_FILE, info)
    save_fn = load_fn = None
    if not recipe.is_full:
        from .checkpoint import load_delta, save_delta

        def save_fn(m: Any, directory: Path) -> None:
            save_delta(m, directory)

        def load_fn(m: Any, directory: Path) -> None:
            load_delta(m, directory)

    train_cfg = dataclasses.replace(recipe.train, progress_bar=recipe.train.progress_bar and progress)
    collator = train_collator(int(tokenizer.pad_token_id), train_cfg)
    with Trainer(
        model, train_cfg, feats, eval_dataset=dev_feats, collate_fn=collator, save_fn=save_fn, load_fn=load_fn
    ) as trainer:
        summary = trainer.train()
        sharded = bool(trainer.is_fsdp)
        if not recipe.is_full:
            trainer.save_delta(run_dir / DELTA_DIR)  # collective under FSDP; rank 0 writes
        elif trainer.is_main:
            _save_final(recipe, model, tokenizer, run_dir)
    return {**summary, **info, "sharded": sharded}


def _load_trained(recipe: Recipe, checkpoint: str | os.PathLike | None) -> tuple[Any, Any]:
    """The base model with the run's trained delta (or the fully fine-tuned model) loaded."""
    run_dir = recipe.run_dir
    if recipe.is_full:
        path = Path(checkpoint) if checkpoint is not None else run_dir / MODEL_DIR
        if not (path / "config.json").is_file():
            raise CheckpointError(
                f"no fully fine-tuned model at {os.fspath(path)!r}; run `deltatune finetune` first (or pass --checkpoint)"
            )
        from .models import load

        _set_threads(recipe)
        return load(path, task="causal-lm", dtype=recipe.model.dtype)
    from .checkpoint import load_delta

    path = Path(checkpoint) if checkpoint is not None else run_dir / DELTA_DIR
    if not path.is_dir():
        raise CheckpointError(
            f"no delta checkpoint at {os.fspath(path)!r}; run `deltatune finetune` first (or pass --checkpoint)"
        )
    model, tok = _load_model(recipe)
    load_delta(model, path)
    return model, tok


def _generate(recipe: Recipe, model: Any, tokenizer: Any, examples: list[Any], run_dir: Path, progress: bool) -> dict[str, Any]:
    from .api import merge
    from .data import build_generation_prompts
    from .generate import generate_text
    from .methods import get_method
    from .train.logging import peak_memory_mb, reset_peak_memory

    device = _device(recipe)
    model.to(device)
    merged = False
    if recipe.eval.merge and not recipe.is_full and get_method(recipe.method).mergeable:
        merge(model)
        merged = True
    prompts = build_generation_prompts(examples, tokenizer, max_length=recipe.data.max_length, **_feature_kwargs(recipe))
    reset_peak_memory(device)
    t0 = time.perf_counter()
    texts = generate_text(
        model, tokenizer, [p["input_ids"] for p in prompts], recipe.generate,
        batch_size=recipe.eval.batch_size, device=device, progress=progress,
    )
    gen_time = time.perf_counter() - t0
    if merged:
        from .api import unmerge

        unmerge(model)
    preds = [" ".join(t.split()) for t in texts]
    _write_lines(run_dir / PREDICTIONS_FILE, preds)
    write_references(run_dir / REFERENCES_FILE, [p["references"] for p in prompts])
    _write_lines(run_dir / SOURCES_FILE, [p["source"] for p in prompts])
    _write_lines(run_dir / CATEGORIES_FILE, [str(examples[p["example_index"]].category) for p in prompts])
    info = {
        "split": recipe.eval.split,
        "num_inputs": len(prompts),
        "num_references": sum(len(p["references"]) for p in prompts),
        "generate_time_s": round(gen_time, 4),
        "generate_peak_memory_mb": round(peak_memory_mb(device), 2),
        "device": str(device),
        "merged": merged,
        "empty_predictions": sum(1 for p in preds if not p),
    }
    _write_json(run_dir / GENERATION_INFO_FILE, info)
    return info


def _write_config(recipe: Recipe, run_dir: Path) -> None:
    atomic_write_text(run_dir / CONFIG_FILE, recipe.to_yaml())


def finetune(recipe: Recipe, *, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Step 1 alone: load the model, apply the delta, train, save checkpoints and the final delta.

    Writes ``config.yaml``, ``run_info.json``, the Trainer's logs, checkpoints and
    ``train_summary.json``, and ``delta/`` (``model/`` for full fine-tuning). Returns the training
    summary merged with the trainable-parameter counts.
    """
    check_type("recipe", recipe, Recipe, "a Recipe (see load_recipe)")
    _check_placement(recipe)
    check_applicable(recipe.method, recipe.delta, recipe.model.name_or_path)  # before data and weights
    data = prepare_data(recipe)
    run_dir = _start_run_dir(recipe, overwrite)
    model, tok = _load_model(recipe)
    return _finetune(recipe, model, tok, data, run_dir, progress)


def _start_run_dir(recipe: Recipe, overwrite: bool) -> Path:
    """Rank 0 prepares the run directory and writes the resolved config; other ranks only use it."""
    if _rank() != 0:
        return recipe.run_dir
    run_dir = _prepare_run_dir(recipe, overwrite)
    _write_config(recipe, run_dir)
    return run_dir


def generate_predictions(
    recipe: Recipe, *, checkpoint: str | os.PathLike | None = None, progress: bool = True
) -> dict[str, Any]:
    """Step 2 alone: decode ``eval.split`` with the trained run (``delta/``, ``model/`` or ``checkpoint``).

    Writes ``predictions.txt``, ``references.txt``, ``sources.txt`` and ``generation_info.json`` into
    the run directory; returns the generation info.
    """
    check_type("recipe", recipe, Recipe, "a Recipe (see load_recipe)")
    data = prepare_data(recipe, need_train=False)
    run_dir = recipe.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    model, tok = _load_trained(recipe, checkpoint)
    return _generate(recipe, model, tok, data.eval, run_dir, progress)


def evaluate_run(
    recipe: Recipe | None = None,
    *,
    predictions: str | os.PathLike | None = None,
    references: str | os.PathLike | None = None,
    run_dir: str | os.PathLike | None = None,
    metrics: Sequence[str] | None = None,
    started_at: float | None = None,
) -> dict[str, Any]:
    """Step 3 alone: score a predictions file against a references file and write ``metrics.json``
    and ``report.md`` (with the plots) into the run directory.

    Files default to the run directory's ``predictions.txt`` / ``references.txt``; the run directory
    defaults to the recipe's ``output_dir`` (or the predictions file's folder). The metrics default to
    ``recipe.eval.metrics`` (all five without a recipe). What the run directory holds from the other
    steps (trainable parameters, peak memory, times, losses) is added to ``metrics.json``. WebNLG runs
    (the recipe's dataset, or ``run_info.json``'s) are also scored on the seen / unseen / all split
    (``metrics.json``'s ``splits``), from ``categories.txt`` next to the predictions file.
    ``started_at`` (a ``time.perf_counter()`` value) makes ``wall_time_s`` the time since then;
    otherwise it is the sum of the steps' times.
    """
    from .metrics import score_files
    from .report import METRICS_FILE, write_report

    if recipe is not None:
        check_type("recipe", recipe, Recipe, "a Recipe (see load_recipe)")
    if run_dir is None:
        if recipe is not None:
            run_dir = recipe.run_dir
        elif predictions is not None:
            run_dir = Path(predictions).resolve().parent
        else:
            raise DeltaConfigError("evaluate needs a recipe, a run_dir or a predictions file, got none")
    root = Path(run_dir)
    pred = Path(predictions) if predictions is not None else root / PREDICTIONS_FILE
    ref = Path(references) if references is not None else root / REFERENCES_FILE
    for what, p in (("predictions", pred), ("references", ref)):
        if not p.is_file():
            raise DeltaConfigError(
                f"{what} file must exist, got {os.fspath(p)!r} (run `deltatune generate` first, or pass --{what})"
            )
    names = list(metrics) if metrics is not None else (recipe.eval.metrics if recipe is not None else list(E2E_METRIC_NAMES))
    _check_java(names)
    dataset = recipe.data.dataset if recipe is not None else _read_json(root / RUN_INFO_FILE).get("dataset")
    t0 = time.perf_counter()
    scores: dict[str, Any]
    if dataset == "webnlg":  # scored on the seen / unseen / all split; the top-level scores are "all"'s
        splits = _webnlg_splits(ref, pred, pred.parent / CATEGORIES_FILE, names)
        scores = {k: v for k, v in splits["all"].items() if k != "num_inputs"}
        scores["splits"] = splits
    else:
        scores = dict(score_files(ref, pred, names))
    score_time = time.perf_counter() - t0
    root.mkdir(parents=True, exist_ok=True)

    train = _read_json(root / TRAIN_SUMMARY_FILE)
    info = _read_json(root / RUN_INFO_FILE)
    gen = _read_json(root / GENERATION_INFO_FILE)
    out: dict[str, Any] = dict(scores)
    for key in ("trainable_params", "total_params", "trainable_percent"):
        if key in info:
            out[key] = info[key]
    peaks = [v for v in (train.get("peak_mem_mb"), gen.get("generate_peak_memory_mb")) if isinstance(v, (int, float))]
    if peaks:
        out["peak_memory_mb"] = max(peaks)
    if "wall_time_s" in train:
        out["train_time_s"] = train["wall_time_s"]
    if "generate_time_s" in gen:
        out["generate_time_s"] = gen["generate_time_s"]
    out["score_time_s"] = round(score_time, 4)
    if started_at is not None:
        out["wall_time_s"] = round(time.perf_counter() - started_at, 2)
    else:
        out["wall_time_s"] = round(sum(float(out.get(k, 0.0)) for k in ("train_time_s", "generate_time_s", "score_time_s")), 2)
    for key in ("steps", "train_loss", "final_loss", "eval_loss", "eval_ppl", "tokens_per_s"):
        if train.get(key) is not None:
            out[key] = train[key]
    out["num_eval_inputs"] = gen.get("num_inputs", _count_lines(pred))
    for key in ("method", "model", "dataset"):
        if key in info:
            out[key] = info[key]
    if gen.get("split"):
        out["eval_split"] = gen["split"]
    # the versions that trained the run (run_info.json), else those scoring it now
    out["versions"] = info.get("versions") if isinstance(info.get("versions"), dict) else software_versions()
    _write_json(root / METRICS_FILE, out)

    extra: dict[str, Any] = {}
    if recipe is not None:
        extra = {
            "title": f"Run report: {recipe.name}",
            "model": recipe.model.name_or_path,
            "method": recipe.method,
            "dataset": recipe.data.dataset,
            "train split": f"{recipe.data.train_split} (sample_fraction {recipe.data.sample_fraction:g})",
            "eval split": recipe.eval.split,
            "decoding": (
                f"beam {recipe.generate.num_beams}, length_penalty {recipe.generate.length_penalty:g}, "
                f"no_repeat_ngram_size {recipe.generate.no_repeat_ngram_size}, "
                f"max_new_tokens {recipe.generate.max_new_tokens}"
            ),
        }
    for key, label in (("train_examples", "train inputs"), ("train_features", "train sequences")):
        if key in info:
            extra[label] = info[key]
    if "num_inputs" in gen:
        extra["eval inputs"] = gen["num_inputs"]
    extra["software"] = format_versions(out["versions"])
    write_report(root, out, extra)
    return out


def _webnlg_splits(ref: Path, pred: Path, categories: Path, names: Sequence[str]) -> dict[str, Any]:
    """WebNLG scores on the seen / unseen / all inputs (categories: one per line, next to the predictions)."""
    from .data import WEBNLG_SEEN_CATEGORIES
    from .metrics import read_scored_files, seen_unseen_labels, split_scores

    if not categories.is_file():
        raise DeltaConfigError(
            f"WebNLG runs are scored per seen/unseen category split, which needs {os.fspath(categories)!r} (one "
            f"category per input, written by `deltatune generate`); it does not exist"
        )
    preds, refs = read_scored_files(ref, pred)
    cats = categories.read_text(encoding="utf-8").splitlines()
    if len(cats) != len(preds):
        raise DeltaConfigError(
            f"{os.fspath(categories)} holds {len(cats)} categories but {os.fspath(pred)} holds {len(preds)} "
            f"predictions; they must be equal"
        )
    labels = seen_unseen_labels([c.strip() for c in cats], WEBNLG_SEEN_CATEGORIES)
    return split_scores(preds, refs, labels, names, order=("seen", "unseen"))


def _count_lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def run_recipe(recipe: Recipe, *, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run the whole pipeline: train → generate → decode → score → report.

    Every check runs before any work (:func:`load_recipe` validated the recipe; the data is loaded and
    sampled before the model). Returns the content of ``metrics.json``; see the module docstring for
    the files written.
    """
    check_type("recipe", recipe, Recipe, "a Recipe (see load_recipe)")
    _check_placement(recipe)
    check_applicable(recipe.method, recipe.delta, recipe.model.name_or_path)  # before data and weights
    t0 = time.perf_counter()
    data = prepare_data(recipe)
    run_dir = _start_run_dir(recipe, overwrite)
    model, tok = _load_model(recipe)
    export = recipe.export if recipe.export is not None and recipe.export.gguf else None
    if export is not None:  # before training: the architecture and the tokenizer source must fit
        from .export_gguf import check_exportable

        check_exportable(model, export.gguf, _source_gguf(recipe), tok)
    summary = _finetune(recipe, model, tok, data, run_dir, progress)
    if _rank() != 0:  # under torchrun, rank 0 alone decodes and scores
        return {}
    if summary.get("sharded"):  # the FSDP-sharded model cannot run on one rank: reload the saved delta
        model, tok = _load_trained(recipe, None)
    if export is not None:
        _export(recipe, model, tok, export.gguf, export.quant, None, progress)
    _generate(recipe, model, tok, data.eval, run_dir, progress)
    return evaluate_run(recipe, run_dir=run_dir, started_at=t0)


def _source_gguf(recipe: Recipe) -> Path | None:
    from .export_gguf import source_gguf_of

    return source_gguf_of(recipe.model.name_or_path)


def _export(recipe: Recipe, model: Any, tok: Any, kind: str, quant: str | None, path: Any, progress: bool) -> Path:
    from .export_gguf import DEFAULT_QUANTS, default_filename, export_gguf

    quant = quant or DEFAULT_QUANTS[kind]
    out = Path(path) if path is not None else recipe.run_dir / default_filename(kind, quant)
    if kind == "adapter":
        return export_gguf(model, out, kind=kind, quant=quant, progress=progress)
    source = _source_gguf(recipe)
    return export_gguf(model, out, kind=kind, quant=quant, source_gguf=source,
                       tokenizer=tok if source is None else None, progress=progress)


def export_run_gguf(
    recipe: Recipe,
    kind: str,
    quant: str | None = None,
    *,
    path: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """Export a finished run as GGUF (see :func:`deltatune.export_gguf.export_gguf`): the base model with
    the run's delta (``delta/``, or ``model/`` for full fine-tuning) loaded, written to ``path`` (default:
    ``RUN_DIR/model.<quant>.gguf`` or ``RUN_DIR/adapter.<quant>.gguf``). The tokenizer of a merged file
    comes from the base model's GGUF file, or else from its Hugging Face tokenizer."""
    from .export_gguf import ExportSpec

    check_type("recipe", recipe, Recipe, "a Recipe (see load_recipe)")
    spec = ExportSpec(gguf=kind, quant=quant)
    if kind == "adapter" and recipe.method != "lora":
        raise DeltaConfigError(
            f"kind 'adapter' writes a llama.cpp LoRA adapter and needs a LoRA run, but this run's delta.method is "
            f"{recipe.method!r}; use kind 'merged'"
        )
    model, tok = _load_trained(recipe, None)
    return _export(recipe, model, tok, kind, spec.quant, path, progress)


def format_scores(metrics: Mapping[str, Any]) -> str:
    """The score table as plain text (what the CLI prints at the end of a run)."""
    from .report import score_table

    rows = score_table(metrics)
    if not rows:
        return "(no scores)"
    width = max(len(label) for label, _ in rows)
    vwidth = max(len(v) for _, v in rows)
    line = "-" * (width + vwidth + 3)
    return "\n".join([line] + [f"{label:<{width}}   {value:>{vwidth}}" for label, value in rows] + [line])
