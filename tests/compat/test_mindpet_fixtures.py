"""The MindPet parity suite on recorded outputs: MindPet 1.0.4's outputs and gradients (MindSpore 2.10, CPU,
fp32), written by ``scripts/mindpet_parity.sh --record tests/compat/fixtures/mindpet``, against the
deltatune shells, without MindSpore. The full lane (scripts/mindpet_parity.sh) recomputes MindPet's side."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).parent / "fixtures" / "mindpet"
CASES = ["LoRADense", "LoRADense_gelu", "AdapterDense", "AdapterDense_relu", "AdapterLayer", "LowRankAdapterDense",
         "LowRankAdapterLayer", "PrefixLayer", "PrefixEncoder_ptuning2_proj", "PrefixEncoder_ptuning2_noproj",
         "RDropLoss_2pairs", "RDropLoss_4pairs", "RDropLoss_8pairs", "rdrop_repeat"]


@pytest.fixture(scope="module")
def side():
    spec = importlib.util.spec_from_file_location("deltatune_side", ROOT / "scripts" / "mindpet_parity" / "deltatune_side.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("case", CASES)
def test_outputs_and_gradients_match_mindpet(side, case):
    data = dict(np.load(FIXTURES / f"{case}.npz"))
    d_out, d_grad = side.compare_case(case, data)
    assert d_out <= 1e-5 and d_grad <= 1e-5, (d_out, d_grad)
    if case == "PrefixLayer":
        assert side.prefix_init_time(data) <= 1e-5


@pytest.mark.parametrize("mode", ["lora", "prefixtuning", "adapter", "low_rank_adapter", "bitfit", "ptuning2"])
def test_freeze_delta_trains_what_mindpet_trains(side, mode):
    want = {k.split(":", 1)[1]: int(v) for k, v in np.load(FIXTURES / f"freeze_delta_{mode}.npz").items()}
    assert side.freeze_counts(mode) == want


def test_the_comparison_can_fail(side):
    """A changed MindPet output is caught (the check is not vacuous)."""
    data = dict(np.load(FIXTURES / "RDropLoss_4pairs.npz"))
    data["out"] = data["out"] + 1e-3
    d_out, _ = side.compare_case("RDropLoss_4pairs", data)
    assert d_out > 1e-5
    data = dict(np.load(FIXTURES / "AdapterLayer.npz"))
    key = next(k for k in data if k.startswith("gw:"))
    data[key] = data[key] * 1.01
    assert side.compare_case("AdapterLayer", data)[1] > 1e-5
