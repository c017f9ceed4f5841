"""The method sweep end to end on a tiny BERT: complete table (every method), MD/CSV/PNG, errors."""

from __future__ import annotations

import csv
import json
import statistics

import pytest

from deltatune.errors import DeltaConfigError
from deltatune.sweep import aggregate, load_sweep, main, run_sweep
from deltatune.tasks import sweep_method_names
from tests.tasks._tasks_helpers import tiny_bert_dir, write_glue, write_yaml

ALL = ["full", "lora", "adapter", "low_rank_adapter", "bitfit", "prefix", "ptuning_v2", "ia3"]


def _config(tmp_path, task="sst2", **extra):
    model = tiny_bert_dir(tmp_path)
    data = write_glue(tmp_path / "data", task if task in ("sst2", "mrpc", "stsb", "cola", "rte") else "sst2")
    cfg = {
        "name": "tiny",
        "model": {"name_or_path": str(model), "pooling": "mean"},
        "data": {"dataset": task, "data_dir": str(data), "max_length": 32},
        "progress": False,
        "train": {"max_steps": 2, "batch_size": 8, "progress_bar": False},
        "methods": {"lora": {"lr": 0.01, "config": {"r": 4}}},
        "sweep": {"methods": ALL, "seeds": [1, 2]},
        "output_dir": str(tmp_path / "out"),
        **extra,
    }
    return write_yaml(tmp_path / "sweep.yaml", cfg)


