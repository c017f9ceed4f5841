"""Beam search for the Jittor models, with the semantics of :func:`deltatune.generate.generate`.

The model runs in Jittor (with its key/value cache); the beam bookkeeping runs in numpy on the
float32 last-position logits, step for step as deltatune's ``_beam_search``: log-softmax, repetition
penalty and no-repeat-n-gram blocking (prompt included, padding excluded), the best
``max(2, 1 + n_eos) * num_beams`` candidates per prompt, finished hypotheses scored
``sum_logprobs / generated_length ** length_penalty``, transformers' stopping rules. Prompts are
grouped longest first and left-padded; the output keeps the input order, cut before the first EOS.
Only deterministic beam search (``do_sample=False``, ``num_beams > 1``) and greedy search are implemented.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import DeltaConfigError
from . import require_jittor
from .models import to_jt, to_np

__all__ = ["generate"]

_NEG = -1.0e9


def _topk(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise top-k (values, indices), best first; ties go to the lower index."""
    idx = np.argsort(-x, axis=-1, kind="stable")[:, :k]
    return np.take_along_axis(x, idx, -1), idx


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    z = x - m
    return (z - np.log(np.exp(z).sum(-1, keepdims=True))).astype(np.float32)


def _process(scores: np.ndarray, history: np.ndarray, cfg: Any) -> np.ndarray:
    vocab = scores.shape[-1]
    if cfg.repetition_penalty != 1.0:
        seen = np.zeros_like(scores, dtype=bool)
        for r in range(scores.shape[0]):
            toks = history[r][(history[r] >= 0) & (history[r] < vocab)]
            seen[r, toks] = True
        pen = np.where(scores < 0, scores * cfg.repetition_penalty, scores / cfg.repetition_penalty)
        scores = np.where(seen, pen, scores)
    n = cfg.no_repeat_ngram_size
    if n > 0 and history.shape[1] >= n:
        scores = scores.copy()
        for r in range(scores.shape[0]):
            h = history[r]
            real = h[h >= 0]
            if len(real) < n:
                continue
            suffix = h[len(h) - n + 1 :] if n > 1 else h[:0]
            for s in range(len(h) - n + 1):
                g = h[s : s + n]
                if (g >= 0).all() and (g[: n - 1] == suffix).all() and g[-1] < vocab:
                    scores[r, g[-1]] = -np.inf
    return scores


def _step(model: Any, ids: np.ndarray, mask: np.ndarray, past: Any) -> tuple[np.ndarray, Any]:
    if past is None:
        pos = np.clip(mask.cumsum(-1) - 1, 0, None)
    else:
        pos = mask.sum(-1, keepdims=True) - 1
    logits, past = model(ids, attention_mask=mask, position_ids=pos, past=past, last_only=True)
    return to_np(logits)[:, -1, :].astype(np.float32), past


def _reorder(past: list, index: np.ndarray) -> list:
    sel = to_jt(index)
    return [(k[sel], v[sel]) for k, v in past]


def _beam_search(model: Any, ids: np.ndarray, mask: np.ndarray, cfg: Any, eos: np.ndarray, pad: int) -> list[list[int]]:
    batch, nb, steps = ids.shape[0], cfg.num_beams, cfg.max_new_tokens
    lp, es = cfg.length_penalty, cfg.early_stopping
    n_keep = max(2, 1 + len(eos)) * nb
    logits, past = _step(model, ids, mask, None)
    expand = np.repeat(np.arange(batch), nb)
    past = _reorder(past, expand)
    logits, mask = logits[expand], mask[expand]
    history = np.where(mask == 0, -1, ids[expand])
    run_scores = np.zeros((batch, nb), dtype=np.float32)
    run_scores[:, 1:] = _NEG
    run_tokens = np.zeros((batch, nb, 0), dtype=np.int64)
    fin_tokens = np.full((batch, nb, steps), pad, dtype=np.int64)
    fin_scores = np.full((batch, nb), _NEG, dtype=np.float32)
    fin_flag = np.zeros((batch, nb), dtype=bool)
    open_ = np.ones((batch, 1), dtype=bool)
    rank = np.arange(n_keep)
    offsets = np.arange(batch)[:, None] * nb
    for t in range(steps):
        logp = _process(_log_softmax(logits), history, cfg)
        vocab = logp.shape[-1]
        acc = (logp.reshape(batch, nb, vocab) + run_scores[:, :, None]).reshape(batch, nb * vocab)
        cand, idx = _topk(acc, n_keep)
        c_beam, c_tok = idx // vocab, idx % vocab
        ends = np.isin(c_tok, eos) if t + 1 < steps else np.ones_like(c_tok, dtype=bool)
        f_score = (cand / np.float32((t + 1) ** lp)).astype(np.float32)
        if es is True:
            f_score = f_score + fin_flag.all(-1, keepdims=True).astype(np.float32) * _NEG
        f_score = f_score + (~open_).astype(np.float32) * _NEG
        f_score = f_score + (~(ends & (rank < nb))).astype(np.float32) * _NEG
        c_tokens = np.full((batch, n_keep, steps), pad, dtype=np.int64)
        c_tokens[:, :, :t] = np.take_along_axis(run_tokens, c_beam[:, :, None], 1) if t else c_tokens[:, :, :0]
        c_tokens[:, :, t] = c_tok
        merged = np.concatenate([fin_scores, f_score], 1)
        _, pick = _topk(merged, nb)
        fin_scores = np.take_along_axis(merged, pick, 1)
        fin_tokens = np.take_along_axis(np.concatenate([fin_tokens, c_tokens], 1), pick[:, :, None], 1)
        fin_flag = np.take_along_axis(np.concatenate([fin_flag, ends & (rank < nb)], 1), pick, 1)
        r_key = (cand + ends.astype(np.float32) * _NEG).astype(np.float32)
        _, sel = _topk(r_key, nb)
        run_scores = np.take_along_axis(r_key, sel, 1)
        parent = np.take_along_axis(c_beam, sel, 1)
        new_tok = np.take_along_axis(c_tok, sel, 1)
        prev = np.take_along_axis(run_tokens, parent[:, :, None], 1) if t else run_tokens
        run_tokens = np.concatenate([prev, new_tok[:, :, None]], 2)
        best_len = steps if (es == "never" and lp > 0.0) else t + 1
        best_possible = run_scores[:, :1] / np.float32(best_len**lp)
        worst = np.where(fin_flag, fin_scores.min(-1, keepdims=True), np.full_like(fin_scores, _NEG))
        open_ = open_ & (best_possible > worst).any(-1, keepdims=True)
        if not open_.any() or ends.all() or (es is True and fin_flag.all()):
            break
        flat = (offsets + parent).reshape(-1)
        past = _reorder(past, flat)
        history = np.concatenate([history[flat], new_tok.reshape(-1, 1)], 1)
        mask = np.concatenate([mask[flat], np.ones((batch * nb, 1), dtype=mask.dtype)], 1)
        logits, past = _step(model, new_tok.reshape(-1, 1), mask, past)
    return fin_tokens[:, 0, :].tolist()


