"""Tiny random-init models built from configs, shared by the tests."""

from __future__ import annotations

import torch
import torch.nn as nn

VOCAB = 64


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, 1)
        self.conv3 = nn.Conv1d(4, 4, 3, padding=1)
        self.head = nn.Linear(4 * 36, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        h = self.conv3(h.flatten(2)).flatten(1)
        return self.head(h)


def convnet() -> nn.Module:
    torch.manual_seed(0)
    return ConvNet()


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                     bos_token_id=0, eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def llama_config(**fields):
    """The tiny Llama shape of the tests (2 layers, hidden 32, 4 heads, 2 KV heads) with ``fields`` added."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, **fields)


def llama() -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = llama_config(vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=VOCAB, max_position_embeddings=64, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


BUILDERS = {"mlp": mlp, "convnet": convnet, "gpt2": gpt2, "llama": llama, "bert": bert}


def example_input(kind: str) -> dict | torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if kind == "mlp":
        return torch.randn(4, 16, generator=g)
    if kind == "convnet":
        return torch.randn(2, 3, 6, 6, generator=g)
    ids = torch.randint(3, VOCAB, (2, 7), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def run(model: nn.Module, inputs) -> torch.Tensor:
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out if isinstance(out, torch.Tensor) else out.logits
