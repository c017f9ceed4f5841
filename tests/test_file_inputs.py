"""Config, recipe and override files: bad UTF-8, YAML/JSON syntax errors and duplicate keys are named
errors that give the file and the line, from the API and from the CLI (no traceback)."""

from __future__ import annotations

import re

import pytest
import yaml

import deltatune as dt
from deltatune.cli import main
from deltatune.errors import DataFormatError, DeltaConfigError, FileFormatError
from deltatune.io_utils import json_loads_strict, load_json_file, load_yaml_file, read_text_file, yaml_load
from deltatune.recipes import load_recipe, parse_override
from tests.recipe_fixtures import recipe_dict, tiny_assets, write_recipe


@pytest.fixture(scope="module")
def tiny():
    return tiny_assets()


# -- YAML duplicate keys ----------------------------------------------------------------------
def test_yaml_duplicate_key_is_refused_with_both_lines():
    with pytest.raises(yaml.constructor.ConstructorError, match=r"duplicate key 'r' \(first on line 2\)"):
        yaml_load("method: lora\nr: 4\nalpha: 8\nr: 16\n")
    with pytest.raises(yaml.constructor.ConstructorError, match=r"duplicate key 'lr' \(first on line 3\)"):
        yaml_load("train:\n  steps: 1\n  lr: 1\n  lr: 2\n")  # nested mapping too
    with pytest.raises(yaml.constructor.ConstructorError, match=r"duplicate key 'a' \(first on line 1\)"):
        yaml_load("{a: 1, b: 2, a: 3}")  # flow style
    # neighbours that are fine: the same key in two different mappings, merge keys, 1e-3 floats
    assert yaml_load("a: {x: 1}\nb: {x: 2}\n") == {"a": {"x": 1}, "b": {"x": 2}}
    assert yaml_load("base: &b {x: 1}\nc:\n  <<: *b\n  y: 2\n") == {"base": {"x": 1}, "c": {"x": 1, "y": 2}}
    assert yaml_load("lr: 1e-3") == {"lr": 0.001}


def test_load_config_duplicate_key_names_file_and_line(tmp_path):
    p = tmp_path / "lora.yaml"
    p.write_text("method: lora\nr: 4\nr: 16\n")
    with pytest.raises(FileFormatError, match=r"config '.*lora\.yaml', line 3, column 1: invalid YAML \(duplicate key 'r'"):
        dt.load_config(p)
    j = tmp_path / "lora.json"
    j.write_text('{"method": "lora", "r": 4, "r": 16}')
    with pytest.raises(FileFormatError, match=r"config '.*lora\.json': duplicate key 'r' in a JSON object"):
        dt.load_config(j)


def test_load_recipe_duplicate_key(tiny, tmp_path):
    model_dir, data_dir = tiny
    p = write_recipe(tmp_path / "r.yaml", recipe_dict(model_dir, data_dir, tmp_path / "run"))
    p.write_text(p.read_text() + "name: first\nname: second\n")
    with pytest.raises(DataFormatError, match=r"r\.yaml, line \d+, column 1: invalid YAML \(duplicate key 'name'"):
        load_recipe(p)


def test_set_override_with_duplicate_key_is_refused():
    with pytest.raises(DeltaConfigError, match=r"--set 'model=\{a: 1, a: 2\}': duplicate key 'a'"):
        parse_override("model={a: 1, a: 2}")
    assert parse_override("model={a: 1, b: 2}") == (["model"], {"a": 1, "b": 2})


