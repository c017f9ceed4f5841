"""Score processors of :mod:`deltatune.generate`, vectorised over rows: the repetition penalty, n-gram
blocking, and the sampling filters (temperature, top-k, top-p), with transformers 5's semantics.

``scores`` is ``(rows, vocab)``; ``history`` is ``(rows, length)`` token ids with ``-1`` for left
padding. Imports only ``torch``.
"""

from __future__ import annotations

from typing import Protocol

import torch

__all__ = ["ScoreSettings", "block_ngrams", "process_scores", "repetition_penalty", "top_k_filter", "top_p_filter"]


class ScoreSettings(Protocol):
    """The decoding settings :func:`process_scores` reads (a :class:`deltatune.GenerationConfig` has them)."""

    repetition_penalty: float
    no_repeat_ngram_size: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float


def repetition_penalty(scores: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty: for every token in ``history`` (``-1`` = padding, skipped), a positive score is
    divided by ``penalty``, a negative one multiplied by it."""
    vocab = scores.shape[-1]
    cols = torch.where((history < 0) | (history >= vocab), vocab, history)
    seen = torch.zeros(scores.shape[0], vocab + 1, dtype=torch.bool, device=scores.device)
    seen.scatter_(1, cols, True)
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen[:, :vocab], penalised, scores)


def block_ngrams(scores: torch.Tensor, history: torch.Tensor, n: int) -> torch.Tensor:
    """``-inf`` for every token that would complete an ``n``-gram already in ``history`` (n-grams that
    touch the ``-1`` padding do not count)."""
    rows, length = history.shape
    if length < n:
        return scores
    vocab = scores.shape[-1]
    suffix = history[:, length - n + 1 :]  # the n-1 last tokens (empty for n = 1)
    grams = history.unfold(1, n, 1)  # (rows, length - n + 1, n): every complete n-gram so far
    hit = (grams[..., : n - 1] == suffix[:, None, :]).all(-1)
    hit &= (grams >= 0).all(-1)  # n-grams touching the padding do not exist
    real_len = (history >= 0).sum(-1, keepdim=True)
    hit &= real_len >= n
    nxt = grams[..., -1]
    cols = torch.where(hit & (nxt < vocab), nxt, vocab)
    banned = torch.zeros(rows, vocab + 1, dtype=torch.bool, device=scores.device)
    banned.scatter_(1, cols, True)
    return scores.masked_fill(banned[:, :vocab], float("-inf"))


def top_k_filter(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``-inf`` for every score below the ``k``-th largest of its row (ties at the ``k``-th are kept)."""
    k = min(k, scores.shape[-1])
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, float("-inf"))


def top_p_filter(scores: torch.Tensor, p: float, min_keep: int) -> torch.Tensor:
    """``-inf`` for every token whose strictly better tokens already hold probability ``>= p``; the
    ``min_keep`` best tokens are always kept."""
    ordered, order = torch.sort(scores, dim=-1, descending=True)
    probs = ordered.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # probability of the strictly better tokens
    drop = mass_before >= p
    drop[..., :min_keep] = False
    drop = drop.scatter(-1, order, drop)
    return scores.masked_fill(drop, float("-inf"))


def process_scores(scores: torch.Tensor, history: torch.Tensor, cfg: ScoreSettings, min_keep: int) -> torch.Tensor:
    """Apply the processors ``cfg`` switches on, in transformers' order: repetition penalty, n-gram
    blocking, then (sampling only) temperature, top-k and top-p, keeping at least ``min_keep`` tokens."""
    if cfg.repetition_penalty != 1.0:
        scores = repetition_penalty(scores, history, cfg.repetition_penalty)
    if cfg.no_repeat_ngram_size > 0:
        scores = block_ngrams(scores, history, cfg.no_repeat_ngram_size)
    if cfg.do_sample:
        if cfg.temperature != 1.0:
            scores = scores / cfg.temperature
        if cfg.top_k > 0:
            scores = top_k_filter(scores, max(cfg.top_k, min_keep))
        if cfg.top_p < 1.0:
            scores = top_p_filter(scores, cfg.top_p, min_keep)
    return scores
