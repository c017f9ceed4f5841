"""Tests for deltatune.generate: cache/padding correctness, parity with transformers, exact beam search."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM
from transformers.cache_utils import DynamicCache
from transformers.generation.logits_process import (
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from deltatune.errors import DeltaConfigError, DeltaConfigTypeError
from deltatune.generate import GenerationConfig, generate, generate_text
from deltatune.hf_cache import cache_arg
from deltatune.score_processors import block_ngrams, repetition_penalty, top_k_filter, top_p_filter
from tests.tiny_models import llama_config as tiny_llama_config

NO_SPECIAL = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


def tiny_llama(vocab: int = 48, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = tiny_llama_config(vocab_size=vocab, **NO_SPECIAL)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(vocab: int = 40, seed: int = 1) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=vocab, **NO_SPECIAL)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="module")
def gpt2() -> GPT2LMHeadModel:
    return tiny_gpt2()


PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10], [11], [3, 3, 4, 5], [20, 21]]


def full_recompute_greedy(model, prompt: list[int], steps: int, eos: list[int]) -> list[int]:
    """Reference: no cache, no padding, the whole sequence recomputed at every step."""
    seq, out = list(prompt), []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([seq]), use_cache=False).logits[0, -1]
        tok = int(logits.argmax())
        if tok in eos:
            break
        out.append(tok)
        seq.append(tok)
    return out


def hf_generate(model, prompt: list[int], eos: list[int], **kw) -> list[int]:
    """transformers' own generate on one prompt, new tokens cut before the first EOS."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        seq = model.generate(
            ids, attention_mask=torch.ones_like(ids), eos_token_id=eos, pad_token_id=0, **kw
        )[0, len(prompt) :].tolist()
    for j, t in enumerate(seq):
        if t in eos:
            return seq[:j]
    return seq


def frequent_tokens(model, prompts: list[list[int]], k: int, steps: int = 6) -> list[int]:
    """The ``k`` tokens greedy decoding emits most often (used as EOS so that EOS handling is exercised)."""
    outs = generate(
        model, None, prompts, GenerationConfig(max_new_tokens=steps, eos_token_id=[]), progress=False
    )
    counts = torch.bincount(torch.tensor([t for o in outs for t in o]))
    return counts.argsort(descending=True, stable=True)[:k].tolist()


def likely_eos(model, prompts: list[list[int]]) -> int:
    return frequent_tokens(model, prompts, 1)[0]


# ------------------------------------------------------------------------------------------------
# Greedy: cache + left padding + positions against full recomputation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_batched_greedy_equals_full_recompute(which, llama, gpt2):
    model = llama if which == "llama" else gpt2
    steps = 10
    got = generate(
        model,
        None,
        PROMPTS,
        GenerationConfig(max_new_tokens=steps, eos_token_id=[]),
        batch_size=5,
        progress=False,
    )
    want = [full_recompute_greedy(model, p, steps, []) for p in PROMPTS]
    assert got == want
    assert all(len(g) == steps for g in got)
    # With an EOS that the model does produce: outputs stop before it, other rows keep going.
    eos = likely_eos(model, PROMPTS)
    got = generate(
        model, None, PROMPTS, GenerationConfig(max_new_tokens=steps, eos_token_id=eos), progress=False
    )
    want = [full_recompute_greedy(model, p, steps, [eos]) for p in PROMPTS]
    assert got == want
    assert any(len(g) < steps for g in got)


def test_batch_size_and_order_do_not_change_greedy(llama):
    cfg = GenerationConfig(max_new_tokens=6, eos_token_id=[])
    one = generate(llama, None, PROMPTS, cfg, batch_size=1, progress=False)
    two = generate(llama, None, PROMPTS, cfg, batch_size=2, progress=False)
    assert one == two


# ------------------------------------------------------------------------------------------------
# Parity with transformers' generate (independent reference)
# ------------------------------------------------------------------------------------------------

HF_CASES = [
    {"num_beams": 1},
    {"num_beams": 1, "repetition_penalty": 1.5},
    {"num_beams": 1, "no_repeat_ngram_size": 2, "repetition_penalty": 0.8},
    {"num_beams": 4, "length_penalty": 1.0},
    {"num_beams": 3, "length_penalty": 0.6, "no_repeat_ngram_size": 2, "repetition_penalty": 1.3},
    {"num_beams": 5, "length_penalty": 2.0, "early_stopping": True},
    {"num_beams": 4, "length_penalty": -1.0, "early_stopping": "never", "no_repeat_ngram_size": 1},
    {"num_beams": 6, "length_penalty": 0.9, "early_stopping": "never", "no_repeat_ngram_size": 3},
]


