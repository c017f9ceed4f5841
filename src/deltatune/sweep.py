"""Method comparison on one task: every method, the same budget, several seeds, one table.

``deltatune sweep configs/glue/sst2.yaml --methods full,lora,bitfit --seeds 1,2,3`` (or
:func:`main` / :func:`run_sweep`) trains each method on one classification task with the same
budget (``train``: epochs or steps, batch size; ``max_length``; train/dev subsets) and seeds; only
the learning rate and the method's own config differ (``methods.<name>.lr`` / ``.config`` in the
YAML, else :data:`~deltatune.tasks.classification.DEFAULT_LR` and
:data:`~deltatune.tasks.classification.DEFAULT_METHOD_CONFIGS`). It writes, in ``output_dir``:

* ``runs/<method>_seed<k>.json``: one result per run (or its error);
* ``results.md`` / ``results.csv``: one row per method: trainable parameters and %, peak memory,
  time per step, each dev score as mean ± std over the seeds (in %, as GLUE tables print them),
  and an error column (a failing method is reported there; the sweep goes on);
* ``results.png``: bar charts of the dev scores (error bars: std over seeds) and of the
  trainable-parameter share.

The sweep YAML is a :class:`~deltatune.tasks.classification.ClassificationConfig` (``task``,
``model``, ``pooling``, ``max_length``, ``train``, subsets ...) plus ``name``, ``methods`` (per-method
overrides ``{lr, config}``) and ``sweep`` (default ``methods`` and ``seeds`` lists). By default
every run is done in a fresh process, so the CPU peak resident memory is that run's own.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._optional import require
from .errors import DeltaConfigError, DeltaConfigTypeError, DeltaError
from .io_utils import atomic_write_bytes, atomic_write_text, read_text_file, yaml_load
from .validation import check_bool, check_int, check_known_keys, check_run_name, check_type

__all__ = [
    "SWEEP_KEYS",
    "MethodRow",
    "SweepResult",
    "SweepSpec",
    "aggregate",
    "load_sweep",
    "main",
    "run_sweep",
    "set_overrides",
    "write_tables",
]

#: Keys of a sweep YAML besides the ClassificationConfig fields.
SWEEP_KEYS: tuple[str, ...] = ("name", "methods", "sweep")
_METHOD_OVERRIDE_KEYS = ("lr", "config", "train")
_NOT_IN_SWEEP = ("method", "method_config", "seed", "output_dir")
_BUDGET_KEYS = ("epochs", "max_steps", "batch_size", "grad_accum_steps")


@dataclass
class SweepSpec:
    """A parsed sweep: the shared run fields, per-method overrides, methods, seeds, output folder."""

    name: str
    base: dict[str, Any]
    overrides: dict[str, dict[str, Any]]
    methods: list[str]
    seeds: list[int]
    output_dir: str

    def run_config(self, method: str, seed: int) -> dict[str, Any]:
        """The ClassificationConfig dict of one run."""
        ov = self.overrides.get(method, {})
        train = {**dict(self.base.get("train") or {}), **dict(ov.get("train") or {})}
        if "lr" in ov:
            train["lr"] = ov["lr"]
        elif "lr" not in train:
            from .tasks.classification import DEFAULT_LR

            train["lr"] = DEFAULT_LR[method]
        return {
            **self.base,
            "train": train,
            "method": method,
            "method_config": dict(ov.get("config") or {}),
            "seed": seed,
            "output_dir": os.path.join(self.output_dir, "runs", f"{method}_seed{seed}"),
        }


def _parse_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in items):
        raise DeltaConfigError(f"--{what} must be a comma-separated list without empty entries, got {text!r}")
    return items


def _check_methods(methods: Sequence[str], where: str) -> list[str]:
    from .tasks.classification import sweep_method_names

    known = sweep_method_names()
    methods = list(methods)
    if not methods:
        raise DeltaConfigError(f"{where} must name at least one method, got []")
    for m in methods:
        if not isinstance(m, str) or m not in known:
            raise DeltaConfigError(f"{where}: unknown method {m!r}; known methods: {', '.join(known)}")
    dup = sorted({m for m in methods if methods.count(m) > 1})
    if dup:
        raise DeltaConfigError(f"{where} lists method(s) {dup} more than once")
    return methods


def _check_seeds(seeds: Sequence[Any], where: str) -> list[int]:
    seeds = list(seeds)
    if not seeds:
        raise DeltaConfigError(f"{where} must name at least one seed, got []")
    out = [check_int(f"{where}[{i}]", s, minimum=0) for i, s in enumerate(seeds)]
    if len(set(out)) != len(out):
        raise DeltaConfigError(f"{where} lists a seed more than once, got {out}")
    return out


def set_overrides(items: Sequence[str]) -> dict[str, Any]:
    """Turn ``--set`` arguments (``key=value`` or ``train.key=value``; values are YAML) into run-field overrides.

    Top-level keys replace the YAML's value; ``train.KEY`` sets one key of the ``train`` mapping (the
    rest of the YAML's ``train`` is kept). Raises :class:`DeltaConfigError` for a malformed item.
    """
    from .recipes import parse_override

    out: dict[str, Any] = {}
    for text in items:
        parts, value = parse_override(text)
        if len(parts) == 1:
            out[parts[0]] = value
        elif len(parts) == 2 and parts[0] == "train":
            out.setdefault("train.", {})[parts[1]] = value
        else:
            raise DeltaConfigError(
                f"--set {text!r}: a sweep override is a run field (e.g. max_train_examples=2000) or train.KEY=VALUE"
            )
    return out


def load_sweep(
    source: str | os.PathLike | Mapping[str, Any],
    *,
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    output_dir: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> SweepSpec:
    """Read and validate a sweep YAML (or dict); every run config is checked before anything runs.

    ``methods`` / ``seeds`` / ``output_dir`` replace the YAML's ``sweep.methods`` / ``sweep.seeds`` /
    ``output_dir``; ``overrides`` replaces top-level run fields (e.g. ``{"device": "cpu"}``); its key
    ``"train."`` (as :func:`set_overrides` builds it) holds single ``train`` keys to replace.
    """
    from .tasks.classification import ClassificationConfig

    if isinstance(source, Mapping):
        raw = dict(source)
        default_name = "sweep"
    else:
        check_type("config", source, (str, os.PathLike), "a YAML path or a dict")
        path = Path(source)
        if not path.is_file():
            raise DeltaConfigError(f"config must be an existing YAML file, got {os.fspath(source)!r}")
        import yaml

        try:
            raw = yaml_load(read_text_file(path, "sweep config"))
        except yaml.YAMLError as exc:
            raise DeltaConfigError(f"config {os.fspath(path)!r} is not valid YAML: {exc}") from None
        if not isinstance(raw, Mapping):
            raise DeltaConfigTypeError(f"config {os.fspath(path)!r} must hold a YAML mapping, got {type(raw).__name__}")
        raw = dict(raw)
        default_name = path.stem
    if overrides:
        overrides = dict(overrides)
        train_keys = overrides.pop("train.", None)
        raw.update(overrides)
        if train_keys:
            base_train = raw.get("train") or {}
            check_type("train", base_train, Mapping, "a mapping of TrainConfig fields")
            raw["train"] = {**dict(base_train), **train_keys}
    check_known_keys("sweep", raw, [*ClassificationConfig.known_keys(), *SWEEP_KEYS])
    bad = [k for k in _NOT_IN_SWEEP if k in raw and k != "output_dir"]
    if bad:
        raise DeltaConfigError(
            f"sweep config must not set {', '.join(map(repr, bad))}: the sweep sets them per run "
            f"(use methods.<name>.config for method fields and sweep.seeds / --seeds for seeds)"
        )
    name = raw.pop("name", default_name)
    check_run_name("name", name)
    per_method = raw.pop("methods", None) or {}
    check_type("methods", per_method, Mapping, "a mapping method -> {lr, config, train}")
    sweep = raw.pop("sweep", None) or {}
    check_type("sweep", sweep, Mapping, "a mapping with 'methods' and 'seeds'")
    unknown = sorted(set(sweep) - {"methods", "seeds"})
    if unknown:
        raise DeltaConfigError(f"unknown sweep.* key(s) {unknown}; known keys: methods, seeds")
    out_dir = output_dir if output_dir is not None else raw.pop("output_dir", None)
    raw.pop("output_dir", None)
    if out_dir is None:
        out_dir = os.path.join("runs", "sweep", name)
    check_type("output_dir", out_dir, (str, os.PathLike), "a directory path")

    from .tasks.classification import sweep_method_names

    if methods is None:
        methods = sweep.get("methods") or sweep_method_names()
        methods = _check_methods(methods, "sweep.methods")
    else:
        methods = _check_methods(methods, "--methods")
    if seeds is None:
        seeds = _check_seeds(sweep.get("seeds") or [42], "sweep.seeds")
    else:
        seeds = _check_seeds(seeds, "--seeds")
    for m, ov in per_method.items():
        _check_methods([m], "methods")
        check_type(f"methods.{m}", ov, Mapping, "a mapping with lr, config, train")
        unknown = sorted(set(ov) - set(_METHOD_OVERRIDE_KEYS))
        if unknown:
            raise DeltaConfigError(
                f"unknown methods.{m} key(s) {unknown}; known keys: {', '.join(_METHOD_OVERRIDE_KEYS)}"
            )
        check_type(f"methods.{m}.train", ov.get("train") or {}, Mapping, "a dict of TrainConfig fields")
        budget = sorted(set(ov.get("train") or {}) & set(_BUDGET_KEYS))
        if budget:
            raise DeltaConfigError(
                f"methods.{m}.train must not change the shared budget ({', '.join(_BUDGET_KEYS)}), got {budget}"
            )
    spec = SweepSpec(name, raw, {m: dict(v) for m, v in per_method.items()}, list(methods), list(seeds), os.fspath(out_dir))
    for m in spec.methods:  # validate every run before the first one starts
        ClassificationConfig.from_dict(spec.run_config(m, spec.seeds[0]))
    return spec


# ------------------------------------------------------------------------------------------ running
def _child(cfg: dict[str, Any], result_path: str) -> None:
    """Entry point of an isolated run (a spawned process): writes ``{"result": ...}`` or ``{"error": ...}``."""
    try:
        from .tasks.classification import run_classification

        payload: dict[str, Any] = {"result": run_classification(cfg)}
    except Exception as exc:  # reported in the table, not raised
        payload = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    atomic_write_text(result_path, json.dumps(payload) + "\n")


def _run_one(cfg: dict[str, Any], isolate: bool, tmp_path: Path) -> dict[str, Any]:
    if not isolate:
        try:
            from .tasks.classification import run_classification

            return {"result": run_classification(cfg)}
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    if tmp_path.exists():
        tmp_path.unlink()
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_child, args=(cfg, str(tmp_path)), daemon=False)
    proc.start()
    try:
        proc.join()
    except BaseException:
        proc.terminate()
        proc.join()
        raise
    if not tmp_path.is_file():
        return {"error": f"the run's process exited with code {proc.exitcode} without a result"}
    payload = json.loads(tmp_path.read_text(encoding="utf-8"))
    tmp_path.unlink()
    return payload


@dataclass
class MethodRow:
    """One row of the sweep table (a method aggregated over its seeds)."""

    method: str
    seeds: list[int]
    ok_seeds: list[int]
    trainable_params: int | None
    trainable_percent: float | None
    peak_memory_mb: float | None
    time_per_step_s: float | None
    scores: dict[str, tuple[float, float]]  # metric -> (mean, std) over ok seeds (fractions)
    error: str | None = None


@dataclass
class SweepResult:
    """What :func:`run_sweep` returns: the rows, the per-run records and the files written."""

    task: str
    metrics: list[str]
    rows: list[MethodRow]
    runs: list[dict[str, Any]]
    files: dict[str, Path] = field(default_factory=dict)


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(runs: Sequence[Mapping[str, Any]], methods: Sequence[str], metrics: Sequence[str]) -> list[MethodRow]:
    """Aggregate per-run records (``{"method", "seed", "result"|"error"}``) into one row per method.

    Scores are mean and sample standard deviation over the seeds that succeeded; the error column
    holds the first error (prefixed by its seed) when any seed failed.
    """
    rows = []
    for m in methods:
        mine = [r for r in runs if r["method"] == m]
        ok = [r for r in mine if "result" in r]
        errs = [f"seed {r['seed']}: {r['error']}" for r in mine if "error" in r]
        res = [r["result"] for r in ok]
        scores = {k: _mean_std([float(x["metrics"][k]) for x in res if k in x["metrics"]]) for k in metrics}
        rows.append(
            MethodRow(
                method=m,
                seeds=[r["seed"] for r in mine],
                ok_seeds=[r["seed"] for r in ok],
                trainable_params=res[0]["trainable_params"] if res else None,
                trainable_percent=res[0]["trainable_percent"] if res else None,
                peak_memory_mb=statistics.fmean(x["peak_memory_mb"] for x in res) if res else None,
                time_per_step_s=statistics.fmean(x["time_per_step_s"] for x in res) if res else None,
                scores=scores,
                error=(errs[0] + (f" (+{len(errs) - 1} more)" if len(errs) > 1 else "")) if errs else None,
            )
        )
    return rows


_METRIC_LABELS = {"accuracy": "Acc", "f1": "F1", "mcc": "MCC", "pearson": "Pearson", "spearman": "Spearman"}


def _fmt_score(mean: float, std: float, n: int) -> str:
    if math.isnan(mean):
        return "–"
    return f"{100 * mean:.2f}" if n <= 1 else f"{100 * mean:.2f} ± {100 * std:.2f}"


def _fmt_int(n: int | None) -> str:
    return "–" if n is None else f"{n:,}"


def _table_rows(rows: Sequence[MethodRow], metrics: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    header = ["Method", "Trainable params", "Trainable %", "Peak memory (MiB)", "Time / step (ms)"]
    header += [f"{_METRIC_LABELS.get(k, k)} (dev)" for k in metrics]
    header += ["Seeds", "Error"]
    body = []
    for r in rows:
        cells = [
            r.method,
            _fmt_int(r.trainable_params),
            "–" if r.trainable_percent is None else f"{r.trainable_percent:.3f}%",
            "–" if r.peak_memory_mb is None else f"{r.peak_memory_mb:,.0f}",
            "–" if r.time_per_step_s is None else f"{1000 * r.time_per_step_s:,.0f}",
        ]
        cells += [_fmt_score(*r.scores[k], len(r.ok_seeds)) for k in metrics]
        cells += [f"{len(r.ok_seeds)}/{len(r.seeds)}", (r.error or "").replace("|", "\\|").replace("\n", " ")]
        body.append(cells)
    return header, body


def _markdown(title: str, notes: Sequence[str], header: list[str], body: list[list[str]]) -> str:
    lines = [f"# {title}", ""]
    lines += [f"{n}" for n in notes]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def _csv_text(rows: Sequence[MethodRow], metrics: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        ["method", "trainable_params", "trainable_percent", "peak_memory_mb", "time_per_step_s"]
        + [f"{k}_{s}" for k in metrics for s in ("mean", "std")]
        + ["seeds_ok", "seeds", "error"]
    )
    for r in rows:
        def num(x: float | None) -> str:
            return "" if x is None or (isinstance(x, float) and math.isnan(x)) else repr(float(x))

        w.writerow(
            [r.method, "" if r.trainable_params is None else r.trainable_params, num(r.trainable_percent),
             num(r.peak_memory_mb), num(r.time_per_step_s)]
            + [num(v) for k in metrics for v in r.scores[k]]
            + [" ".join(map(str, r.ok_seeds)), " ".join(map(str, r.seeds)), r.error or ""]
        )
    return buf.getvalue()


def _png_bytes(title: str, rows: Sequence[MethodRow], metrics: Sequence[str]) -> bytes:
    FigureCanvasAgg = require("matplotlib.backends.backend_agg", "sweep plots").FigureCanvasAgg  # noqa: N806
    Figure = require("matplotlib.figure", "sweep plots").Figure  # noqa: N806

    n = len(metrics) + 1
    fig = Figure(figsize=(4.2 * n, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    names = [r.method for r in rows]
    xs = list(range(len(rows)))
    for i, k in enumerate(metrics):
        ax = fig.add_subplot(1, n, i + 1)
        means = [0.0 if math.isnan(r.scores[k][0]) else 100 * r.scores[k][0] for r in rows]
        stds = [0.0 if math.isnan(r.scores[k][1]) else 100 * r.scores[k][1] for r in rows]
        colors = ["#b0b0b0" if r.error and not r.ok_seeds else "#4c72b0" for r in rows]
        ax.bar(xs, means, yerr=stds, capsize=3, color=colors)
        ax.set_title(f"{_METRIC_LABELS.get(k, k)} (dev, %)")
        ax.set_xticks(xs)
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    ax = fig.add_subplot(1, n, n)
    pct = [r.trainable_percent or 0.0 for r in rows]
    ax.bar(xs, pct, color="#dd8452")
    if any(p > 0 for p in pct):
        ax.set_yscale("log")
    ax.set_title("trainable parameters (%)")
    ax.set_xticks(xs)
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_tables(
    result: SweepResult, output_dir: str | os.PathLike, *, title: str, notes: Sequence[str] = ()
) -> dict[str, Path]:
    """Write ``results.md``, ``results.csv`` and ``results.png`` (atomically) and return their paths."""
    out = Path(output_dir)
    header, body = _table_rows(result.rows, result.metrics)
    files = {"md": out / "results.md", "csv": out / "results.csv", "png": out / "results.png"}
    atomic_write_text(files["md"], _markdown(title, notes, header, body))
    atomic_write_text(files["csv"], _csv_text(result.rows, result.metrics))
    atomic_write_bytes(files["png"], _png_bytes(title, result.rows, result.metrics))
    return files


def _budget_notes(spec: SweepSpec, runs: Sequence[Mapping[str, Any]]) -> list[str]:
    ok = [r["result"] for r in runs if "result" in r]
    base = spec.base
    train = dict(base.get("train") or {})
    budget = ", ".join(f"{k}={v}" for k, v in train.items() if k != "lr")
    notes = [
        f"Task `{base['task']}`, model `{base.get('model', 'minilm-l6')}`, pooling `{base.get('pooling', 'auto')}`, "
        f"max_length {base.get('max_length', 128)}; budget: {budget or 'TrainConfig defaults'}; seeds {spec.seeds}.",
    ]
    if ok:
        r0 = ok[0]
        mem = "GPU max allocated" if r0["memory_kind"] == "cuda_allocated" else "CPU peak RSS of the run's process"
        notes.append(
            f"Train examples {r0['train_examples']}, dev examples {r0['eval_examples']}, {r0['steps']} optimiser steps "
            f"per run, device {r0['device']}; peak memory = {mem}. Scores in %, mean ± std over seeds."
        )
        lrs = {r["method"]: r["result"]["lr"] for r in runs if "result" in r}
        notes.append("Learning rates: " + ", ".join(f"{m} {lr:g}" for m, lr in lrs.items()) + ".")
    return notes


def run_sweep(
    spec: SweepSpec | str | os.PathLike | Mapping[str, Any],
    *,
    isolate: bool = True,
    progress: bool = True,
) -> SweepResult:
    """Run every (method, seed) of ``spec`` and write the per-run JSON and the tables.

    A run that raises is recorded with its error (in its JSON and the table's error column); the
    sweep continues with the next run. ``isolate`` runs each in a fresh process (spawn).
    """
    from tqdm.auto import tqdm

    from .metrics import GLUE_TASK_METRICS
    from .tasks.classification import ClassificationConfig

    if not isinstance(spec, SweepSpec):
        spec = load_sweep(spec)
    check_bool("isolate", isolate)
    check_bool("progress", progress)
    task_cfg = ClassificationConfig.from_dict(spec.run_config(spec.methods[0], spec.seeds[0]))
    if task_cfg.task == "csv":
        task_name, metrics = "csv", ["accuracy"]
    else:
        from .data import glue_task

        task_name = glue_task(task_cfg.task).name
        metrics = list(GLUE_TASK_METRICS[task_name])
    out = Path(spec.output_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    jobs = [(m, s) for m in spec.methods for s in spec.seeds]
    title = f"{spec.name}: method comparison on {task_name}"
    bar = tqdm(jobs, desc=f"sweep {spec.name}", unit="run", disable=not progress, dynamic_ncols=True)
    for m, s in bar:
        bar.set_postfix(method=m, seed=s, refresh=True)
        cfg = spec.run_config(m, s)
        cfg["progress"] = bool(cfg.get("progress", True)) and progress
        t0 = time.perf_counter()
        payload = _run_one(cfg, isolate, out / "runs" / f".{m}_seed{s}.child.json")
        record = {"method": m, "seed": s, "config": cfg, "wall_time_s": time.perf_counter() - t0, **payload}
        atomic_write_text(out / "runs" / f"{m}_seed{s}.json", json.dumps(record, indent=2, default=str) + "\n")
        runs.append(record)
        if "error" in payload:
            tqdm.write(f"sweep: {m} seed {s} failed: {payload['error']}", file=sys.stderr)
        # the tables are rewritten after every run: an interrupted sweep keeps a table of what finished
        result = SweepResult(task_name, metrics, aggregate(runs, spec.methods, metrics), runs)
        result.files = write_tables(result, out, title=title, notes=_budget_notes(spec, runs))
    bar.close()
    return result


# ------------------------------------------------------------------------------------------ CLI
def build_parser(prog: str = "deltatune sweep") -> argparse.ArgumentParser:
    """The argument parser of ``deltatune sweep``."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Compare fine-tuning methods on one task with the same budget and seeds; "
        "writes results.md, results.csv, results.png and per-run JSON.",
    )
    p.add_argument("config", help="sweep YAML (e.g. configs/glue/sst2.yaml)")
    p.add_argument("--methods", help="comma-separated methods (default: the YAML's sweep.methods, else all)")
    p.add_argument("--seeds", help="comma-separated seeds (default: the YAML's sweep.seeds, else 42)")
    p.add_argument("--output-dir", help="where the tables and runs go (default: the YAML's output_dir)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a run field of the YAML, e.g. --set train.epochs=2 --set max_train_examples=20000 "
        "--set model=/path/to/model (values are YAML)",
    )
    p.add_argument("--device", help="override the run device ('cpu', 'cuda', 'auto')")
    p.add_argument("--num-threads", type=int, help="torch threads per run (CPU)")
    p.add_argument("--no-isolate", action="store_true", help="run in this process (faster start; CPU peak memory is cumulative)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    """``deltatune sweep`` entry point; returns the exit status (0 ok, 1 some run failed, 2 bad arguments)."""
    args = build_parser().parse_args(argv)
    try:
        methods = _parse_list(args.methods, "methods") if args.methods is not None else None
        seeds = None
        if args.seeds is not None:
            items = _parse_list(args.seeds, "seeds")
            try:
                seeds = [int(s) for s in items]
            except ValueError:
                raise DeltaConfigError(f"--seeds must be comma-separated ints, got {args.seeds!r}") from None
        overrides = set_overrides(args.overrides)
        if args.device is not None:
            overrides["device"] = args.device
        if args.num_threads is not None:
            overrides["num_threads"] = args.num_threads
        spec = load_sweep(args.config, methods=methods, seeds=seeds, output_dir=args.output_dir, overrides=overrides)
        result = run_sweep(spec, isolate=not args.no_isolate, progress=not args.no_progress)
    except DeltaError as exc:
        print(f"deltatune sweep: error: {exc}", file=sys.stderr)
        return 2
    print(result.files["md"].read_text(encoding="utf-8"))
    for kind, path in result.files.items():
        print(f"{kind}: {path}")
    return 1 if any(r.error for r in result.rows) else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
