"""The CLI as one tool (issue 14): a run directory's config.yaml is the source of truth of generate and
evaluate; a YAML file given to the wrong subcommand names the right one; perplexity takes --set,
--output-dir, --overwrite and --no-progress. Tiny random-init Llama, tiny E2E / WikiText files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from deltatune.cli import main
from deltatune.metrics import read_predictions_file
from tests.recipe_fixtures import recipe_dict, tiny_assets, write_recipe
from tests.tasks._tasks_helpers import tiny_llama_dir, write_wikitext

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def tiny():
    return tiny_assets()


def _run(capsys, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_evaluate_and_generate_take_the_run_directorys_config(tiny, tmp_path, capsys):
    model_dir, data_dir = tiny
    cfg = write_recipe(tmp_path / "tiny.yaml", recipe_dict(model_dir, data_dir, tmp_path / "run"))
    run = tmp_path / "run"
    sets = ["--set", "data.sample_fraction=0.5", "--set", "eval.max_examples=2", "--set", "train.max_steps=2"]
    code, _, err = _run(capsys, "run", cfg, "--no-progress", *sets)
    assert code == 0, err
    trained = json.loads((run / "metrics.json").read_text())
    assert trained["num_eval_inputs"] == 2
    files = {n: (run / n).read_bytes() for n in ("metrics.json", "report.md", "predictions.txt")}

    # the example: evaluating without repeating the run's --set flags is refused, naming the fields;
    # nothing in the run directory changes
    code, _, err = _run(capsys, "evaluate", cfg, "--output-dir", run)
    assert code == 2
    assert err == (
        f"deltatune: error: the recipe differs from the run's own {run / 'config.yaml'} in 2 field(s): "
        f"data.sample_fraction: run 0.5, given 1.0; eval.max_examples: run 2, given None. The run directory's config.yaml is the source of truth of its settings: repeat the run's --set "
        f"flags, leave out the recipe, or pass --override-run-config to use the given values (recorded in "
        f"metrics.json and report.md)\n"
    )
    code, _, err = _run(capsys, "generate", cfg, "--output-dir", run, "--no-progress")
    assert code == 2 and "in 2 field(s): data.sample_fraction: run 0.5, given 1.0;" in err
    assert {n: (run / n).read_bytes() for n in files} == files

    # without a recipe, or with the same --set flags: the run's settings; the run's wall_time_s is kept and
    # the evaluation's own time has its own key
    code, _, err = _run(capsys, "evaluate", "--output-dir", run)
    assert code == 0, err
    again = json.loads((run / "metrics.json").read_text())
    assert again["wall_time_s"] == trained["wall_time_s"] and again["BLEU"] == trained["BLEU"]
    assert again["evaluate_time_s"] > 0 and "evaluate_time_s" not in trained
    report = (run / "report.md").read_text()
    assert "| train split | train (sample_fraction 0.5) |" in report and "run config overrides" not in report
    # the training settings (train.*), the decoding batch and the threads are not the run's results: they may differ
    code, _, err = _run(capsys, "evaluate", cfg, "--output-dir", run, *sets[:4], "--set", "eval.batch_size=1")
    assert code == 0, err
    assert json.loads((run / "metrics.json").read_text())["wall_time_s"] == trained["wall_time_s"]

    # generate decodes the run's own number of inputs (2, not the recipe's 4)
    code, out, err = _run(capsys, "generate", "--output-dir", run, "--no-progress")
    assert code == 0, err
    assert "decoded 2 inputs of 'test'" in out
    assert (run / "predictions.txt").read_bytes() == files["predictions.txt"]

    # an explicit override is used and recorded in metrics.json and report.md
    code, _, err = _run(capsys, "evaluate", cfg, "--output-dir", run, "--override-run-config")
    assert code == 0, err
    over = json.loads((run / "metrics.json").read_text())
    assert over["run_config_overrides"] == {
        "data.sample_fraction": {"run": 0.5, "given": 1.0},
        "eval.max_examples": {"run": 2, "given": None},
    }
    assert over["wall_time_s"] == trained["wall_time_s"]
    report = (run / "report.md").read_text()
    assert "| train split | train (sample_fraction 1) |" in report
    assert (
        "| run config overrides | data.sample_fraction: run 0.5 -> given 1.0; eval.max_examples: run 2 -> given None |"
    ) in report


def test_a_yaml_file_given_to_the_wrong_subcommand_names_the_right_one(capsys):
    sst2, e2e, wiki = CONFIGS / "glue" / "sst2_cpu.yaml", CONFIGS / "e2e_cpu.yaml", CONFIGS / "wikitext_lora.yaml"
    glue = "a classification sweep config"
    cases = [("run", sst2, glue, "sweep", ""), ("perplexity", sst2, glue, "sweep", "")]
    cases += [(c, wiki, "a perplexity config", "perplexity", "") for c in ("finetune", "generate", "evaluate", "align")]
    cases.append(("sweep", e2e, "a data-to-text recipe (one run)", "run",
                  " (to sweep methods over a recipe, give it a 'sweep: {methods: [...], seeds: [...]}' section)"))
    for command, path, what, right, hint in cases:
        code, _, err = _run(capsys, command, path)
        prog = "deltatune sweep" if command == "sweep" else "deltatune"
        assert code == 2
        assert err == (
            f"{prog}: error: {path} is {what}, which `deltatune {command}` does not take: use "
            f"`deltatune {right} {path}`{hint}\n"
        )


def test_perplexity_takes_set_output_dir_overwrite_and_no_progress(tmp_path, capsys):
    model_dir = tiny_llama_dir(tmp_path)
    data = write_wikitext(tmp_path / "data")
    cfg = tmp_path / "ppl.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "tiny_ppl", "task": "perplexity", "model": str(model_dir), "data_dir": str(data),
        "eval_max_tokens": 150, "max_length": 32, "stride": 32, "train_max_tokens": 256, "block_size": 32,
        "delta": {"method": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-2}, "device": "cpu", "output_dir": str(tmp_path / "x"),
    }))
    out = tmp_path / "out"
    argv = ["perplexity", cfg, "--set", "eval_max_tokens=64", "--set", "train.max_steps=1", "--set", "delta.r=2",
            "--output-dir", out, "--no-progress"]
    code, stdout, err = _run(capsys, *argv)
    assert code == 0, err
    result = json.loads((out / "result.json").read_text())
    assert (result["eval_tokens"], result["steps"], result["delta"]["r"]) == (64, 1, 2)
    assert f"perplexity base {result['base']['perplexity']:.3f} -> tuned {result['tuned']['perplexity']:.3f}" in stdout
    assert (out / "delta" / "delta.safetensors").is_file() and not (tmp_path / "x").exists()
    # --no-progress: no training or perplexity bars (the bars of model loading are models.load's own)
    assert "window/s" not in err and "windows/s" not in err and "\rtrain" not in err
    code, _, err = _run(capsys, *argv)
    assert code == 2
    assert err == (
        f"deltatune: error: output_dir {str(out)!r} already holds a run (train_log.jsonl); pass --overwrite "
        f"(overwrite=True) to replace it, or choose another --output-dir\n"  # perplexity runs do not resume
    )
    code, _, err = _run(capsys, *argv, "--overwrite")
    assert code == 0, err
    assert json.loads((out / "result.json").read_text())["steps"] == 1


def test_generate_from_inside_the_run_directory_without_a_recipe(tiny, tmp_path, capsys, monkeypatch):
    """A run's config.yaml holds the resolved data folder: generate finds the data from any directory."""
    model_dir, data_dir = tiny
    cfg = write_recipe(tmp_path / "tiny.yaml", recipe_dict(model_dir, data_dir, tmp_path / "run",
                                                          train={"max_steps": 1, "eval_every": 0}))
    code, _, err = _run(capsys, "finetune", cfg, "--no-progress")
    assert code == 0, err
    monkeypatch.chdir(tmp_path / "run")
    code, out, err = _run(capsys, "generate", "--output-dir", ".", "--no-progress")
    assert code == 0, err
    assert len(read_predictions_file(tmp_path / "run" / "predictions.txt")) == 4
