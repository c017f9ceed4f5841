"""Tests of sliding-window perplexity (deltatune.metrics.perplexity)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from deltatune.errors import DeltaConfigError, DeltaConfigTypeError
from deltatune.metrics.perplexity import perplexity, sliding_windows


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def stream():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (36,), generator=g)


def _nll(model, context, target):
    logits = model(input_ids=context[None]).logits[0, -1].float()
    return float(F.cross_entropy(logits[None], target[None]))


def test_non_overlapping_windows_match_plain_loop(model, stream):
    L = 12
    nlls = []
    with torch.no_grad():
        for start in range(0, stream.numel(), L):
            chunk = stream[start : start + L]
            logits = model(input_ids=chunk[None]).logits[0]
            nlls += F.cross_entropy(logits[:-1], chunk[1:], reduction="none").tolist()
    out = perplexity(model, stream, max_length=L, stride=L, progress=False)
    assert out["tokens"] == len(nlls) == 36 - 3
    assert out["nll"] == pytest.approx(sum(nlls) / len(nlls), rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)


@pytest.mark.parametrize(("max_length", "stride"), [(16, 5), (10, 1), (20, 20)])
def test_sliding_window_matches_brute_force(model, stream, max_length, stride):
    # brute force: token t is scored by the window that first reaches it, with context from that
    # window's start; recompute each token separately with exactly that context
    n = stream.numel()
    begin_of = {}
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        for t in range(max(prev_end, begin + 1), end):
            begin_of[t] = begin
        prev_end = end
        if end == n:
            break
    with torch.no_grad():
        nlls = [_nll(model, stream[b:t], stream[t]) for t, b in sorted(begin_of.items())]
    for batch_size in (1, 3):
        out = perplexity(model, stream, max_length=max_length, stride=stride, batch_size=batch_size, progress=False)
        assert out["tokens"] == len(nlls)
        if stride < max_length:
            assert out["tokens"] == n - 1  # every token but the first is scored once
        assert out["nll"] == pytest.approx(sum(nlls) / len(nlls), rel=1e-5)
        assert out["perplexity"] == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)


def test_windows_tile_the_stream():
    w = sliding_windows(10, max_length=4, stride=3)
    assert w == [(0, 4, 1), (3, 7, 4), (6, 10, 7)]
    scored = [t for _, e, s in w for t in range(s, e)]
    assert scored == list(range(1, 10))


def test_restores_training_mode_and_shows_progress(model, stream, capsys):
    model.train()
    try:
        perplexity(model, stream[:20], max_length=8, stride=4, progress=True)
        assert model.training
    finally:
        model.eval()
    assert "perplexity" in capsys.readouterr().err


def test_validation(model, stream):
    with pytest.raises(DeltaConfigError, match=r"stride must be an int <= max_length \(8\), got 9"):
        perplexity(model, stream, max_length=8, stride=9, progress=False)
    with pytest.raises(DeltaConfigError, match="stride must be a positive int, got 0"):
        perplexity(model, stream, max_length=8, stride=0, progress=False)
    with pytest.raises(DeltaConfigError, match="max_length must be an int >= 2, got 1"):
        perplexity(model, stream, max_length=1, stride=1, progress=False)
    with pytest.raises(DeltaConfigError, match="batch_size must be a positive int, got 0"):
        perplexity(model, stream, max_length=8, stride=4, batch_size=0, progress=False)
    with pytest.raises(DeltaConfigError, match=r"input_ids must be a 1-D token stream, got shape \(1, 36\)"):
        perplexity(model, stream[None], max_length=8, stride=4, progress=False)
    with pytest.raises(DeltaConfigTypeError, match="input_ids must be an integer tensor"):
        perplexity(model, stream.float(), max_length=8, stride=4, progress=False)
    with pytest.raises(DeltaConfigTypeError, match="input_ids must be a 1-D torch.LongTensor, got list"):
        perplexity(model, [1, 2, 3], max_length=8, stride=4, progress=False)
