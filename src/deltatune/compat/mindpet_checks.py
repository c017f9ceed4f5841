"""MindPet's argument rules and the plain building blocks its cells share (for :mod:`.mindpet`).

MindSpore-style values become torch ones here, checked as MindPet checks them (a wrong type is a
:class:`DeltaConfigTypeError`, a bad value a :class:`DeltaConfigError`): dtypes
(:func:`check_dtype`), activations (:func:`make_activation`), adapter non-linearities
(:func:`non_linearity_name`), initialisers (:func:`fill_init`, :func:`check_init_value`), and the
``Dense`` layer with its checks (:func:`make_dense`, :func:`check_dense_args`, :class:`ActivatedDense`).
:class:`Autocast` runs a cell in its ``compute_dtype``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from ..errors import DeltaConfigError, DeltaConfigTypeError
from ..validation import check_bool, check_positive_int, check_type

__all__ = [
    "ActivatedDense",
    "Autocast",
    "check_dense_args",
    "check_dtype",
    "check_init_value",
    "fill_init",
    "make_activation",
    "make_dense",
    "non_linearity_name",
]

#: MindPet non-linearity names -> deltatune's (MindSpore's ``gelu`` is the tanh approximation).
_NON_LINEARITIES = {"gelu": "gelu_tanh", "relu": "relu", "tanh": "tanh", "silu": "silu"}

_DTYPES = {"float32": torch.float32, "float16": torch.float16}

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": lambda: nn.GELU(approximate="tanh"),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
    "softmax": lambda: nn.Softmax(dim=-1),
    "leakyrelu": lambda: nn.LeakyReLU(0.2),
}


def check_dtype(name: str, value: Any) -> torch.dtype:
    if isinstance(value, str) and value in _DTYPES:
        return _DTYPES[value]
    if isinstance(value, torch.dtype) and value in _DTYPES.values():
        return value
    raise DeltaConfigTypeError(
        f"{name} must be torch.float32 or torch.float16 (MindSpore's mstype.float32 / mstype.float16), got {value!r}"
    )


def make_activation(name: str, value: Any) -> nn.Module | None:
    if value is None:
        return None
    if isinstance(value, nn.Module):
        return value
    if not isinstance(value, str):
        raise DeltaConfigTypeError(f"{name} must be a str, an nn.Module or None, got {value!r} ({type(value).__name__})")
    key = value.lower()
    if key not in _ACTIVATIONS:
        raise DeltaConfigError(f"{name} must be one of {sorted(_ACTIVATIONS)}, got {value!r}")
    return _ACTIVATIONS[key]()


def non_linearity_name(name: str, value: Any) -> str:
    check_type(name, value, str, "a str")
    key = value.lower()
    if key not in _NON_LINEARITIES:
        raise DeltaConfigError(
            f"{name} must be one of {sorted(_NON_LINEARITIES)} (deltatune's adapter non-linearities; MindPet also takes "
            f"MindSpore's other activations), got {value!r}"
        )
    return _NON_LINEARITIES[key]


def fill_init(name: str, spec: Any, tensor: torch.Tensor) -> None:
    """Initialise ``tensor`` in place from a MindSpore-style init: a tensor of the same shape, a number, or a
    name (``"normal"`` is N(0, 0.01²) as in MindSpore, ``"he_uniform"`` is kaiming-uniform with a=0...)."""
    with torch.no_grad():
        if isinstance(spec, torch.Tensor):
            if tuple(spec.shape) != tuple(tensor.shape):
                raise DeltaConfigError(f"{name} must have shape {tuple(tensor.shape)}, got {tuple(spec.shape)}")
            tensor.copy_(spec)
            return
        if isinstance(spec, (int, float)) and not isinstance(spec, bool):
            tensor.fill_(float(spec))
            return
        if not isinstance(spec, str):
            raise DeltaConfigTypeError(
                f"{name} must be a tensor, a number or an initializer name, got {spec!r} ({type(spec).__name__})"
            )
        inits: dict[str, Callable[[torch.Tensor], Any]] = {
            "normal": lambda t: nn.init.normal_(t, std=0.01),
            "zeros": nn.init.zeros_,
            "zero": nn.init.zeros_,
            "ones": nn.init.ones_,
            "one": nn.init.ones_,
            "uniform": lambda t: nn.init.uniform_(t, -0.07, 0.07),
            "truncatednormal": lambda t: nn.init.trunc_normal_(t, std=0.01, a=-0.02, b=0.02),
            "xavier_uniform": nn.init.xavier_uniform_,
            "xavier_normal": nn.init.xavier_normal_,
            "he_uniform": lambda t: nn.init.kaiming_uniform_(t, a=0.0),
            "he_normal": lambda t: nn.init.kaiming_normal_(t, a=0.0),
            "he_uniform_sqrt5": lambda t: nn.init.kaiming_uniform_(t, a=math.sqrt(5)),
        }
        key = spec.lower()
        if key not in inits:
            raise DeltaConfigError(f"{name} must be one of {sorted(inits)} (or a tensor or a number), got {spec!r}")
        inits[key](tensor)


def check_init_value(name: str, spec: Any, shape: tuple[int, ...]) -> None:
    """Check an init spec before anything is built (a tensor's shape, a name, a number)."""
    fill_init(name, spec, torch.empty(shape))


class Autocast:
    """Runs a forward in ``compute_dtype`` (when it differs from the input's) and returns the input's dtype."""

    def __init__(self, x: torch.Tensor, compute_dtype: torch.dtype) -> None:
        self.enabled = x.is_floating_point() and x.dtype != compute_dtype
        self.ctx = torch.autocast(x.device.type, dtype=compute_dtype, enabled=self.enabled)

    def __enter__(self) -> Autocast:
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.ctx.__exit__(*exc)


def make_dense(in_channels: int, out_channels: int, weight_init: Any, bias_init: Any, has_bias: bool,
           dtype: torch.dtype) -> nn.Linear:
    layer = nn.Linear(in_channels, out_channels, bias=has_bias, dtype=dtype)
    fill_init("weight_init", weight_init, layer.weight)
    if has_bias:
        fill_init("bias_init", bias_init, layer.bias)
    return layer


def check_dense_args(cls: str, in_channels: Any, out_channels: Any, weight_init: Any, bias_init: Any,
                      has_bias: Any) -> None:
    check_positive_int(f"{cls}.in_channels", in_channels)
    check_positive_int(f"{cls}.out_channels", out_channels)
    check_bool(f"{cls}.has_bias", has_bias)
    check_init_value(f"{cls}.weight_init", weight_init, (out_channels, in_channels))
    check_init_value(f"{cls}.bias_init", bias_init, (out_channels,))


class ActivatedDense(nn.Module):
    """``activation(linear(x))``: the layer MindPet's ``*Dense`` cells put an adapter behind."""

    def __init__(self, linear: nn.Linear, activation: nn.Module | None) -> None:
        super().__init__()
        self.linear = linear
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return self.activation(y) if self.activation is not None else y
