"""P-Tuning v2 (Liu et al., 2022): deep prompt tuning with key/value prefixes in every layer.

The prefix is either an embedding of ``pre_seq_len x (num_layers * 2 * kv_dim)`` trained directly
(``prefix_projection=False``, the paper's default), or an embedding of ``pre_seq_len x hidden_size``
reparameterised through ``Linear(hidden, projection_dim) -> tanh -> Linear(projection_dim,
num_layers * 2 * kv_dim)``. Dropout applies to the prefix key/values in training.

Everything else (cache pre-filling, attention mask, positions, generation, folding) is the
Prefix-Tuning machinery of :mod:`deltatune.methods.prefix`; the encoders live in
``model.ptuning_encoder`` (parameters ``ptuning_encoder.<adapter>.embedding.weight`` ...).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ..validation import check_bool, check_float, check_positive_int
from .base import DeltaConfig
from .prefix import PrefixMethodBase
from .prefix_parts import PrefixEncoder, PrefixHolder, reject_module_fields

__all__ = ["METHOD", "PTuningV2Config", "PTuningV2Holder", "PTuningV2Method", "PrefixEncoder"]


@dataclasses.dataclass
class PTuningV2Config(DeltaConfig):
    """P-Tuning v2 hyper-parameters.

    Attributes:
        pre_seq_len: number of prefix positions per layer (positive int).
        prefix_projection: reparameterise the prefix through a two-layer MLP.
        projection_dim: hidden size of that MLP (positive int; used when ``prefix_projection``).
        dropout: dropout probability on the prefix key/values in training, in [0, 1).
        modules_to_save: modules trained in full alongside (e.g. ``["classifier"]``); the
            module-selection fields (``target_modules`` ...) must stay ``None``.
    """

    method: ClassVar[str] = "ptuning_v2"

    pre_seq_len: int = 16
    prefix_projection: bool = False
    projection_dim: int = 512
    dropout: float = 0.1

    def validate(self) -> None:
        super().validate()
        check_positive_int("PTuningV2Config.pre_seq_len", self.pre_seq_len)
        check_bool("PTuningV2Config.prefix_projection", self.prefix_projection)
        check_positive_int("PTuningV2Config.projection_dim", self.projection_dim)
        self.dropout = check_float("PTuningV2Config.dropout", self.dropout, low=0.0, high=1.0, high_inclusive=False)
        reject_module_fields(self, "P-Tuning v2")


class PTuningV2Holder(PrefixHolder):
    """``model.ptuning_encoder``: the P-Tuning v2 adapters."""

    method_name = "ptuning_v2"
    holder_attr = "ptuning_encoder"

    def build_encoder(self, config: DeltaConfig, device: torch.device | None) -> PrefixEncoder:
        assert isinstance(config, PTuningV2Config)
        g = self.geometry
        if config.prefix_projection:
            return PrefixEncoder(config.pre_seq_len, g.hidden_size, g.out_dim, config.projection_dim, device=device)
        return PrefixEncoder(config.pre_seq_len, g.out_dim, g.out_dim, device=device)

    def dropout_of(self, config: DeltaConfig) -> float:
        assert isinstance(config, PTuningV2Config)
        return config.dropout

    def folded_config(self, config: DeltaConfig) -> DeltaConfig:
        assert isinstance(config, PTuningV2Config)
        return config.replace(prefix_projection=False)


class PTuningV2Method(PrefixMethodBase):
    """Registry entry for P-Tuning v2."""

    name = "ptuning_v2"
    config_cls = PTuningV2Config
    layer_cls = None
    delta_prefixes = ("ptuning_",)
    mergeable = False
    holder_cls = PTuningV2Holder
    display_name = "P-Tuning v2"


METHOD = PTuningV2Method()
