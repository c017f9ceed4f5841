"""MindPet's API (``mindpet.delta`` / ``mindpet.graph``, seed 002) as thin shells over deltatune's methods.

A MindPet user changes the import and keeps the names and argument names::

    from deltatune.compat.mindpet import LoRADense, freeze_delta, TrainableParamsCheckPoint

    dense1 = LoRADense(in_channels=784, out_channels=512, lora_rank=8, lora_alpha=16)
    freeze_delta(model, mode="lora", exclude=["*head*"])

Each shell builds the layer MindPet builds and adds deltatune's method to it (:func:`deltatune.apply`),
so the parameters are deltatune's (``dense.lora_A.default.weight``...; the MindPet names are
properties, e.g. ``LoRADense.mindpet_delta_lora_a``) and :func:`deltatune.freeze_delta`,
:func:`deltatune.save_delta` and the Trainer see them as usual.

Numbers are MindPet 1.0.4's (checked by ``scripts/mindpet_parity.sh`` against the real MindPet on
MindSpore 2.10 to 1e-5): ``non_linearity="gelu"`` is the tanh approximation (MindSpore's GELU;
deltatune's own configs default to the exact GELU), Low-Rank Adapters initialise every factor with
``low_rank_w_init`` (no zero factor), adapters' projections start from MindSpore's ``"normal"``
(N(0, 0.01²)), and :class:`RDropLoss` sums the KL over the batch.

Arguments are checked as MindPet checks them (a wrong type is a :class:`DeltaConfigTypeError`, which
is a ``TypeError``; a bad value a :class:`DeltaConfigError`, a ``ValueError``), before anything is
built. Where deltatune is stricter the message says so: LoRA's ``lora_alpha`` must be > 0 (MindPet:
non-zero), a Low-Rank Adapter's ``low_rank_size`` must not exceed its bottleneck, R-Drop's ``alpha``
must be >= 0, ``prefix_projection`` must be a bool, and :func:`freeze_delta`'s patterns must each
match a parameter. ``param_init_type`` and ``compute_dtype`` take ``torch.float32`` /
``torch.float16`` (or their names); ``compute_dtype`` runs the layer under ``torch.autocast``.
The ``shard`` methods (MindSpore's parallel strategies) do not exist.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..api import apply
from ..errors import DeltaConfigError, DeltaConfigTypeError
from ..freeze import freeze_delta as _freeze_delta
from ..methods.adapter import AdapterConfig
from ..methods.base import get_records, logical_param_name
from ..methods.lora import LoraConfig
from ..methods.low_rank_adapter import LowRankAdapterConfig
from ..methods.prefix import PrefixEncoder as _PrefixEncoder
from ..methods.rdrop import RDropLoss as _RDropLoss
from ..train.trainer import TrainerCallback
from ..validation import check_bool, check_float, check_positive_int, check_type

__all__ = [
    "AdapterDense",
    "AdapterLayer",
    "CheckpointConfig",
    "DELTA_LIST",
    "LoRADense",
    "LowRankAdapterDense",
    "LowRankAdapterLayer",
    "PrefixEncoder",
    "PrefixLayer",
    "RDropLoss",
    "TrainableParamsCheckPoint",
    "freeze_delta",
    "rdrop_repeat",
]

#: MindPet's ``freeze_delta`` modes -> deltatune method names.
_MODES = {
    "lora": "lora",
    "prefixtuning": "prefix",
    "adapter": "adapter",
    "low_rank_adapter": "low_rank_adapter",
    "bitfit": "bitfit",
    "ptuning2": "ptuning_v2",
}
#: the modes MindPet's ``freeze_delta`` accepts.
DELTA_LIST = list(_MODES)

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


# ------------------------------------------------------------------------------------------------
# argument checks (MindPet's rules)
# ------------------------------------------------------------------------------------------------
def _dtype(name: str, value: Any) -> torch.dtype:
    if isinstance(value, str) and value in _DTYPES:
        return _DTYPES[value]
    if isinstance(value, torch.dtype) and value in _DTYPES.values():
        return value
    raise DeltaConfigTypeError(
        f"{name} must be torch.float32 or torch.float16 (MindSpore's mstype.float32 / mstype.float16), got {value!r}"
    )


def _activation(name: str, value: Any) -> nn.Module | None:
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


def _non_linearity(name: str, value: Any) -> str:
    check_type(name, value, str, "a str")
    key = value.lower()
    if key not in _NON_LINEARITIES:
        raise DeltaConfigError(
            f"{name} must be one of {sorted(_NON_LINEARITIES)} (deltatune's adapter non-linearities; MindPet also takes "
            f"MindSpore's other activations), got {value!r}"
        )
    return _NON_LINEARITIES[key]


def _fill(name: str, spec: Any, tensor: torch.Tensor) -> None:
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


def _check_init_value(name: str, spec: Any, shape: tuple[int, ...]) -> None:
    """Check an init spec before anything is built (a tensor's shape, a name, a number)."""
    _fill(name, spec, torch.empty(shape))


class _Autocast:
    """Runs a forward in ``compute_dtype`` (when it differs from the input's) and returns the input's dtype."""

    def __init__(self, x: torch.Tensor, compute_dtype: torch.dtype) -> None:
        self.enabled = x.is_floating_point() and x.dtype != compute_dtype
        self.ctx = torch.autocast(x.device.type, dtype=compute_dtype, enabled=self.enabled)

    def __enter__(self) -> _Autocast:
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.ctx.__exit__(*exc)


def _dense(in_channels: int, out_channels: int, weight_init: Any, bias_init: Any, has_bias: bool,
           dtype: torch.dtype) -> nn.Linear:
    layer = nn.Linear(in_channels, out_channels, bias=has_bias, dtype=dtype)
    _fill("weight_init", weight_init, layer.weight)
    if has_bias:
        _fill("bias_init", bias_init, layer.bias)
    return layer


def _check_dense_args(cls: str, in_channels: Any, out_channels: Any, weight_init: Any, bias_init: Any,
                      has_bias: Any) -> None:
    check_positive_int(f"{cls}.in_channels", in_channels)
    check_positive_int(f"{cls}.out_channels", out_channels)
    check_bool(f"{cls}.has_bias", has_bias)
    _check_init_value(f"{cls}.weight_init", weight_init, (out_channels, in_channels))
    _check_init_value(f"{cls}.bias_init", bias_init, (out_channels,))


class _ActivatedDense(nn.Module):
    """``activation(linear(x))``: the layer MindPet's ``*Dense`` cells put an adapter behind."""

    def __init__(self, linear: nn.Linear, activation: nn.Module | None) -> None:
        super().__init__()
        self.linear = linear
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return self.activation(y) if self.activation is not None else y


# ------------------------------------------------------------------------------------------------
# LoRA
# ------------------------------------------------------------------------------------------------
class LoRADense(nn.Module):
    """MindPet's ``LoRADense``: ``activation(x·Wᵀ + b + lora_alpha/lora_rank · dropout(x)·Aᵀ·Bᵀ)``.

    A ``nn.Linear`` (``self.dense``) with deltatune's LoRA applied (adapter ``"default"``).
    ``lora_a_init`` defaults to MindPet's ``HeUniform(negative_slope=sqrt(5))`` (``"he_uniform_sqrt5"``),
    ``lora_b_init`` to zeros. ``lora_alpha`` must be > 0 (deltatune is stricter than MindPet's non-zero).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        lora_rank: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        lora_a_init: Any = "he_uniform_sqrt5",
        lora_b_init: Any = "zeros",
        param_init_type: Any = torch.float32,
        compute_dtype: Any = torch.float16,
        weight_init: Any = "normal",
        bias_init: Any = "zeros",
        has_bias: bool = True,
        activation: Any = None,
    ) -> None:
        _check_dense_args("LoRADense", in_channels, out_channels, weight_init, bias_init, has_bias)
        check_positive_int("LoRADense.lora_rank", lora_rank)
        check_type("LoRADense.lora_alpha", lora_alpha, (int, float), "an int or a float")
        if lora_alpha == 0:
            raise DeltaConfigError("LoRADense.lora_alpha must not be 0, got 0")
        if lora_alpha < 0:
            raise DeltaConfigError(
                f"LoRADense.lora_alpha must be > 0 (deltatune is stricter than MindPet, which takes any non-zero "
                f"value), got {lora_alpha}"
            )
        check_type("LoRADense.lora_dropout", lora_dropout, float, "a float in [0, 1)")
        check_float("LoRADense.lora_dropout", lora_dropout, low=0.0, high=1.0, high_inclusive=False)
        _check_init_value("LoRADense.lora_a_init", lora_a_init, (lora_rank, in_channels))
        _check_init_value("LoRADense.lora_b_init", lora_b_init, (out_channels, lora_rank))
        self.param_init_type = _dtype("LoRADense.param_init_type", param_init_type)
        self.compute_dtype = _dtype("LoRADense.compute_dtype", compute_dtype)
        act = _activation("LoRADense.activation", activation)
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.lora_rank, self.lora_alpha = lora_rank, lora_alpha
        self.dense = _dense(in_channels, out_channels, weight_init, bias_init, has_bias, self.param_init_type)
        self.activation = act
        apply(self, LoraConfig(r=lora_rank, alpha=float(lora_alpha), dropout=lora_dropout, target_modules=["dense"]),
              freeze_base=False)
        _fill("lora_a_init", lora_a_init, self.mindpet_delta_lora_a)
        _fill("lora_b_init", lora_b_init, self.mindpet_delta_lora_b)

    @property
    def weight(self) -> nn.Parameter:
        """The dense weight ``(out_channels, in_channels)``."""
        return self.dense.base_layer.weight

    @property
    def bias(self) -> nn.Parameter | None:
        """The dense bias (None without ``has_bias``)."""
        return self.dense.base_layer.bias

    @property
    def mindpet_delta_lora_a(self) -> nn.Parameter:
        """LoRA's A, ``(lora_rank, in_channels)``."""
        return self.dense.lora_A["default"].weight

    @property
    def mindpet_delta_lora_b(self) -> nn.Parameter:
        """LoRA's B, ``(out_channels, lora_rank)``."""
        return self.dense.lora_B["default"].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _Autocast(x, self.compute_dtype):
            y = self.dense(x)
            if self.activation is not None:
                y = self.activation(y)
        return y.to(x.dtype)


# ------------------------------------------------------------------------------------------------
# Adapter / Low-Rank Adapter
# ------------------------------------------------------------------------------------------------
class _AdapterShell(nn.Module):
    """Shared parts of the adapter shells: ``self.block`` (an identity, or the activated dense layer)
    carries deltatune's adapter; ``param_init_type`` / ``compute_dtype`` are checked first."""

    def __init__(self, cls: str, param_init_type: Any, compute_dtype: Any,
                 make_block: Callable[[torch.dtype], nn.Module]) -> None:
        pit = _dtype(f"{cls}.param_init_type", param_init_type)
        cdt = _dtype(f"{cls}.compute_dtype", compute_dtype)
        super().__init__()
        self.param_init_type, self.compute_dtype = pit, cdt
        self.block = make_block(pit)

    @property
    def adapter(self) -> nn.Module:
        """deltatune's adapter layer (``adapter_*`` / ``low_rank_adapter_*`` ModuleDicts)."""
        return self.block

    @property
    def dense(self) -> nn.Linear:
        """The dense layer of the ``*Dense`` shells."""
        return self.block.base_layer.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _Autocast(x, self.compute_dtype):
            y = self.block(x)
        return y.to(x.dtype)


class AdapterLayer(_AdapterShell):
    """MindPet's ``AdapterLayer``: ``x + up(non_linearity(down(x)))`` on a tensor of width ``hidden_size``.

    deltatune's bottleneck adapter (``mode="layer"``) on an identity; both projections start from
    MindSpore's ``"normal"`` N(0, 0.01²) and zero biases, as MindPet's.
    """

    def __init__(
        self,
        hidden_size: int,
        bottleneck_size: int = 64,
        non_linearity: str = "gelu",
        param_init_type: Any = torch.float32,
        compute_dtype: Any = torch.float16,
    ) -> None:
        check_positive_int("AdapterLayer.hidden_size", hidden_size)
        check_positive_int("AdapterLayer.bottleneck_size", bottleneck_size)
        nl = _non_linearity("AdapterLayer.non_linearity", non_linearity)
        super().__init__("AdapterLayer", param_init_type, compute_dtype, lambda dtype: nn.Identity())
        _apply_adapter(self, AdapterConfig(bottleneck_size=bottleneck_size, non_linearity=nl, mode="layer",
                                           hidden_size=hidden_size, target_modules=["block"]))


class AdapterDense(_AdapterShell):
    """MindPet's ``AdapterDense``: ``AdapterLayer(activation(x·Wᵀ + b))``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        weight_init: Any = "normal",
        bias_init: Any = "zeros",
        has_bias: bool = True,
        activation: Any = None,
        bottleneck_size: int = 64,
        non_linearity: str = "gelu",
        param_init_type: Any = torch.float32,
        compute_dtype: Any = torch.float16,
    ) -> None:
        _check_dense_args("AdapterDense", in_channels, out_channels, weight_init, bias_init, has_bias)
        check_positive_int("AdapterDense.bottleneck_size", bottleneck_size)
        nl = _non_linearity("AdapterDense.non_linearity", non_linearity)
        act = _activation("AdapterDense.activation", activation)
        super().__init__("AdapterDense", param_init_type, compute_dtype, lambda dtype: _ActivatedDense(
            _dense(in_channels, out_channels, weight_init, bias_init, has_bias, dtype), act))
        _apply_adapter(self, AdapterConfig(bottleneck_size=bottleneck_size, non_linearity=nl, mode="layer",
                                           hidden_size=out_channels, target_modules=["block"]))


def _apply_adapter(shell: nn.Module, config: AdapterConfig) -> None:
    apply(shell, config, freeze_base=False)
    layer = shell.block
    with torch.no_grad():
        for proj in (layer.adapter_down["default"], layer.adapter_up["default"]):
            _fill("weight_init", "normal", proj.weight)
            proj.bias.zero_()


class LowRankAdapterLayer(_AdapterShell):
    """MindPet's ``LowRankAdapterLayer``: ``x + up(non_linearity(down(x)))`` with each projection a product
    of two rank-``low_rank_size`` factors; bottleneck ``hidden_size // reduction_factor``.

    MindPet's initialisation: every factor from ``low_rank_w_init`` (no zero factor), zero biases.
    """

    def __init__(
        self,
        hidden_size: int,
        reduction_factor: int,
        low_rank_size: int = 1,
        low_rank_w_init: Any = "xavier_uniform",
        non_linearity: str = "gelu",
        param_init_type: Any = torch.float32,
        compute_dtype: Any = torch.float16,
    ) -> None:
        check_positive_int("LowRankAdapterLayer.hidden_size", hidden_size)
        config = _low_rank_config("LowRankAdapterLayer", hidden_size, reduction_factor, low_rank_size,
                                  low_rank_w_init, non_linearity)
        super().__init__("LowRankAdapterLayer", param_init_type, compute_dtype, lambda dtype: nn.Identity())
        _apply_low_rank(self, config, low_rank_w_init)


class LowRankAdapterDense(_AdapterShell):
    """MindPet's ``LowRankAdapterDense``: ``LowRankAdapterLayer(activation(x·Wᵀ + b))``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        weight_init: Any = "normal",
        bias_init: Any = "zeros",
        has_bias: bool = True,
        activation: Any = None,
        reduction_factor: int = 1,
        low_rank_size: int = 1,
        low_rank_w_init: Any = "xavier_uniform",
        non_linearity: str = "gelu",
        param_init_type: Any = torch.float32,
        compute_dtype: Any = torch.float16,
    ) -> None:
        _check_dense_args("LowRankAdapterDense", in_channels, out_channels, weight_init, bias_init, has_bias)
        act = _activation("LowRankAdapterDense.activation", activation)
        config = _low_rank_config("LowRankAdapterDense", out_channels, reduction_factor, low_rank_size,
                                  low_rank_w_init, non_linearity)
        super().__init__("LowRankAdapterDense", param_init_type, compute_dtype, lambda dtype: _ActivatedDense(
            _dense(in_channels, out_channels, weight_init, bias_init, has_bias, dtype), act))
        _apply_low_rank(self, config, low_rank_w_init)


