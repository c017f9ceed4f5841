"""Run reports: training-curve plots, a Markdown score report, and side-by-side run comparisons.

Everything here reads what a run directory holds (``train_log.jsonl`` written by the
:class:`~deltatune.train.Trainer`, ``metrics.json`` written by :func:`deltatune.recipes.run_recipe`)
and writes PNG images (matplotlib, Agg canvas: no display needed, the global backend is left alone),
Markdown and CSV. Every file is written atomically.

* :func:`plot_run`: training loss, validation loss, validation perplexity and learning rate against
  the optimiser step, one PNG each.
* :func:`write_report`: ``report.md`` with the score table (BLEU, NIST, METEOR, ROUGE-L, CIDEr,
  trainable parameters, peak memory, time), extra run facts and the plots; a run trained on an
  evaluation split (``config.yaml``'s ``data.train_split`` is not ``train``, e.g. DART, whose train
  split is not shipped) says that its scores are not comparable with published ones
  (:func:`training_split_note`).
* :func:`compare_runs`: one PNG overlaying the loss curves of several runs and their ``metrics.json``
  side by side (Markdown and CSV).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ._optional import require
from .errors import DataFormatError, DeltaConfigError
from .io_utils import atomic_write_bytes, atomic_write_text, load_yaml_file, read_text_file
from .validation import check_type

__all__ = [
    "METRICS_FILE",
    "REPORT_FILE",
    "SCORE_ROWS",
    "compare_runs",
    "format_value",
    "plot_run",
    "read_metrics",
    "score_table",
    "training_split_note",
    "write_report",
]

#: File names inside a run directory.
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
LOG_FILE = "train_log.jsonl"
#: The resolved recipe a run directory holds (written by the recipe pipeline).
CONFIG_FILE = "config.yaml"

#: Series with at most this many points are drawn with a marker on every point (a one-point line
#: is otherwise invisible: a short run logs its loss and learning rate once).
MARKER_MAX_POINTS = 10

#: How reports spell the data-to-text datasets.
_DATASET_NAMES = {"e2e": "E2E", "dart": "DART", "webnlg": "WebNLG"}

#: (key in metrics.json, label) of the rows of the score table, in order.
SCORE_ROWS: tuple[tuple[str, str], ...] = (
    ("BLEU", "BLEU"),
    ("NIST", "NIST"),
    ("METEOR", "METEOR"),
    ("ROUGE_L", "ROUGE-L"),
    ("CIDEr", "CIDEr"),
    ("TER", "TER (lower is better)"),
    ("trainable_params", "trainable params"),
    ("trainable_percent", "trainable %"),
    ("peak_memory_mb", "peak memory (MiB)"),
    ("train_time_s", "train time (s)"),
    ("wall_time_s", "wall time (s)"),
)

_PLOTS = {
    "loss": "plot_loss.png",
    "val_ppl": "plot_val_ppl.png",
    "lr": "plot_lr.png",
}


# ------------------------------------------------------------------------------------------------
# reading


def _run_dir(run_dir: Any, name: str = "run_dir") -> Path:
    check_type(name, run_dir, (str, os.PathLike), "a run directory path")
    path = Path(run_dir)
    if not path.is_dir():
        raise DeltaConfigError(f"{name} must be an existing run directory, got {os.fspath(run_dir)!r}")
    return path


def _num(value: Any) -> float | None:
    """A finite or non-finite float from a log value (the logger writes NaN/inf as strings)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _curves(run_dir: Path) -> dict[str, tuple[list[float], list[float]]]:
    """``{curve: (steps, values)}`` for train loss, lr, val loss and val ppl (missing curves omitted)."""
    from .train.logging import read_log

    log = run_dir / LOG_FILE
    if not log.is_file():
        raise DeltaConfigError(f"run_dir must contain {LOG_FILE} (written by the Trainer), got {os.fspath(run_dir)!r}")
    out: dict[str, tuple[list[float], list[float]]] = {}

    def add(name: str, step: Any, value: Any) -> None:
        s, v = _num(step), _num(value)
        if s is None or v is None:
            return
        xs, ys = out.setdefault(name, ([], []))
        xs.append(s)
        ys.append(v)

    for rec in read_log(log):
        split = rec.get("split", "train")
        if split == "train":
            add("train_loss", rec.get("step"), rec.get("loss"))
            add("lr", rec.get("step"), rec.get("lr"))
        elif split == "eval":
            add("val_loss", rec.get("step"), rec.get("loss"))
            ppl = rec.get("ppl")
            if ppl is None and _num(rec.get("loss")) is not None:
                try:
                    ppl = math.exp(_num(rec.get("loss")))  # type: ignore[arg-type]
                except OverflowError:
                    ppl = float("inf")
            add("val_ppl", rec.get("step"), ppl)
    return out


