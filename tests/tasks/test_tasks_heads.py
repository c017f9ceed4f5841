"""Classification / regression heads: pooling maths, padding invariance, decoders, build_classifier."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.errors import DeltaConfigError
from deltatune.tasks.heads import PooledClassifier, build_classifier, last_token_index, masked_mean
from tests.tasks._tasks_helpers import tiny_bert_dir, tiny_llama_dir


def _bert_base():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertModel(cfg).eval()


def _llama_base():
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, pad_token_id=0)
    return LlamaModel(cfg).eval()


def _gpt2_base():
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2Model(cfg).eval()


def _pad(seqs, side, pad_id=0):
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(length - len(s), length)
        ids[i, sl] = torch.tensor(s)
        mask[i, sl] = 1
    return ids, mask


SEQS = [[5, 9, 12, 7, 30, 3], [8, 4, 22], [40, 41, 42, 43, 11]]


def test_masked_mean_and_last_index_match_loops():
    torch.manual_seed(1)
    h = torch.randn(3, 6, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    ref = torch.stack([h[i][mask[i].bool()].mean(0) for i in range(3)])
    torch.testing.assert_close(masked_mean(h, mask), ref)
    assert last_token_index(mask).tolist() == [2, 5, 5]


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_pooled_classifier_equals_manual_head(pooling):
    base = _bert_base()
    model = PooledClassifier(base, 3, pooling, dropout=0.0).eval()
    ids, mask = _pad(SEQS, "right")
    logits = model(input_ids=ids, attention_mask=mask).logits
    hidden = base(input_ids=ids, attention_mask=mask).last_hidden_state
    rows = []
    for i, s in enumerate(SEQS):
        n = len(s)
        pooled = hidden[i, :n].mean(0) if pooling == "mean" else hidden[i, n - 1]
        rows.append(model.head(pooled))
    torch.testing.assert_close(logits, torch.stack(rows))
    assert model.head_name == ("classifier" if pooling == "mean" else "score")


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_last_token_pooling_ignores_padding_on_decoders(arch, side):
    base = _llama_base() if arch == "llama" else _gpt2_base()
    model = PooledClassifier(base, 2, "last", dropout=0.0).eval()
    ids, mask = _pad(SEQS, side)
    kwargs = {}
    if arch == "gpt2":  # absolute positions: give real-token positions explicitly under left padding
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
    batched = model(input_ids=ids, attention_mask=mask, **kwargs).logits
    for i, s in enumerate(SEQS):
        single = model(input_ids=torch.tensor([s]), attention_mask=torch.ones(1, len(s), dtype=torch.long)).logits
        torch.testing.assert_close(batched[i], single[0], atol=1e-5, rtol=1e-4)


def test_mean_pooling_with_prefix_uses_real_token_mask():
    """Prefix methods widen attention_mask in front; the pooling must still see only the real tokens."""
    model = PooledClassifier(_bert_base(), 2, "mean", dropout=0.0)
    dt.apply(model, dt.PTuningV2Config(pre_seq_len=4, dropout=0.0, modules_to_save=["classifier"]))
    model.eval()
    ids, mask = _pad(SEQS, "right")
    batched = model(input_ids=ids, attention_mask=mask).logits
    for i, s in enumerate(SEQS):
        single = model(input_ids=torch.tensor([s]), attention_mask=torch.ones(1, len(s), dtype=torch.long)).logits
        torch.testing.assert_close(batched[i], single[0], atol=1e-5, rtol=1e-4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("classifier.modules_to_save.default.") for n in trainable)


def test_regression_head_loss_is_mse():
    model = PooledClassifier(_bert_base(), 1, "mean", dropout=0.0).eval()
    ids, mask = _pad(SEQS, "right")
    labels = torch.tensor([0.5, 3.0, 4.25])
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (3, 1)
    torch.testing.assert_close(out.loss, ((out.logits.squeeze(-1) - labels) ** 2).mean())


def test_build_classifier_cls_mean_last_and_errors(tmp_path):
    bert = tiny_bert_dir(tmp_path)
    b = build_classifier(str(bert), 3, pooling="cls")
    assert type(b.model).__name__ == "BertForSequenceClassification" and b.head_modules == ["classifier"]
    assert b.pooling == "cls" and not b.is_decoder
    assert build_classifier(str(bert), 2, pooling="auto").pooling == "cls"
    m = build_classifier(str(bert), 1, pooling="mean")
    assert isinstance(m.model, PooledClassifier) and m.model.head.out_features == 1
    llama = tiny_llama_dir(tmp_path)
    d = build_classifier(str(llama), 2)
    assert d.is_decoder and d.pooling == "last" and d.head_modules == ["score"]
    assert d.model.config.pad_token_id == d.tokenizer.pad_token_id == 0
    with pytest.raises(DeltaConfigError, match=r"^pooling 'cls' needs an encoder \(BERT-like\) model, got the "
                       r"decoder model type 'llama'; use pooling 'last' \(or 'mean'\)$"):
        build_classifier(str(llama), 2, pooling="cls")
    with pytest.raises(DeltaConfigError, match=r"^pooling must be one of 'auto', 'cls', 'mean', 'last', got 'max'$"):
        build_classifier(str(bert), 2, pooling="max")