def _low_rank_config(cls: str, hidden: int, reduction_factor: Any, low_rank_size: Any, low_rank_w_init: Any,
                     non_linearity: Any) -> LowRankAdapterConfig:
    check_positive_int(f"{cls}.reduction_factor", reduction_factor)
    check_positive_int(f"{cls}.low_rank_size", low_rank_size)
    if not isinstance(low_rank_w_init, str):
        raise DeltaConfigTypeError(
            f"{cls}.low_rank_w_init must be a str (an initializer name), got {low_rank_w_init!r} "
            f"({type(low_rank_w_init).__name__})"
        )
    _check_init_value(f"{cls}.low_rank_w_init", low_rank_w_init, (2, 2))
    nl = _non_linearity(f"{cls}.non_linearity", non_linearity)
    if reduction_factor > hidden:
        raise DeltaConfigError(
            f"{cls}.reduction_factor must be <= the hidden size {hidden}, got {reduction_factor}"
        )
    bottleneck = hidden // reduction_factor
    if low_rank_size > bottleneck:
        raise DeltaConfigError(
            f"{cls}.low_rank_size must be <= the bottleneck size {bottleneck} (hidden size {hidden} // reduction_factor "
            f"{reduction_factor}; deltatune is stricter than MindPet here), got {low_rank_size}"
        )
    return LowRankAdapterConfig(reduction_factor=reduction_factor, low_rank_size=low_rank_size, identity_init=False,
                                non_linearity=nl, mode="layer", hidden_size=hidden, target_modules=["block"])


