"""Issue 14's "The CLI behaves as one tool", tried as a user would on the classification and perplexity
configs: the data folder is found as a recipe's is, a run that cannot be resumed is not offered a resume,
the perplexity command takes the same flags as ``run`` and writes its settings in the sectioned layout,
and the tokenizer's length warning stays off. Tiny local models, tiny data."""

from __future__ import annotations

import json
import logging

import pytest
import yaml

from deltatune.cli import main
from deltatune.errors import DeltaConfigError
from deltatune.sweep import load_sweep
from deltatune.tasks.lm import _tokens, load_perplexity_config
from tests.tasks._tasks_helpers import tiny_bert_dir, tiny_llama_dir, write_glue, write_wikitext, write_yaml


def _ppl_config(tmp_path, data_dir):
    (tmp_path / "cfg").mkdir(exist_ok=True)
    return write_yaml(tmp_path / "cfg" / "ppl.yaml", {
        "name": "tiny_ppl",
        "model": {"name_or_path": str(tiny_llama_dir(tmp_path))},
        "data": {"dataset": "wikitext-2", "data_dir": data_dir, "train_max_tokens": 64, "block_size": 32},
        "eval": {"max_tokens": 64, "max_length": 32, "stride": 32},
        "delta": {"method": "lora", "r": 2, "target_modules": ["q_proj", "v_proj"]},
        "train": {"max_steps": 1, "batch_size": 2, "device": "cpu"},
    })


def test_data_dir_is_found_next_to_the_config_and_through_the_env_var(tmp_path, monkeypatch):
    """`data.data_dir: ../data` in configs/x.yaml means <repo>/data wherever the command runs, as in recipes."""
    write_wikitext(tmp_path / "data")
    write_glue(tmp_path / "data", "sst2")
    (tmp_path / "elsewhere" / "deeper").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "elsewhere" / "deeper")  # ../data is not here: the config's folder's parent has it
    path = _ppl_config(tmp_path, "../data")
    assert load_perplexity_config(path).data_dir == str((tmp_path / "data").resolve())
    glue = write_yaml(tmp_path / "cfg" / "glue.yaml", {
        "model": {"name_or_path": str(tiny_bert_dir(tmp_path))}, "data": {"dataset": "sst2", "data_dir": "../data"},
        "sweep": {"methods": ["lora"], "seeds": [1]}})
    assert load_sweep(glue).base["data"]["data_dir"] == str((tmp_path / "data").resolve())
    # no data_dir at all: $DELTATUNE_DATA_DIR, then the default
    monkeypatch.setenv("DELTATUNE_DATA_DIR", str(tmp_path / "data"))
    raw = yaml.safe_load(path.read_text())
    del raw["data"]["data_dir"]
    path.write_text(yaml.safe_dump(raw))
    assert load_perplexity_config(path).data_dir == str((tmp_path / "data").resolve())
    monkeypatch.setenv("DELTATUNE_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DeltaConfigError, match=r"^data.data_dir must be an existing directory, got '.*nowhere' "
                                               r"\(looked in: .*\); set data.data_dir or \$DELTATUNE_DATA_DIR$"):
        load_perplexity_config(path)


def test_perplexity_cli_flags_run_directory_and_no_resume_hint(tmp_path, capsys):
    data = str(write_wikitext(tmp_path / "data"))
    path = _ppl_config(tmp_path, data)
    out = tmp_path / "run"
    argv = ["perplexity", str(path), "--set", "eval.max_tokens=48", "--set", "train.lr=0.5", "--output-dir", str(out),
            "--no-progress"]
    capsys.readouterr()  # the tiny model's own saving bars
    assert main(argv) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    assert captured.out.startswith("perplexity base ") and captured.err == ""  # --no-progress: no bars at all
    result = json.loads((out / "result.json").read_text())
    assert (result["eval_tokens"], result["lr"]) == (48, 0.5)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["eval"]["max_tokens"] == 48 and saved["train"]["lr"] == 0.5 and saved["data"]["dataset"] == "wikitext-2"
    assert load_perplexity_config(saved, progress=False) == load_perplexity_config(
        path, ["eval.max_tokens=48", "train.lr=0.5"], output_dir=out, progress=False)
    assert main(argv) == 2  # a second run there: refused, and no resume is offered (perplexity runs cannot resume)
    assert capsys.readouterr().err == (
        f"deltatune: error: output_dir {str(out)!r} already holds a run (train_log.jsonl); pass --overwrite "
        f"(overwrite=True) to replace it, or choose another --output-dir\n"
    )
    (out / "mine.txt").write_text("keep")
    assert main([*argv, "--overwrite"]) == 0
    assert (out / "mine.txt").read_text() == "keep"


def test_tokenising_a_whole_split_does_not_warn_about_the_model_length(tmp_path, caplog):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir(tmp_path)))
    tok.model_max_length = 8
    caplog.set_level(logging.WARNING)
    ids = _tokens(tok, "the cat sat on the mat " * 10)
    assert len(ids) == 60
    assert "longer than the specified maximum sequence length" not in caplog.text
    tok(("the cat sat on the mat " * 10), add_special_tokens=False)  # the check itself: the plain call warns
    assert "longer than the specified maximum sequence length" in caplog.text
