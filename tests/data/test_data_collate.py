"""CausalLMCollator, pack_features and ClassificationCollator: exact tensors."""

from __future__ import annotations

import pytest
import torch

from deltatune.data import (
    CausalLMCollator,
    ClassificationCollator,
    DataToTextExample,
    TextPairExample,
    build_causal_lm_features,
    pack_features,
)
from deltatune.errors import DeltaConfigError, DeltaConfigTypeError

FEATS = [
    {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "example_index": 0},
    {"input_ids": [8, 9, 10, 11], "labels": [-100, -100, 10, 11]},
    {"input_ids": [12, 13], "labels": [-100, 13]},
]


def test_right_padding_exact():
    b = CausalLMCollator(pad_token_id=0)(FEATS)
    assert b["input_ids"].dtype == torch.long and b["labels"].dtype == torch.long
    assert b["input_ids"].tolist() == [[5, 6, 7, 0], [8, 9, 10, 11], [12, 13, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7, -100], [-100, -100, 10, 11], [-100, 13, -100, -100]]


def test_left_padding_multiple_and_label_pad():
    c = CausalLMCollator(pad_token_id=1, label_pad=-1, pad_to_multiple_of=3, padding_side="left")
    b = c(FEATS[:1] + FEATS[2:])
    assert b["input_ids"].tolist() == [[5, 6, 7], [1, 12, 13]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert b["labels"].tolist() == [[-100, 6, 7], [-1, -100, 13]]
    b = c(FEATS)
    assert b["input_ids"].shape == (3, 6)
    assert b["input_ids"][1].tolist() == [1, 1, 8, 9, 10, 11]


def test_prompts_without_labels_and_tensor_inputs():
    b = CausalLMCollator(0, padding_side="left")([{"input_ids": torch.tensor([4, 5])}, {"input_ids": [6]}])
    assert set(b) == {"input_ids", "attention_mask"}
    assert b["input_ids"].tolist() == [[4, 5], [0, 6]]


def test_collator_errors():
    with pytest.raises(DeltaConfigError, match="pad_token_id must be an int >= 0, got -1"):
        CausalLMCollator(-1)
    with pytest.raises(DeltaConfigError, match="padding_side must be one of 'right', 'left', got 'top'"):
        CausalLMCollator(0, padding_side="top")
    with pytest.raises(DeltaConfigError, match="pad_to_multiple_of must be a positive int, got 0"):
        CausalLMCollator(0, pad_to_multiple_of=0)
    c = CausalLMCollator(0)
    with pytest.raises(DeltaConfigError, match=r"features\[1\]: labels has length 1 but input_ids has length 2"):
        c([FEATS[0], {"input_ids": [1, 2], "labels": [1]}])
    with pytest.raises(DeltaConfigError, match=r"features\[1\] has no 'labels'"):
        c([FEATS[0], {"input_ids": [1, 2]}])
    with pytest.raises(DeltaConfigError, match="features must be a non-empty list"):
        c([])


def test_pack_features_exact():
    blocks = pack_features(FEATS, 4)
    assert blocks == [
        {"input_ids": [5, 6, 7, 8], "labels": [-100, 6, 7, -100], "attention_mask": [1, 1, 1, 1]},
        {"input_ids": [9, 10, 11, 12], "labels": [-100, 10, 11, -100], "attention_mask": [1, 1, 1, 1]},
        {"input_ids": [13, 0, 0, 0], "labels": [13, -100, -100, -100], "attention_mask": [1, 0, 0, 0]},
    ]
    assert pack_features(FEATS, 4, drop_last=True) == blocks[:2]
    assert pack_features(FEATS, 9) == [
        {"input_ids": [5, 6, 7, 8, 9, 10, 11, 12, 13], "labels": [-100, 6, 7, -100, -100, 10, 11, -100, 13],
         "attention_mask": [1] * 9}
    ]
    # unlabeled features are packed for plain LM training: labels = input_ids
    assert pack_features([{"input_ids": [1, 2, 3]}], 2, pad_token_id=9) == [
        {"input_ids": [1, 2], "labels": [1, 2], "attention_mask": [1, 1]},
        {"input_ids": [3, 9], "labels": [3, -100], "attention_mask": [1, 0]},
    ]


def test_packed_blocks_collate_with_their_mask():
    blocks = pack_features(FEATS, 4)
    b = CausalLMCollator(0)(blocks)
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert b["labels"][2].tolist() == [13, -100, -100, -100]


def test_pack_errors():
    with pytest.raises(DeltaConfigError, match="block_size must be a positive int, got 0"):
        pack_features(FEATS, 0)
    with pytest.raises(DeltaConfigError, match=r"features\[0\]: labels has length 1"):
        pack_features([{"input_ids": [1, 2], "labels": [1]}], 2)


def test_features_to_batch_roundtrip(word_tok):
    ex = DataToTextExample("name : Alimentum", ["There is a place", "it is"])
    feats = build_causal_lm_features([ex], word_tok, max_length=32)
    b = CausalLMCollator(word_tok.pad_token_id)(feats)
    n0 = len(feats[0]["input_ids"])
    n1 = len(feats[1]["input_ids"])
    assert b["input_ids"][1, n1:].tolist() == [word_tok.pad_token_id] * (n0 - n1)
    assert b["labels"][1, : n1].tolist() == feats[1]["labels"]


# ---- classification, with the bundled MiniLM (BERT) tokenizer ----

PAIRS = [
    TextPairExample("A man is playing a guitar.", "A person plays an instrument.", 1),
    TextPairExample("Cats sleep.", "The stock market fell sharply on Monday after the report.", 0),
]


def _manual(tok, examples, max_length):
    """Reference: encode one by one, then right-pad with pad_token_id by hand."""
    enc = [
        tok(e.text_a, e.text_b, truncation=True, max_length=max_length) for e in examples
    ]
    n = max(len(x["input_ids"]) for x in enc)
    ids = [x["input_ids"] + [tok.pad_token_id] * (n - len(x["input_ids"])) for x in enc]
    tt = [x["token_type_ids"] + [0] * (n - len(x["token_type_ids"])) for x in enc]
    mask = [[1] * len(x["input_ids"]) + [0] * (n - len(x["input_ids"])) for x in enc]
    return ids, tt, mask


def test_classification_pairs_exact(minilm_tok):
    b = ClassificationCollator(minilm_tok, 128)(PAIRS)
    ids, tt, mask = _manual(minilm_tok, PAIRS, 128)
    assert b["input_ids"].tolist() == ids
    assert b["token_type_ids"].tolist() == tt
    assert b["attention_mask"].tolist() == mask
    assert b["labels"].dtype == torch.long and b["labels"].tolist() == [1, 0]
    # [CLS] a [SEP] b [SEP]: two segments
    assert set(b["token_type_ids"][0].tolist()) == {0, 1}


def test_classification_truncation_single_and_regression(minilm_tok):
    singles = [TextPairExample("a b c d e f g h i j k", None, 0.5), TextPairExample("short", None, 3)]
    b = ClassificationCollator(minilm_tok, 6)(singles)
    ids, _, _ = _manual(minilm_tok, singles, 6)
    assert b["input_ids"].tolist() == ids and b["input_ids"].shape[1] == 6
    assert b["labels"].dtype == torch.float and b["labels"].tolist() == [0.5, 3.0]
    b = ClassificationCollator(minilm_tok, 6, is_regression=True)([TextPairExample("x", None, 2)])
    assert b["labels"].dtype == torch.float
    b = ClassificationCollator(minilm_tok, 16, pad_to_multiple_of=8)(singles)
    assert b["input_ids"].shape[1] == 16


def test_classification_hidden_labels_and_errors(minilm_tok):
    c = ClassificationCollator(minilm_tok, 32)
    assert "labels" not in c([TextPairExample("x"), TextPairExample("y")])
    with pytest.raises(DeltaConfigError, match=r"examples\[1\] has label None"):
        c([TextPairExample("x", None, 1), TextPairExample("y")])
    with pytest.raises(DeltaConfigError, match=r"examples\[1\] has no text_b"):
        c([TextPairExample("x", "z", 1), TextPairExample("y", None, 1)])
    with pytest.raises(DeltaConfigError, match=r"examples\[0\]\.label must be a class id"):
        ClassificationCollator(minilm_tok, 32, is_regression=False)([TextPairExample("x", None, 0.5)])
    with pytest.raises(DeltaConfigTypeError, match=r"examples\[0\] must be a TextPairExample"):
        c([("x", 1)])
    with pytest.raises(DeltaConfigError, match="max_length must be an int >= 2, got 1"):
        ClassificationCollator(minilm_tok, 1)