def _apply_low_rank(shell: nn.Module, config: LowRankAdapterConfig, low_rank_w_init: str) -> None:
    apply(shell, config, freeze_base=False)
    layer = shell.block
    with torch.no_grad():
        for proj in (layer.low_rank_adapter_down["default"], layer.low_rank_adapter_up["default"]):
            _fill("low_rank_w_init", low_rank_w_init, proj.w_left)
            _fill("low_rank_w_init", low_rank_w_init, proj.w_right)
            proj.bias.zero_()


# ------------------------------------------------------------------------------------------------
# Prefix-Tuning / P-Tuning v2
# ------------------------------------------------------------------------------------------------
class PrefixLayer(nn.Module):
    """MindPet's ``PrefixLayer``: ``dropout(MLP(wte(0..prefix_token_num-1)))`` of shape
    ``(prefix_token_num, hidden_dim)``, with ``MLP = Linear(embed_dim, mid_dim) -> tanh -> Linear(mid_dim,
    hidden_dim)`` (deltatune's :class:`~deltatune.methods.prefix.PrefixEncoder`).

    As in MindPet, ``past_key_reparam`` and ``past_value_reparam`` are the same tensor. Unlike MindPet
    (which computes it once in ``__init__``), they are recomputed on access, so gradients reach the
    prefix parameters.
    """

    def __init__(
        self,
        prefix_token_num: int,
        batch_size: int,
        num_heads: int,
        hidden_dim: int,
        embed_dim: int,
        mid_dim: int = 512,
        dropout_rate: float = 0.1,
    ) -> None:
        for name, value in (("prefix_token_num", prefix_token_num), ("batch_size", batch_size),
                            ("num_heads", num_heads), ("hidden_dim", hidden_dim), ("embed_dim", embed_dim),
                            ("mid_dim", mid_dim)):
            check_positive_int(f"PrefixLayer.{name}", value)
        check_float("PrefixLayer.dropout_rate", dropout_rate, low=0.0, high=1.0, high_inclusive=False)
        if prefix_token_num % batch_size:
            raise DeltaConfigError(
                f"PrefixLayer.prefix_token_num must be a multiple of batch_size {batch_size}, got {prefix_token_num}"
            )
        super().__init__()
        self.prefix_token_num, self.batch_size, self.num_heads = prefix_token_num, batch_size, num_heads
        self.hidden_dim, self.embed_dim, self.mid_dim = hidden_dim, embed_dim, mid_dim
        self.prefix_encoder = _PrefixEncoder(prefix_token_num, embed_dim, hidden_dim, mid_dim)
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self) -> torch.Tensor:
        """The prefix ``(prefix_token_num, hidden_dim)`` (key and value alike)."""
        return self.dropout(self.prefix_encoder())

    @property
    def past_key_reparam(self) -> torch.Tensor:
        """The key prefix (the same values as :attr:`past_value_reparam`, as in MindPet)."""
        return self.forward()

    @property
    def past_value_reparam(self) -> torch.Tensor:
        """The value prefix."""
        return self.forward()