# -- encoding and syntax ------------------------------------------------------------------------
def test_non_utf8_names_file_line_and_byte(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes(b"method: lora\nr: 4\ntarget_modules: [q\xff]\n")
    with pytest.raises(FileFormatError, match=r"config '.*c\.yaml', line 3: not valid UTF-8 \(byte b'\\xff' at offset 36\)"):
        dt.load_config(p)
    with pytest.raises(FileFormatError, match=r"thing '.*c\.yaml', line 3: not valid UTF-8"):
        read_text_file(p, "thing")
    j = tmp_path / "c.json"
    j.write_bytes(b'{"method": "lora",\n "r": "\xc3"}')
    with pytest.raises(FileFormatError, match=r"config '.*c\.json', line 2: not valid UTF-8"):
        dt.load_config(j)


@pytest.mark.parametrize(
    ("name", "text", "loader", "message"),
    [
        ("bad.yaml", "method: lora\nr: [4\nalpha: 8\n", dt.load_config, r"config '.*bad\.yaml', line 3, column \d+: invalid YAML"),
        ("bad.yaml", "method: lora\nr: [4\nalpha: 8\n", load_yaml_file, r"YAML file '.*bad\.yaml', line 3"),
        ("bad.json", '{"method": "lora",\n "r": 4,\n}', dt.load_config, r"config '.*bad\.json', line 3, column 1: invalid JSON"),
        ("bad.json", '{"method": "lora",\n "r": 4,\n}', load_json_file, r"JSON file '.*bad\.json', line 3, column 1: invalid JSON"),
    ],
)
def test_yaml_and_json_syntax_errors_name_the_line(tmp_path, name, text, loader, message):
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(FileFormatError, match=message):
        loader(p)


def test_json_loads_strict():
    with pytest.raises(FileFormatError, match=r"^src, line 1, column 1: invalid JSON \(Expecting value\)"):
        json_loads_strict("", "src")
    assert json_loads_strict('{"a": [1, {"a": 2}]}', "src") == {"a": [1, {"a": 2}]}  # same key, other object


def test_recipe_non_utf8_and_syntax(tiny, tmp_path):
    model_dir, data_dir = tiny
    p = write_recipe(tmp_path / "r.yaml", recipe_dict(model_dir, data_dir, tmp_path / "run"))
    good = p.read_bytes()
    p.write_bytes(good + b"# caf\xe9\n")
    n = good.count(b"\n") + 1
    with pytest.raises(FileFormatError, match=rf"recipe '.*r\.yaml', line {n}: not valid UTF-8"):
        load_recipe(p)
    p.write_bytes(good + b"train: [\n")
    with pytest.raises(DataFormatError, match=r"r\.yaml, line \d+, column \d+: invalid YAML"):
        load_recipe(p)


def test_cli_reports_bad_files_without_traceback(tiny, tmp_path, capsys):
    model_dir, data_dir = tiny
    p = write_recipe(tmp_path / "r.yaml", recipe_dict(model_dir, data_dir, tmp_path / "run"))
    p.write_bytes(p.read_bytes() + b"\xff\xfe\n")
    assert main(["run", str(p), "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert "deltatune: error:" in err and "r.yaml" in err and "not valid UTF-8" in err
    assert "Traceback" not in err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: lora\nr: 2\nr: 4\n")
    assert main(["info", str(model_dir), "--config", str(cfg)]) == 2
    out, err = capsys.readouterr()
    assert "duplicate key 'r'" in err and "c.yaml', line 3" in err and "Traceback" not in err


# -- recipe names -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../../escaped", "a/b", "..", "x/../y", "a\\b", "/abs", ".", "..hidden"])
def test_recipe_name_with_path_parts_is_refused(tiny, tmp_path, name):
    model_dir, data_dir = tiny
    raw = recipe_dict(model_dir, data_dir, tmp_path / "run")
    with pytest.raises(DeltaConfigError, match=r"name must be a plain run name .*, got " + re.escape(repr(name)) + "$"):
        load_recipe({**raw, "name": name})


def test_recipe_plain_names_are_accepted(tiny, tmp_path):
    model_dir, data_dir = tiny
    raw = recipe_dict(model_dir, data_dir, tmp_path / "run")
    for name in ("e2e_lora", "run-1.v2", "a.b"):
        assert load_recipe({**raw, "name": name}).name == name


# -- other files we read back -------------------------------------------------------------------
def test_prediction_and_reference_files_with_bad_bytes(tmp_path):
    from deltatune.metrics import read_predictions_file, read_references_file

    p = tmp_path / "pred.txt"
    p.write_bytes("\ufeffA pub .\nCaf\u00e9 .\n".encode())
    assert read_predictions_file(p) == ["A pub .", "Caf\u00e9 ."]  # a BOM is dropped, UTF-8 read
    p.write_bytes(b"A pub .\nCaf\xe9 .\n")
    with pytest.raises(FileFormatError, match=r"text file '.*pred\.txt', line 2: not valid UTF-8"):
        read_predictions_file(p)
    with pytest.raises(FileFormatError, match=r"pred\.txt', line 2: not valid UTF-8"):
        read_references_file(p)


def test_run_metrics_file_with_bad_bytes(tmp_path):
    from deltatune.report import read_metrics

    (tmp_path / "metrics.json").write_bytes(b'{"bleu": "\xff"}')
    with pytest.raises(FileFormatError, match=r"metrics\.json '.*metrics\.json', line 1: not valid UTF-8"):
        read_metrics(tmp_path)


# -- overwriting a run directory -----------------------------------------------------------------
def test_overwrite_deletes_only_our_files_and_refuses_foreign_checkpoints(tiny, tmp_path):
    from deltatune.errors import ForeignFileError
    from deltatune.recipes import _prepare_run_dir

    model_dir, data_dir = tiny
    recipe = load_recipe(recipe_dict(model_dir, data_dir, tmp_path / "run"))
    run = tmp_path / "run"
    (run / "checkpoint-4").mkdir(parents=True)
    (run / "checkpoint-4" / "COMPLETE").write_text("4\n")  # the Trainer's
    for name in ("train_log.jsonl", "metrics.json", "notes.txt"):
        (run / name).write_text("x")
    (run / "checkpoint-500").mkdir()
    (run / "checkpoint-500" / "pytorch_model.bin").write_bytes(b"not ours")
    before = sorted(p.relative_to(run).as_posix() for p in run.rglob("*"))
    with pytest.raises(ForeignFileError, match=r"holds \['checkpoint-500'\], checkpoint directories deltatune did not write"):
        _prepare_run_dir(recipe, overwrite=True)
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == before  # nothing deleted
    (run / "checkpoint-500" / "pytorch_model.bin").rename(tmp_path / "moved.bin")
    (run / "checkpoint-500").rmdir()
    _prepare_run_dir(recipe, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]  # our artefacts and checkpoint gone
