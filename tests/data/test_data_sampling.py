"""stratified_sample: per-category shares, determinism, order, validation."""

from __future__ import annotations

from collections import Counter

import pytest

from deltatune.data import DataToTextExample, stratified_sample
from deltatune.errors import DeltaConfigError, DeltaConfigTypeError


def _examples():
    cats = ["pub"] * 50 + ["coffee shop"] * 30 + ["restaurant"] * 2 + [None] * 5
    # interleave so that order preservation is meaningful
    order = sorted(range(len(cats)), key=lambda i: (i * 37) % len(cats))
    return [DataToTextExample(source=f"s{i}", references=[f"r{i}"], category=cats[i]) for i in order]


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 0.9, 1.0])
def test_shares_are_kept(fraction):
    exs = _examples()
    sample = stratified_sample(exs, fraction, seed=3)
    full = Counter(e.category for e in exs)
    got = Counter(e.category for e in sample)
    assert got == {c: max(1, round(fraction * n)) for c, n in full.items()}


def test_order_preserved_and_subset():
    exs = _examples()
    sample = stratified_sample(exs, 0.3, seed=1)
    pos = {id(e): i for i, e in enumerate(exs)}
    idx = [pos[id(e)] for e in sample]
    assert idx == sorted(idx) and len(set(idx)) == len(idx)


def test_seed_repeats_and_differs():
    exs = _examples()
    a = stratified_sample(exs, 0.2, seed=0)
    b = stratified_sample(exs, 0.2, seed=0)
    c = stratified_sample(exs, 0.2, seed=1)
    assert [e.source for e in a] == [e.source for e in b]
    assert [e.source for e in a] != [e.source for e in c]


def test_small_category_keeps_one_and_custom_key():
    exs = _examples()
    sample = stratified_sample(exs, 0.01, key=lambda e: e.category == "pub")
    assert Counter(e.category == "pub" for e in sample) == {True: 1, False: 1}
    assert stratified_sample(exs, 1.0) == exs


@pytest.mark.parametrize("fraction", [0, 0.0, -0.5, 1.5, float("nan")])
def test_fraction_validated(fraction):
    with pytest.raises(DeltaConfigError, match=r"fraction must be a number in \(0, 1\]"):
        stratified_sample(_examples(), fraction)


def test_type_errors():
    with pytest.raises(DeltaConfigTypeError, match="key must be a callable"):
        stratified_sample(_examples(), 0.5, key="category")
    with pytest.raises(DeltaConfigTypeError, match="seed must be an int"):
        stratified_sample(_examples(), 0.5, seed=1.5)
    with pytest.raises(DeltaConfigTypeError, match="examples must be a sequence"):
        stratified_sample(iter(_examples()), 0.5)
