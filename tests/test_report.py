"""Tests for deltatune.report: plots from train_log.jsonl, report.md, run comparison."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from deltatune.errors import DeltaConfigError
from deltatune.report import compare_runs, format_value, plot_run, read_metrics, score_table, write_report


def _write_log(run: Path, n: int = 20, *, evals: bool = True, scale: float = 1.0) -> None:
    run.mkdir(parents=True, exist_ok=True)
    rows = []
    for step in range(1, n + 1):
        rows.append({"split": "train", "step": step, "epoch": step / n, "loss": scale * 4.0 / math.sqrt(step),
                     "lr": 1e-3 * min(1.0, step / 5) * (1 - step / (n + 1)), "grad_norm": 1.0,
                     "tokens_per_s": 100.0, "elapsed": step * 0.1})
        if evals and step % 5 == 0:
            loss = scale * 3.5 / math.sqrt(step)
            rows.append({"split": "eval", "step": step, "epoch": step / n, "loss": loss, "ppl": math.exp(loss)})
    (run / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _image(path: Path) -> np.ndarray:
    import matplotlib.image as mpimg

    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] >= 200 and img.shape[1] >= 300 and img.shape[2] in (3, 4)
    rgb = img[..., :3]
    # non-trivial content: not a blank canvas, lines in several colours
    assert (rgb < 0.95).any(axis=-1).mean() > 0.01
    assert len(np.unique((rgb.reshape(-1, 3) * 255).astype(int), axis=0)) > 20
    return img


METRICS = {
    "BLEU": 0.65123, "NIST": 8.4321, "METEOR": 0.4412, "ROUGE_L": 0.6789, "CIDEr": 2.2345,
    "trainable_params": 230400, "total_params": 134745408, "trainable_percent": 0.17099,
    "peak_memory_mb": 1234.56, "train_time_s": 321.25, "wall_time_s": 456.75, "eval_loss": 1.5,
}


def test_plot_run_writes_three_valid_pngs(tmp_path):
    run = tmp_path / "run"
    _write_log(run)
    paths = plot_run(run)
    assert [p.name for p in paths] == ["plot_loss.png", "plot_val_ppl.png", "plot_lr.png"]
    images = [_image(p) for p in paths]
    # the three plots show different data
    assert not np.array_equal(images[0], images[2])


def test_plot_run_without_eval_rows_and_with_nan(tmp_path):
    run = tmp_path / "run"
    _write_log(run, evals=False)
    with open(run / "train_log.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"split": "train", "step": 21, "loss": "nan", "lr": 0.0}) + "\n")
    paths = plot_run(run)
    assert [p.name for p in paths] == ["plot_loss.png", "plot_lr.png"]
    for p in paths:
        _image(p)


def test_plot_depends_on_the_data(tmp_path):
    a, b = tmp_path / "a", tmp_path / "a2"
    _write_log(a, scale=1.0)
    _write_log(b, scale=3.0)
    # same directory name length; the loss curves differ, so the loss images differ
    assert not np.array_equal(_image(plot_run(a)[0]), _image(plot_run(b)[0]))


def test_plot_run_errors(tmp_path):
    with pytest.raises(DeltaConfigError, match="run_dir must be an existing run directory"):
        plot_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DeltaConfigError, match="must contain train_log.jsonl"):
        plot_run(tmp_path / "empty")
    run = tmp_path / "evalonly"
    run.mkdir()
    (run / "train_log.jsonl").write_text(json.dumps({"split": "eval", "step": 1, "loss": 1.0}) + "\n")
    with pytest.raises(DeltaConfigError, match="holds no training record"):
        plot_run(run)


def test_format_value():
    assert format_value("BLEU", 0.651234) == "0.6512"
    assert format_value("trainable_params", 230400) == "230,400"
    assert format_value("peak_memory_mb", 1234.56) == "1,234.6"
    assert format_value("wall_time_s", 12.34) == "12.3"
    assert format_value("x", None) == "-"
    assert format_value("x", float("nan")) == "nan"
    assert format_value("method", "a|b") == "a\\|b"


def test_score_table_order_and_labels():
    rows = score_table(METRICS)
    assert [r[0] for r in rows] == [
        "BLEU", "NIST", "METEOR", "ROUGE-L", "CIDEr", "trainable params", "trainable %",
        "peak memory (MiB)", "train time (s)", "wall time (s)",
    ]
    assert rows[0][1] == "0.6512" and rows[6][1] == "0.1710"


def test_write_report_has_scores_extras_and_plots(tmp_path):
    run = tmp_path / "run"
    _write_log(run)
    path = write_report(run, METRICS, {"model": "smollm2-135m", "method": "lora", "title": "My run"})
    text = path.read_text(encoding="utf-8")
    assert path == run / "report.md"
    assert text.startswith("# My run\n")
    for label, value in [("BLEU", "0.6512"), ("NIST", "8.4321"), ("METEOR", "0.4412"), ("ROUGE-L", "0.6789"),
                         ("CIDEr", "2.2345"), ("trainable %", "0.1710"), ("trainable params", "230,400"),
                         ("peak memory (MiB)", "1,234.6"), ("train time (s)", "321.2"), ("wall time (s)", "456.8")]:
        assert f"| {label} | {value} |" in text
    assert "| eval_loss | 1.5000 |" in text  # other metrics go to their own table
    assert "| model | smollm2-135m |" in text and "| method | lora |" in text
    for name in ("plot_loss.png", "plot_val_ppl.png", "plot_lr.png"):
        assert f"]({name})" in text
        _image(run / name)


def test_write_report_without_log(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    text = write_report(run, {"BLEU": 0.5}).read_text()
    assert "| BLEU | 0.5000 |" in text and "Training curves" not in text
    assert not list(run.glob("*.png"))


def _make_run(root: Path, name: str, metrics: dict, scale: float) -> Path:
    run = root / name
    _write_log(run, scale=scale)
    (run / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    return run


def test_compare_runs(tmp_path):
    a = _make_run(tmp_path, "lora", {**METRICS, "method": "lora"}, 1.0)
    b = _make_run(tmp_path, "ia3", {**METRICS, "BLEU": 0.5987, "trainable_params": 57600, "method": "ia3"}, 1.5)
    md, png = compare_runs([a, b], tmp_path / "cmp")
    assert md == tmp_path / "cmp" / "compare.md" and png == tmp_path / "cmp" / "compare.png"
    img = _image(png)
    assert img.shape[1] > img.shape[0]  # two panels side by side
    text = md.read_text()
    assert "| metric | lora | ia3 |" in text
    assert "| BLEU | 0.6512 | 0.5987 |" in text
    assert "| trainable params | 230,400 | 57,600 |" in text
    assert "| method | lora | ia3 |" in text
    assert "](compare.png)" in text
    with open(tmp_path / "cmp" / "compare.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["metric", "lora", "ia3"]
    table = {r[0]: r[1:] for r in rows[1:]}
    assert [float(x) for x in table["BLEU"]] == [0.65123, 0.5987]
    assert [int(x) for x in table["trainable_params"]] == [230400, 57600]


def test_compare_runs_same_names_missing_metrics_and_errors(tmp_path):
    a = tmp_path / "x" / "run"
    b = tmp_path / "y" / "run"
    _write_log(a)
    _make_run(tmp_path / "y", "run", {"BLEU": 0.25}, 2.0)
    md, png = compare_runs([a, b], tmp_path / "out")
    text = md.read_text()
    assert "| metric | x/run | y/run |" in text
    assert "| BLEU | - | 0.2500 |" in text
    _image(png)
    with pytest.raises(DeltaConfigError, match="non-empty list of run directories"):
        compare_runs([], tmp_path / "out")
    with pytest.raises(DeltaConfigError, match=r"run_dirs\[1\] must be an existing run directory"):
        compare_runs([a, tmp_path / "nope"], tmp_path / "out")
    (tmp_path / "bare").mkdir()
    with pytest.raises(DeltaConfigError, match="none of the runs has metrics.json or train_log.jsonl"):
        compare_runs([tmp_path / "bare"], tmp_path / "out")


def test_read_metrics_errors(tmp_path):
    (tmp_path / "r").mkdir()
    with pytest.raises(DeltaConfigError, match="has no metrics.json"):
        read_metrics(tmp_path / "r")
    (tmp_path / "r" / "metrics.json").write_text("[1, 2]")
    from deltatune.errors import DataFormatError

    with pytest.raises(DataFormatError, match="expected a JSON object"):
        read_metrics(tmp_path / "r")