def test_sweep_end_to_end_every_method(tmp_path, capsys):
    path = _config(tmp_path)
    rc = main([str(path), "--no-isolate", "--no-progress"])
    assert rc == 0
    out = tmp_path / "out"
    md = (out / "results.md").read_text(encoding="utf-8")
    rows = list(csv.DictReader((out / "results.csv").open(encoding="utf-8")))
    assert [r["method"] for r in rows] == ALL
    for m in ALL:
        assert f"| {m} |" in md
        runs = [json.loads((out / "runs" / f"{m}_seed{s}.json").read_text()) for s in (1, 2)]
        assert all("result" in r for r in runs), [r.get("error") for r in runs]
        accs = [r["result"]["metrics"]["accuracy"] for r in runs]
        row = next(r for r in rows if r["method"] == m)
        assert float(row["accuracy_mean"]) == pytest.approx(statistics.fmean(accs))
        assert float(row["accuracy_std"]) == pytest.approx(statistics.stdev(accs))
        assert int(row["trainable_params"]) == runs[0]["result"]["trainable_params"]
        assert row["error"] == "" and row["seeds_ok"] == "1 2"
    lrs = {m: json.loads((out / "runs" / f"{m}_seed1.json").read_text())["result"]["lr"] for m in ALL}
    assert lrs["lora"] == 0.01 and lrs["full"] == 5e-5 and lrs["ptuning_v2"] == 1e-2
    full = next(r for r in rows if r["method"] == "full")
    assert float(full["trainable_percent"]) == pytest.approx(100.0)
    png = (out / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(str(out / "results.png"))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 300
    assert "results.md" in capsys.readouterr().out


def test_failing_method_goes_into_the_error_column(tmp_path):
    path = _config(tmp_path, methods={"lora": {"config": {"target_modules": ["no_such_module"]}}},
                   sweep={"methods": ["lora", "bitfit"], "seeds": [1]})
    res = run_sweep(load_sweep(path), isolate=False, progress=False)
    lora, bitfit = res.rows
    assert lora.error.startswith("seed 1: TargetNotFoundError: ") and lora.ok_seeds == []
    assert bitfit.error is None and bitfit.ok_seeds == [1]
    rows = list(csv.DictReader(res.files["csv"].open(encoding="utf-8")))
    assert rows[0]["error"].startswith("seed 1: TargetNotFoundError") and rows[0]["accuracy_mean"] == ""
    assert main([str(path), "--no-isolate", "--no-progress", "--methods", "lora"]) == 1


def test_isolated_run_in_a_fresh_process(tmp_path):
    path = _config(tmp_path, sweep={"methods": ["bitfit"], "seeds": [7]})
    res = run_sweep(load_sweep(path), isolate=True, progress=False)
    assert res.rows[0].error is None, res.runs[0].get("traceback")
    assert res.runs[0]["result"]["seed"] == 7 and res.rows[0].peak_memory_mb > 0


def test_aggregate_mean_std_by_hand():
    def run(m, s, acc):
        return {"method": m, "seed": s, "result": {"metrics": {"accuracy": acc}, "trainable_params": 10,
                                                    "trainable_percent": 1.0, "peak_memory_mb": 100.0 + s,
                                                    "time_per_step_s": 0.5}}

    runs = [run("lora", 1, 0.5), run("lora", 2, 0.7), run("lora", 3, 0.9), {"method": "ia3", "seed": 1, "error": "X: y"}]
    lora, ia3 = aggregate(runs, ["lora", "ia3"], ["accuracy"])
    mean, std = lora.scores["accuracy"]
    assert mean == pytest.approx(0.7) and std == pytest.approx(0.2)  # sample std of 0.5, 0.7, 0.9
    assert lora.peak_memory_mb == pytest.approx(102.0)
    assert ia3.error == "seed 1: X: y" and ia3.trainable_params is None


def test_errors_unknown_method_and_bad_task(tmp_path, capsys):
    path = _config(tmp_path)
    capsys.readouterr()
    assert main([str(path), "--methods", "full,foo"]) == 2
    known = ", ".join(sweep_method_names())
    assert capsys.readouterr().err == f"deltatune sweep: error: --methods: unknown method 'foo'; known methods: {known}\n"
    assert main([str(path), "--seeds", "1,x"]) == 2
    assert capsys.readouterr().err == "deltatune sweep: error: --seeds must be comma-separated ints, got '1,x'\n"
    bad = _config(tmp_path, task="sst3")
    capsys.readouterr()
    assert main([str(bad)]) == 2
    assert capsys.readouterr().err == (
        "deltatune sweep: error: data.dataset must be one of 'cola', 'sst2', 'mrpc', 'stsb', 'rte', 'wnli' (or the "
        "folder spellings) or 'csv', got 'sst3'\n"
    )
    with pytest.raises(DeltaConfigError, match=r"^methods.lora.train must not change the shared budget"):
        load_sweep(_config(tmp_path, methods={"lora": {"train": {"max_steps": 9}}}))
    with pytest.raises(DeltaConfigError, match=r"^a sweep must not set 'train.seed' \(got 3\): the sweep sets it per run"):
        load_sweep(_config(tmp_path, train={"seed": 3}))
    with pytest.raises(DeltaConfigError, match=r"^name must be a plain run name .*, got '\.\./escaped'$"):
        load_sweep(_config(tmp_path, name="../escaped"))
    assert not (tmp_path / "out" / "results.md").exists()


def test_set_overrides_run_fields_and_single_train_keys(tmp_path):
    path = _config(tmp_path, sweep={"methods": ["bitfit"], "seeds": [1]})
    out2 = tmp_path / "elsewhere"
    rc = main([str(path), "--no-isolate", "--no-progress", "--output-dir", str(out2),
               "--set", "data.max_train_examples=5", "--set", "train.max_steps=3", "--set", "train.lr=0.5"])
    assert rc == 0
    run = json.loads((out2 / "runs" / "bitfit_seed1.json").read_text())
    cfg = run["config"]
    assert cfg["data"]["max_train_examples"] == 5
    # one train key replaced, the YAML's other train keys kept
    assert cfg["train"]["max_steps"] == 3 and cfg["train"]["batch_size"] == 8 and cfg["train"]["progress_bar"] is False
    assert run["result"]["lr"] == 0.5 and run["result"]["steps"] == 3
    assert run["result"]["train_examples"] == 5


def test_set_override_errors(tmp_path, capsys):
    path = _config(tmp_path)
    capsys.readouterr()
    assert main([str(path), "--set", "train"]) == 2
    assert capsys.readouterr().err == (
        "deltatune sweep: error: --set expects KEY=VALUE (e.g. train.lr=1e-3), got 'train'\n"
    )
    assert main([str(path), "--set", "train.max_steps.x=1"]) == 2
    assert capsys.readouterr().err == (
        "deltatune sweep: error: --set 'train.max_steps.x=1': 'train.max_steps' takes a value, not sub-keys\n"
    )
    assert main([str(path), "--set", "max_lenght=3"]) == 2
    assert capsys.readouterr().err == (
        "deltatune sweep: error: --set 'max_lenght=3': unknown sweep classification config key 'max_lenght'; known "
        "keys: name, output_dir, num_threads, save_delta, progress, model, data, delta, train, methods, sweep\n"
    )
    assert main([str(path), "--set", "data.max_lenght=3"]) == 2
    assert capsys.readouterr().err == (
        "deltatune sweep: error: unknown key 'data.max_lenght' in classification config section 'data'; known keys: "
        "dataset, data_dir, csv, max_length, max_train_examples, max_eval_examples, subset_seed\n"
    )


def test_tables_are_written_after_every_run(tmp_path, monkeypatch):
    """An interrupted sweep keeps the table of the runs that finished."""
    import deltatune.sweep as sweep_mod

    path = _config(tmp_path, sweep={"methods": ["bitfit", "lora"], "seeds": [1]})
    real = sweep_mod._run_one
    seen = []

    def run_one(kind, cfg, isolate, tmp, progress=True):
        if cfg["delta"]["method"] == "lora":  # by now bitfit's row must be on disk
            rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open(encoding="utf-8")))
            seen.append({r["method"]: r["seeds_ok"] for r in rows})
            raise KeyboardInterrupt
        return real(kind, cfg, isolate, tmp, progress)

    monkeypatch.setattr(sweep_mod, "_run_one", run_one)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(load_sweep(path), isolate=False, progress=False)
    assert seen == [{"bitfit": "1", "lora": ""}]
    md = (tmp_path / "out" / "results.md").read_text(encoding="utf-8")
    assert "| bitfit |" in md and "| lora |" in md


def test_yaml_exponent_numbers_are_floats_as_in_recipes(tmp_path):
    """`lr: 1e-3` (no dot, which plain YAML 1.1 reads as a string) is a float, as in recipes and --set."""
    path = _config(tmp_path, sweep={"methods": ["lora"], "seeds": [1]})
    path.write_text(path.read_text(encoding="utf-8").replace("lr: 0.01", "lr: 1e-3"), encoding="utf-8")
    assert "lr: 1e-3" in path.read_text(encoding="utf-8")
    spec = load_sweep(path)
    assert spec.run_config("lora", 1)["train"]["lr"] == 0.001
