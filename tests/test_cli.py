"""End-to-end tests of the ``deltatune`` command line on a tiny random-init Llama and tiny E2E files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deltatune.cli import main
from deltatune.methods import method_names
from deltatune.metrics import read_predictions_file, read_references_file, score_files
from tests.recipe_fixtures import TEST, recipe_dict, tiny_assets, write_recipe


@pytest.fixture(scope="module")
def tiny():
    return tiny_assets()


def _config(tiny, tmp_path: Path, name: str = "tiny.yaml", **sections) -> Path:
    model_dir, data_dir = tiny
    return write_recipe(tmp_path / name, recipe_dict(model_dir, data_dir, tmp_path / "run", **sections))


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_run_produces_every_artefact_and_prints_scores(tiny, tmp_path, capsys):
    cfg = _config(tiny, tmp_path)
    out_dir = tmp_path / "custom_run"
    code, out, err = _run(capsys, "run", cfg, "--output-dir", out_dir, "--no-progress",
                          "--set", "train.max_steps=4", "--set", "generate.num_beams=1")
    assert code == 0, err
    for name in ("config.yaml", "train_log.jsonl", "train_summary.json", "run_info.json", "predictions.txt",
                 "references.txt", "sources.txt", "generation_info.json", "metrics.json", "report.md",
                 "plot_loss.png", "plot_val_ppl.png", "plot_lr.png", "delta/delta.safetensors",
                 "delta/delta_config.json", "checkpoint-4/delta.safetensors"):
        assert (out_dir / name).is_file(), name
    assert not (tmp_path / "run").exists()  # --output-dir replaced the recipe's output_dir
    metrics = json.loads((out_dir / "metrics.json").read_text())
    # --set reached the run: 4 steps, greedy decoding
    assert metrics["steps"] == 4
    resolved = yaml.safe_load((out_dir / "config.yaml").read_text())
    assert resolved["train"]["max_steps"] == 4 and resolved["generate"]["num_beams"] == 1
    assert resolved["output_dir"] == str(out_dir)
    # the scores are the scorer's on the written files
    scores = score_files(out_dir / "references.txt", out_dir / "predictions.txt", ["BLEU", "NIST"])
    assert metrics["BLEU"] == pytest.approx(scores["BLEU"]) and metrics["NIST"] == pytest.approx(scores["NIST"])
    assert len(read_predictions_file(out_dir / "predictions.txt")) == len(TEST)
    assert len(read_references_file(out_dir / "references.txt")) == len(TEST)
    # the score table is printed at the end
    lines = out.split("scores (")[-1].splitlines()
    assert any(ln.startswith("BLEU ") and ln.endswith(f" {metrics['BLEU']:.4f}") for ln in lines)
    assert any(ln.startswith("NIST ") and ln.endswith(f" {metrics['NIST']:.4f}") for ln in lines)
    assert "trainable %" in out and "report:" in out

    # steps alone: generate with the saved delta (the run's own config.yaml: no recipe needed), evaluate the
    # files (also without a config)
    code, out, err = _run(capsys, "generate", "--output-dir", out_dir, "--no-progress")
    assert code == 0, err
    assert f"decoded {len(TEST)} inputs of 'test'" in out
    code, out, err = _run(capsys, "evaluate", "--predictions", out_dir / "predictions.txt",
                          "--references", out_dir / "references.txt", "--metrics", "BLEU", "NIST",
                          "--output-dir", tmp_path / "scored")
    assert code == 0, err
    rescored = json.loads((tmp_path / "scored" / "metrics.json").read_text())
    assert rescored["BLEU"] == pytest.approx(metrics["BLEU"])
    assert (tmp_path / "scored" / "report.md").is_file()

    # compare two runs
    code, out, err = _run(capsys, "compare", out_dir, tmp_path / "scored", "--out", tmp_path / "cmp")
    assert code == 0, err
    for name in ("compare.md", "compare.csv", "compare.png"):
        assert (tmp_path / "cmp" / name).is_file()
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert f"| BLEU | {metrics['BLEU']:.4f} | {rescored['BLEU']:.4f} |" in md

    # running again into the same directory is refused with exit code 2
    code, out, err = _run(capsys, "run", cfg, "--output-dir", out_dir, "--no-progress")
    assert code == 2 and "already holds a run" in err and "Traceback" not in err


def test_finetune_full_then_generate(tiny, tmp_path, capsys):
    cfg = _config(tiny, tmp_path, delta={"method": "full"}, train={"max_steps": 2, "eval_every": 0})
    code, out, err = _run(capsys, "finetune", cfg, "--no-progress")
    assert code == 0, err
    assert "trained 2 steps" in out and "(100.0000%)" in out
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    # greedy decoding differs from the run's config.yaml (2 beams): refused, then used and recorded on request
    code, out, err = _run(capsys, "generate", cfg, "--no-progress", "--set", "generate.num_beams=1")
    assert code == 2 and "generate.num_beams: run 2, given 1" in err
    code, out, err = _run(capsys, "generate", cfg, "--no-progress", "--set", "generate.num_beams=1",
                          "--override-run-config")
    assert code == 0, err
    assert len(read_predictions_file(tmp_path / "run" / "predictions.txt")) == len(TEST)
    info = json.loads((tmp_path / "run" / "generation_info.json").read_text())
    assert info["run_config_overrides"] == {"generate.num_beams": {"run": 2, "given": 1}}


@pytest.mark.parametrize(
    ("extra", "sections", "message"),
    [
        (["--set", "train.lrr=1"], {}, "unknown key(s) 'train.lrr' in recipe section 'train'; known keys: lr"),
        ([], {"eval": {"split": "test", "nope": 1}}, "unknown key(s) 'eval.nope' in recipe section 'eval'; known keys"),
        ([], {"delta": {"method": "lorax"}}, "delta.method must be one of"),
        (["--set", "data.data_dir=/nonexistent/data"], {}, "data.data_dir must be an existing directory"),
        (["--set", "delta.r=0"], {}, "r must be a positive int, got 0"),
        (["--set", "eval.metrics=[BLU]"], {}, "eval.metrics[0] must be one of"),
        (["--set", "train.lr"], {}, "--set expects KEY=VALUE"),
    ],
)
def test_errors_exit_2_with_message(tiny, tmp_path, capsys, extra, sections, message):
    cfg = _config(tiny, tmp_path, **sections)
    code, out, err = _run(capsys, "run", cfg, "--no-progress", *extra)
    assert code == 2
    assert err.startswith("deltatune: error: ") and message in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing was started


def test_missing_config_and_generate_before_finetune(tiny, tmp_path, capsys):
    code, _, err = _run(capsys, "run", tmp_path / "missing.yaml")
    assert code == 2 and "recipe must be an existing YAML file" in err
    cfg = _config(tiny, tmp_path)
    code, _, err = _run(capsys, "generate", cfg, "--no-progress")
    assert code == 2 and "no delta checkpoint at" in err and "deltatune finetune" in err
    code, _, err = _run(capsys, "evaluate")
    assert err == (
        "deltatune: error: evaluate needs a CONFIG, an --output-dir holding a run's config.yaml, or both "
        "--predictions and --references\n"
    )
    code, _, err = _run(capsys, "generate", "--output-dir", tmp_path / "nothing")
    assert err == (
        f"deltatune: error: generate needs a CONFIG or an --output-dir holding a run's config.yaml; "
        f"{tmp_path / 'nothing' / 'config.yaml'} does not exist\n"
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    code, _, err = _run(capsys, "run", bad)
    assert code == 2 and f"{bad}, line 2" in err and "invalid YAML" in err


def test_methods_lists_registry(capsys):
    code, out, _ = _run(capsys, "methods")
    assert code == 0
    listed = [line.split()[0] for line in out.splitlines()[1:]]
    assert listed == method_names() + ["full"]
    assert "LoraConfig" in out


def test_info_with_config(tiny, tmp_path, capsys):
    model_dir, _ = tiny
    cfg = tmp_path / "lora.yaml"
    cfg.write_text(yaml.safe_dump({"method": "lora", "r": 2, "target_modules": ["q_proj", "v_proj"]}))
    code, out, err = _run(capsys, "info", model_dir, "--config", cfg, "--set", "r=4")
    assert code == 0, err
    from deltatune.models import load

    base, _ = load(model_dir)
    total = sum(p.numel() for p in base.parameters())
    lora = 2 * 4 * ((32 + 32) + (32 + 16))  # 2 layers, r=4 on q (32->32) and v (32->16)
    assert f"trainable params: {lora:,} || all params: {total + lora:,}" in out
    # a recipe works as --config too (its delta section), and --per-module lists the modules
    recipe = _config(tiny, tmp_path)
    code, out, err = _run(capsys, "info", model_dir, "--config", recipe, "--per-module")
    assert code == 0, err
    assert "model.layers.0.self_attn.q_proj" in out and "model.layers.1.self_attn.v_proj" in out
    code, out, err = _run(capsys, "info", model_dir)
    assert code == 0 and f"trainable params: {total:,} || all params: {total:,}" in out
    code, _, err = _run(capsys, "info", model_dir, "--config", cfg, "--set", "r=0")
    assert code == 2 and "r must be a positive int, got 0" in err
    code, _, err = _run(capsys, "info", tmp_path / "no_model")
    assert code == 2 and "deltatune: error:" in err


def test_python_dash_m(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "deltatune", "compare", str(tmp_path / "x"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 2 and "deltatune: error: run_dirs[0] must be an existing run directory" in proc.stderr


def test_sweep_and_perplexity_subcommands_are_wired(capsys):
    from deltatune.cli import main

    assert main(["sweep", "missing.yaml"]) == 2
    err = capsys.readouterr().err
    assert "missing.yaml" in err
    with pytest.raises(SystemExit) as exc:
        main(["sweep", "--help"])
    assert exc.value.code == 0
    assert "--methods" in capsys.readouterr().out
    assert main(["perplexity", "missing.yaml"]) == 2
    assert "missing.yaml" in capsys.readouterr().err
