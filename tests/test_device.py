"""Tests for deltatune.device.resolve_device, the one device resolver (models, train, tasks use it).

CUDA and MPS availability are replaced by fakes where a test needs a machine it does not have; the
resolver asks torch only through ``torch.cuda.is_available``, ``torch.cuda.device_count`` and
``torch.backends.mps.is_available``.
"""

from __future__ import annotations

import re

import pytest
import torch

import deltatune.models.loading as loading
from deltatune.device import resolve_device
from deltatune.errors import DeltaConfigError, DeltaConfigTypeError
from deltatune.train import distributed


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_auto_is_cpu_without_cuda(no_cuda):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("auto", 3) == torch.device("cpu")


def test_auto_is_cuda_with_cuda(two_gpus):
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("auto", 1) == torch.device("cuda", 1)


def test_auto_follows_the_machine():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.parametrize(
    ("name", "local_rank", "expected"),
    [
        ("cpu", None, torch.device("cpu")),
        (torch.device("cpu"), None, torch.device("cpu")),
        ("cpu", 1, torch.device("cpu")),
        ("cuda", None, torch.device("cuda")),
        ("cuda", 1, torch.device("cuda", 1)),  # torchrun's LOCAL_RANK picks the GPU
        ("cuda:0", 1, torch.device("cuda", 0)),  # an explicit index wins over the local rank
        (torch.device("cuda"), 1, torch.device("cuda", 1)),
        ("cuda:1", None, torch.device("cuda", 1)),
    ],
)
def test_explicit_names(two_gpus, name, local_rank, expected):
    assert resolve_device(name, local_rank) == expected


@pytest.mark.parametrize(
    ("gpus", "args", "kwargs", "message"),
    [
        (0, ("cuda",), {}, "device must be an available device, got 'cuda' but CUDA is not available"),
        (0, ("cuda:1",), {"field": "train.device"},
         "train.device must be an available device, got 'cuda:1' but CUDA is not available"),
        (2, ("cuda:2",), {}, "device must be an available device, got 'cuda:2' but only 2 CUDA device(s) exist"),
        (2, ("cuda", 5), {}, "device must be an available device, got 'cuda:5' but only 2 CUDA device(s) exist"),
    ],
)
def test_missing_cuda_devices(monkeypatch, gpus, args, kwargs, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    with pytest.raises(DeltaConfigError, match=f"^{re.escape(message)}$"):
        resolve_device(*args, **kwargs)


def test_mps_unavailable(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DeltaConfigError, match=r"^device must be an available device, got 'mps' but MPS is not available$"):
        resolve_device("mps")


@pytest.mark.parametrize("name", ["gpu9", "", "cuda:x", "auto:0"])
def test_bad_names(name):
    with pytest.raises(
        DeltaConfigError, match=rf"^device must be 'auto' or a torch device such as 'cpu' or 'cuda:0', got {name!r}$"
    ):
        resolve_device(name)


def test_bad_name_names_the_field():
    with pytest.raises(
        DeltaConfigError,
        match=r"^train\.device must be 'auto' or a torch device such as 'cpu' or 'cuda:0', got 'gpu'$",
    ):
        resolve_device("gpu", field="train.device")


@pytest.mark.parametrize("value", [0, None, 1.5, ["cpu"]])
def test_bad_types(value):
    message = f"device must be 'auto', a str or a torch.device, got {value!r}"
    with pytest.raises(DeltaConfigTypeError, match=f"^{re.escape(message)}$"):
        resolve_device(value)


@pytest.mark.parametrize(("value", "error"), [(-1, DeltaConfigError), (True, DeltaConfigTypeError), ("0", DeltaConfigTypeError)])
def test_bad_local_rank(value, error):
    with pytest.raises(error, match=rf"^local_rank must be None or an int >= 0, got {value!r}$"):
        resolve_device("cpu", value)


def test_train_and_models_use_the_one_resolver():
    assert distributed.resolve_device is resolve_device
    assert loading.resolve_device is resolve_device


def test_init_distributed_single_process_uses_gpu_zero(two_gpus):
    assert distributed.init_distributed("none", "auto").device == torch.device("cuda", 0)
    assert distributed.init_distributed("none", "cuda").device == torch.device("cuda", 0)
    assert distributed.init_distributed("none", "cpu").device == torch.device("cpu")


def test_init_distributed_bad_device_before_any_work(no_cuda, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")

    def forbidden(*args, **kwargs):
        raise AssertionError("no process group may be created for a bad device")

    monkeypatch.setattr(distributed.dist, "init_process_group", forbidden)
    with pytest.raises(
        DeltaConfigError, match=r"^device must be an available device, got 'cuda' but CUDA is not available$"
    ):
        distributed.init_distributed("ddp", "cuda")
