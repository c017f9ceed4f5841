"""Batched generation for Hugging Face causal LMs with the KV cache: greedy, sampling and beam search.

The decoding knobs are the ones the LoRA paper uses for its NLG experiments (beam size, length
penalty, no-repeat n-gram size) plus the usual sampling ones. Semantics follow ``model.generate`` of
transformers 5 wherever both define a behaviour, so results can be checked against it token for token:

* **Greedy / sampling.** The logits of the last position (in float32) go through the repetition
  penalty, then n-gram blocking, then (sampling only) temperature, top-k and top-p; greedy takes the
  argmax, sampling draws from the softmax.
* **Beam search** (``num_beams > 1``). Scores are sums of log-probabilities. The processors above are
  applied to the *log-softmax* of the logits (as transformers does; the result is not renormalised).
  Each step keeps the best ``K = max(2, 1 + n_eos) * num_beams`` continuations over all beams of a
  prompt; the best ``num_beams`` of them that do not end continue, and those among the first
  ``num_beams`` that end (with EOS, or by reaching ``max_new_tokens``) are finished hypotheses, scored
  ``sum_logprobs / (length ** length_penalty)`` where ``length`` counts the **generated tokens only,
  including the EOS token** and never the prompt (transformers 5: ``cur_len + 1 - prompt_len``). The
  ``num_beams`` best finished hypotheses are kept per prompt. ``early_stopping=True`` stops a prompt
  once it has ``num_beams`` finished hypotheses; ``False`` stops it when the best running beam divided
  by ``current_length ** length_penalty`` cannot beat the worst finished one (transformers' heuristic);
  ``"never"`` uses ``max_new_tokens`` as that length when ``length_penalty > 0``, which makes the bound
  exact (canonical beam search). With ``do_sample=True`` the ``K`` continuations are drawn without
  replacement from the softmax of the accumulated scores (Gumbel top-k), as transformers' beam sampling.
* **Repetition penalty** (CTRL): for every token already present in the sequence — the real prompt
  tokens **and** the generated ones, as transformers 5 does (it skips only left padding) — a positive
  score is divided by the penalty and a negative one multiplied by it.
* **No-repeat n-grams**: a token that would complete an n-gram already present in the sequence
  (prompt included, as transformers does for decoder-only models; padding excluded) gets ``-inf``.

The score processors themselves live in :mod:`deltatune.score_processors`; this module owns the
prompts' checks, the model calls with their cache, and the decoding loops.

Compatibility contract with delta methods that hook the model (e.g. prefix-tuning pre-hooks that
prepend learned key/values to the cache and extend the attention mask): every call passes an explicit
``attention_mask`` (over all real tokens fed so far, past and current, left padding as zeros) and
explicit ``position_ids`` computed from that mask (so padding does not shift positions), lets the model
create its own cache on the first call (``use_cache=True``, no cache object is made here), and reuses
the returned cache afterwards, feeding only the new token. The cache goes in and comes out under the
name the model uses (``cache`` from transformers 5.24, ``past_key_values`` before; see
:mod:`deltatune.hf_cache`), so no deprecated alias is touched. The cache length is never assumed
to equal the number of tokens fed. Beam search reorders (and, after the prompt pass, expands to
``batch * num_beams`` rows) the cache with its own ``reorder_cache`` method (an ``index_select`` along
the batch dimension of every layer's keys and values); legacy tuple caches are reordered the same way.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import DeltaConfigError, DeltaConfigTypeError
from .hf_cache import cache_arg, output_cache
from .score_processors import process_scores
from .validation import (
    check_bool,
    check_float,
    check_int,
    check_optional_int_list,
    check_positive_int,
    check_type,
)

__all__ = ["GenerationConfig", "generate", "generate_text"]

_NEG = -1.0e9  # the "impossible" offset transformers' beam search uses (kept for identical tie-breaking)


@dataclasses.dataclass
class GenerationConfig:
    """Decoding settings for :func:`generate`.

    Attributes:
        max_new_tokens: how many tokens to generate at most (EOS included).
        num_beams: beam size; 1 means greedy decoding (or plain sampling with ``do_sample``).
        do_sample: sample instead of taking the best tokens (beam sampling when ``num_beams > 1``).
        temperature: divides the scores before sampling (only with ``do_sample``); > 0.
        top_k: keep only the ``top_k`` best tokens before sampling; 0 disables it.
        top_p: nucleus sampling: keep the smallest set of best tokens whose probability reaches
            ``top_p``; 1.0 disables it. In (0, 1].
        length_penalty: exponent of the generated length that divides a finished beam's summed
            log-probability (beam search only; > 0 favours longer outputs, < 0 shorter).
        no_repeat_ngram_size: forbid repeating any n-gram of this size (prompt included); 0 disables.
        repetition_penalty: CTRL penalty (> 0) on tokens already in the sequence, prompt included;
            1.0 disables it.
        eos_token_id: token id(s) that end a sequence. ``None`` takes the tokenizer's
            ``eos_token_id``, else the model's ``generation_config``/``config`` one; ``[]`` never stops
            before ``max_new_tokens``.
        pad_token_id: id used for left padding (always masked out). ``None`` takes the tokenizer's,
            else the model config's pad token, else the first EOS id, else 0.
        early_stopping: beam search stopping rule: ``True``, ``False`` (heuristic) or ``"never"``
            (exact bound); see the module docstring.
        seed: seed of a private ``torch.Generator`` for sampling (reproducible runs); ``None`` uses
            torch's global generator.
    """

    max_new_tokens: int = 64
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    early_stopping: bool | str = False
    seed: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field; raise ``DeltaConfigError`` naming the field, the value and what is expected."""
        n = type(self).__name__
        check_positive_int(f"{n}.max_new_tokens", self.max_new_tokens)
        check_positive_int(f"{n}.num_beams", self.num_beams)
        check_bool(f"{n}.do_sample", self.do_sample)
        self.temperature = check_float(f"{n}.temperature", self.temperature, low=0, low_inclusive=False)
        check_int(f"{n}.top_k", self.top_k, minimum=0)
        self.top_p = check_float(f"{n}.top_p", self.top_p, low=0, high=1, low_inclusive=False)
        self.length_penalty = check_float(f"{n}.length_penalty", self.length_penalty)
        check_int(f"{n}.no_repeat_ngram_size", self.no_repeat_ngram_size, minimum=0)
        self.repetition_penalty = check_float(
            f"{n}.repetition_penalty", self.repetition_penalty, low=0, low_inclusive=False
        )
        check_optional_int_list(f"{n}.eos_token_id", self.eos_token_id, minimum=0)
        if self.pad_token_id is not None:
            check_int(f"{n}.pad_token_id", self.pad_token_id, minimum=0)
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            kind = type(self.early_stopping).__name__
            msg = f"{n}.early_stopping must be a bool or 'never', got {self.early_stopping!r}"
            if isinstance(self.early_stopping, str):
                raise DeltaConfigError(msg)
            raise DeltaConfigTypeError(f"{msg} ({kind})")
        if self.seed is not None:
            check_int(f"{n}.seed", self.seed, minimum=0)


