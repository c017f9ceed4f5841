"""Prefix-Tuning (Li & Liang, 2021): trainable key/value prefixes for every attention layer.

Each adapter owns a :class:`PrefixEncoder` that produces ``num_tokens`` key/value vectors for every
layer, i.e. a ``(num_tokens, num_layers * 2 * num_kv_heads * head_dim)`` tensor. With
``reparameterize=True`` the prefix is an embedding of ``num_tokens x hidden_size`` passed through an
MLP (``Linear(hidden, mid_dim) -> tanh -> Linear(mid_dim, L * 2 * kv)``), as in the paper; after
training :func:`fold_prefix` / :func:`fold` replace the MLP by the tensor it computes, so inference
stores only the prefixes (outputs are bit for bit the same).

Mechanism: the encoders live in one :class:`PrefixHolder` attached to the model
(``model.prefix_encoder``; its parameters are ``prefix_encoder.<adapter>.embedding.weight`` and so
on). A forward pre-hook, while an adapter of the holder is active and adapters are not disabled,

1. prepends the prefix key/values into the cache, the forward argument ``cache`` (transformers >= 5.24)
   or ``past_key_values`` (older; see :mod:`deltatune.hf_cache`; either name is accepted from the
   caller and passed on under the one the model takes): with no cache (training, first decoding
   step) a :class:`~transformers.DynamicCache` pre-filled with the prefix is created; an empty cache
   (the one ``generate`` creates) is filled; a cache that already holds the prefix (later decoding
   steps, beam search) is left alone. The cache is marked with the adapters it holds, and a cache
   with tokens but without the prefix is refused;
2. prepends ``num_tokens`` ones to ``attention_mask`` (creating an all-ones mask when none is given);
3. passes explicit ``position_ids`` so the prefix does not shift token positions: for causal models
   ``cumsum(attention_mask) - 1`` over the real tokens (what ``generate`` does), for bidirectional
   encoders (BERT) the model's own default ``0 .. T-1``; explicit ``position_ids`` are kept;
4. leaves labels and the loss alone (the prefix lives in the cache, so it produces no logits) and
   drops the returned cache again when the caller did not ask for one (``use_cache=False``).

The hook sits on the model itself when its forward takes the cache (causal LMs, and task heads that
pass ``**kwargs`` on to their backbone); otherwise (task heads of transformers 4.x such as
``BertForSequenceClassification``) on its backbone ``model.base_model``, which does.

Several active adapters (also of P-Tuning v2, which shares this machinery) contribute their prefixes
one after the other. Gradient checkpointing is refused in training: transformers drops the cache in
checkpointed layers, which would silently drop the prefix.

This module owns :class:`PrefixConfig`, the Prefix-Tuning holder and method, the machinery shared with
P-Tuning v2 (:class:`PrefixMethodBase`) and folding; the model parts (geometry, encoder, holder base) are
in :mod:`deltatune.methods.prefix_parts`, the hooks in :mod:`deltatune.methods.prefix_hooks`.
"""


from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..delta_layer import get_records
from ..errors import AdapterNotFoundError, DeltaConfigError, DeltaConfigTypeError, UnsupportedModuleError
from ..validation import check_bool, check_float, check_positive_int
from .base import DeltaConfig, DeltaMethod
from .prefix_hooks import holders, install_hooks, remove_hooks
from .prefix_parts import (
    PrefixEncoder,
    PrefixGeometry,
    PrefixHolder,
    hook_target,
    prefix_geometry,
    reject_module_fields,
)

__all__ = [
    "METHOD",
    "PrefixConfig",
    "PrefixEncoder",
    "PrefixGeometry",
    "PrefixHolder",
    "PrefixMethod",
    "PrefixMethodBase",
    "PrefixTuningHolder",
    "fold",
    "fold_prefix",
    "hook_target",
    "prefix_geometry",
    "reject_module_fields",
]


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class PrefixConfig(DeltaConfig):
    """Prefix-Tuning hyper-parameters.

    Attributes:
        prefix_token_num: number of prefix positions per layer (positive int).
        mid_dim: hidden size of the reparameterisation MLP (positive int).
        dropout: dropout probability on the prefix key/values in training, in [0, 1).
        reparameterize: train the prefix through the MLP (the paper's recipe); ``False`` trains the
            key/value prefixes directly (what :func:`fold_prefix` turns an adapter into).
        modules_to_save: modules trained in full alongside (e.g. ``["classifier"]``); the
            module-selection fields (``target_modules`` ...) must stay ``None``.
    """

    method: ClassVar[str] = "prefix"

    prefix_token_num: int = 10
    mid_dim: int = 512
    dropout: float = 0.0
    reparameterize: bool = True

    def validate(self) -> None:
        super().validate()
        check_positive_int("PrefixConfig.prefix_token_num", self.prefix_token_num)
        check_positive_int("PrefixConfig.mid_dim", self.mid_dim)
        self.dropout = check_float("PrefixConfig.dropout", self.dropout, low=0.0, high=1.0, high_inclusive=False)
        check_bool("PrefixConfig.reparameterize", self.reparameterize)
        reject_module_fields(self, "prefix-tuning")


