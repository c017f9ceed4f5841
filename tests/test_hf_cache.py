"""deltatune.hf_cache: the cache's argument/field name across transformers versions (4.56 ... 5.25)."""

from __future__ import annotations

import inspect
import re

import pytest
import torch
import torch.nn as nn
from packaging.version import Version

transformers = pytest.importorskip("transformers")

from deltatune.errors import DeltaConfigError  # noqa: E402
from deltatune.hf_cache import (  # noqa: E402
    cache_arg,
    declared_cache_arg,
    default_cache_arg,
    output_cache,
    output_field,
    take_cache,
    without_cache,
)
from tests.tiny_models import bert, example_input, llama  # noqa: E402

RENAMED = Version(transformers.__version__).release >= (5, 24)  # transformers 5.24 renamed the cache


def test_default_name_follows_the_installed_transformers() -> None:
    assert default_cache_arg() == ("cache" if RENAMED else "past_key_values")


def test_cache_arg_of_models() -> None:
    model = llama()
    # the name the forward itself declares (read from transformers' own signature)
    params = inspect.signature(model.forward).parameters
    assert cache_arg(model) == declared_cache_arg(model) == ("cache" if "cache" in params else "past_key_values")
    assert cache_arg(model) == default_cache_arg()
    # a sequence classifier: its own forward (4.x) or its backbone (5.x, **kwargs) names it
    clf = bert()
    assert cache_arg(clf) == declared_cache_arg(clf.bert) == default_cache_arg()

    class Plain(nn.Module):
        def forward(self, x: torch.Tensor, past_key_values: object = None) -> torch.Tensor:
            return x

    class Bare(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    assert cache_arg(Plain()) == "past_key_values"  # declared wins over the installed version's name
    assert declared_cache_arg(Bare()) is None and cache_arg(Bare()) == default_cache_arg()


def test_output_cache_reads_the_declared_field_without_the_alias() -> None:
    model = llama()
    with torch.no_grad():
        out = model(**example_input("llama"), use_cache=True)
    field = output_field(out)
    assert field == default_cache_arg()
    cache = output_cache(out)
    assert cache is out[field] and cache.get_seq_length() == 7
    stripped = without_cache(out)
    assert type(stripped) is type(out) and output_cache(stripped) is None and field not in stripped.keys()
    torch.testing.assert_close(stripped.logits, out.logits)
    # tuple outputs (return_dict=False): item 1; a bare tensor: none
    with torch.no_grad():
        tup = model(**example_input("llama"), use_cache=True, return_dict=False)
    assert output_cache(tup).get_seq_length() == 7
    assert output_cache(torch.zeros(2)) is None and without_cache(tup) is tup


def test_take_cache() -> None:
    kwargs = {"input_ids": 1, "past_key_values": "old"}
    assert take_cache(kwargs) == "old" and kwargs == {"input_ids": 1}
    kwargs = {"cache": "new", "past_key_values": None}
    assert take_cache(kwargs) == "new" and kwargs == {}
    assert take_cache({}) is None
    with pytest.raises(DeltaConfigError, match=re.escape(
        f"got a cache under both 'cache' and 'past_key_values'; pass it once, as {default_cache_arg()!r} "
        "(the name of the installed transformers)"
    )):
        take_cache({"cache": "a", "past_key_values": "b"})
