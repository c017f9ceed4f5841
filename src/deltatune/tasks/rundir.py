"""The run directory: its file names, the prepare / overwrite rules and the writers of its files.

A data-to-text run directory holds ``config.yaml`` (the resolved recipe, the source of truth of the
run's settings), ``run_info.json``, ``train_log.jsonl`` (and TensorBoard events),
``checkpoint-<step>/`` directories, ``delta/`` (``model/`` for full fine-tuning),
``train_summary.json``, ``predictions.txt``, ``references.txt`` (the official E2E scorer's format),
``sources.txt``, ``categories.txt``, ``generation_info.json``, ``metrics.json``, ``report.md`` and
the PNG plots. A classification or perplexity run directory holds ``config.yaml`` (its settings in the
sectioned layout of :mod:`deltatune.tasks.layout`), ``result.json``, ``train_log.jsonl``, ``train_summary.json``
and ``delta/``.

:func:`prepare_run_dir` refuses to replace an existing run unless asked to (``--overwrite``), and then
deletes only the files and directories a run writes (checkpoints only when complete and ours). Every
file is written atomically (:func:`deltatune.io_utils.atomic_write_text`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..errors import DataFormatError, DeltaConfigError
from ..io_utils import atomic_write_text, read_text_file
from ..train.resume import cleanup_stale_checkpoints, list_checkpoints, remove_checkpoint

__all__ = [
    "ARTEFACTS",
    "CATEGORIES_FILE",
    "CONFIG_FILE",
    "DELTA_DIR",
    "GENERATION_INFO_FILE",
    "METRICS_FILE",
    "MODEL_DIR",
    "PREDICTIONS_FILE",
    "REFERENCES_FILE",
    "RESULT_FILE",
    "RUN_INFO_FILE",
    "SOURCES_FILE",
    "TRAIN_LOG_FILE",
    "TRAIN_SUMMARY_FILE",
    "count_lines",
    "prepare_run_dir",
    "rank",
    "read_json",
    "write_config",
    "write_json",
    "write_lines",
    "write_references",
]

CONFIG_FILE = "config.yaml"
PREDICTIONS_FILE = "predictions.txt"
REFERENCES_FILE = "references.txt"
SOURCES_FILE = "sources.txt"
CATEGORIES_FILE = "categories.txt"
GENERATION_INFO_FILE = "generation_info.json"
TRAIN_SUMMARY_FILE = "train_summary.json"
TRAIN_LOG_FILE = "train_log.jsonl"
RUN_INFO_FILE = "run_info.json"
METRICS_FILE = "metrics.json"
RESULT_FILE = "result.json"
DELTA_DIR = "delta"
MODEL_DIR = "model"

#: the files a run writes (and --overwrite deletes)
ARTEFACTS = (
    CONFIG_FILE,
    TRAIN_LOG_FILE,
    TRAIN_SUMMARY_FILE,
    RUN_INFO_FILE,
    PREDICTIONS_FILE,
    REFERENCES_FILE,
    SOURCES_FILE,
    CATEGORIES_FILE,
    GENERATION_INFO_FILE,
    METRICS_FILE,
    RESULT_FILE,
    "report.md",
    "plot_loss.png",
    "plot_val_ppl.png",
    "plot_lr.png",
)
_RUN_SUBDIRS = (DELTA_DIR, MODEL_DIR, "tensorboard")
#: a directory holding one of these holds a run
_RUN_MARKERS = (TRAIN_LOG_FILE, RESULT_FILE)


def rank() -> int:
    """This process's rank under torchrun (0 when not distributed)."""
    return int(os.environ.get("RANK", "0"))


def prepare_run_dir(
    run_dir: str | os.PathLike, *, overwrite: bool, resuming: bool = False, resumable: bool = True
) -> Path:
    """Create ``run_dir``, or empty it of a previous run's files when ``overwrite``. ``resumable``: the
    task can resume a run (data-to-text); the refusal then names ``train.resume_from`` as a way out.

    Raises:
        DeltaConfigError: ``run_dir`` is a file, or it holds a run (``train_log.jsonl`` or
            ``result.json``) and neither ``overwrite`` nor ``resuming`` is set.
        ForeignFileError: a ``checkpoint-*`` entry the project did not write (before anything is deleted).
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise DeltaConfigError(f"output_dir must be a directory, got the file {os.fspath(run_dir)!r}")
    held = [m for m in _RUN_MARKERS if (run_dir / m).exists()] if run_dir.is_dir() else []
    if held and not resuming:
        if not overwrite:
            resume = " --set train.resume_from=latest to resume it," if resumable else ""
            raise DeltaConfigError(
                f"output_dir {os.fspath(run_dir)!r} already holds a run ({held[0]}); pass --overwrite "
                f"(overwrite=True) to replace it,{resume} or choose another --output-dir"
            )
        cleanup_stale_checkpoints(run_dir)  # ForeignFileError, before anything is deleted, for checkpoints not ours
        for name in ARTEFACTS:
            (run_dir / name).unlink(missing_ok=True)
        for sub in _RUN_SUBDIRS:
            shutil.rmtree(run_dir / sub, ignore_errors=True)
        for ckpt in list_checkpoints(run_dir):  # only complete checkpoints: the ones the Trainer wrote
            remove_checkpoint(ckpt)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def write_config(run_dir: str | os.PathLike, settings: Mapping[str, Any]) -> None:
    """Write a run's settings (plain YAML-able values) as ``run_dir/config.yaml``, atomically, keys in order."""
    atomic_write_text(Path(run_dir) / CONFIG_FILE, yaml.safe_dump(dict(settings), sort_keys=False, allow_unicode=True))


def write_json(path: str | os.PathLike, data: Mapping[str, Any]) -> None:
    """Write ``data`` as indented JSON (atomically); non-finite floats become strings, other objects ``str()``."""

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


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON object file as a dict (``{}`` when it does not exist or holds no object).

    Raises:
        DataFormatError: invalid JSON, naming the file and the line.
    """
    path = Path(path)
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


def write_lines(path: str | os.PathLike, lines: Sequence[str]) -> None:
    """Write one line per item, whitespace runs collapsed to one space (atomically)."""
    atomic_write_text(path, "".join(" ".join(line.split()) + "\n" for line in lines))


def count_lines(path: str | os.PathLike) -> int:
    """The number of lines of a text file."""
    return len(Path(path).read_text(encoding="utf-8").splitlines())