def _greedy(model: Any, ids: np.ndarray, mask: np.ndarray, cfg: Any, eos: np.ndarray, pad: int) -> list[list[int]]:
    logits, past = _step(model, ids, mask, None)
    history = np.where(mask == 0, -1, ids)
    out = np.full((ids.shape[0], cfg.max_new_tokens), pad, dtype=np.int64)
    done = np.zeros(ids.shape[0], dtype=bool)
    for t in range(cfg.max_new_tokens):
        tok = _process(logits, history, cfg).argmax(-1)
        tok = np.where(done, pad, tok)
        out[:, t] = tok
        done |= np.isin(tok, eos)
        if done.all() or t + 1 == cfg.max_new_tokens:
            break
        history = np.concatenate([history, tok[:, None]], 1)
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), dtype=mask.dtype)], 1)
        logits, past = _step(model, tok[:, None], mask, past)
    return out.tolist()


def generate(
    model: Any, prompts: Sequence[Sequence[int]], config: Any, *, eos_token_id: int | Sequence[int],
    pad_token_id: int, batch_size: int = 8, progress: bool = False,
) -> list[list[int]]:
    """Generate continuations of token-id ``prompts`` (the generated ids only, cut before EOS).

    ``config`` is a :class:`deltatune.generate.GenerationConfig` (its ``eos_token_id``/``pad_token_id``,
    when set, win over the arguments).

    Raises:
        DeltaConfigError: sampling (``do_sample=True``), which the Jittor side does not implement.
    """
    jt = require_jittor()
    from tqdm.auto import tqdm

    if config.do_sample:
        raise DeltaConfigError("the Jittor beam search is deterministic: generate.do_sample must be false, got true")
    eos_cfg = config.eos_token_id if config.eos_token_id is not None else eos_token_id
    eos = np.asarray([eos_cfg] if isinstance(eos_cfg, int) else list(eos_cfg), dtype=np.int64)
    pad = int(config.pad_token_id if config.pad_token_id is not None else pad_token_id)
    ids_list = [list(map(int, p)) for p in prompts]
    if any(not p for p in ids_list):
        raise DeltaConfigError("every prompt must have at least one token")
    decode = _beam_search if config.num_beams > 1 else _greedy
    order = sorted(range(len(ids_list)), key=lambda i: -len(ids_list[i]))
    results: list[list[int]] = [[] for _ in ids_list]
    was = model.training
    model.train(False)
    try:
        with jt.no_grad():
            n_batches = (len(order) + batch_size - 1) // batch_size
            for b in tqdm(range(n_batches), desc="generate (jittor)", unit="batch", disable=not progress):
                chunk = order[b * batch_size : (b + 1) * batch_size]
                group = [ids_list[i] for i in chunk]
                width = max(map(len, group))
                ids = np.array([[pad] * (width - len(p)) + p for p in group], dtype=np.int64)  # left padding
                mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in group], dtype=np.int64)
                rows = decode(model, ids, mask, config, eos, pad)
                for r, i in enumerate(chunk):
                    row = rows[r]
                    cut = next((j for j, tk in enumerate(row) if tk in set(eos.tolist())), len(row))
                    results[i] = row[:cut]
                jt.gc()
    finally:
        model.train(was)
    return results
