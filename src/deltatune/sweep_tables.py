"""The tables of a method sweep: per-method aggregation over seeds, ``results.md`` / ``.csv`` / ``.png``.

:func:`aggregate` turns the per-run records of :func:`deltatune.sweep.run_sweep` into one
:class:`MethodRow` per method (mean and sample standard deviation of each score over the seeds that
succeeded, the first error of those that failed); :func:`write_tables` writes the Markdown and CSV
tables and the bar charts. Scores in [0, 1] (accuracy, BLEU ...) are shown as percentages; NIST and
CIDEr as they are.
"""

from __future__ import annotations

import csv
import io
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._optional import require
from .io_utils import atomic_write_bytes, atomic_write_text

__all__ = ["UNSCALED_METRICS", "MethodRow", "SweepResult", "aggregate", "write_tables"]


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
    split: str = "dev"  #: the split the scores are on (named in the table's headers)

    def scale(self, metric: str) -> float:
        """The factor a score is shown with: 100 (a percentage) for scores in [0, 1], 1 for NIST, CIDEr and
        perplexities."""
        return 1.0 if metric in UNSCALED_METRICS else 100.0


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
#: scores not in [0, 1], shown as they are (not as percentages)
UNSCALED_METRICS = ("NIST", "CIDEr", "perplexity", "base_perplexity")


def _fmt_score(mean: float, std: float, n: int, factor: float = 100.0) -> str:
    if math.isnan(mean):
        return "–"
    return f"{factor * mean:.2f}" if n <= 1 else f"{factor * mean:.2f} ± {factor * std:.2f}"


def _unit(result: SweepResult, metric: str) -> str:
    return f"{result.split}, %" if result.scale(metric) == 100.0 else result.split


def _fmt_int(n: int | None) -> str:
    return "–" if n is None else f"{n:,}"


def _table_rows(result: SweepResult) -> tuple[list[str], list[list[str]]]:
    rows, metrics = result.rows, result.metrics
    header = ["Method", "Trainable params", "Trainable %", "Peak memory (MiB)", "Time / step (ms)"]
    header += [f"{_METRIC_LABELS.get(k, k)} ({result.split})" for k in metrics]
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
        cells += [_fmt_score(*r.scores[k], len(r.ok_seeds), result.scale(k)) for k in metrics]
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


def _png_bytes(title: str, result: SweepResult) -> bytes:
    FigureCanvasAgg = require("matplotlib.backends.backend_agg", "sweep plots").FigureCanvasAgg  # noqa: N806
    Figure = require("matplotlib.figure", "sweep plots").Figure  # noqa: N806

    rows, metrics = result.rows, result.metrics
    n = len(metrics) + 1
    fig = Figure(figsize=(4.2 * n, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    names = [r.method for r in rows]
    xs = list(range(len(rows)))
    for i, k in enumerate(metrics):
        ax = fig.add_subplot(1, n, i + 1)
        f = result.scale(k)
        means = [0.0 if math.isnan(r.scores[k][0]) else f * r.scores[k][0] for r in rows]
        stds = [0.0 if math.isnan(r.scores[k][1]) else f * r.scores[k][1] for r in rows]
        colors = ["#b0b0b0" if r.error and not r.ok_seeds else "#4c72b0" for r in rows]
        ax.bar(xs, means, yerr=stds, capsize=3, color=colors)
        ax.set_title(f"{_METRIC_LABELS.get(k, k)} ({_unit(result, k)})")
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
    header, body = _table_rows(result)
    files = {"md": out / "results.md", "csv": out / "results.csv", "png": out / "results.png"}
    atomic_write_text(files["md"], _markdown(title, notes, header, body))
    atomic_write_text(files["csv"], _csv_text(result.rows, result.metrics))
    atomic_write_bytes(files["png"], _png_bytes(title, result))
    return files