# ---------------------------------------------------------------------------------------------
# holder
# ---------------------------------------------------------------------------------------------
class PrefixTuningHolder(PrefixHolder):
    """``model.prefix_encoder``: the Prefix-Tuning adapters."""

    method_name = "prefix"
    holder_attr = "prefix_encoder"

    def build_encoder(self, config: DeltaConfig, device: torch.device | None) -> PrefixEncoder:
        assert isinstance(config, PrefixConfig)
        g = self.geometry
        if config.reparameterize:
            return PrefixEncoder(config.prefix_token_num, g.hidden_size, g.out_dim, config.mid_dim, device=device)
        return PrefixEncoder(config.prefix_token_num, g.out_dim, g.out_dim, device=device)

    def dropout_of(self, config: DeltaConfig) -> float:
        assert isinstance(config, PrefixConfig)
        return config.dropout

    def folded_config(self, config: DeltaConfig) -> DeltaConfig:
        assert isinstance(config, PrefixConfig)
        return config.replace(reparameterize=False)


# ---------------------------------------------------------------------------------------------
# method
# ---------------------------------------------------------------------------------------------
class PrefixMethodBase(DeltaMethod):
    """Model-level apply/remove shared by Prefix-Tuning and P-Tuning v2."""

    holder_cls: ClassVar[type[PrefixHolder]] = PrefixHolder
    display_name: ClassVar[str] = "prefix-tuning"

    def _device(self, model: nn.Module) -> torch.device | None:
        get_emb = getattr(model, "get_input_embeddings", None)
        emb = get_emb() if callable(get_emb) else None
        weight = getattr(emb, "weight", None)
        if isinstance(weight, torch.Tensor):
            return weight.device
        p = next(model.parameters(), None)
        return p.device if p is not None else None

    def apply(self, model: nn.Module, config: DeltaConfig, adapter_name: str) -> list[str]:
        """Attach (or extend) ``model.<holder_attr>`` with adapter ``adapter_name`` and install the hooks."""
        if not isinstance(config, self.config_cls):
            raise DeltaConfigTypeError(
                f"config must be a {self.config_cls.__name__} for method {self.name!r}, got {type(config).__name__}"
            )
        geometry = prefix_geometry(model, self.display_name)
        self.holder_cls.check_name(adapter_name)
        attr = self.holder_cls.holder_attr
        existing = model._modules.get(attr)
        if existing is None and attr in model.__dict__:
            raise DeltaConfigError(f"the model already has a non-module attribute {attr!r}; cannot attach {self.name!r}")
        if existing is not None and not isinstance(existing, (self.holder_cls, nn.Identity)):
            raise DeltaConfigError(
                f"the model already has a module {attr!r} of type {type(existing).__name__}; cannot attach {self.name!r}"
            )
        if isinstance(existing, self.holder_cls):
            holder = existing
        else:  # none, or the placeholder that deltatune.unload leaves behind
            holder = self.holder_cls(geometry)
        holder.add_adapter(adapter_name, config, device=self._device(model))
        if holder is not existing:
            setattr(model, attr, holder)
        holder.train(model.training)  # new modules start in training mode; follow the model
        install_hooks(model)
        return [attr]

    def remove(self, model: nn.Module, adapter_name: str) -> None:
        """Delete the adapter's encoder; drop the holder and the hooks when nothing is left."""
        attr = self.holder_cls.holder_attr
        holder = model._modules.get(attr)
        if not isinstance(holder, self.holder_cls) or adapter_name not in holder.adapter_names:
            return
        holder.delete_adapter(adapter_name)
        if not holder.adapter_names:
            delattr(model, attr)
        if not holders(model):
            remove_hooks(model)

    def check_module(self, slot: Any, config: DeltaConfig) -> None:  # pragma: no cover - apply is overridden
        """Never used: prefix methods hook the model instead of wrapping modules."""
        raise UnsupportedModuleError(f"method {self.name!r} does not wrap modules; it hooks the whole model")


class PrefixMethod(PrefixMethodBase):
    """Registry entry for Prefix-Tuning."""

    name = "prefix"
    config_cls = PrefixConfig
    layer_cls = None
    delta_prefixes = ("prefix_",)
    mergeable = False
    holder_cls = PrefixTuningHolder
    display_name = "prefix-tuning"


# ---------------------------------------------------------------------------------------------
# folding
# ---------------------------------------------------------------------------------------------
def fold_prefix(model: nn.Module, name: str = "default") -> None:
    """Replace adapter ``name``'s reparameterisation MLP by the prefix it computes.

    Works for Prefix-Tuning and P-Tuning v2 (``prefix_projection``) adapters; outputs are unchanged
    and only ``prefix_token_num * num_layers * 2 * kv_dim`` parameters remain. The adapter's config
    becomes the one that builds the folded structure (``reparameterize=False`` /
    ``prefix_projection=False``), so :func:`deltatune.save_delta` / ``load_delta`` round-trip it.
    Folding an already folded adapter does nothing.
    """
    records = get_records(model)
    if name not in records:
        raise AdapterNotFoundError(f"adapter {name!r} not found on the model; adapters: {sorted(records)}")
    record = records[name]
    holder = next((h for h in holders(model) if name in h.adapter_names and h.method_name == record.method), None)
    if holder is None:
        raise DeltaConfigError(
            f"adapter {name!r} is a {record.method!r} adapter; only prefix and ptuning_v2 adapters can be folded"
        )
    holder.encoder(name).fold()
    record.config = holder.folded_config(record.config)


def fold(model: nn.Module) -> nn.Module:
    """Fold every Prefix-Tuning / P-Tuning v2 adapter on the model (see :func:`fold_prefix`); returns it."""
    for holder in holders(model):
        for name in list(holder.adapter_names):
            fold_prefix(model, name)
    return model


METHOD = PrefixMethod()
