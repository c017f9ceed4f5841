"""`deltatune sweep` on a perplexity config (WikiText-2 layout): tiny Llama, tiny WikiText files."""

from __future__ import annotations

import csv
import json

import pytest

from deltatune.errors import DeltaConfigError
from deltatune.sweep import load_sweep, main
from deltatune.tasks.lm import load_perplexity_config
from deltatune.tasks.spec import WrongCommandError
from tests.tasks._tasks_helpers import tiny_llama_dir, write_wikitext, write_yaml


def _config(tmp_path):
    cfg = {
        "name": "tiny_ppl", "output_dir": str(tmp_path / "out"), "progress": False,
        "model": {"name_or_path": str(tiny_llama_dir(tmp_path))},
        "data": {"dataset": "wikitext-2", "data_dir": str(write_wikitext(tmp_path / "data")), "train_max_tokens": 128,
                 "block_size": 32},
        "eval": {"max_tokens": 96, "max_length": 32, "stride": 32},
        "delta": {"method": "lora", "r": 2, "alpha": 4, "init": "random", "target_modules": ["q_proj", "v_proj"]},
        "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-2, "device": "cpu"},
        "methods": {"ia3": {"lr": 0.05, "config": {"target_modules": ["k_proj", "v_proj", "down_proj"],
                                                  "feedforward_modules": ["down_proj"]}}},
        "sweep": {"methods": ["lora", "ia3"], "seeds": [1]},
    }
    return write_yaml(tmp_path / "ppl_sweep.yaml", cfg)


def test_perplexity_method_sweep(tmp_path, capsys):
    path = _config(tmp_path)
    assert main([str(path), "--no-isolate", "--no-progress"]) == 0, capsys.readouterr().err
    out = tmp_path / "out"
    rows = {r["method"]: r for r in csv.DictReader((out / "results.csv").open(encoding="utf-8"))}
    assert list(rows) == ["lora", "ia3"]
    for m in rows:
        result = json.loads((out / "runs" / f"{m}_seed1" / "result.json").read_text())
        assert result["method"] == m and result["steps"] == 2
        assert float(rows[m]["perplexity_mean"]) == pytest.approx(result["tuned"]["perplexity"])
        assert float(rows[m]["base_perplexity_mean"]) == pytest.approx(result["base"]["perplexity"])
        assert int(rows[m]["trainable_params"]) == result["trainable_params"]
    assert json.loads((out / "runs" / "ia3_seed1" / "result.json").read_text())["lr"] == 0.05
    md = (out / "results.md").read_text(encoding="utf-8")
    assert "| perplexity (valid) | base_perplexity (valid) |" in md


def test_perplexity_sweep_checks(tmp_path):
    path = _config(tmp_path)
    with pytest.raises(DeltaConfigError, match=r"^a perplexity sweep trains delta methods; 'full' \(full fine-tuning\)"):
        load_sweep(path, methods=["full", "lora"])
    for seed in ("seed=3", "train.seed=3"):  # the old flat path and the section's
        with pytest.raises(DeltaConfigError, match=r"^a sweep must not set 'train.seed' \(got 3\)"):
            load_sweep(path, overrides=[seed])
    spec = load_sweep(path, overrides=["methods.lora.config={r: 3}", "eval.max_tokens=64"])
    cfg = spec.run_config("lora", 7)
    assert (cfg["delta"]["r"], cfg["delta"]["alpha"], cfg["train"]["seed"], cfg["eval"]["max_tokens"]) == (3, 4, 7, 64)
    old = load_sweep(path, overrides=["methods.lora.config={r: 3}", "eval_max_tokens=64"])  # the old flat path
    assert old.run_config("lora", 7) == cfg
    with pytest.raises(WrongCommandError) as exc:
        load_perplexity_config(path)
    assert str(exc.value) == (
        f"{path} is a perplexity method sweep, which `deltatune perplexity` does not take: use `deltatune sweep "
        f"{path}` (or remove its 'sweep' and 'methods' sections to run it once)"
    )
    assert not (tmp_path / "out").exists()
