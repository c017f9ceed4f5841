"""Hugging Face ``model.generate()`` on Prefix-Tuning / P-Tuning v2 models against ``deltatune.generate``.

The tiny GPT-2 and Llama models of ``tests/tiny_models.py`` get a prefix adapter (amplified so that
it changes the output); transformers' own greedy and beam search, with and without the cache, must
produce the tokens of our decoder, and neither may raise a ``FutureWarning`` (the cache argument was
renamed ``cache`` in transformers 5.24; passing the old name is deprecated). A forward call with
``use_cache=False`` returns no cache under either name.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.nn as nn

pytest.importorskip("transformers")

import deltatune.api as api  # noqa: E402
from deltatune.generate import GenerationConfig, generate  # noqa: E402
from deltatune.hf_cache import output_cache  # noqa: E402
from deltatune.methods.prefix import PrefixConfig  # noqa: E402
from deltatune.methods.ptuning_v2 import PTuningV2Config  # noqa: E402
from tests.tiny_models import BUILDERS  # noqa: E402

PAD = 2
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14], [3, 4, 5, 6]]
N_PREFIX = {"prefix": 3, "ptuning_v2": 4}
CONFIGS = {
    "prefix": lambda: PrefixConfig(prefix_token_num=N_PREFIX["prefix"], mid_dim=16),
    "ptuning_v2": lambda: PTuningV2Config(pre_seq_len=N_PREFIX["ptuning_v2"], prefix_projection=False, dropout=0.0),
}
HOLDER = {"prefix": "prefix_encoder", "ptuning_v2": "ptuning_encoder"}
DECODING = [
    {"num_beams": 1},
    {"num_beams": 3, "length_penalty": 1.0},
    {"num_beams": 4, "length_penalty": 0.6, "early_stopping": True},
]


@contextlib.contextmanager
def no_deprecated_cache_name() -> Iterator[None]:
    """Fail on a ``FutureWarning`` and on transformers' logged "past_key_values ... deprecated" message.

    transformers logs the latter once per process (``warning_once`` is an ``lru_cache``), so its cache
    is cleared first and a handler on the library's root logger collects what is logged meanwhile.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.warning_once.cache_clear()
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            yield
    finally:
        root.removeHandler(handler)
    messages = [r.getMessage() for r in records]
    assert not [m for m in messages if "past_key_values" in m], messages


def prefix_model(arch: str, method: str) -> nn.Module:
    """A tiny causal LM with one active prefix adapter that clearly changes its output."""
    model = BUILDERS[arch]()
    api.apply(model, CONFIGS[method]())
    with torch.no_grad():
        for p in getattr(model, HOLDER[method]).parameters():
            p.mul_(4.0)
    return model.eval()


def hf_generate(model: nn.Module, prompt: list[int], steps: int, **kw) -> list[int]:
    """transformers' generate on one unpadded prompt: the new tokens, no EOS."""
    ids = torch.tensor([prompt])
    with torch.no_grad(), no_deprecated_cache_name():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps,
                             do_sample=False, pad_token_id=PAD, eos_token_id=None, **kw)
    return out[0, len(prompt):].tolist()


def ours(model: nn.Module, steps: int, **kw) -> list[list[int]]:
    """deltatune's decoder on all prompts in one left-padded batch."""
    cfg = GenerationConfig(max_new_tokens=steps, eos_token_id=[], pad_token_id=PAD, **kw)
    with no_deprecated_cache_name():
        return generate(model, None, PROMPTS, cfg, batch_size=len(PROMPTS), progress=False)


@pytest.mark.parametrize("kw", DECODING, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hf_generate_equals_deltatune_generate(arch: str, method: str, kw: dict) -> None:
    model = prefix_model(arch, method)
    steps = 6
    got = ours(model, steps, **kw)
    assert all(len(g) == steps for g in got)
    for prompt, mine in zip(PROMPTS, got):
        assert hf_generate(model, prompt, steps, **kw) == mine, prompt
        assert hf_generate(model, prompt, steps, use_cache=False, **kw) == mine, prompt
    with api.disable_adapters(model):  # the prefix matters: the base model says something else
        assert ours(model, steps, **kw) != got


@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_use_cache_false_returns_no_cache(arch: str, method: str) -> None:
    model = prefix_model(arch, method)
    ids = torch.tensor([[5, 6, 7, 8]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        out = model(**batch, use_cache=False)
        cached = output_cache(model(**batch, use_cache=True))
        gen = model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=PAD, eos_token_id=None,
                             use_cache=False, return_dict_in_generate=True)
    assert output_cache(out) is None and not {"cache", "past_key_values"} & set(out.keys())
    assert cached.get_seq_length() == N_PREFIX[method] + 4  # with the cache: the prefix, then the tokens
    assert output_cache(gen) is None
