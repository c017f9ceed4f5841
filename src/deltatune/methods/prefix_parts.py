"""The model side of the prefix methods (Prefix-Tuning, P-Tuning v2): the prefix geometry of a
transformers model, the module the prefix hooks sit on, the :class:`PrefixEncoder` that produces one
adapter's prefix, and the :class:`PrefixHolder` (``model.prefix_encoder`` ...) that keeps the encoders.

How the prefix reaches the attention layers is in :mod:`deltatune.methods.prefix_hooks`; the configs and
methods are in :mod:`deltatune.methods.prefix` and :mod:`deltatune.methods.ptuning_v2`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..delta_layer import DeltaLayer
from ..errors import AdapterNotFoundError, DeltaConfigError, UnsupportedModuleError
from ..hf_cache import CACHE_NAMES, declared_cache_arg, takes_var_kwargs
from .base import DeltaConfig

__all__ = [
    "PrefixEncoder",
    "PrefixGeometry",
    "PrefixHolder",
    "hook_target",
    "prefix_geometry",
    "reject_module_fields",
]


def reject_module_fields(config: DeltaConfig, what: str) -> None:
    """Prefix methods adapt every attention layer: module-selection fields must stay unset."""
    name = type(config).__name__
    for fname in ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"):
        value = getattr(config, fname)
        if value is not None:
            raise DeltaConfigError(
                f"{name}.{fname} must be None ({what} adds prefixes to every attention layer), got {value!r}"
            )



# ---------------------------------------------------------------------------------------------
# model geometry
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PrefixGeometry:
    """What the prefix must look like for one model."""

    model_type: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    causal: bool

    @property
    def kv_dim(self) -> int:
        """``num_kv_heads * head_dim``: the width of one layer's key (or value) per position."""
        return self.num_kv_heads * self.head_dim

    @property
    def out_dim(self) -> int:
        """Width of one prefix position over all layers: ``num_layers * 2 * kv_dim``."""
        return self.num_layers * 2 * self.kv_dim


def _int_attr(cfg: Any, name: str) -> int | None:
    value = getattr(cfg, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def prefix_geometry(model: nn.Module, method: str = "prefix-tuning") -> PrefixGeometry:
    """The layer count, key/value heads, head size and causality of a transformers model.

    Raises :class:`UnsupportedModuleError` (naming the model type) when the model's config lacks
    ``num_hidden_layers`` / ``num_attention_heads`` / ``hidden_size``, for encoder-decoder models,
    and for models whose cache has sliding-window or linear-attention layers (they would drop or
    not hold the prefix).
    """
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None) or "unknown"
    where = f"model type {model_type!r} ({type(model).__name__})"
    if cfg is None:
        raise UnsupportedModuleError(
            f"{method} needs a transformers model with a config (num_hidden_layers, num_attention_heads); "
            f"{type(model).__name__} has no config"
        )
    for attr in ("num_hidden_layers", "num_attention_heads", "hidden_size"):
        if _int_attr(cfg, attr) is None:
            raise UnsupportedModuleError(
                f"{method} does not support {where}: its config has no positive int {attr} "
                f"(got {getattr(cfg, attr, None)!r}); unsupported architecture"
            )
    if getattr(cfg, "is_encoder_decoder", False):
        raise UnsupportedModuleError(
            f"{method} does not support encoder-decoder {where}; supported: decoder-only and encoder-only models"
        )
    if hook_target(model) is None:
        raise UnsupportedModuleError(
            f"{method} does not support {where}: neither its forward nor its base model's takes a cache "
            f"({' / '.join(CACHE_NAMES)})"
        )
    # transformers is imported on first use: importing it costs more than all of ``import deltatune``
    from transformers import DynamicCache

    try:
        probe = DynamicCache(config=cfg)
    except Exception as e:  # pragma: no cover - depends on the transformers version / config
        raise UnsupportedModuleError(f"{method} cannot build a key/value cache for {where}: {e}") from None
    for i, layer in enumerate(probe.layers):
        if getattr(layer, "is_sliding", False) or type(layer).__name__ != "DynamicLayer":
            raise UnsupportedModuleError(
                f"{method} does not support {where}: cache layer {i} is {type(layer).__name__} "
                f"(sliding-window or linear attention would drop the prefix)"
            )
    heads = cfg.num_attention_heads
    kv_heads = _int_attr(cfg, "num_key_value_heads") or heads
    head_dim = _int_attr(cfg, "head_dim") or cfg.hidden_size // heads
    causal = any(getattr(m, "is_causal", None) is True for m in model.modules())
    return PrefixGeometry(model_type, cfg.num_hidden_layers, kv_heads, head_dim, cfg.hidden_size, causal)


def hook_target(model: nn.Module) -> nn.Module | None:
    """The module whose forward receives the prefix cache: ``model`` when its forward takes the cache
    (declared, or passed on through ``**kwargs``), else ``model.base_model`` when that one declares it;
    None when neither does."""
    if not hasattr(model, "forward"):
        return None
    if declared_cache_arg(model) is not None or takes_var_kwargs(model):
        return model
    base = getattr(model, "base_model", None)
    if isinstance(base, nn.Module) and base is not model and declared_cache_arg(base) is not None:
        return base
    return None


