"""One config layout for every task (issue 14): classification and perplexity configs use the sections of
a recipe; the old flat files load unchanged in meaning through the one mapping (tasks/layout.py), and
their old ``--set`` paths keep working."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from deltatune.errors import DeltaConfigError
from deltatune.sweep import load_sweep
from deltatune.tasks.classification import ClassificationConfig, classification_config
from deltatune.tasks.layout import CLASSIFICATION, PERPLEXITY, flatten, task_of, to_sections
from deltatune.tasks.lm import load_perplexity_config
from deltatune.tasks.spec import config_kind
from tests.tasks._tasks_helpers import write_glue, write_wikitext

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "tasks" / "fixtures"
#: the commit before the configs were converted to the sectioned layout
FLAT_COMMIT = "c2c8c66"
CONVERTED = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs" / "glue").rglob("*.yaml")) + [
    "configs/wikitext_lora.yaml"
]


def _git_show(path: str) -> str:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    proc = subprocess.run(["git", "show", f"{FLAT_COMMIT}:{path}"], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"commit {FLAT_COMMIT} is not in this checkout ({proc.stderr.strip()})")
    return proc.stdout


def test_every_converted_file_is_listed():
    assert len(CONVERTED) == 16 and "configs/glue/lora_vs_full/sst2.yaml" in CONVERTED


@pytest.mark.parametrize("path", CONVERTED)
def test_converted_config_equals_the_mapping_of_its_flat_version(path):
    old = yaml.safe_load(_git_show(path))
    new = yaml.safe_load((REPO / path).read_text(encoding="utf-8"))
    assert "task" in old and "task" not in new  # the old file is flat, the new one sectioned
    layout = PERPLEXITY if old["task"] == "perplexity" else CLASSIFICATION
    assert to_sections(old, layout) == new
    assert to_sections(new, layout) == new  # a sectioned file is left as it is
    assert config_kind(old) == config_kind(new)


def test_flat_classification_fixture_loads_as_its_converted_file(tmp_path):
    data = str(write_glue(tmp_path, "sst2"))
    old = load_sweep(FIXTURES / "flat_sst2_cpu.yaml", overrides=[f"data_dir={data}", "max_train_examples=20"])
    new = load_sweep(REPO / "configs" / "glue" / "sst2_cpu.yaml",
                     overrides=[f"data.data_dir={data}", "data.max_train_examples=20"])
    assert old == new
    # the old flat paths on the converted file reach the same keys
    assert load_sweep(REPO / "configs" / "glue" / "sst2_cpu.yaml", overrides=[f"data_dir={data}",
                                                                             "max_train_examples=20"]) == new
    for m in new.methods:
        cfg = classification_config(new.run_config(m, 1))
        assert cfg == classification_config(old.run_config(m, 1))
    lora = classification_config(new.run_config("lora", 1))
    assert (lora.model, lora.pooling, lora.max_length, lora.max_train_examples, lora.device, lora.seed) == (
        "minilm-l6", "mean", 64, 20, "cpu", 1)
    assert (lora.method_config["r"], lora.train["lr"], lora.num_threads) == (8, 2e-3, 1)
    # a flat mapping (the Python-side dict of ClassificationConfig) reads the same
    assert classification_config(lora.to_dict()) == lora
    assert classification_config(lora.to_sections()).to_sections() == lora.to_sections()


def test_flat_perplexity_fixture_loads_as_its_converted_file(tmp_path):
    data = str(write_wikitext(tmp_path))
    old = load_perplexity_config(FIXTURES / "flat_wikitext_lora.yaml",
                                 [f"data_dir={data}", "eval_max_tokens=64", "stride=32", "seed=5", "device=cpu"])
    new = load_perplexity_config(REPO / "configs" / "wikitext_lora.yaml",
                                 [f"data.data_dir={data}", "eval.max_tokens=64", "eval.stride=32", "train.seed=5"])
    assert old == new
    assert (new.eval_max_tokens, new.stride, new.seed, new.train["lr"], new.delta["r"]) == (64, 32, 5, 5e-4, 8)
    assert load_perplexity_config({**new.to_sections(), "progress": True}) == new


def test_task_of_both_layouts():
    assert task_of({"task": "sst2", "model": "minilm-l6"}) == "classification"
    assert task_of({"data": {"dataset": "SST-2"}, "model": {"name_or_path": "x"}}) == "classification"
    assert task_of({"data": {"dataset": "csv"}}) == "classification"
    assert task_of({"task": "perplexity"}) == task_of({"data": {"dataset": "wikitext-2"}}) == "perplexity"
    assert task_of({"eval_max_tokens": 5}) == task_of({"eval": {"stride": 4}, "delta": {}}) == "perplexity"
    assert task_of({"data": {"dataset": "e2e"}}) == task_of({"model": {"name_or_path": "m"}}) == "data-to-text"
    assert task_of({"data": {"dataset": "sst3"}}) is None and task_of({"name": "x"}) is None


def test_flat_mapping_conflicts_and_unknown_keys():
    with pytest.raises(DeltaConfigError, match=r"^'max_length' \(the flat layout's name of data.max_length\) and "
                                               r"data.max_length are both given, with different values \(32 and 64\)"):
        to_sections({"max_length": 32, "data": {"max_length": 64}}, CLASSIFICATION)
    # the same value twice is no conflict; method / method_config become the delta section
    assert to_sections({"max_length": 32, "data": {"max_length": 32}, "method": "lora", "method_config": {"r": 2},
                        "seed": 3, "device": "cpu", "dtype": "bfloat16"}, CLASSIFICATION) == {
        "model": {"dtype": "bfloat16"}, "data": {"max_length": 32}, "delta": {"method": "lora", "r": 2},
        "train": {"seed": 3, "device": "cpu"}}
    with pytest.raises(DeltaConfigError, match=r"^perplexity config: task must be 'perplexity', got 'sst2'$"):
        to_sections({"task": "sst2", "stride": 3}, PERPLEXITY)
    with pytest.raises(DeltaConfigError, match=r"^unknown classification config key 'pooling2'; known keys: name, "
                                               r"output_dir, num_threads, save_delta, progress, model, data, delta, train$"):
        flatten(to_sections({"pooling2": "mean"}, CLASSIFICATION), CLASSIFICATION)
    with pytest.raises(DeltaConfigError, match=r"^unknown key 'model.pool' in classification config section 'model'; "
                                               r"known keys: name_or_path, dtype, pooling, head_dropout$"):
        flatten({"model": {"pool": "mean"}}, CLASSIFICATION)
    with pytest.raises(DeltaConfigError, match=r"^data.dataset must be one of 'wikitext-2', got 'wiki'$"):
        flatten({"data": {"dataset": "wiki"}}, PERPLEXITY)
    with pytest.raises(DeltaConfigError, match=r"^delta.method is required"):
        flatten({"delta": {"r": 2}}, CLASSIFICATION)


def test_sectioned_classification_config_fields(tmp_path):
    data = str(write_glue(tmp_path, "mrpc"))
    cfg = classification_config({
        "name": "x", "output_dir": "out", "num_threads": 2,
        "model": {"name_or_path": "minilm-l6", "pooling": "cls", "head_dropout": 0.2, "dtype": "float32"},
        "data": {"dataset": "mrpc", "data_dir": data, "max_length": 48, "max_train_examples": 10, "subset_seed": 4},
        "delta": {"method": "ia3"},
        "train": {"seed": 9, "device": "cpu", "lr": 0.5, "max_steps": 2},
    })
    assert cfg == ClassificationConfig(task="mrpc", model="minilm-l6", method="ia3", pooling="cls", head_dropout=0.2,
                                       dtype="float32", data_dir=data, max_length=48, max_train_examples=10,
                                       subset_seed=4, seed=9, device="cpu", train={"lr": 0.5, "max_steps": 2},
                                       num_threads=2, output_dir="out")
