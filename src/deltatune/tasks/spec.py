"""The shared run specification of every task, and the one YAML loader.

This module owns:

* :data:`FULL`, the one name of full fine-tuning (``method: full``), and :func:`check_run_fields`, the
  checks of the run fields every task shares (``seed``, ``device``, ``dtype``, ``num_threads``,
  ``output_dir``);
* :func:`read_yaml`, the one reader of recipe / sweep / perplexity YAML files, and :func:`config_kind`
  with :func:`check_config_kind`, which tell which subcommand a YAML file belongs to (a recipe given to
  the wrong one raises :class:`WrongCommandError` naming the right one);
* the data-to-text recipe schema: :class:`ModelSpec`, :class:`DataSpec`, :class:`EvalSpec` and
  :class:`Recipe` (sections ``model``, ``delta``, ``data``, ``train``, ``generate``, ``eval``,
  ``export``; see :mod:`deltatune.tasks.loader` for the loading and :mod:`deltatune.tasks.data_to_text`
  for the pipeline).

Classification / regression (:mod:`deltatune.tasks.classification`) and perplexity
(:mod:`deltatune.tasks.lm`) configs use the same sections (``model``, ``data``, ``delta``, ``train``
with ``seed`` and ``device``, ``eval``; ``name``, ``output_dir``, ``num_threads`` at the top): their
known keys and the one mapping of the old flat files are in :mod:`deltatune.tasks.layout`. Every task
shares the run-field checks, the YAML reader, the override parser (:mod:`deltatune.tasks.overrides`)
and the full-fine-tuning name.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import DeltaConfig, config_from_dict
from ..data import DATA_TO_TEXT_DATASETS, DATA_TO_TEXT_FILES
from ..errors import DataFormatError, DeltaConfigError, DeltaConfigTypeError
from ..export_gguf import ExportSpec
from ..generate import GenerationConfig
from ..io_utils import read_text_file, yaml_load
from ..train import TrainConfig
from ..validation import check_bool, check_choice, check_float, check_int, check_str_list, check_type
from .layout import task_of

__all__ = [
    "DATA_DIR_ENV_VAR",
    "DEFAULT_DATA_DIR",
    "E2E_METRIC_NAMES",
    "FULL",
    "METRIC_CHOICES",
    "SECTIONS",
    "DataSpec",
    "EvalSpec",
    "ModelSpec",
    "Recipe",
    "WrongCommandError",
    "check_config_kind",
    "check_run_fields",
    "config_kind",
    "from_mapping",
    "read_yaml",
    "section_keys",
]

#: The method name of full fine-tuning (no delta method; every parameter trains), in every task.
FULL = "full"
#: Environment variable used as ``data.data_dir`` when a recipe does not set it.
DATA_DIR_ENV_VAR = "DELTATUNE_DATA_DIR"
DEFAULT_DATA_DIR = "../shared/data"
#: Top-level keys of a data-to-text recipe.
SECTIONS = ("name", "output_dir", "num_threads", "model", "delta", "data", "train", "generate", "eval", "export")
#: The recipe keys that hold a mapping.
MAPPING_SECTIONS = ("model", "delta", "data", "train", "generate", "eval", "export")
E2E_METRIC_NAMES = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
#: what eval.metrics may list: the E2E five and TER (WebNLG/DART)
METRIC_CHOICES = (*E2E_METRIC_NAMES, "TER")


class WrongCommandError(DeltaConfigError):
    """A YAML file of one kind given to the subcommand of another (a GLUE sweep config to ``run``)."""


# ================================================================================================
# shared run fields, YAML loading, kinds


def check_run_fields(cfg: Any) -> None:
    """Check the run settings task configs share (seed, device, dtype, num_threads, output_dir);
    normalises ``output_dir`` to a str."""
    n = type(cfg).__name__
    check_int(f"{n}.seed", cfg.seed, minimum=0)
    check_type(f"{n}.device", cfg.device, str, "'auto', 'cpu', 'cuda' or 'cuda:N'")
    if cfg.dtype is not None:
        check_choice(f"{n}.dtype", cfg.dtype, (None, "float32", "bfloat16", "float16"))
    if cfg.num_threads is not None:
        check_int(f"{n}.num_threads", cfg.num_threads, minimum=1)
    if cfg.output_dir is not None:
        check_type(f"{n}.output_dir", cfg.output_dir, (str, os.PathLike), "None or a directory path")
        cfg.output_dir = os.fspath(cfg.output_dir)


def read_yaml(path: str | os.PathLike, what: str = "recipe") -> dict[str, Any]:
    """Read a recipe / sweep / perplexity YAML file into a dict (an empty file is ``{}``).

    Raises:
        DeltaConfigError: the file does not exist or does not end in ``.yaml`` / ``.yml``.
        DataFormatError: invalid YAML (``<path>, line L, column C: invalid YAML (...)``) or a
            document that is not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise DeltaConfigError(f"{what} must be an existing YAML file, got {os.fspath(path)!r}")
    if path.suffix not in (".yaml", ".yml"):
        raise DeltaConfigError(f"{what} file must end in .yaml or .yml, got {os.fspath(path)!r}")
    try:
        data = yaml_load(read_text_file(path, what))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "line 1"
        raise DataFormatError(f"{path}, {where}: invalid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise DataFormatError(f"{path}, line 1: a {what} must be a YAML mapping, got {type(data).__name__}")
    return data


#: kind -> (what it is, the subcommand that runs it)
KINDS: dict[str, tuple[str, str]] = {
    "data-to-text": ("a data-to-text recipe (one run)", "run"),
    "data-to-text-sweep": ("a data-to-text method sweep", "sweep"),
    "classification": ("a classification sweep config", "sweep"),
    "perplexity": ("a perplexity config", "perplexity"),
    "perplexity-sweep": ("a perplexity method sweep", "sweep"),
}


def config_kind(raw: Mapping[str, Any]) -> str | None:
    """Which kind of YAML ``raw`` is: ``"data-to-text"``, ``"data-to-text-sweep"`` (a recipe with a
    ``sweep`` section), ``"classification"`` (a GLUE / CSV config; always run by ``sweep``),
    ``"perplexity"``, ``"perplexity-sweep"``, or ``None`` when nothing identifies it. Both the
    sectioned layout and the old flat one are recognised (:func:`deltatune.tasks.layout.task_of`)."""
    task = task_of(raw)
    if task in ("data-to-text", "perplexity") and ("sweep" in raw or "methods" in raw):
        return f"{task}-sweep"
    return task


def check_config_kind(raw: Mapping[str, Any], source: Any, command: str, accepted: tuple[str, ...]) -> None:
    """Raise :class:`WrongCommandError` naming the right subcommand when ``raw`` (read from
    ``source``) is of a kind that ``deltatune <command>`` does not take."""
    kind = config_kind(raw)
    if kind is None or kind in accepted:
        return
    what, right = KINDS[kind]
    where = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "the config"
    hint = ""
    if kind == "data-to-text" and command == "sweep":
        hint = " (to sweep methods over a recipe, give it a 'sweep: {methods: [...], seeds: [...]}' section)"
    elif kind.endswith("-sweep"):
        hint = " (or remove its 'sweep' and 'methods' sections to run it once)"
    raise WrongCommandError(
        f"{where} is {what}, which `deltatune {command}` does not take: use `deltatune {right} {where}`{hint}"
    )


def from_mapping(cls: type, section: str, data: Any) -> Any:
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


# ================================================================================================
# the data-to-text recipe schema


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
        data_dir: the folder holding ``e2e/``, ``webnlg2017/``, ``dart/`` (see :mod:`deltatune.tasks.loader`).
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
        allow_dev_training: allow a training split other than ``train``.
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
    """A validated data-to-text recipe (build it with :func:`deltatune.tasks.loader.load_recipe`).

    ``delta`` is the method config dict (``{"method": "full"}`` for full fine-tuning); ``source`` is the
    YAML file it came from.
    """

    name: str
    output_dir: str
    model: ModelSpec
    delta: dict[str, Any]
    data: DataSpec
    train: TrainConfig
    generate: GenerationConfig
    eval: EvalSpec
    source: str | None = None
    num_threads: int | None = None
    export: ExportSpec | None = None  # None: no export

    @property
    def method(self) -> str:
        """The delta method's name (``"full"`` for full fine-tuning)."""
        return str(self.delta["method"])

    @property
    def is_full(self) -> bool:
        """True for full fine-tuning."""
        return self.method == FULL

    @property
    def run_dir(self) -> Path:
        """The run directory."""
        return Path(self.output_dir)

    def keep_delta_config(self, config: DeltaConfig | None) -> None:
        """Remember the config object the loader built from ``delta`` (so it is not built and validated again)."""
        self.__dict__["_delta_config"] = config

    def delta_config(self) -> DeltaConfig | None:
        """The method config object (``None`` for full fine-tuning): the one the loader built while
        ``delta`` is unchanged, else built (and validated) from ``delta``."""
        if self.is_full:
            return None
        kept = self.__dict__.get("_delta_config")
        if kept is not None and kept.to_dict() == self.delta:
            return kept
        return config_from_dict(self.delta)

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain YAML-able data (what ``config.yaml`` holds)."""
        train = self.train.to_dict()
        train.pop("output_dir", None)
        cfg = self.delta_config()
        return {
            "name": self.name,
            "output_dir": self.output_dir,
            "num_threads": self.num_threads,
            "model": dataclasses.asdict(self.model),
            "delta": plain(cfg.to_dict() if cfg is not None else dict(self.delta)),
            "data": dataclasses.asdict(self.data),
            "train": plain(train),
            "generate": plain(dataclasses.asdict(self.generate)),
            "eval": dataclasses.asdict(self.eval),
            "export": dataclasses.asdict(self.export) if self.export is not None else {"gguf": None, "quant": None},
        }

    def to_yaml(self) -> str:
        """:meth:`to_dict` as YAML text."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def plain(value: Any) -> Any:
    """``value`` with tuples turned into lists and keys into str (YAML-able)."""
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return value


def section_keys(section: str) -> list[str] | None:
    """Known keys of a fixed-schema recipe section (``None`` for ``delta``, whose keys depend on the method)."""
    classes = {"model": ModelSpec, "data": DataSpec, "eval": EvalSpec, "generate": GenerationConfig, "export": ExportSpec}
    if section == "train":
        return [k for k in TrainConfig.known_keys() if k != "output_dir"]
    if section in classes:
        return [f.name for f in dataclasses.fields(classes[section])]
    return None