@pytest.mark.parametrize("which", ["llama", "gpt2"])
@pytest.mark.parametrize("kw", HF_CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_matches_transformers_generate(which, kw, llama, gpt2):
    model = llama if which == "llama" else gpt2
    eos = likely_eos(model, PROMPTS)
    steps = 8
    for eos_ids in ([eos], [eos, (eos + 1) % model.config.vocab_size]):
        cfg = GenerationConfig(max_new_tokens=steps, eos_token_id=eos_ids, pad_token_id=0, **kw)
        got = generate(model, None, PROMPTS[:4], cfg, batch_size=2, progress=False)
        want = [
            hf_generate(model, p, eos_ids, max_new_tokens=steps, do_sample=False, **kw) for p in PROMPTS[:4]
        ]
        assert got == want


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_early_stop_heuristic_matches_transformers(which, llama, gpt2):
    # Frequent EOS tokens fill the finished set early and a large length penalty makes the heuristic
    # stop (and refuse later, better-normalised hypotheses) before max_new_tokens: exactly as transformers.
    model = llama if which == "llama" else gpt2
    eos_ids = frequent_tokens(model, PROMPTS, 4 if which == "gpt2" else 3)
    kw = {"num_beams": 2, "length_penalty": 2.0, "early_stopping": False}
    cfg = GenerationConfig(max_new_tokens=12, eos_token_id=eos_ids, pad_token_id=0, **kw)
    got = generate(model, None, PROMPTS, cfg, batch_size=5, progress=False)
    want = [hf_generate(model, p, eos_ids, max_new_tokens=12, do_sample=False, **kw) for p in PROMPTS]
    assert got == want


# ------------------------------------------------------------------------------------------------
# Beam search is exact when the beam is wide enough
# ------------------------------------------------------------------------------------------------


def exhaustive_best(model, prompt: list[int], steps: int, eos: int, lp: float) -> list[int]:
    """Score every possible output (each sequence cut at its first EOS) and return the best one."""
    vocab = model.config.vocab_size
    seqs = list(itertools.product(range(vocab), repeat=steps))
    ids = torch.tensor([prompt + list(s) for s in seqs])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids, use_cache=False).logits.double(), -1)
    p = len(prompt)
    tok_logp = logp[:, p - 1 : p - 1 + steps, :].gather(-1, ids[:, p:, None]).squeeze(-1)
    scores: dict[tuple[int, ...], float] = {}
    for i, s in enumerate(seqs):
        n = s.index(eos) + 1 if eos in s else steps
        scores[s[:n]] = float(tok_logp[i, :n].sum()) / (n**lp)
    best = max(scores, key=scores.__getitem__)
    return [t for t in best if t != eos]


def test_wide_beam_equals_exhaustive_search():
    vocab, steps = 8, 3
    model = tiny_llama(vocab=vocab, seed=3)
    eos = 0
    prompts = [[1, 2], [3], [4, 5, 6], [7, 1]]
    lengths = set()
    for lp in (0.0, 1.0, 2.5, -0.5):
        cfg = GenerationConfig(
            max_new_tokens=steps,
            num_beams=vocab**steps,
            length_penalty=lp,
            early_stopping="never",
            eos_token_id=eos,
        )
        got = generate(model, None, prompts, cfg, batch_size=2, progress=False)
        want = [exhaustive_best(model, p, steps, eos, lp) for p in prompts]
        assert got == want
        lengths.update(len(g) for g in got)
    assert min(lengths) < steps and max(lengths) == steps  # both EOS and max-length endings were tested


def test_batched_beam_search_equals_single_prompts(llama, gpt2):
    for model, modes in ((llama, (False, "never")), (gpt2, (True,))):
        eos = likely_eos(model, PROMPTS)
        for es in modes:
            cfg = GenerationConfig(
                max_new_tokens=7,
                num_beams=4,
                length_penalty=0.8,
                no_repeat_ngram_size=3,
                repetition_penalty=1.2,
                early_stopping=es,
                eos_token_id=eos,
            )
            batched = generate(model, None, PROMPTS, cfg, batch_size=3, progress=False)
            alone = [generate(model, None, [p], cfg, progress=False)[0] for p in PROMPTS]
            assert batched == alone