# ------------------------------------------------------------------------------------------------
# Input handling
# ------------------------------------------------------------------------------------------------


def _as_id_list(ids: Any, where: str) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise DeltaConfigTypeError(
                f"{where} must be a list of int token ids, got a tensor of shape {tuple(ids.shape)} "
                f"and dtype {ids.dtype}"
            )
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple)):
        raise DeltaConfigTypeError(
            f"{where} must be a str or a list of int token ids, got {ids!r} ({type(ids).__name__})"
        )
    for j, tok in enumerate(ids):
        if isinstance(tok, bool) or not isinstance(tok, int):
            raise DeltaConfigTypeError(
                f"{where}[{j}] must be an int token id, got {tok!r} ({type(tok).__name__})"
            )
    return [int(t) for t in ids]


def _vocab_limit(model: torch.nn.Module) -> int | None:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if isinstance(emb, torch.nn.Embedding):
        return emb.num_embeddings
    cfg = getattr(model, "config", None)
    size = getattr(cfg, "vocab_size", None)
    return size if isinstance(size, int) else None


def _prepare_prompts(
    prompts: Any, tokenizer: Any, model: torch.nn.Module, add_special_tokens: bool
) -> list[list[int]]:
    if isinstance(prompts, (str, torch.Tensor)) or not isinstance(prompts, (list, tuple)):
        raise DeltaConfigTypeError(
            f"prompts must be a list of str or a list of lists of int token ids, got {prompts!r:.200} "
            f"({type(prompts).__name__})"
        )
    out: list[list[int]] = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise DeltaConfigError(
                    f"tokenizer must be given when prompts are strings, got None (prompts[{i}] is {p!r:.80})"
                )
            ids = _as_id_list(
                tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"], f"prompts[{i}]"
            )
        else:
            ids = _as_id_list(p, f"prompts[{i}]")
        if not ids:
            raise DeltaConfigError(f"prompts[{i}] must have at least one token, got {p!r}")
        out.append(ids)
    limit = _vocab_limit(model)
    if limit is not None:
        for i, ids in enumerate(out):
            bad = [t for t in ids if t < 0 or t >= limit]
            if bad:
                raise DeltaConfigError(
                    f"prompts[{i}] token ids must be in [0, {limit - 1}] (the model's vocabulary), got {bad[0]}"
                )
    return out