class PrefixEncoder(nn.Module):
    """MindPet's P-Tuning v2 ``PrefixEncoder``: ``forward(batch_size)`` returns ``num_layers`` tensors of shape
    ``(2, batch_size, num_heads, pre_seq_len, kv_channels)`` (key and value of each layer, ``out_perm``
    as MindPet's), from an embedding of ``pre_seq_len x (num_layers·2·num_heads·kv_channels)``, optionally
    through ``Linear(E, projection_dim) -> tanh -> Linear(projection_dim, E)`` (``prefix_projection``).

    ``prefix_projection`` must be a bool (deltatune is stricter than MindPet, which takes any truthy value).
    """

    def __init__(
        self,
        pre_seq_len: int,
        num_layers: int,
        num_heads: int,
        kv_channels: int,
        prefix_projection: bool,
        projection_dim: int,
        dropout_prob: float,
        out_perm: Sequence[int] = (2, 0, 3, 1, 4),
    ) -> None:
        for name, value in (("pre_seq_len", pre_seq_len), ("num_layers", num_layers), ("num_heads", num_heads),
                            ("kv_channels", kv_channels)):
            check_positive_int(f"PrefixEncoder.{name}", value)
        check_float("PrefixEncoder.dropout_prob", dropout_prob, low=0.0, high=1.0, high_inclusive=False)
        if not isinstance(prefix_projection, bool):
            raise DeltaConfigTypeError(
                f"PrefixEncoder.prefix_projection must be a bool (deltatune is stricter than MindPet here), got "
                f"{prefix_projection!r} ({type(prefix_projection).__name__})"
            )
        if prefix_projection:
            check_positive_int("PrefixEncoder.projection_dim", projection_dim)
        perm = tuple(out_perm)
        if sorted(perm) != [0, 1, 2, 3, 4]:
            raise DeltaConfigError(f"PrefixEncoder.out_perm must be a permutation of (0, 1, 2, 3, 4), got {out_perm!r}")
        super().__init__()
        self.pre_seq_len, self.num_layers, self.num_heads, self.kv_channels = (
            pre_seq_len, num_layers, num_heads, kv_channels)
        self.prefix_projection, self.out_perm = prefix_projection, perm
        out_dim = num_layers * kv_channels * num_heads * 2
        self.ptuning_encoder = _PrefixEncoder(pre_seq_len, out_dim, out_dim, projection_dim if prefix_projection else None)
        self.dropout = nn.Dropout(dropout_prob)

    def forward(self, batch_size: int, dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, ...]:
        """``num_layers`` tensors ``(2, batch_size, num_heads, pre_seq_len, kv_channels)`` in ``dtype``."""
        check_positive_int("batch_size", batch_size)
        prefix = self.ptuning_encoder().to(dtype)  # (pre_seq_len, E)
        pkv = prefix.unsqueeze(0).expand(batch_size, -1, -1)
        pkv = pkv.reshape(batch_size, self.pre_seq_len, self.num_layers * 2, self.num_heads, self.kv_channels)
        pkv = self.dropout(pkv).permute(*self.out_perm)
        return tuple(pkv.split(2, dim=0))