# ------------------------------------------------------------------------------------------------
# Prefix-tuning style hooks: the cache is not just the tokens fed, and the mask is extended
# ------------------------------------------------------------------------------------------------


def add_prefix_hook(model: LlamaForCausalLM, n_prefix: int = 3):
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator().manual_seed(7)
    keys = [torch.randn(1, cfg.num_key_value_heads, n_prefix, head_dim, generator=g) for _ in range(2)]
    vals = [torch.randn(1, cfg.num_key_value_heads, n_prefix, head_dim, generator=g) for _ in range(2)]

    arg = cache_arg(model)  # "cache" from transformers 5.24, "past_key_values" before

    def hook(module, args, kwargs):
        mask = kwargs["attention_mask"]
        rows = mask.shape[0]
        if kwargs.get(arg) is None:
            cache = DynamicCache(config=cfg)
            for layer in range(cfg.num_hidden_layers):
                cache.update(
                    keys[layer].expand(rows, -1, -1, -1), vals[layer].expand(rows, -1, -1, -1), layer
                )
            kwargs[arg] = cache
        kwargs["attention_mask"] = torch.cat([mask.new_ones(rows, n_prefix), mask], 1)
        return args, kwargs

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def test_prefix_hook_contract():
    model = tiny_llama(seed=5)
    handle = add_prefix_hook(model)
    try:
        prompts = PROMPTS[:4]
        steps = 6
        got = generate(
            model, None, prompts, GenerationConfig(max_new_tokens=steps, eos_token_id=[]), progress=False
        )

        def ref(prompt):  # full recomputation, no padding; the hook adds the prefix each time
            seq, out = list(prompt), []
            for _ in range(steps):
                ids = torch.tensor([seq])
                with torch.no_grad():
                    logits = model(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        position_ids=torch.arange(len(seq))[None],
                        use_cache=True,
                    ).logits[0, -1]
                seq.append(int(logits.argmax()))
                out.append(seq[-1])
            return out

        assert got == [ref(p) for p in prompts]
        # Beam search with the prefix cache: batched (expanded + reordered cache) equals one by one.
        cfg = GenerationConfig(max_new_tokens=5, num_beams=3, eos_token_id=[])
        batched = generate(model, None, prompts, cfg, batch_size=4, progress=False)
        assert batched == [generate(model, None, [p], cfg, progress=False)[0] for p in prompts]
    finally:
        handle.remove()
    plain = generate(
        model, None, prompts, GenerationConfig(max_new_tokens=steps, eos_token_id=[]), progress=False
    )
    assert plain != got  # the prefix really changed the computation


# ------------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------------


def test_sampling_reproducible_with_seed(llama):
    for beams in (1, 3):
        cfg = GenerationConfig(
            max_new_tokens=8,
            do_sample=True,
            num_beams=beams,
            temperature=1.5,
            top_p=0.95,
            seed=123,
            eos_token_id=[],
        )
        a = generate(llama, None, PROMPTS, cfg, batch_size=2, progress=False)
        b = generate(llama, None, PROMPTS, cfg, batch_size=2, progress=False)
        assert a == b
        c = generate(llama, None, PROMPTS, dataclass_replace(cfg, seed=124), batch_size=2, progress=False)
        assert c != a


def dataclass_replace(cfg: GenerationConfig, **kw) -> GenerationConfig:
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_top_k_one_sampling_equals_greedy(llama, gpt2):
    for model in (llama, gpt2):
        greedy = generate(
            model, None, PROMPTS, GenerationConfig(max_new_tokens=8, eos_token_id=[]), progress=False
        )
        sampled = generate(
            model,
            None,
            PROMPTS,
            GenerationConfig(
                max_new_tokens=8, do_sample=True, top_k=1, temperature=3.0, seed=0, eos_token_id=[]
            ),
            progress=False,
        )
        assert sampled == greedy