# ---------------------------------------------------------------------------------------------
# encoder and holder
# ---------------------------------------------------------------------------------------------
class PrefixEncoder(nn.Module):
    """Produces the ``(num_tokens, out_dim)`` prefix of one adapter.

    ``embedding`` is ``num_tokens x embed_dim``; with ``mid_dim`` set, ``mlp`` maps it through
    ``Linear(embed_dim, mid_dim) -> tanh -> Linear(mid_dim, out_dim)``; without it ``embed_dim``
    must equal ``out_dim`` and the embedding is the prefix itself.
    """

    def __init__(
        self,
        num_tokens: int,
        embed_dim: int,
        out_dim: int,
        mid_dim: int | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if mid_dim is None and embed_dim != out_dim:
            raise DeltaConfigError(
                f"PrefixEncoder embed_dim must equal out_dim ({out_dim}) without an MLP, got {embed_dim}"
            )
        kw = {"device": device, "dtype": dtype}
        self.num_tokens, self.out_dim = num_tokens, out_dim
        self.embedding = nn.Embedding(num_tokens, embed_dim, **kw)
        self.mlp: nn.Sequential | None = None
        if mid_dim is not None:
            self.mlp = nn.Sequential(nn.Linear(embed_dim, mid_dim, **kw), nn.Tanh(), nn.Linear(mid_dim, out_dim, **kw))

    @property
    def reparameterized(self) -> bool:
        """True while the prefix is computed through the MLP."""
        return self.mlp is not None

    def forward(self) -> torch.Tensor:
        """The prefix, ``(num_tokens, out_dim)``, in the parameters' dtype."""
        prefix = self.embedding.weight
        return self.mlp(prefix) if self.mlp is not None else prefix

    def fold(self) -> None:
        """Replace the MLP by the prefix it computes (exactly the same values)."""
        if self.mlp is None:
            return
        trainable = self.embedding.weight.requires_grad
        with torch.no_grad():
            prefix = self.forward().detach().clone()
        self.embedding = nn.Embedding(self.num_tokens, self.out_dim, device=prefix.device, dtype=prefix.dtype)
        with torch.no_grad():
            self.embedding.weight.copy_(prefix)
        self.embedding.weight.requires_grad_(trainable)
        self.mlp = None


class PrefixHolder(DeltaLayer):
    """Holds the prefix encoders of one method, one child module per adapter name.

    It is attached to the model as ``model.<holder_attr>`` and is a :class:`DeltaLayer` only so that
    :func:`deltatune.set_active_adapter` / :func:`deltatune.disable_adapters` reach it; it is never
    called as a module (its ``base_layer`` is an ``nn.Identity`` placeholder).
    """

    holder_attr: ClassVar[str] = ""
    config_cls: ClassVar[type[DeltaConfig]] = DeltaConfig

    def __init__(self, geometry: PrefixGeometry) -> None:
        super().__init__(nn.Identity())
        self.geometry = geometry
        self.dropout: dict[str, float] = {}

    # -- subclasses -----------------------------------------------------------------------
    def build_encoder(self, config: DeltaConfig, device: torch.device | None) -> PrefixEncoder:  # pragma: no cover
        """A new encoder for ``config`` on ``device`` (fp32 master weights)."""
        raise NotImplementedError

    def dropout_of(self, config: DeltaConfig) -> float:  # pragma: no cover - abstract
        """The prefix dropout probability ``config`` asks for."""
        raise NotImplementedError

    def folded_config(self, config: DeltaConfig) -> DeltaConfig:  # pragma: no cover - abstract
        """The config that builds the folded structure directly."""
        raise NotImplementedError

    # -- adapters -------------------------------------------------------------------------
    @classmethod
    def check_name(cls, name: str) -> None:
        """Adapter names become attribute names of the holder; refuse ones that clash."""
        reserved = ("base_layer", "geometry", "dropout", "adapter_names", "active_adapters", "disabled",
                    "merged_adapters", "training")
        if name in reserved or hasattr(cls, name):
            raise DeltaConfigError(f"adapter name {name!r} is reserved by {cls.__name__}; choose another name")

    def add_adapter(self, name: str, config: DeltaConfig, *, device: torch.device | None = None, **kwargs: Any) -> None:
        """Create adapter ``name``'s encoder from its config."""
        self.check_name(name)
        self._register_adapter(name)
        self.add_module(name, self.build_encoder(config, device))
        self.dropout[name] = self.dropout_of(config)

    def _delete_extra(self, name: str) -> None:
        del self._modules[name]
        self.dropout.pop(name, None)

    def encoder(self, name: str) -> PrefixEncoder:
        """Adapter ``name``'s encoder."""
        if name not in self.adapter_names:
            raise AdapterNotFoundError(f"adapter {name!r} not found; this {type(self).__name__} has {self.adapter_names}")
        return self._modules[name]  # type: ignore[return-value]

    def num_tokens(self, name: str) -> int:
        """Prefix length of adapter ``name``."""
        return self.encoder(name).num_tokens

    def prefix(self, name: str, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
        """Adapter ``name``'s prefix for a batch: ``(batch, num_tokens, out_dim)`` in ``dtype``."""
        states = self.encoder(name)().to(dtype)
        states = states.unsqueeze(0).expand(batch_size, -1, -1)
        p = self.dropout.get(name, 0.0)
        if p > 0 and self.training:
            states = F.dropout(states, p, training=True)
        return states

    def delta_forward(self, active: list[str], *args: Any, **kwargs: Any) -> Any:  # pragma: no cover
        raise RuntimeError(f"{type(self).__name__} is not called as a module; the model's forward hook uses it")

    def extra_repr(self) -> str:
        g = self.geometry
        return (
            f"{super().extra_repr()}, layers={g.num_layers}, kv_heads={g.num_kv_heads}, head_dim={g.head_dim}"
        )
