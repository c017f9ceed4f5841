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

This module holds the ``mindpet.delta`` cells; MindPet's argument rules are in
:mod:`.mindpet_checks`, and ``mindpet.graph``'s :func:`freeze_delta` and
:class:`TrainableParamsCheckPoint` in :mod:`.mindpet_graph` (re-exported here).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from ..api import apply
from ..errors import DeltaConfigError, DeltaConfigTypeError
from ..methods.adapter import AdapterConfig
from ..methods.lora import LoraConfig
from ..methods.low_rank_adapter import LowRankAdapterConfig
from ..methods.prefix import PrefixEncoder as _PrefixEncoder
from ..methods.rdrop import RDropLoss as _RDropLoss
from ..validation import check_float, check_positive_int, check_type
from .mindpet_checks import (
    ActivatedDense,
    Autocast,
    check_dense_args,
    check_dtype,
    check_init_value,
    fill_init,
    make_activation,
    make_dense,
    non_linearity_name,
)
from .mindpet_graph import DELTA_LIST, CheckpointConfig, TrainableParamsCheckPoint, freeze_delta

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
        check_dense_args("LoRADense", in_channels, out_channels, weight_init, bias_init, has_bias)
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
        check_init_value("LoRADense.lora_a_init", lora_a_init, (lora_rank, in_channels))
        check_init_value("LoRADense.lora_b_init", lora_b_init, (out_channels, lora_rank))
        self.param_init_type = check_dtype("LoRADense.param_init_type", param_init_type)
        self.compute_dtype = check_dtype("LoRADense.compute_dtype", compute_dtype)
        act = make_activation("LoRADense.activation", activation)
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.lora_rank, self.lora_alpha = lora_rank, lora_alpha
        self.dense = make_dense(in_channels, out_channels, weight_init, bias_init, has_bias, self.param_init_type)
        self.activation = act
        apply(self, LoraConfig(r=lora_rank, alpha=float(lora_alpha), dropout=lora_dropout, target_modules=["dense"]),
              freeze_base=False)
        fill_init("lora_a_init", lora_a_init, self.mindpet_delta_lora_a)
        fill_init("lora_b_init", lora_b_init, self.mindpet_delta_lora_b)

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
        with Autocast(x, self.compute_dtype):
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
        pit = check_dtype(f"{cls}.param_init_type", param_init_type)
        cdt = check_dtype(f"{cls}.compute_dtype", compute_dtype)
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
        with Autocast(x, self.compute_dtype):
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
        nl = non_linearity_name("AdapterLayer.non_linearity", non_linearity)
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
        check_dense_args("AdapterDense", in_channels, out_channels, weight_init, bias_init, has_bias)
        check_positive_int("AdapterDense.bottleneck_size", bottleneck_size)
        nl = non_linearity_name("AdapterDense.non_linearity", non_linearity)
        act = make_activation("AdapterDense.activation", activation)
        super().__init__("AdapterDense", param_init_type, compute_dtype, lambda dtype: ActivatedDense(
            make_dense(in_channels, out_channels, weight_init, bias_init, has_bias, dtype), act))
        _apply_adapter(self, AdapterConfig(bottleneck_size=bottleneck_size, non_linearity=nl, mode="layer",
                                           hidden_size=out_channels, target_modules=["block"]))


def _apply_adapter(shell: nn.Module, config: AdapterConfig) -> None:
    apply(shell, config, freeze_base=False)
    layer = shell.block
    with torch.no_grad():
        for proj in (layer.adapter_down["default"], layer.adapter_up["default"]):
            fill_init("weight_init", "normal", proj.weight)
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
        check_dense_args("LowRankAdapterDense", in_channels, out_channels, weight_init, bias_init, has_bias)
        act = make_activation("LowRankAdapterDense.activation", activation)
        config = _low_rank_config("LowRankAdapterDense", out_channels, reduction_factor, low_rank_size,
                                  low_rank_w_init, non_linearity)
        super().__init__("LowRankAdapterDense", param_init_type, compute_dtype, lambda dtype: ActivatedDense(
            make_dense(in_channels, out_channels, weight_init, bias_init, has_bias, dtype), act))
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
    check_init_value(f"{cls}.low_rank_w_init", low_rank_w_init, (2, 2))
    nl = non_linearity_name(f"{cls}.non_linearity", non_linearity)
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
            fill_init("low_rank_w_init", low_rank_w_init, proj.w_left)
            fill_init("low_rank_w_init", low_rank_w_init, proj.w_right)
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
