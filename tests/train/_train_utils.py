"""Tiny models and datasets shared by the trainer tests (also imported by the DDP worker script)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

VOCAB = 32


class TinyLM(nn.Module):
    """A pure-torch causal 'LM' (no sequence mixing): embedding -> norm -> MLP (+dropout) -> head."""

    def __init__(self, vocab: int = VOCAB, dim: int = 16, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        h = self.embed(input_ids)
        h = h + self.drop(torch.tanh(self.proj(self.norm(h))))
        return SimpleNamespace(logits=self.head(h))


def tiny_lm(seed: int = 0, dropout: float = 0.0) -> TinyLM:
    """A TinyLM with a frozen embedding (the 'base') and trainable norm/proj/head."""
    torch.manual_seed(seed)
    model = TinyLM(dropout=dropout)
    model.embed.weight.requires_grad_(False)
    return model


def tiny_llama(seed: int = 0, attention_dropout: float = 0.0) -> nn.Module:
    """A random-init LlamaForCausalLM with everything frozen except layer 1's weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        attention_dropout=attention_dropout,
        initializer_range=0.2,  # 0.02 caps the frozen head's logits at ~0.6 (loss floor ~ln(vocab))
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    model = LlamaForCausalLM(cfg)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("model.layers.1."))
    return model


def lm_examples(n: int, seed: int = 1, min_len: int = 3, max_len: int = 12) -> list[dict[str, list[int]]]:
    """``n`` feature dicts of random token ids with varying lengths (labels added by the collator)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        out.append({"input_ids": torch.randint(3, VOCAB, (length,), generator=g).tolist()})
    return out


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the requires_grad parameters."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models run far faster on one thread (and do not fight other test processes)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
