"""Sequence classification and regression runs: GLUE tasks and CSV/TSV classification data.

:func:`run_classification` trains one method (``"full"`` or any delta method) on the train split,
evaluates on the dev split and returns the scores with the trainable-parameter count, the peak
memory and the time per optimiser step. :class:`ClassificationConfig` holds everything a run needs
(flat fields, for Python) and is validated before any work starts; :func:`classification_config`
builds it from a YAML mapping in the sectioned layout of every task (``model``, ``data``, ``delta``,
``train``; :data:`deltatune.tasks.layout.CLASSIFICATION`) or the old flat one. A run directory is
prepared by :func:`deltatune.tasks.rundir.prepare_run_dir` (``overwrite`` deletes only the files a run
writes) and holds ``config.yaml`` (the run's settings in the sectioned layout), ``train_log.jsonl``, ``train_summary.json``,
``delta/`` and ``result.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..api import apply
from ..checkpoint import save_delta
from ..config import DeltaConfig, config_from_dict
from ..data import (
    GLUE_TASKS,
    ClassificationCollator,
    TextPairExample,
    glue_task,
    load_glue,
    read_classification_csv,
    stratified_sample,
)
from ..errors import DeltaConfigError, DeltaConfigTypeError
from ..freeze import trainable_summary
from ..io_utils import atomic_write_text
from ..methods import method_names
from ..metrics import glue_metrics
from ..preflight import check_applicable
from ..train import TrainConfig, Trainer, set_seed
from ..validation import check_bool, check_choice, check_float, check_int, check_known_keys, check_type
from .heads import POOLINGS, build_classifier
from .layout import CLASSIFICATION, SWEEP_SECTIONS, flatten, legacy_override, to_sections
from .overrides import OverrideSchema
from .rundir import DELTA_DIR, RESULT_FILE, prepare_run_dir, write_config
from .spec import FULL, check_run_fields, plain

__all__ = [
    "CLASSIFICATION_SCHEMA",
    "ClassificationLoss",
    "CSV_KEYS",
    "DEFAULT_LR",
    "DEFAULT_METHOD_CONFIGS",
    "FULL",
    "ClassificationConfig",
    "TaskData",
    "classification_config",
    "classification_loss",
    "load_task_data",
    "predict",
    "run_classification",
    "subset_examples",
    "sweep_method_names",
]

#: Learning rate per method when neither the run nor the sweep gives one (AdamW, small encoders,
#: short budgets: delta methods with few parameters and a fresh head need larger steps than full
#: fine-tuning).
DEFAULT_LR: dict[str, float] = {
    "full": 5e-5,
    "lora": 1e-3,
    "adapter": 1e-3,
    "low_rank_adapter": 3e-3,
    "bitfit": 3e-3,
    "ia3": 5e-3,
    "prefix": 5e-3,
    "ptuning_v2": 1e-2,
}

#: Method config fields used when the run gives none (merged under the run's ``method_config``).
DEFAULT_METHOD_CONFIGS: dict[str, dict[str, Any]] = {
    "full": {},
    "lora": {"r": 8, "alpha": 16, "dropout": 0.1},
    "adapter": {"bottleneck_size": 64},
    "low_rank_adapter": {},
    "bitfit": {},
    "ia3": {},
    "prefix": {"prefix_token_num": 10},
    "ptuning_v2": {"pre_seq_len": 16},
}

#: Keys of the ``csv`` section for non-GLUE classification data.
CSV_KEYS: tuple[str, ...] = (
    "train_file",
    "dev_file",
    "text_columns",
    "label_column",
    "has_header",
    "delimiter",
    "join_with",
)


def sweep_method_names() -> list[str]:
    """``"full"`` followed by every registered delta method name."""
    return [FULL, *[m for m in method_names() if m != FULL]]


@dataclasses.dataclass
class ClassificationConfig:
    """One classification / regression run, as flat fields (for Python). In a YAML file the same fields
    sit in the sections of :data:`deltatune.tasks.layout.CLASSIFICATION` (``task`` is ``data.dataset``,
    ``model`` is ``model.name_or_path``, ``seed`` and ``device`` are in ``train``, ``method`` and
    ``method_config`` are the ``delta`` section ...); :func:`classification_config` reads either.

    Attributes:
        task: a GLUE task (``"sst2"``, ``"cola"``, ``"mrpc"``, ``"stsb"``, ``"rte"``, ``"wnli"``; folder
            spellings too) or ``"csv"`` (any number of labels from the files in ``csv``).
        model: a registered model name, an HF directory or a ``.gguf`` file.
        method: ``"full"`` or a delta method name.
        method_config: fields of the method's config (merged over :data:`DEFAULT_METHOD_CONFIGS`);
            ``modules_to_save`` defaults to the head.
        data_dir: the folder holding ``glue/`` (GLUE tasks).
        csv: for ``task="csv"``: ``train_file``, ``dev_file`` (required), ``text_columns`` (default
            ``[1]``), ``label_column`` (default ``0``: the AG News layout ``label, title, description``),
            ``has_header``, ``delimiter`` (default tab for ``.tsv`` files, else comma), ``join_with``.
        pooling: ``"auto"``, ``"cls"``, ``"mean"`` or ``"last"`` (see :mod:`deltatune.tasks.heads`).
        head_dropout: dropout before the head (``mean``/``last``).
        max_length: tokens per example (pairs truncated longest first).
        max_train_examples / max_eval_examples: subsample train / dev (stratified by label for
            classification, uniform for regression) with ``subset_seed``; ``None`` = all.
        train: :class:`~deltatune.train.TrainConfig` fields (``epochs`` or ``max_steps``,
            ``batch_size``, ``lr`` ...); ``lr`` defaults to :data:`DEFAULT_LR` of the method.
        seed: training seed (head initialisation, data order, dropout).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        dtype: model dtype (``None`` = float32).
        num_threads: ``torch.set_num_threads`` for the run (``None`` = leave as is).
        output_dir: where the training log, the delta (``delta/``, methods only) and ``result.json``
            go; ``None`` writes nothing.
        save_delta: save the trained delta (with the head) under ``output_dir/delta``.
        progress: tqdm bars.
    """

    task: str
    model: str = "minilm-l6"
    method: str = "lora"
    method_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    data_dir: str = "../shared/data"
    csv: dict[str, Any] | None = None
    pooling: str = "auto"
    head_dropout: float = 0.1
    max_length: int = 128
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    subset_seed: int = 0
    train: dict[str, Any] = dataclasses.field(default_factory=dict)
    seed: int = 42
    device: str = "auto"
    dtype: str | None = None
    num_threads: int | None = None
    output_dir: str | None = None
    save_delta: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field (names, types, ranges, that the data files exist); nothing is loaded."""
        n = "ClassificationConfig"
        check_type(f"{n}.task", self.task, str, "a GLUE task name or 'csv'")
        if self.task != "csv":
            glue_task(self.task)
        check_type(f"{n}.model", self.model, (str, os.PathLike), "a registered model name or a path")
        self.model = os.fspath(self.model)
        check_type(f"{n}.method", self.method, str, "a method name")
        check_choice(f"{n}.method", self.method, sweep_method_names())
        check_type(f"{n}.method_config", self.method_config, Mapping, "a dict of method config fields")
        if "method" in self.method_config and self.method_config["method"] != self.method:
            raise DeltaConfigError(
                f"{n}.method_config['method'] must be {self.method!r} (or absent), got {self.method_config['method']!r}"
            )
        if self.method == FULL and self.method_config:
            raise DeltaConfigError(
                f"{n}.method_config must be empty for method 'full' (nothing is applied), got {dict(self.method_config)!r}"
            )
        check_type(f"{n}.data_dir", self.data_dir, (str, os.PathLike), "a directory path")
        self.data_dir = os.fspath(self.data_dir)
        if self.task == "csv":
            self._validate_csv(n)
        elif self.csv is not None:
            raise DeltaConfigError(f"{n}.csv is only used with task 'csv', got task {self.task!r}")
        else:
            info = glue_task(self.task)
            base = os.path.join(self.data_dir, "glue") if os.path.isdir(os.path.join(self.data_dir, "glue")) else self.data_dir
            for split in ("train", "dev"):
                path = os.path.join(base, info.folder, f"{split}.tsv")
                if not os.path.isfile(path):
                    raise DeltaConfigError(
                        f"{n}.data_dir must hold glue/{info.folder}/{split}.tsv, got {self.data_dir!r} ({path} does not exist)"
                    )
        check_choice(f"{n}.pooling", self.pooling, POOLINGS)
        self.head_dropout = check_float(f"{n}.head_dropout", self.head_dropout, low=0.0, high=1.0, high_inclusive=False)
        check_int(f"{n}.max_length", self.max_length, minimum=2)
        for field in ("max_train_examples", "max_eval_examples"):
            if getattr(self, field) is not None:
                check_int(f"{n}.{field}", getattr(self, field), minimum=2)
        check_int(f"{n}.subset_seed", self.subset_seed, minimum=0)
        check_type(f"{n}.train", self.train, Mapping, "a dict of TrainConfig fields")
        for key in ("seed", "output_dir", "save_final", "save_every", "resume_from", "device"):
            if key in self.train:
                raise DeltaConfigError(
                    f"{n}.train must not set {key!r} (it is set from the run's own {key.split('_')[0]!r} field), "
                    f"got {key}={self.train[key]!r}"
                )
        check_run_fields(self)
        check_bool(f"{n}.save_delta", self.save_delta)
        check_bool(f"{n}.progress", self.progress)
        self.train_config()  # validates the TrainConfig fields and the method config
        self.method_config_obj()

    def _validate_csv(self, n: str) -> None:
        if not isinstance(self.csv, Mapping):
            raise DeltaConfigTypeError(
                f"{n}.csv must be a dict with train_file and dev_file for task 'csv', got {self.csv!r}"
            )
        unknown = sorted(set(self.csv) - set(CSV_KEYS))
        if unknown:
            raise DeltaConfigError(f"unknown {n}.csv key(s) {unknown}; known keys: {', '.join(CSV_KEYS)}")
        for key in ("train_file", "dev_file"):
            if key not in self.csv:
                raise DeltaConfigError(f"{n}.csv.{key} is required for task 'csv', got keys {sorted(self.csv)}")
            path = self.csv[key]
            check_type(f"{n}.csv.{key}", path, (str, os.PathLike), "a file path")
            if not os.path.isfile(path):
                raise DeltaConfigError(f"{n}.csv.{key} must be an existing file, got {os.fspath(path)!r}")

    # -- derived objects ---------------------------------------------------------------------
    def lr(self) -> float:
        """The learning rate: ``train["lr"]`` or the method's default."""
        return self.train.get("lr", DEFAULT_LR.get(self.method, 1e-3))

    def train_config(self) -> TrainConfig:
        """The :class:`~deltatune.train.TrainConfig` of the run (validated)."""
        fields = {"lr": self.lr(), "tensorboard": False, "log_every": 10, **dict(self.train)}
        fields.update(
            seed=self.seed,
            device=self.device,
            output_dir=self.output_dir,
            save_final=False,
            save_every=0,
            progress_bar=fields.get("progress_bar", self.progress),
        )
        return TrainConfig.from_dict(fields)

    def method_config_obj(self, head_modules: Sequence[str] | None = None) -> DeltaConfig | None:
        """The delta method config (``None`` for ``full``); ``modules_to_save`` defaults to ``head_modules``."""
        if self.method == FULL:
            return None
        data = {**DEFAULT_METHOD_CONFIGS.get(self.method, {}), **dict(self.method_config), "method": self.method}
        if head_modules is not None and data.get("modules_to_save") is None:
            data["modules_to_save"] = list(head_modules)
        return config_from_dict(data)

    @classmethod
    def known_keys(cls) -> list[str]:
        """Field names accepted by :meth:`from_dict`."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClassificationConfig:
        """Build from a mapping (e.g. YAML); unknown keys raise ``DeltaConfigError`` listing the known ones."""
        if not isinstance(data, Mapping):
            raise DeltaConfigTypeError(f"ClassificationConfig needs a mapping, got {type(data).__name__}")
        check_known_keys("ClassificationConfig", data, cls.known_keys())
        if "task" not in data:
            raise DeltaConfigError(f"ClassificationConfig needs a 'task' key, got keys {sorted(data)}")
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict that :meth:`from_dict` accepts."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    def to_sections(self) -> dict[str, Any]:
        """The run's settings in the sectioned layout (what ``config.yaml`` holds; :func:`classification_config`
        reads it back)."""
        flat = self.to_dict()
        flat["method_config"] = {**DEFAULT_METHOD_CONFIGS.get(self.method, {}), **flat["method_config"]}
        flat.pop("progress")
        return plain(to_sections(flat, CLASSIFICATION))


#: ``--set`` in a classification config: ``data.max_train_examples=200``, ``model.pooling=cls``,
#: ``train.lr=1e-3``, ``delta.r=4``, ``methods.lora.lr=1e-3`` (a sweep); old flat paths
#: (``max_train_examples=200``, ``seed=3``) are mapped onto the sections.
CLASSIFICATION_SCHEMA = OverrideSchema(
    "classification config",
    (*CLASSIFICATION.top, *CLASSIFICATION.sections, *SWEEP_SECTIONS),
    (*CLASSIFICATION.sections, *SWEEP_SECTIONS),
    ("model", "train", "sweep"),
    lambda parts, value: legacy_override(parts, value, CLASSIFICATION),
)


def classification_config(raw: Mapping[str, Any] | ClassificationConfig) -> ClassificationConfig:
    """A :class:`ClassificationConfig` from a mapping in the sectioned layout (or the old flat one, mapped
    by :func:`deltatune.tasks.layout.to_sections`); unknown keys raise ``DeltaConfigError`` listing the
    known ones."""
    if isinstance(raw, ClassificationConfig):
        return raw
    check_type("classification config", raw, Mapping, "a mapping")
    fields = flatten(to_sections(raw, CLASSIFICATION), CLASSIFICATION)
    names = f"{', '.join(repr(k) for k in GLUE_TASKS)} (or the folder spellings) or 'csv'"
    if "task" not in fields:
        raise DeltaConfigError(f"a classification config needs data.dataset ({names}), got keys {sorted(raw)}")
    if fields["task"] != "csv":
        try:
            glue_task(fields["task"])
        except DeltaConfigError:
            raise DeltaConfigError(f"data.dataset must be one of {names}, got {fields['task']!r}") from None
    return ClassificationConfig.from_dict(fields)


@dataclasses.dataclass
class TaskData:
    """Train and dev examples of a task with its label facts.

    Attributes:
        name: ``"sst2"`` ... or ``"csv"``.
        metric_task: the :func:`~deltatune.metrics.glue_metrics` task (``"classification"`` for CSV).
        num_labels: classes (1 for regression).
        is_regression: STS-B.
        train / dev: the examples (after subsampling).
        label_map: CSV raw label -> id (empty for GLUE).
    """

    name: str
    metric_task: str
    num_labels: int
    is_regression: bool
    train: list[TextPairExample]
    dev: list[TextPairExample]
    label_map: dict[str, int]


def subset_examples(
    examples: Sequence[TextPairExample], max_examples: int | None, *, seed: int, regression: bool
) -> list[TextPairExample]:
    """Exactly ``max_examples`` examples: stratified by label (classification) or uniform (regression).

    Keeps the input order; ``None`` or a count >= ``len(examples)`` returns all of them.
    """
    examples = list(examples)
    if max_examples is None or max_examples >= len(examples):
        return examples
    if regression:
        idx = sorted(random.Random(seed).sample(range(len(examples)), max_examples))
        return [examples[i] for i in idx]
    picked = stratified_sample(examples, max_examples / len(examples), key=lambda e: e.label, seed=seed)
    if len(picked) > max_examples:  # rounding per class can overshoot by a few ...
        drop = set(random.Random(seed + 1).sample(range(len(picked)), len(picked) - max_examples))
        picked = [e for i, e in enumerate(picked) if i not in drop]
    elif len(picked) < max_examples:  # ... or fall short: top up from the examples not picked
        chosen = {id(e) for e in picked}
        rest = [i for i, e in enumerate(examples) if id(e) not in chosen]
        extra = set(random.Random(seed + 1).sample(rest, max_examples - len(picked)))
        picked = [e for i, e in enumerate(examples) if id(e) in chosen or i in extra]
    return picked


def _csv_delimiter(path: str, given: str | None) -> str:
    if given is not None:
        return given
    return "\t" if str(path).lower().endswith(".tsv") else ","


def load_task_data(cfg: ClassificationConfig) -> TaskData:
    """Read and subsample the train and dev splits of ``cfg.task``."""
    if cfg.task == "csv":
        c = dict(cfg.csv or {})
        kwargs = {
            "text_columns": c.get("text_columns", [1]),
            "label_column": c.get("label_column", 0),
            "has_header": c.get("has_header", False),
            "join_with": c.get("join_with"),
        }
        train, label_map = read_classification_csv(
            c["train_file"], delimiter=_csv_delimiter(c["train_file"], c.get("delimiter")), **kwargs
        )
        dev, _ = read_classification_csv(
            c["dev_file"], delimiter=_csv_delimiter(c["dev_file"], c.get("delimiter")), label_map=label_map, **kwargs
        )
        if len(label_map) < 2:
            raise DeltaConfigError(
                f"csv.train_file must hold at least 2 distinct labels, got {sorted(label_map)} in {c['train_file']}"
            )
        name, metric_task, num_labels, regression = "csv", "classification", len(label_map), False
    else:
        info = glue_task(cfg.task)
        train = load_glue(info.name, "train", cfg.data_dir)
        dev = load_glue(info.name, "dev", cfg.data_dir)
        label_map = {}
        name, metric_task, num_labels, regression = info.name, info.name, info.num_labels, info.is_regression
    train = subset_examples(train, cfg.max_train_examples, seed=cfg.subset_seed, regression=regression)
    dev = subset_examples(dev, cfg.max_eval_examples, seed=cfg.subset_seed, regression=regression)
    for split, exs in (("train", train), ("dev", dev)):
        if not exs:
            raise DeltaConfigError(f"the {split} split of task {cfg.task!r} holds no examples")
        if any(e.label is None for e in exs):
            raise DeltaConfigError(f"the {split} split of task {cfg.task!r} has examples without labels")
    return TaskData(name, metric_task, num_labels, regression, train, dev, label_map)


class ClassificationLoss:
    """A Trainer ``loss_fn(model, batch) -> (mean loss, examples)``: cross-entropy, or MSE for regression.

    Its :meth:`unit_count` gives the examples of a batch from the CPU copy, so the Trainer can capture
    its steps as CUDA graphs (``train.cuda_graph``)."""

    def __init__(self, is_regression: bool) -> None:
        self.is_regression = is_regression

    def unit_count(self, batch: Mapping[str, torch.Tensor]) -> int:
        """Examples in ``batch`` (the ``n`` that :meth:`__call__` returns)."""
        return int(batch["labels"].shape[0])

    def __call__(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        labels = batch["labels"]
        logits = model(**inputs).logits
        if self.is_regression:
            loss = nn.functional.mse_loss(logits.squeeze(-1).float(), labels.float())
        else:
            loss = nn.functional.cross_entropy(logits.float(), labels.long())
        return loss, labels.shape[0]


def classification_loss(is_regression: bool) -> ClassificationLoss:
    """The loss of a classification (``False``) or regression (``True``) task: a :class:`ClassificationLoss`."""
    return ClassificationLoss(is_regression)


@torch.no_grad()
def predict(
    model: nn.Module,
    examples: Sequence[TextPairExample],
    collator: ClassificationCollator,
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    is_regression: bool = False,
    progress: bool = False,
) -> list[float] | list[int]:
    """Predicted class ids (argmax) or regression scores for ``examples``, in order (eval mode)."""
    was_training = model.training
    model.eval()
    out: list[Any] = []
    try:
        starts = range(0, len(examples), batch_size)
        for s in tqdm(starts, desc="predict", leave=False, disable=not progress):
            batch = collator([dataclasses.replace(e, label=None) for e in examples[s : s + batch_size]])
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(**batch).logits.float()
            if is_regression:
                out.extend(logits.squeeze(-1).tolist())
            else:
                out.extend(logits.argmax(dim=-1).tolist())
    finally:
        model.train(was_training)
    return out


def _trainable_counts(model: nn.Module) -> tuple[int, int]:
    s = trainable_summary(model)
    return int(s.trainable), int(s.total)


def run_classification(cfg: ClassificationConfig | Mapping[str, Any], *, overwrite: bool = False) -> dict[str, Any]:
    """Train ``cfg.method`` on the task's train split and score the dev split.

    A mapping is read by :func:`classification_config` (sectioned or flat layout). With ``output_dir``,
    the run directory is prepared before any work: one that already holds a run (``train_log.jsonl`` or
    ``result.json``) raises ``DeltaConfigError`` unless ``overwrite``, which deletes only the files a run
    writes.

    Returns a JSON-able dict: ``task``, ``method``, ``seed``, ``model``, ``pooling``, ``metrics``
    (the task's GLUE metrics, e.g. ``{"accuracy": 0.91}``), ``trainable_params``, ``total_params``,
    ``trainable_percent``, ``peak_memory_mb`` with ``memory_kind`` (``"cuda_allocated"`` or
    ``"cpu_rss"``: the peak resident set of the process), ``time_per_step_s``, ``steps``, ``lr``,
    ``train_examples``, ``eval_examples``, ``train_loss``, ``train_time_s``, ``eval_time_s``,
    ``device`` and ``delta_dir`` (where the delta with the head was saved, or ``None``).
    """
    if isinstance(cfg, Mapping):
        cfg = classification_config(cfg)
    check_type("cfg", cfg, ClassificationConfig, "a ClassificationConfig or a dict")
    check_bool("overwrite", overwrite)
    cfg.validate()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    tcfg = cfg.train_config()
    tcfg.check_cuda_graph_device()  # before the data and the model are loaded
    check_applicable(cfg.method, cfg.method_config_obj(), cfg.model, task="base", added_modules=("classifier", "score"))
    data = load_task_data(cfg)
    if cfg.output_dir is not None:
        out = prepare_run_dir(cfg.output_dir, overwrite=overwrite, resumable=False)
        write_config(out, cfg.to_sections())

    set_seed(cfg.seed)
    bundle = build_classifier(
        cfg.model, data.num_labels, pooling=cfg.pooling, dropout=cfg.head_dropout, dtype=cfg.dtype,
        progress=cfg.progress,
    )
    model, tokenizer = bundle.model, bundle.tokenizer
    method_cfg = cfg.method_config_obj(bundle.head_modules)
    if method_cfg is None:
        model.requires_grad_(True)
    else:
        apply(model, method_cfg)
    trainable, total = _trainable_counts(model)

    collator = ClassificationCollator(tokenizer, cfg.max_length, is_regression=data.is_regression)
    trainer = Trainer(
        model,
        tcfg,
        data.train,
        collate_fn=collator,
        loss_fn=classification_loss(data.is_regression),
    )
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    t0 = time.perf_counter()
    preds = predict(
        trainer.model,
        data.dev,
        collator,
        batch_size=tcfg.eval_batch_size or max(tcfg.batch_size, 32),
        device=trainer.device,
        is_regression=data.is_regression,
        progress=cfg.progress,
    )
    eval_time = time.perf_counter() - t0
    labels = [e.label for e in data.dev]
    metrics = glue_metrics(data.metric_task, preds, labels)
    steps = int(summary["steps"])
    on_cuda = trainer.device.type == "cuda"
    result: dict[str, Any] = {
        "task": data.name,
        "method": cfg.method,
        "seed": cfg.seed,
        "model": cfg.model,
        "pooling": bundle.pooling,
        "metrics": metrics,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100.0 * trainable / total if total else 0.0,
        "peak_memory_mb": float(summary["peak_mem_mb"]),
        "memory_kind": "cuda_allocated" if on_cuda else "cpu_rss",
        "time_per_step_s": float(summary["wall_time_s"]) / steps if steps else math.nan,
        "steps": steps,
        "lr": tcfg.lr,
        "batch_size": tcfg.batch_size,
        "max_length": cfg.max_length,
        "train_examples": len(data.train),
        "eval_examples": len(data.dev),
        "train_loss": summary.get("train_loss"),
        "train_time_s": float(summary["wall_time_s"]),
        "eval_time_s": eval_time,
        "device": str(trainer.device),
        "delta_dir": None,
    }
    if cfg.output_dir is not None:
        out = Path(cfg.output_dir)
        if cfg.save_delta and method_cfg is not None:
            save_delta(trainer.model, out / DELTA_DIR)
            result["delta_dir"] = str(out / DELTA_DIR)
        atomic_write_text(out / RESULT_FILE, json.dumps(result, indent=2) + "\n")
    return result

