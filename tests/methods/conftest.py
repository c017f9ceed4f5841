"""Tiny random-init transformers models and helpers shared by the method tests.

Fixtures:
    tiny: ``tiny.model(arch)`` builds a seeded tiny GPT-2 / Llama (causal LM) or BERT (sequence
        classification, 3 labels) in eval mode with dropout off; ``tiny.batch(arch)`` a fixed batch
        with labels; ``tiny.train(model, batch, steps)`` runs AdamW (lr 1e-2) on the trainable
        parameters and returns the losses; ``tiny.base_state(model)`` copies every non-delta
        parameter under its logical name.
    decode_step_ops: ``decode_step_ops(model)`` lists the aten ops one decode step of a causal LM
        dispatches at the top level (not inside another aten op), after a step that fills its caches.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

ARCHS = ("gpt2", "llama", "bert")
VOCAB = 64
HIDDEN = 32
LAYERS = 2
HEADS = 4
INTER = 64


def make_model(arch: str, seed: int = 0) -> nn.Module:
    """A tiny model of ``arch`` (hidden 32, 2 layers, 4 heads, vocab 64), eval mode, no dropout."""
    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(
            n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, vocab_size=VOCAB, n_positions=64,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )
        model = transformers.GPT2LMHeadModel(cfg)
    elif arch == "llama":
        cfg = transformers.LlamaConfig(
            hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
        )
        model = transformers.LlamaForCausalLM(cfg)
    elif arch == "bert":
        cfg = transformers.BertConfig(
            hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=INTER,
            vocab_size=VOCAB, max_position_embeddings=64, num_labels=3,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
        model = transformers.BertForSequenceClassification(cfg)
    else:  # pragma: no cover
        raise ValueError(arch)
    return model.eval()


def make_batch(arch: str, batch: int = 2, seq: int = 8) -> dict[str, torch.Tensor]:
    """A fixed batch for ``arch`` with labels (token ids for causal LMs, classes for BERT)."""
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out["labels"] = torch.randint(0, 3, (batch,), generator=g) if arch == "bert" else ids.clone()
    return out


def train(model: nn.Module, batch: dict[str, torch.Tensor], steps: int = 5, lr: float = 1e-2) -> list[float]:
    """AdamW steps on the trainable parameters; returns the loss before each step and after the last."""
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "nothing to train"
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        losses.append(model(**batch).loss.item())
    return losses


def base_state(model: nn.Module, is_delta: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """Copies of every parameter that ``is_delta`` rejects, keyed by logical name."""
    from deltatune.methods.base import logical_param_name

    return {
        logical_param_name(n): p.detach().clone() for n, p in model.named_parameters() if not is_delta(n)
    }


class Tiny:
    """Namespace handed out by the ``tiny`` fixture."""

    archs = ARCHS
    hidden = HIDDEN
    layers = LAYERS
    inter = INTER
    vocab = VOCAB
    model = staticmethod(make_model)
    batch = staticmethod(make_batch)
    train = staticmethod(train)
    base_state = staticmethod(base_state)

    @staticmethod
    def clone(model: nn.Module) -> nn.Module:
        return copy.deepcopy(model)


@pytest.fixture
def tiny() -> Tiny:
    """Tiny-model builders and training helpers (see module docstring)."""
    return Tiny()


def _decode_step_ops(model: nn.Module) -> list[str]:
    """aten ops dispatched at the top level (not inside another aten op) by one decode step of ``model``."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)  # the first step fills caches
        out = model(input_ids=ids, use_cache=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
    names = [e.name for e in prof.events() if e.name.startswith("aten::")
             and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    return names


@pytest.fixture
def decode_step_ops() -> Callable[[nn.Module], list[str]]:
    return _decode_step_ops
