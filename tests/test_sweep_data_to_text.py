"""`deltatune sweep` on a data-to-text recipe (an E2E method sweep works like a GLUE one): tiny Llama, tiny E2E."""

from __future__ import annotations

import csv
import json
import statistics

import pytest
import yaml

from deltatune.errors import DeltaConfigError
from deltatune.sweep import load_sweep, main
from tests.recipe_fixtures import recipe_dict, tiny_assets, write_recipe


def _sweep_recipe(tmp_path, **extra):
    model_dir, data_dir = tiny_assets()
    raw = recipe_dict(model_dir, data_dir, tmp_path / "out", train={"max_steps": 2, "eval_every": 0}, **extra)
    raw["methods"] = {"lora": {"lr": 0.05}, "ia3": {"config": {"target_modules": ["k_proj", "v_proj", "down_proj"]}}}
    raw["sweep"] = {"methods": ["lora", "ia3"], "seeds": [1, 2]}
    return write_recipe(tmp_path / "e2e_sweep.yaml", raw)


def test_e2e_method_sweep_end_to_end(tmp_path, capsys):
    path = _sweep_recipe(tmp_path)
    rc = main([str(path), "--no-isolate", "--no-progress", "--set", "eval.max_examples=3"])
    assert rc == 0, capsys.readouterr().err
    out = tmp_path / "out"
    rows = list(csv.DictReader((out / "results.csv").open(encoding="utf-8")))
    assert [r["method"] for r in rows] == ["lora", "ia3"]
    md = (out / "results.md").read_text(encoding="utf-8")
    assert "| Method | Trainable params | Trainable % | Peak memory (MiB) | Time / step (ms) | BLEU (test) | NIST (test) |" in md
    for row in rows:
        m = row["method"]
        runs = [json.loads((out / "runs" / f"{m}_seed{s}.json").read_text()) for s in (1, 2)]
        assert all("result" in r for r in runs), [r.get("error") for r in runs]
        for s, r in zip((1, 2), runs):
            run_dir = out / "runs" / f"{m}_seed{s}"
            metrics = json.loads((run_dir / "metrics.json").read_text())
            config = yaml.safe_load((run_dir / "config.yaml").read_text())
            # each run is the recipe with its method and seed, scored like `deltatune run`
            assert (config["delta"]["method"], config["train"]["seed"], config["eval"]["max_examples"]) == (m, s, 3)
            assert r["result"]["metrics"] == {"BLEU": metrics["BLEU"], "NIST": metrics["NIST"]}
            assert r["result"]["trainable_params"] == metrics["trainable_params"] and metrics["num_eval_inputs"] == 3
        bleu = [r["result"]["metrics"]["BLEU"] for r in runs]
        assert float(row["BLEU_mean"]) == pytest.approx(statistics.fmean(bleu))
        assert float(row["BLEU_std"]) == pytest.approx(statistics.stdev(bleu))
        assert row["seeds_ok"] == "1 2" and row["error"] == ""
    lora = json.loads((out / "runs" / "lora_seed1.json").read_text())["result"]
    ia3 = json.loads((out / "runs" / "ia3_seed1.json").read_text())["result"]
    assert (lora["lr"], ia3["lr"]) == (0.05, 1e-2)  # methods.lora.lr; the recipe's train.lr for ia3
    assert yaml.safe_load((out / "runs" / "ia3_seed1" / "config.yaml").read_text())["delta"]["target_modules"] == [
        "k_proj", "v_proj", "down_proj"]
    assert (out / "results.png").stat().st_size > 0


def test_e2e_sweep_is_checked_before_any_run(tmp_path):
    path = _sweep_recipe(tmp_path)
    spec = load_sweep(path, overrides=["methods.lora.config={r: 3}"])
    assert spec.kind == "data-to-text"
    cfg = spec.run_config("lora", 2)
    assert (cfg["delta"], cfg["train"]["seed"], cfg["name"]) == (
        {"method": "lora", "r": 3, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}, 2, "tiny_lora_seed2")  # the recipe name is "tiny"
    assert spec.run_config("full", 1)["delta"] == {"method": "full"}
    with pytest.raises(DeltaConfigError, match=r"^a sweep must not set 'train.seed' \(got 5\): the sweep sets it"):
        load_sweep(path, overrides=["train.seed=5"])
    with pytest.raises(DeltaConfigError, match=r"^LoraConfig.r must be a positive int, got 0$"):
        load_sweep(path, overrides=["methods.lora.config={r: 0}"])
    assert not (tmp_path / "out").exists()
