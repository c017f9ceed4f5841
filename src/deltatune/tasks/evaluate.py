"""Scoring a data-to-text run: predictions vs references -> ``metrics.json`` and ``report.md``.

:func:`evaluate_run` is the last step of :func:`deltatune.tasks.data_to_text.run_recipe` and the
``deltatune evaluate`` command: it scores a predictions file against a references file (E2E metrics,
TER; WebNLG runs also on the seen / unseen / all split), gathers what the run directory holds from the
other steps (trainable parameters, peak memory, times, losses, versions) and writes ``metrics.json``
and ``report.md`` with the plots. :func:`format_scores` is the score table the CLI prints.

A standalone evaluation of a finished run keeps the run's ``wall_time_s`` (the time of the run that
trained, decoded and scored it) and records its own time as ``evaluate_time_s``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .._version import format_versions, software_versions
from ..data import WEBNLG_SEEN_CATEGORIES
from ..errors import DeltaConfigError
from ..metrics import read_scored_files, score_files, seen_unseen_labels, split_scores
from ..report import score_table, write_report
from ..validation import check_type
from .loader import check_java
from .rundir import (
    CATEGORIES_FILE,
    GENERATION_INFO_FILE,
    METRICS_FILE,
    PREDICTIONS_FILE,
    REFERENCES_FILE,
    RUN_INFO_FILE,
    TRAIN_SUMMARY_FILE,
    count_lines,
    read_json,
    write_json,
)
from .spec import E2E_METRIC_NAMES, Recipe

__all__ = ["evaluate_run", "format_scores"]


def _run_dir(recipe: Recipe | None, run_dir: Any, predictions: Any) -> Path:
    if run_dir is not None:
        return Path(run_dir)
    if recipe is not None:
        return recipe.run_dir
    if predictions is not None:
        return Path(predictions).resolve().parent
    raise DeltaConfigError("evaluate needs a recipe, a run_dir or a predictions file, got none")


def _format_overrides(diff: Mapping[str, Any]) -> str:
    return "; ".join(f"{k}: run {v['run']!r} -> given {v['given']!r}" for k, v in diff.items())


def evaluate_run(
    recipe: Recipe | None = None,
    *,
    predictions: str | os.PathLike | None = None,
    references: str | os.PathLike | None = None,
    run_dir: str | os.PathLike | None = None,
    metrics: Sequence[str] | None = None,
    started_at: float | None = None,
    run_config_overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Step 3 alone: score a predictions file against a references file and write ``metrics.json``
    and ``report.md`` (with the plots) into the run directory.

    Files default to the run directory's ``predictions.txt`` / ``references.txt``; the run directory
    defaults to the recipe's ``output_dir`` (or the predictions file's folder). The metrics default to
    ``recipe.eval.metrics`` (all five without a recipe). What the run directory holds from the other
    steps (trainable parameters, peak memory, times, losses) is added to ``metrics.json``. WebNLG runs
    (the recipe's dataset, or ``run_info.json``'s) are also scored on the seen / unseen / all split
    (``metrics.json``'s ``splits``), from ``categories.txt`` next to the predictions file.

    ``started_at`` (a ``time.perf_counter()`` value, given by the whole pipeline) makes ``wall_time_s``
    the time since then. Without it (a standalone evaluation) the ``wall_time_s`` of an existing
    ``metrics.json`` is kept (else it is the sum of the steps' times) and this evaluation's own time
    goes to ``evaluate_time_s``. ``run_config_overrides`` (``{field: {"run", "given"}}``, from
    :func:`deltatune.tasks.data_to_text.resolve_run_recipe`) and those ``generate`` recorded in
    ``generation_info.json`` are written to ``metrics.json`` and ``report.md``.
    """
    t_start = time.perf_counter()
    if recipe is not None:
        check_type("recipe", recipe, Recipe, "a Recipe (see load_recipe)")
    root = _run_dir(recipe, run_dir, predictions)
    pred = Path(predictions) if predictions is not None else root / PREDICTIONS_FILE
    ref = Path(references) if references is not None else root / REFERENCES_FILE
    for what, p in (("predictions", pred), ("references", ref)):
        if not p.is_file():
            raise DeltaConfigError(
                f"{what} file must exist, got {os.fspath(p)!r} (run `deltatune generate` first, or pass --{what})"
            )
    names = list(metrics) if metrics is not None else (recipe.eval.metrics if recipe is not None else list(E2E_METRIC_NAMES))
    check_java(names)
    info = read_json(root / RUN_INFO_FILE)
    dataset = recipe.data.dataset if recipe is not None else info.get("dataset")
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

    previous = read_json(root / METRICS_FILE)
    train = read_json(root / TRAIN_SUMMARY_FILE)
    gen = read_json(root / GENERATION_INFO_FILE)
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
    elif isinstance(previous.get("wall_time_s"), (int, float)):
        out["wall_time_s"] = previous["wall_time_s"]
    else:
        out["wall_time_s"] = round(sum(float(out.get(k, 0.0)) for k in ("train_time_s", "generate_time_s", "score_time_s")), 2)
    for key in ("steps", "train_loss", "final_loss", "eval_loss", "eval_ppl", "tokens_per_s"):
        if train.get(key) is not None:
            out[key] = train[key]
    out["num_eval_inputs"] = gen.get("num_inputs", count_lines(pred))
    for key in ("method", "model", "dataset"):
        if key in info:
            out[key] = info[key]
    if gen.get("split"):
        out["eval_split"] = gen["split"]
    # the versions that trained the run (run_info.json), else those scoring it now
    out["versions"] = info.get("versions") if isinstance(info.get("versions"), dict) else software_versions()
    overrides = {**dict(gen.get("run_config_overrides") or {}), **dict(run_config_overrides or {})}
    if overrides:
        out["run_config_overrides"] = overrides
    if started_at is None:
        out["evaluate_time_s"] = round(time.perf_counter() - t_start, 4)

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
    if overrides:
        extra["run config overrides"] = _format_overrides(overrides)
    for key, label in (("train_examples", "train inputs"), ("train_features", "train sequences")):
        if key in info:
            extra[label] = info[key]
    if "num_inputs" in gen:
        extra["eval inputs"] = gen["num_inputs"]
    extra["software"] = format_versions(out["versions"])
    write_json(root / METRICS_FILE, out)
    write_report(root, out, extra)
    return out


def _webnlg_splits(ref: Path, pred: Path, categories: Path, names: Sequence[str]) -> dict[str, Any]:
    """WebNLG scores on the seen / unseen / all inputs (categories: one per line, next to the predictions)."""
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


def format_scores(metrics: Mapping[str, Any]) -> str:
    """The score table as plain text (what the CLI prints at the end of a run)."""
    rows = score_table(metrics)
    if not rows:
        return "(no scores)"
    width = max(len(label) for label, _ in rows)
    vwidth = max(len(v) for _, v in rows)
    line = "-" * (width + vwidth + 3)
    return "\n".join([line] + [f"{label:<{width}}   {value:>{vwidth}}" for label, value in rows] + [line])
