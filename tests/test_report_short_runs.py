"""deltatune.report for short runs and dev-trained runs (issue 14): a one-point series is drawn as a
visible marker, and a run trained on an evaluation split says its scores are not comparable with
published ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deltatune import report
from deltatune.errors import DataFormatError
from deltatune.report import MARKER_MAX_POINTS, compare_runs, plot_run, training_split_note, write_report

REPO = Path(__file__).resolve().parents[1]


def _log(run: Path, steps: int, *, evals: bool) -> None:
    run.mkdir(parents=True, exist_ok=True)
    rows = []
    for step in range(1, steps + 1):
        rows.append({"split": "train", "step": step, "loss": 3.0 - 0.01 * step, "lr": 1e-3 / step})
        if evals:
            rows.append({"split": "eval", "step": step, "loss": 2.5, "ppl": 12.18})
    (run / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures report.py saves, in order (the PNGs are still written)."""
    saved: list = []
    original = report._save_png

    def spy(fig, path):
        saved.append(fig)
        return original(fig, path)

    monkeypatch.setattr(report, "_save_png", spy)
    return saved


def test_one_point_series_are_drawn_with_markers(tmp_path, figures):
    run = tmp_path / "run"
    _log(run, 1, evals=True)
    paths = plot_run(run)
    assert [p.name for p in paths] == ["plot_loss.png", "plot_val_ppl.png", "plot_lr.png"]
    assert len(figures) == 3
    for fig in figures:
        lines = fig.axes[0].get_lines()
        assert lines, "every plot has a line"
        for line in lines:
            assert len(line.get_xdata()) == 1
            assert line.get_marker() == "o"
            assert line.get_markersize() >= 3
            assert line.get_visible() and line.get_alpha() in (None, 1.0)
    # the loss plot: the training loss point at (1, 2.99) and the validation point at (1, 2.5)
    train, val = figures[0].axes[0].get_lines()
    assert (list(train.get_xdata()), list(train.get_ydata())) == ([1.0], [2.99])
    assert (list(val.get_xdata()), list(val.get_ydata())) == ([1.0], [2.5])


def test_long_series_keep_plain_lines(tmp_path, figures):
    run = tmp_path / "run"
    _log(run, MARKER_MAX_POINTS + 1, evals=False)
    plot_run(run)
    loss, lr = (fig.axes[0].get_lines()[0] for fig in figures)
    assert len(loss.get_xdata()) == MARKER_MAX_POINTS + 1
    assert loss.get_marker() == "None" and lr.get_marker() == "None"


def test_compare_runs_marks_one_point_runs(tmp_path, figures):
    a, b = tmp_path / "a", tmp_path / "b"
    _log(a, 1, evals=True)
    _log(b, MARKER_MAX_POINTS + 5, evals=False)
    compare_runs([a, b], tmp_path / "cmp")
    ax_train, ax_val = figures[0].axes
    short, long_ = ax_train.get_lines()
    assert short.get_marker() == "o" and len(short.get_xdata()) == 1
    assert long_.get_marker() == "None"
    (val,) = ax_val.get_lines()
    assert val.get_marker() == "o"


def _dart_run_dir(tmp_path: Path, *overrides: str) -> Path:
    """A run directory holding the config.yaml the recipe pipeline writes for configs/dart_lora.yaml."""
    from deltatune.recipes import CONFIG_FILE, load_recipe

    run = tmp_path / "dart_run"
    recipe = load_recipe(
        REPO / "configs" / "dart_lora.yaml", ["eval.metrics=[BLEU]", *overrides], output_dir=run, check_data=False
    )
    run.mkdir()
    (run / CONFIG_FILE).write_text(recipe.to_yaml(), encoding="utf-8")
    return run


DART_NOTE = (
    "**Not comparable with published scores:** this run was trained on the dev split of DART "
    "(data.train_split: dev in config.yaml), not on its train split, so its scores are not comparable "
    "with published DART results."
)


def test_dart_run_trained_on_dev_says_scores_are_not_comparable(tmp_path):
    run = _dart_run_dir(tmp_path, "data.allow_dev_training=true")
    assert training_split_note(run) == DART_NOTE
    text = write_report(run, {"BLEU": 0.41}).read_text(encoding="utf-8")
    assert f"## Scores\n\n{DART_NOTE}\n\n| metric | value |" in text


def test_run_trained_on_train_has_no_note(tmp_path):
    run = _dart_run_dir(tmp_path, "data.train_split=train")
    assert training_split_note(run) is None
    text = write_report(run, {"BLEU": 0.41}).read_text(encoding="utf-8")
    assert "Not comparable" not in text
    assert text.startswith("# Run report: dart_run\n\n## Scores\n\n| metric | value |")


def test_training_split_note_without_config_or_data_section(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert training_split_note(run) is None
    (run / "config.yaml").write_text("task: sst2\nmethod: lora\n", encoding="utf-8")
    assert training_split_note(run) is None


def test_training_split_note_refuses_a_malformed_data_section(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("data: [dev]\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"config\.yaml: 'data' must be a mapping with a str train_split, got \['dev'\]"):
        training_split_note(run)