def read_metrics(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Read ``<run_dir>/metrics.json``.

    Raises:
        DeltaConfigError: the directory or the file is missing.
        DataFormatError: the file is not a JSON object.
    """
    path = _run_dir(run_dir) / METRICS_FILE
    if not path.is_file():
        raise DeltaConfigError(f"run directory {os.fspath(run_dir)!r} has no {METRICS_FILE} (was the run finished?)")
    try:
        data = json.loads(read_text_file(path, METRICS_FILE))
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{path}, line {exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise DataFormatError(f"{path}, line 1: expected a JSON object, got {type(data).__name__}")
    return data


# ------------------------------------------------------------------------------------------------
# plotting


def _figure(ncols: int = 1) -> Any:
    Figure = require("matplotlib.figure", "plots").Figure  # noqa: N806

    fig = Figure(figsize=(6.4 * ncols, 4.2), dpi=100)
    fig.subplots_adjust(left=0.12 / ncols, right=1 - 0.03 / ncols, bottom=0.12, top=0.91, wspace=0.25)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _save_png(fig: Any, path: Path) -> Path:
    FigureCanvasAgg = require("matplotlib.backends.backend_agg", "plots").FigureCanvasAgg  # noqa: N806

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return path


def _finite(xs: list[float], ys: list[float]) -> tuple[list[float], list[float]]:
    keep = [(x, y) for x, y in zip(xs, ys) if math.isfinite(y)]
    return [x for x, _ in keep], [y for _, y in keep]


def _line(ax: Any, xs: list[float], ys: list[float], **kw: Any) -> Any:
    """``ax.plot`` that marks every point of a short series (:data:`MARKER_MAX_POINTS`), so a
    one-point series is a visible dot instead of an empty line."""
    if len(xs) <= MARKER_MAX_POINTS and kw.get("marker") is None:
        kw.update(marker="o", markersize=kw.get("markersize", 5))
    (line,) = ax.plot(xs, ys, **kw)
    return line


def plot_run(run_dir: str | os.PathLike) -> list[Path]:
    """Plot a run's training curves from ``<run_dir>/train_log.jsonl`` into PNGs beside it.

    Writes ``plot_loss.png`` (training loss and, when the log has eval rows, validation loss),
    ``plot_val_ppl.png`` (validation perplexity; only with eval rows) and ``plot_lr.png`` (learning
    rate), all against the optimiser step. Non-finite values are left out of the lines; series of at
    most :data:`MARKER_MAX_POINTS` points mark each point.

    Returns:
        The paths written, in that order.

    Raises:
        DeltaConfigError: ``run_dir`` is not a directory or has no ``train_log.jsonl``, or the log
            holds no training record.
    """
    root = _run_dir(run_dir)
    curves = _curves(root)
    if "train_loss" not in curves:
        raise DeltaConfigError(f"{root / LOG_FILE} holds no training record (split 'train' with step and loss)")
    written: list[Path] = []

    fig, (ax,) = _figure()
    xs, ys = _finite(*curves["train_loss"])
    _line(ax, xs, ys, label="train loss", color="tab:blue", linewidth=1.2)
    if "val_loss" in curves:
        vx, vy = _finite(*curves["val_loss"])
        _line(ax, vx, vy, label="validation loss", color="tab:orange", marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"loss: {root.name}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    written.append(_save_png(fig, root / _PLOTS["loss"]))

    if "val_ppl" in curves:
        fig, (ax,) = _figure()
        px, py = _finite(*curves["val_ppl"])
        _line(ax, px, py, color="tab:green", marker="o", markersize=3, label="validation perplexity")
        ax.set_xlabel("step")
        ax.set_ylabel("perplexity")
        ax.set_title(f"validation perplexity: {root.name}")
        ax.grid(True, alpha=0.3)
        ax.legend()
        written.append(_save_png(fig, root / _PLOTS["val_ppl"]))

    if "lr" in curves:
        fig, (ax,) = _figure()
        lx, ly = _finite(*curves["lr"])
        _line(ax, lx, ly, color="tab:red", label="learning rate")
        ax.set_xlabel("step")
        ax.set_ylabel("learning rate")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.set_title(f"learning rate: {root.name}")
        ax.grid(True, alpha=0.3)
        ax.legend()
        written.append(_save_png(fig, root / _PLOTS["lr"]))
    return written


# ------------------------------------------------------------------------------------------------
# tables


def format_value(key: str, value: Any) -> str:
    """Format one metric for a table: scores with 4 decimals, counts with thousands separators,
    percentages with 4 decimals, memory and times with 1 decimal; ``None`` as ``-``."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if key.endswith(("_mb", "_s")):
            return f"{value:,.1f}"
        return f"{value:.4f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def score_table(metrics: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(label, formatted value)`` rows of the score table for the keys present in ``metrics``."""
    return [(label, format_value(key, metrics[key])) for key, label in SCORE_ROWS if key in metrics]


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _split_table(splits: Mapping[str, Any]) -> str:
    """Markdown table of per-split scores (``{split: {"num_inputs": n, metric: score}}``): one row per
    metric, one column per split."""
    names = [str(k) for k in splits]
    keys = ["num_inputs"] + [k for k, _ in SCORE_ROWS if any(isinstance(v, Mapping) and k in v for v in splits.values())]
    labels = dict(SCORE_ROWS) | {"num_inputs": "inputs"}
    rows = []
    for key in keys:
        cells = []
        for name in names:
            v = splits[name]
            cells.append(format_value(key, v[key]) if isinstance(v, Mapping) and key in v else "-")
        rows.append([labels[key], *cells])
    return _md_table(["metric", *names], rows)


def training_split_note(run_dir: str | os.PathLike) -> str | None:
    """The report's warning for a run trained on an evaluation split, else ``None``.

    The run directory's ``config.yaml`` records the training split (``data.train_split``); a split
    other than ``train`` (DART's recipe trains on dev, as DART's train file is not shipped) makes the
    scores incomparable with published ones, which train on the train split. ``None`` as well for a
    directory without ``config.yaml`` or a config without a ``data`` section (a classification run).

    Raises:
        DataFormatError: ``config.yaml`` is not valid YAML, or ``data`` / ``data.train_split`` has the
            wrong type.
    """
    path = _run_dir(run_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    config = load_yaml_file(path, CONFIG_FILE)
    data = config.get("data") if isinstance(config, Mapping) else None
    if data is None:
        return None
    if not isinstance(data, Mapping) or not isinstance(data.get("train_split", "train"), str):
        raise DataFormatError(f"{path}: 'data' must be a mapping with a str train_split, got {data!r}")
    split = data.get("train_split", "train")
    if split == "train":
        return None
    dataset = str(data.get("dataset") or "the dataset")
    name = _DATASET_NAMES.get(dataset, dataset)
    return (
        f"**Not comparable with published scores:** this run was trained on the {split} split of {name} "
        f"(data.train_split: {split} in {CONFIG_FILE}), not on its train split, so its scores are not "
        f"comparable with published {name} results."
    )


def write_report(
    run_dir: str | os.PathLike, metrics: Mapping[str, Any], extra: Mapping[str, Any] | None = None
) -> Path:
    """Write ``<run_dir>/report.md``: the score table, the other metrics, ``extra`` facts and the plots.

    Args:
        run_dir: the run directory (must exist). When it holds ``train_log.jsonl``, the plots of
            :func:`plot_run` are (re)drawn and embedded; when its ``config.yaml`` names a training split
            other than ``train``, the scores are headed by :func:`training_split_note`.
        metrics: scores and costs, e.g. the content of ``metrics.json``: ``BLEU``, ``NIST``,
            ``METEOR``, ``ROUGE_L``, ``CIDEr`` (as the official E2E scorer prints them: BLEU, METEOR and
            ROUGE-L in [0, 1]), ``trainable_params``, ``trainable_percent``, ``peak_memory_mb``,
            ``train_time_s``, ``wall_time_s``; other keys go into a second table.
        extra: run facts shown as a key/value table (model, method, dataset, ...).

    Returns:
        The path of ``report.md``.
    """
    root = _run_dir(run_dir)
    check_type("metrics", metrics, Mapping, "a mapping of metric name to value")
    if extra is not None:
        check_type("extra", extra, Mapping, "None or a mapping")
    extra = dict(extra or {})
    title = extra.pop("title", None) or f"Run report: {root.name}"
    parts = [f"# {title}", ""]
    if extra:
        parts += ["## Run", "", _md_table(["", "value"], [(str(k), format_value(str(k), v)) for k, v in extra.items()]), ""]
    rows = score_table(metrics)
    parts += ["## Scores", ""]
    note = training_split_note(root)
    if note is not None:
        parts += [note, ""]
    if rows:
        parts += [_md_table(["metric", "value"], rows), ""]
        parts += [
            "BLEU, METEOR and ROUGE-L are in [0, 1] as the official E2E scorer prints them "
            "(multiply by 100 for the percentages papers report).",
            "",
        ]
    else:
        parts += ["(no scores)", ""]
    splits = metrics.get("splits")
    if isinstance(splits, Mapping) and splits:
        parts += ["## Scores by split", "", _split_table(splits), ""]
    shown = {k for k, _ in SCORE_ROWS}
    others = [(str(k), format_value(str(k), v)) for k, v in metrics.items() if k not in shown and not isinstance(v, (dict, list))]
    if others:
        parts += ["## Other metrics", "", _md_table(["metric", "value"], others), ""]
    if (root / LOG_FILE).is_file():
        try:
            plots = plot_run(root)
        except DeltaConfigError:
            plots = []
        if plots:
            parts += ["## Training curves", ""]
            for p in plots:
                parts += [f"![{p.stem}]({p.name})", ""]
    path = root / REPORT_FILE
    atomic_write_text(path, "\n".join(parts).rstrip() + "\n")
    return path


# ------------------------------------------------------------------------------------------------
# comparison


def _labels(dirs: list[Path]) -> list[str]:
    names = [d.name for d in dirs]
    if len(set(names)) == len(names):
        return names
    return [f"{d.parent.name}/{d.name}" if names.count(d.name) > 1 else d.name for d in dirs]


def compare_runs(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Compare runs: overlay their loss curves and tabulate their ``metrics.json`` side by side.

    Writes into ``out_dir`` (created if needed): ``compare.png`` (left: training loss, right:
    validation loss, one line per run), ``compare.md`` (the metrics table, one column per run, and the
    image) and ``compare.csv`` (the same table).

    A run without ``train_log.jsonl`` has no curve; a run without ``metrics.json`` has ``-`` in the
    table. At least one run must have one of the two.

    Returns:
        ``(path of compare.md, path of compare.png)``.

    Raises:
        DeltaConfigError: fewer than one run, a run directory that does not exist, or no run with
            a log or metrics.
    """
    if isinstance(run_dirs, (str, os.PathLike)) or not isinstance(run_dirs, Sequence) or not run_dirs:
        raise DeltaConfigError(f"run_dirs must be a non-empty list of run directories, got {run_dirs!r}")
    dirs = [_run_dir(d, f"run_dirs[{i}]") for i, d in enumerate(run_dirs)]
    check_type("out_dir", out_dir, (str, os.PathLike), "a directory path")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = _labels(dirs)

    metrics: list[dict[str, Any]] = []
    curves: list[dict[str, tuple[list[float], list[float]]]] = []
    for d in dirs:
        metrics.append(read_metrics(d) if (d / METRICS_FILE).is_file() else {})
        curves.append(_curves(d) if (d / LOG_FILE).is_file() else {})
    if not any(metrics) and not any(curves):
        raise DeltaConfigError(
            f"none of the runs has {METRICS_FILE} or {LOG_FILE}: {[os.fspath(d) for d in dirs]}"
        )

    fig, (ax_t, ax_v) = _figure(2)
    for label, c in zip(labels, curves):
        if "train_loss" in c:
            _line(ax_t, *_finite(*c["train_loss"]), label=label, linewidth=1.2)
        if "val_loss" in c:
            _line(ax_v, *_finite(*c["val_loss"]), label=label, marker="o", markersize=3)
    for ax, what in ((ax_t, "training loss"), (ax_v, "validation loss")):
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(what)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    png = _save_png(fig, out / "compare.png")

    # rows: score rows first (in their order), then every other scalar key in first-seen order
    keys = [k for k, _ in SCORE_ROWS if any(k in m for m in metrics)]
    for m in metrics:
        for k, v in m.items():
            if k not in keys and not isinstance(v, (dict, list)):
                keys.append(k)
    label_of = dict(SCORE_ROWS)
    table = [[label_of.get(k, k)] + [format_value(k, m.get(k)) for m in metrics] for k in keys]

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["metric", *labels])
    for k in keys:
        writer.writerow([k] + ["" if m.get(k) is None else m.get(k) for m in metrics])
    atomic_write_text(out / "compare.csv", buf.getvalue())

    parts = ["# Run comparison", ""]
    parts += [_md_table(["run", "directory"], [(lab, os.fspath(d)) for lab, d in zip(labels, dirs)]), ""]
    parts += ["## Metrics", "", _md_table(["metric", *labels], table) if table else "(no metrics)", ""]
    parts += ["## Loss curves", "", f"![comparison]({png.name})", ""]
    md = out / "compare.md"
    atomic_write_text(md, "\n".join(parts))
    return md, png