def test_sampling_follows_the_filtered_distribution(llama):
    prompt = [4, 9, 2]
    temperature, top_k, n = 0.7, 5, 4000
    with torch.no_grad():
        logits = llama(torch.tensor([prompt])).logits[0, -1].double()
    scores = logits / temperature
    kth = scores.topk(top_k).values[-1]
    probs = torch.softmax(scores.masked_fill(scores < kth, float("-inf")), -1)
    cfg = GenerationConfig(max_new_tokens=1, do_sample=True, temperature=temperature, top_k=top_k, seed=1)
    out = generate(llama, None, [prompt] * n, cfg, batch_size=n, progress=False)
    freq = torch.bincount(torch.tensor([o[0] for o in out]), minlength=logits.numel()).double() / n
    assert freq[probs == 0].sum() == 0
    assert torch.allclose(freq, probs, atol=4 * (0.25 / n) ** 0.5)


# ------------------------------------------------------------------------------------------------
# Score processors against transformers' processors
# ------------------------------------------------------------------------------------------------


def test_processors_match_transformers():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 20, generator=g) * 3
    history = torch.randint(0, 20, (6, 12), generator=g)
    history[:, :3] = history[:, 3:6]  # make repeated n-grams likely
    history[:, 8:11] = history[:, 3:6]
    for pen in (1.3, 0.7):
        ref = RepetitionPenaltyLogitsProcessor(pen)(history, scores.clone())
        assert torch.equal(repetition_penalty(scores, history, pen), ref)
    for n in (1, 2, 3, 4):
        ref = NoRepeatNGramLogitsProcessor(n)(history, scores.clone())
        assert torch.equal(block_ngrams(scores, history, n), ref)
    for k in (1, 3, 25):
        assert torch.equal(top_k_filter(scores, k), TopKLogitsWarper(k)(history, scores.clone()))
    for p, keep in ((0.1, 1), (0.5, 1), (0.9, 2), (0.999, 1)):
        ref = TopPLogitsWarper(p, min_tokens_to_keep=keep)(history, scores.clone())
        assert torch.equal(torch.isinf(top_p_filter(scores, p, keep)), torch.isinf(ref))


def test_left_padding_is_not_history():
    scores = torch.zeros(1, 6)
    history = torch.tensor([[-1, -1, 2, 3]])
    assert repetition_penalty(scores - 1, history, 2.0)[0].tolist() == [-1, -1, -2, -2, -1, -1]
    padded = torch.tensor([[-1, -1, -1, 2, 3, 2]])
    blocked = block_ngrams(scores, padded, 2)[0]
    assert torch.isinf(blocked).tolist() == [False, False, False, True, False, False]


# ------------------------------------------------------------------------------------------------
# Text API, modes, validation
# ------------------------------------------------------------------------------------------------


class CharTokenizer:
    """Minimal tokenizer for tests: 'a'..'z' -> 1..26, id 0 is EOS."""

    eos_token_id = 0
    pad_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [ord(c) - 96 for c in text]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(96 + i) if 1 <= i <= 26 else "?" for i in ids)


def test_generate_text_and_string_prompts(llama):
    tok = CharTokenizer()
    texts = ["abc", "hello", "z"]
    cfg = GenerationConfig(max_new_tokens=5)
    ids = generate(llama, tok, [tok(t)["input_ids"] for t in texts], cfg, progress=False)
    assert generate(llama, tok, texts, cfg, progress=False) == ids
    assert generate_text(llama, tok, texts, cfg, progress=False) == [tok.decode(i) for i in ids]
    assert all(0 not in i for i in ids)  # EOS taken from the tokenizer and cut


def test_restores_training_mode(llama):
    llama.train()
    try:
        generate(llama, None, PROMPTS[:1], GenerationConfig(max_new_tokens=2), progress=False)
        assert llama.training
    finally:
        llama.eval()
    assert generate(llama, None, [], GenerationConfig(), progress=False) == []