# ------------------------------------------------------------------------------------------------
# R-Drop
# ------------------------------------------------------------------------------------------------
class RDropLoss(nn.Module):
    """MindPet's ``RDropLoss``: ``loss(logits, label_ids, alpha=4)`` with ``logits`` ``(2B, C)`` from an
    :func:`rdrop_repeat` batch: ``CE + alpha/4 · Σ_batch (KL(P1‖P2) + KL(P2‖P1))`` (deltatune's
    :class:`~deltatune.methods.rdrop.RDropLoss` with its default ``kl_reduction="sum"``). As in MindPet
    the KL targets get no gradient (``kl_target_grad=False``: MindSpore's ``KLDivLoss`` passes none).
    ``alpha`` must be >= 0 (deltatune is stricter than MindPet here)."""

    def forward(self, logits: torch.Tensor, label_ids: torch.Tensor, alpha: float = 4) -> torch.Tensor:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise DeltaConfigTypeError(f"RDropLoss alpha must be an int or a float, got {alpha!r} ({type(alpha).__name__})")
        if alpha < 0:
            raise DeltaConfigError(f"RDropLoss alpha must be >= 0 (deltatune is stricter than MindPet here), got {alpha}")
        check_type("label_ids", label_ids, torch.Tensor, "a tensor")
        loss = _RDropLoss(alpha=float(alpha), layout="interleave", shift_labels=False, kl_reduction="sum",
                          kl_target_grad=False)
        return loss(logits, label_ids.reshape(-1))