def _resolve_special_ids(
    config: GenerationConfig, tokenizer: Any, model: torch.nn.Module
) -> tuple[list[int], int]:
    """EOS ids and pad id, following the documented fallbacks."""
    eos = check_optional_int_list("eos_token_id", config.eos_token_id)
    if eos is None:
        candidates = [getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None]
        for holder in (getattr(model, "generation_config", None), getattr(model, "config", None)):
            candidates.append(getattr(holder, "eos_token_id", None))
        eos = []
        for cand in candidates:
            if cand is None:
                continue
            eos = [cand] if isinstance(cand, int) else [int(c) for c in cand]
            break
    pad = config.pad_token_id
    if pad is None:
        for cand in (
            getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None,
            getattr(getattr(model, "config", None), "pad_token_id", None),
            eos[0] if eos else None,
            0,
        ):
            if isinstance(cand, int) and not isinstance(cand, bool):
                pad = cand
                break
    limit = _vocab_limit(model)
    if limit is not None:
        for name, ids in (("eos_token_id", eos), ("pad_token_id", [pad])):
            for t in ids:
                if t >= limit:
                    raise DeltaConfigError(
                        f"{name} must be in [0, {limit - 1}] (the model's vocabulary), got {t}"
                    )
    return eos, int(pad)


# ------------------------------------------------------------------------------------------------
# Model calls and cache handling
# ------------------------------------------------------------------------------------------------


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@dataclasses.dataclass(frozen=True)
class _Call:
    """How to call the model: whether it takes ``logits_to_keep``, and its name for the cache."""

    logits_to_keep: bool
    cache_arg: str


