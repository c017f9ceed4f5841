"""The mask-drawing setting of :mod:`deltatune.kernels.dropout_triton` (pure Python: runs without triton)."""

from __future__ import annotations

import pytest

from deltatune.errors import DeltaConfigError
from deltatune.kernels import dropout_triton as T


def test_setting_from_the_environment():
    assert T.rng_setting({}) == T.RngSetting(24, 10)
    assert T.rng_setting({"DELTATUNE_DROPOUT_BITS": "16", "DELTATUNE_DROPOUT_ROUNDS": "7"}) == T.RngSetting(16, 7)


@pytest.mark.parametrize(
    "env,message",
    [
        ({"DELTATUNE_DROPOUT_BITS": "8"}, "DELTATUNE_DROPOUT_BITS must be 24 or 16, got '8'"),
        ({"DELTATUNE_DROPOUT_ROUNDS": "6"}, "DELTATUNE_DROPOUT_ROUNDS must be one of 7, 8, 9, 10, got '6'"),
        ({"DELTATUNE_DROPOUT_ROUNDS": "ten"}, "DELTATUNE_DROPOUT_ROUNDS must be one of 7, 8, 9, 10, got 'ten'"),
    ],
)
def test_bad_setting_is_refused(env, message):
    with pytest.raises(DeltaConfigError) as e:
        T.rng_setting(env)
    assert str(e.value) == message


@pytest.mark.parametrize("bits", [24, 16])
@pytest.mark.parametrize("p", [0.0, 0.05, 0.1, 0.25, 0.3, 0.5, 0.9])
def test_threshold_and_keep_probability(bits, p):
    rng = T.RngSetting(bits, 10)
    t = T.threshold(p, rng)
    # the smallest integer whose share of the 2^bits numbers reaches p
    assert t / 2**bits >= p and (t - 1) / 2**bits < p
    q = T.keep_probability(p, rng)
    assert q == 1 - t / 2**bits
    assert abs(q - (1 - p)) < 2.0**-bits


def test_tiles_from_the_environment():
    assert T.tiles({}) == {name: T.Tile(64, 64, 4) for name in ("xa", "da", "dx")}
    got = T.tiles({"DELTATUNE_DROPOUT_TILES": "xa=32x128x8, dx=16x16x2"})
    assert got == {"xa": T.Tile(32, 128, 8), "da": T.Tile(64, 64, 4), "dx": T.Tile(16, 16, 2)}


@pytest.mark.parametrize("item", ["xb=64x64x4", "xa=64x64", "xa=48x64x4", "xa=64x8x4", "da=64x64x3", "dx=64xax4"])
def test_bad_tiles_are_refused(item):
    with pytest.raises(DeltaConfigError) as e:
        T.tiles({"DELTATUNE_DROPOUT_TILES": f"da=32x32x4,{item}"})
    assert str(e.value) == (
        f"DELTATUNE_DROPOUT_TILES: {item!r} is not KERNEL=ROWSxCOLSxWARPS with KERNEL one of xa, da, dx, "
        "ROWS and COLS powers of two >= 16 and WARPS one of 1, 2, 4, 8, 16"
    )