@pytest.mark.parametrize(
    ("kw", "err", "msg"),
    [
        (
            {"max_new_tokens": 0},
            DeltaConfigError,
            "GenerationConfig.max_new_tokens must be a positive int, got 0",
        ),
        ({"num_beams": 0}, DeltaConfigError, "GenerationConfig.num_beams must be a positive int, got 0"),
        (
            {"do_sample": "yes"},
            DeltaConfigTypeError,
            "GenerationConfig.do_sample must be a bool, got 'yes' (str)",
        ),
        ({"temperature": 0}, DeltaConfigError, "GenerationConfig.temperature must be a number > 0, got 0.0"),
        ({"top_k": -1}, DeltaConfigError, "GenerationConfig.top_k must be an int >= 0, got -1"),
        ({"top_p": 1.5}, DeltaConfigError, "GenerationConfig.top_p must be a number in (0, 1], got 1.5"),
        ({"top_p": 0.0}, DeltaConfigError, "GenerationConfig.top_p must be a number in (0, 1], got 0.0"),
        (
            {"length_penalty": float("nan")},
            DeltaConfigError,
            "GenerationConfig.length_penalty must be a finite number, got nan",
        ),
        (
            {"no_repeat_ngram_size": -2},
            DeltaConfigError,
            "GenerationConfig.no_repeat_ngram_size must be an int >= 0, got -2",
        ),
        (
            {"repetition_penalty": -1},
            DeltaConfigError,
            "GenerationConfig.repetition_penalty must be a number > 0, got -1.0",
        ),
        (
            {"eos_token_id": [2, -1]},
            DeltaConfigError,
            "GenerationConfig.eos_token_id[1] must be an int >= 0, got -1",
        ),
        (
            {"eos_token_id": "2"},
            DeltaConfigTypeError,
            "GenerationConfig.eos_token_id must be an int or a list of int, got '2' (str)",
        ),
        ({"pad_token_id": -3}, DeltaConfigError, "GenerationConfig.pad_token_id must be an int >= 0, got -3"),
        (
            {"early_stopping": "always"},
            DeltaConfigError,
            "GenerationConfig.early_stopping must be a bool or 'never', got 'always'",
        ),
        (
            {"early_stopping": 1},
            DeltaConfigTypeError,
            "GenerationConfig.early_stopping must be a bool or 'never', got 1 (int)",
        ),
        ({"seed": 1.5}, DeltaConfigTypeError, "GenerationConfig.seed must be an int >= 0, got 1.5 (float)"),
    ],
)
def test_config_validation(kw, err, msg):
    with pytest.raises(err) as info:
        GenerationConfig(**kw)
    assert str(info.value) == msg


def test_generate_argument_validation(llama):
    cfg = GenerationConfig(max_new_tokens=2)
    cases = [
        (
            lambda: generate(llama, None, ["abc"], cfg),
            DeltaConfigError,
            "tokenizer must be given when prompts are strings, got None (prompts[0] is 'abc')",
        ),
        (
            lambda: generate(llama, None, [[1, 2], []], cfg),
            DeltaConfigError,
            "prompts[1] must have at least one token, got []",
        ),
        (
            lambda: generate(llama, None, [[1, 48]], cfg),
            DeltaConfigError,
            "prompts[0] token ids must be in [0, 47] (the model's vocabulary), got 48",
        ),
        (
            lambda: generate(llama, None, [[1, 2.0]], cfg),
            DeltaConfigTypeError,
            "prompts[0][1] must be an int token id, got 2.0 (float)",
        ),
        (
            lambda: generate(llama, None, "abc", cfg),
            DeltaConfigTypeError,
            "prompts must be a list of str or a list of lists of int token ids, got 'abc' (str)",
        ),
        (
            lambda: generate(llama, None, [[1]], cfg, batch_size=0),
            DeltaConfigError,
            "batch_size must be a positive int, got 0",
        ),
        (
            lambda: generate(llama, None, [[1]], {"num_beams": 2}),
            DeltaConfigTypeError,
            "config must be a deltatune GenerationConfig, got {'num_beams': 2} (dict)",
        ),
        (
            lambda: generate(llama, None, [[1]], GenerationConfig(eos_token_id=99)),
            DeltaConfigError,
            "eos_token_id must be in [0, 47] (the model's vocabulary), got 99",
        ),
        (
            lambda: generate_text(llama, None, [[1]], cfg),
            DeltaConfigTypeError,
            "tokenizer must be a tokenizer with a decode method, got None (NoneType)",
        ),
    ]
    for call, err, msg in cases:
        with pytest.raises(err) as info:
            call()
        assert str(info.value) == msg


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_cuda_matches_cpu():
    model = tiny_llama()
    cfg = GenerationConfig(max_new_tokens=6, num_beams=3, eos_token_id=[])
    cpu = generate(model, None, PROMPTS, cfg, progress=False)
    gpu = generate(model.cuda(), None, PROMPTS, cfg, progress=False)
    assert gpu == cpu