def _step(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    past: Any,
    call: _Call,
) -> tuple[torch.Tensor, Any]:
    """One forward pass; returns the float32 logits of the last position and the model's cache."""
    if past is None:  # prompt pass: positions count real tokens only (left padding -> 0)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    else:  # the new token's position = number of real tokens before it
        position_ids = attention_mask.sum(-1, keepdim=True) - 1
    kwargs: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "use_cache": True,
    }
    if past is not None:
        kwargs[call.cache_arg] = past
    if call.logits_to_keep:
        kwargs["logits_to_keep"] = 1
    out = model(**kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    past = output_cache(out)
    if past is None:
        raise DeltaConfigError(
            f"model must return its cache ({call.cache_arg}) when called with use_cache=True, got None "
            f"({type(model).__name__})"
        )
    return logits[:, -1, :].float(), past


def _reorder_cache(past: Any, index: torch.Tensor) -> Any:
    """Select rows ``index`` (along the batch dimension) of every layer's keys and values."""
    if hasattr(past, "reorder_cache"):
        past.reorder_cache(index)
        return past
    if isinstance(past, (tuple, list)):
        return type(past)(type(layer)(t.index_select(0, index.to(t.device)) for t in layer) for layer in past)
    raise DeltaConfigError(
        f"beam search needs a reorderable cache, got {type(past).__name__} (no reorder_cache method)"
    )


def _cut_at_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for j, t in enumerate(tokens):
        if t in eos:
            return tokens[:j]
    return tokens


# ------------------------------------------------------------------------------------------------
# Decoding loops (one batch)
# ------------------------------------------------------------------------------------------------


def _greedy_or_sample(
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    cfg: GenerationConfig,
    eos: torch.Tensor,
    pad: int,
    gen: torch.Generator | None,
    call: _Call,
) -> list[list[int]]:
    rows = ids.shape[0]
    history = ids.masked_fill(mask == 0, -1)
    logits, past = _step(model, ids, mask, None, call)
    done = torch.zeros(rows, dtype=torch.bool, device=ids.device)
    out: list[torch.Tensor] = []
    for step in range(cfg.max_new_tokens):
        scores = process_scores(logits, history, cfg, 1)
        if cfg.do_sample:
            tok = torch.multinomial(scores.softmax(-1), 1, generator=gen).squeeze(1)
        else:
            tok = scores.argmax(-1)
        tok = tok.masked_fill(done, pad)
        out.append(tok)
        done |= torch.isin(tok, eos)
        if step + 1 == cfg.max_new_tokens or bool(done.all()):
            break
        history = torch.cat([history, tok[:, None]], 1)
        mask = torch.cat([mask, mask.new_ones(rows, 1)], 1)
        logits, past = _step(model, tok[:, None], mask, past, call)
    return torch.stack(out, 1).tolist()


def _beam_search(
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    cfg: GenerationConfig,
    eos: torch.Tensor,
    pad: int,
    gen: torch.Generator | None,
    call: _Call,
) -> list[list[int]]:
    batch, nb, steps = ids.shape[0], cfg.num_beams, cfg.max_new_tokens
    lp, es = cfg.length_penalty, cfg.early_stopping
    dev = ids.device
    n_eos = int(eos.numel())
    n_keep = max(2, 1 + n_eos) * nb  # candidates kept per prompt and step (enough to continue nb beams)
    min_keep = max(2, 1 + n_eos)  # sampling filters keep this many tokens per beam (as transformers)

    # Prompt pass on ``batch`` rows, then expand everything to batch * nb rows (beam-major per prompt).
    logits, past = _step(model, ids, mask, None, call)
    expand = torch.arange(batch, device=dev).repeat_interleave(nb)
    past = _reorder_cache(past, expand)
    logits, mask = logits[expand], mask[expand]
    history = ids[expand].masked_fill(mask == 0, -1)

    run_scores = torch.zeros(batch, nb, device=dev)
    run_scores[:, 1:] = _NEG  # only beam 0 is live at first, so the nb beams start distinct
    run_tokens = torch.empty(batch, nb, 0, dtype=torch.long, device=dev)
    fin_tokens = torch.full((batch, nb, steps), pad, dtype=torch.long, device=dev)
    fin_scores = torch.full((batch, nb), _NEG, device=dev)
    fin_flag = torch.zeros(batch, nb, dtype=torch.bool, device=dev)
    open_ = torch.ones(batch, 1, dtype=torch.bool, device=dev)  # can this prompt still improve?
    rank = torch.arange(n_keep, device=dev)
    offsets = torch.arange(batch, device=dev)[:, None] * nb

    for t in range(steps):
        logp = process_scores(F.log_softmax(logits, -1), history, cfg, min_keep)
        vocab = logp.shape[-1]
        acc = (logp.view(batch, nb, vocab) + run_scores[:, :, None]).view(batch, nb * vocab)
        if cfg.do_sample:  # nb*K draws without replacement from softmax(acc): Gumbel top-k
            noise = -torch.empty_like(acc).exponential_(generator=gen).log()
            idx = torch.topk(acc + noise, n_keep, dim=-1).indices
            cand = acc.gather(1, idx)
        else:
            cand, idx = torch.topk(acc, n_keep, dim=-1)
        c_beam, c_tok = idx // vocab, idx % vocab
        ends = torch.isin(c_tok, eos) if t + 1 < steps else torch.ones_like(c_tok, dtype=torch.bool)

        # Finished hypotheses: eligible are the first nb candidates that end here.
        f_score = cand / ((t + 1) ** lp)
        if es is True:
            f_score = f_score + (fin_flag.all(-1, keepdim=True)).float() * _NEG
        f_score = f_score + (~open_).float() * _NEG
        f_score = f_score + (~(ends & (rank < nb))).float() * _NEG
        c_tokens = torch.full((batch, n_keep, steps), pad, dtype=torch.long, device=dev)
        c_tokens[:, :, :t] = run_tokens.gather(1, c_beam[:, :, None].expand(-1, -1, t))
        c_tokens[:, :, t] = c_tok
        merged = torch.cat([fin_scores, f_score], 1)
        pick = torch.topk(merged, nb, dim=-1).indices
        fin_scores = merged.gather(1, pick)
        fin_tokens = torch.cat([fin_tokens, c_tokens], 1).gather(1, pick[:, :, None].expand(-1, -1, steps))
        fin_flag = torch.cat([fin_flag, ends & (rank < nb)], 1).gather(1, pick)

        # Running beams: the best nb candidates that do not end.
        r_key = cand + ends.float() * _NEG
        sel = torch.topk(r_key, nb, dim=-1).indices
        run_scores = r_key.gather(1, sel)
        parent = c_beam.gather(1, sel)
        new_tok = c_tok.gather(1, sel)
        run_tokens = torch.cat(
            [run_tokens.gather(1, parent[:, :, None].expand(-1, -1, t)), new_tok[:, :, None]], 2
        )

        # Stopping (transformers' rules, per prompt).
        best_len = steps if (es == "never" and lp > 0.0) else t + 1
        best_possible = run_scores[:, :1] / (best_len**lp)
        worst = torch.where(
            fin_flag, fin_scores.min(-1, keepdim=True).values, torch.full_like(fin_scores, _NEG)
        )
        open_ = open_ & (best_possible > worst).any(-1, keepdim=True)
        stop = not bool(open_.any()) or bool(ends.all())
        if es is True and bool(fin_flag.all()):
            stop = True
        if stop:
            break

        flat = (offsets + parent).view(-1)
        past = _reorder_cache(past, flat)
        history = torch.cat([history[flat], new_tok.view(-1, 1)], 1)
        mask = torch.cat([mask[flat], mask.new_ones(batch * nb, 1)], 1)
        logits, past = _step(model, new_tok.view(-1, 1), mask, past, call)

    return fin_tokens[:, 0, :].tolist()


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------


def generate(
    model: torch.nn.Module,
    tokenizer: Any | None,
    prompts: Sequence[Sequence[int]] | Sequence[str],
    config: GenerationConfig | None = None,
    *,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool = True,
    add_special_tokens: bool = True,
) -> list[list[int]]:
    """Generate continuations of ``prompts`` with ``model``, in batches, reusing the KV cache.

    Args:
        model: a Hugging Face causal LM (``logits`` and ``cache`` / ``past_key_values`` outputs),
            possibly with delta methods attached or merged. It is put in eval mode for the call and its
            previous training mode is restored afterwards; it is not moved.
        tokenizer: needed only when ``prompts`` are strings (encoded with ``add_special_tokens``) and
            to look up EOS/pad ids that ``config`` leaves as ``None``; may be ``None``.
        prompts: a list of token-id lists (or 1-D integer tensors), or a list of strings.
        config: decoding settings (default: ``GenerationConfig()``, greedy, 64 new tokens).
        batch_size: prompts per forward batch (beam search runs ``batch_size * num_beams`` rows).
            Prompts are grouped by length to limit padding; the output keeps the input order.
        device: where inputs go (default: the device of the model's first parameter).
        progress: show a tqdm bar over batches.
        add_special_tokens: passed to the tokenizer for string prompts.

    Returns:
        For each prompt, the generated token ids only (no prompt), cut before the first EOS token
        (the EOS itself is not included).

    Prompts of different lengths are left-padded within a batch; see the module docstring for the
    attention-mask, position-id and cache contract and the decoding semantics.
    """
    if config is None:
        config = GenerationConfig()
    check_type("config", config, GenerationConfig, "a deltatune GenerationConfig")
    config.validate()
    check_type("model", model, torch.nn.Module, "a torch.nn.Module (a causal LM)")
    check_positive_int("batch_size", batch_size)
    check_bool("progress", progress)
    check_bool("add_special_tokens", add_special_tokens)
    ids_list = _prepare_prompts(prompts, tokenizer, model, add_special_tokens)
    eos_ids, pad = _resolve_special_ids(config, tokenizer, model)
    if device is None:
        first = next(model.parameters(), None)
        dev = first.device if first is not None else torch.device("cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise DeltaConfigError(f"device must be a torch device or its name, got {device!r}") from exc
    if not ids_list:
        return []

    gen: torch.Generator | None = None
    if config.do_sample and config.seed is not None:
        gen = torch.Generator(device=dev)
        gen.manual_seed(config.seed)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=dev)
    eos_set = set(eos_ids)
    call = _Call(_accepts_logits_to_keep(model), cache_arg(model))
    decode = _beam_search if config.num_beams > 1 else _greedy_or_sample

    order = sorted(range(len(ids_list)), key=lambda i: -len(ids_list[i]))  # stable: longest first
    results: list[list[int] | None] = [None] * len(ids_list)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            n_batches = (len(order) + batch_size - 1) // batch_size
            for b in tqdm(range(n_batches), desc="generate", unit="batch", disable=not progress):
                chunk = order[b * batch_size : (b + 1) * batch_size]
                width = max(len(ids_list[i]) for i in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for r, i in enumerate(chunk):
                    n = len(ids_list[i])
                    ids[r, width - n :] = torch.tensor(ids_list[i], dtype=torch.long)
                    mask[r, width - n :] = 1
                rows = decode(model, ids.to(dev), mask.to(dev), config, eos, pad, gen, call)
                for r, i in enumerate(chunk):
                    results[i] = _cut_at_eos(rows[r], eos_set)
    finally:
        model.train(was_training)
    return [r if r is not None else [] for r in results]


def generate_text(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]] | Sequence[str],
    config: GenerationConfig | None = None,
    *,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool = True,
    add_special_tokens: bool = True,
    skip_special_tokens: bool = True,
) -> list[str]:
    """Like :func:`generate`, but returns the generated text, decoded with ``tokenizer``.

    ``skip_special_tokens`` is passed to ``tokenizer.decode``. The tokenizer is required.
    """
    if tokenizer is None or not callable(getattr(tokenizer, "decode", None)):
        raise DeltaConfigTypeError(
            f"tokenizer must be a tokenizer with a decode method, got {tokenizer!r:.200} ({type(tokenizer).__name__})"
        )
    check_bool("skip_special_tokens", skip_special_tokens)
    outputs = generate(
        model,
        tokenizer,
        prompts,
        config,
        batch_size=batch_size,
        device=device,
        progress=progress,
        add_special_tokens=add_special_tokens,
    )
    return [tokenizer.decode(ids, skip_special_tokens=skip_special_tokens) for ids in outputs]