def rdrop_repeat(*items: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every tensor with each row twice, interleaved (``x0, x0, x1, x1, ...``), as MindPet's ``rdrop_repeat``."""
    for i, item in enumerate(items):
        check_type(f"rdrop_repeat item {i}", item, torch.Tensor, "a tensor")
        if item.dim() == 0:
            raise DeltaConfigError(f"rdrop_repeat item {i} must have a batch dimension, got a 0-d tensor")
    return tuple(item.repeat_interleave(2, dim=0) for item in items)


# ------------------------------------------------------------------------------------------------
# freezing and checkpoints
# ------------------------------------------------------------------------------------------------
def freeze_delta(
    model: nn.Module,
    mode: str,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
) -> None:
    """MindPet's ``freeze_delta``: freeze everything except the delta parameters of ``mode`` (one of
    :data:`DELTA_LIST`), then freeze the parameters matching ``include`` and unfreeze those matching
    ``exclude`` (shell wildcards over parameter names).

    ``mode="bitfit"`` on a model without deltatune's BitFit applied trains every parameter whose name ends
    in ``bias``, as MindPet does (with BitFit applied, its selected biases). Patterns must each match a
    parameter and not both lists (deltatune is stricter than MindPet, which ignores such patterns).
    """
    check_type("model", model, nn.Module, "a torch.nn.Module")
    if not isinstance(mode, str) or mode.lower() not in _MODES:
        raise DeltaConfigError(f"mode must be a str from {DELTA_LIST}, got {mode!r}")
    for label, pats in (("include", include), ("exclude", exclude)):
        if pats is not None and (not isinstance(pats, list) or not all(isinstance(p, str) for p in pats)):
            raise DeltaConfigTypeError(f"{label} must be a list of str, got {pats!r}")
    method = _MODES[mode.lower()]
    include, exclude = include or None, exclude or None
    has_bitfit = any(r.method == "bitfit" for r in get_records(model).values())
    if method != "bitfit" or has_bitfit:
        _freeze_delta(model, method, include=include, exclude=exclude)
        return
    params = dict(model.named_parameters())
    biases = [n for n in params if re.fullmatch(r".*bias", logical_param_name(n))]
    if not biases:
        raise DeltaConfigError(
            f"mode 'bitfit' trains every bias, but {type(model).__name__} has no parameter named '*bias'"
        )
    # check the patterns before anything changes (as the core freeze_delta does)
    from ..freeze import _matches

    for label, pats in (("include", include or []), ("exclude", exclude or [])):
        for p in pats:
            if not any(_matches(n, p) for n in params):
                raise DeltaConfigError(f"{label} pattern {p!r} matches no parameter of {type(model).__name__}")
    both = [n for n in params if any(_matches(n, p) for p in include or []) and any(_matches(n, p) for p in exclude or [])]
    if both:
        raise DeltaConfigError(f"parameters {both[:5]} match both include and exclude; a parameter can only be in one")
    for n, p in params.items():
        if any(_matches(n, pat) for pat in include or []):
            p.requires_grad_(False)
        elif any(_matches(n, pat) for pat in exclude or []):
            p.requires_grad_(True)
        else:
            p.requires_grad_(n in biases)


class CheckpointConfig:
    """The options of MindSpore's ``CheckpointConfig`` that :class:`TrainableParamsCheckPoint` honours.

    Args:
        save_checkpoint_steps: save every this many optimiser steps (positive int; MindSpore's default 1).
        keep_checkpoint_max: keep at most this many files written by the callback (positive int, default 5);
            older ones it wrote are deleted.
    """

    def __init__(self, save_checkpoint_steps: int = 1, keep_checkpoint_max: int = 5) -> None:
        self.save_checkpoint_steps = check_positive_int("CheckpointConfig.save_checkpoint_steps", save_checkpoint_steps)
        self.keep_checkpoint_max = check_positive_int("CheckpointConfig.keep_checkpoint_max", keep_checkpoint_max)


class TrainableParamsCheckPoint(TrainerCallback):
    """MindPet's ``TrainableParamsCheckPoint(directory, prefix="DELTA_CKP", config=None)`` as a
    :class:`deltatune.TrainerCallback`: every ``config.save_checkpoint_steps`` steps it writes the model's
    trainable parameters only (logical names, safetensors) to ``<directory>/<prefix>-<epoch>_<step>.safetensors``
    (``epoch`` 1-based, ``step`` the global optimiser step), atomically, and keeps the newest
    ``config.keep_checkpoint_max`` of the files it wrote.

    ``directory`` must be a non-empty absolute path that is not a symbolic link (MindPet's rules).
    """

    def __init__(self, directory: str | os.PathLike, prefix: str = "DELTA_CKP", config: CheckpointConfig | None = None) -> None:
        if directory is None or directory == "":
            raise DeltaConfigError("TrainableParamsCheckPoint.directory is required, got " + repr(directory))
        check_type("TrainableParamsCheckPoint.directory", directory, (str, os.PathLike), "a path")
        path = Path(directory)
        if path.is_symlink():
            raise DeltaConfigError(f"TrainableParamsCheckPoint.directory must not be a link path, got {str(path)!r}")
        if not path.is_absolute():
            raise DeltaConfigError(f"TrainableParamsCheckPoint.directory must be an absolute path, got {str(path)!r}")
        check_type("TrainableParamsCheckPoint.prefix", prefix, str, "a non-empty str without '/'")
        if not prefix or "/" in prefix or os.sep in prefix:
            raise DeltaConfigError(f"TrainableParamsCheckPoint.prefix must be a non-empty str without '/', got {prefix!r}")
        if config is not None:
            check_type("TrainableParamsCheckPoint.config", config, CheckpointConfig, "a CheckpointConfig")
        self.directory, self.prefix = path, prefix
        self.config = config or CheckpointConfig()
        self.written: list[Path] = []

    def state_dict_of(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The trainable parameters of ``model`` by logical name (shared ones once)."""
        out: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for name, p in model.named_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out[logical_param_name(name)] = p.detach().to("cpu").contiguous().clone()
        return out

    def save(self, model: nn.Module, epoch: int, step: int) -> Path:
        """Write the trainable parameters now; returns the file."""
        from safetensors.torch import save as st_save

        from ..io_utils import atomic_write_bytes

        state = self.state_dict_of(model)
        if not state:
            raise DeltaConfigError("TrainableParamsCheckPoint: the model has no trainable parameter to save")
        path = self.directory / f"{self.prefix}-{epoch}_{step}.safetensors"
        atomic_write_bytes(path, st_save(state, metadata={"format": "pt", "epoch": str(epoch), "step": str(step)}))
        if path in self.written:
            self.written.remove(path)
        self.written.append(path)
        while len(self.written) > self.config.keep_checkpoint_max:
            old = self.written.pop(0)
            old.unlink(missing_ok=True)
        return path

    def on_step_end(self, trainer: Any) -> None:
        st = trainer.state
        if st.step % self.config.save_checkpoint_steps == 0 and getattr(trainer, "is_main", True):
            # the 1-based epoch the step belongs to (the last step of an epoch has already moved the counter on)
            epoch = st.epoch if st.batches_in_epoch == 0 and st.epoch > 0 else st.epoch + 1
            self.save(trainer.model, epoch, st.step)
