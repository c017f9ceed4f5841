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
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import AdapterNotFoundError, DeltaConfigError, DeltaConfigTypeError, UnsupportedModuleError
from ..hf_cache import (
    CACHE_NAMES,
    cache_arg,
    declared_cache_arg,
    output_field,
    take_cache,
    takes_var_kwargs,
    without_cache,
)
from ..validation import check_bool, check_float, check_positive_int
from .base import DeltaConfig, DeltaLayer, DeltaMethod, get_records

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

CALLS_ATTR = "_deltatune_prefix_calls"
CACHE_MARK = "_deltatune_prefix"
OWNER_ATTR = "_deltatune_prefix_owner"  # on a hooked backbone: the model that holds the prefixes
ARG_ATTR = "_deltatune_prefix_cache_arg"  # on the hooked module: the name its forward takes the cache by


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------
def reject_module_fields(config: DeltaConfig, what: str) -> None:
    """Prefix methods adapt every attention layer: module-selection fields must stay unset."""
    name = type(config).__name__
    for fname in ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"):
        value = getattr(config, fname)
        if value is not None:
            raise DeltaConfigError(
                f"{name}.{fname} must be None ({what} adds prefixes to every attention layer), got {value!r}"
            )


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
    try:
        from transformers import DynamicCache

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
# the forward hooks
# ---------------------------------------------------------------------------------------------
def _holders(model: nn.Module) -> list[PrefixHolder]:
    return [m for m in model._modules.values() if isinstance(m, PrefixHolder)]


def _active_sources(model: nn.Module) -> list[tuple[PrefixHolder, str]]:
    out = []
    for holder in _holders(model):
        if holder.disabled:
            continue
        out.extend((holder, name) for name in holder.active_adapters if name in holder.adapter_names)
    return out


def _activation_dtype(model: nn.Module, kwargs: dict[str, Any], device: torch.device) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    embeds = kwargs.get("inputs_embeds")
    if isinstance(embeds, torch.Tensor) and embeds.is_floating_point():
        return embeds.dtype
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    weight = getattr(emb, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight.dtype
    for name, p in model.named_parameters():
        if p.is_floating_point() and not any(name.startswith(h.holder_attr + ".") for h in _holders(model)):
            return p.dtype
    return torch.float32  # pragma: no cover - a model without float parameters


def _bind(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Positional arguments moved into keywords (by the forward signature)."""
    out = dict(kwargs)
    if not args:
        return out
    params = [
        p for p in inspect.signature(model.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(args) > len(params):
        raise DeltaConfigTypeError(
            f"{type(model).__name__} got {len(args)} positional arguments, its forward takes {len(params)}"
        )
    for p, a in zip(params, args):
        if p.name in out:
            raise DeltaConfigTypeError(f"{type(model).__name__}.forward got multiple values for {p.name!r}")
        out[p.name] = a
    return out


@dataclass
class _CallState:
    cache: Any
    drop_cache: bool


def _pre_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
    stack = module.__dict__.setdefault(CALLS_ATTR, [])
    stack.append(None)  # always popped by the post hook (registered with always_call=True)
    model = module.__dict__.get(OWNER_ATTR, module)  # the model holding the prefixes
    sources = _active_sources(model)
    if not sources:
        return None
    kwargs = _bind(module, args, kwargs)
    arg = module.__dict__.get(ARG_ATTR) or cache_arg(module)
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if model.training and checkpointing:
        # transformers 5 renamed gradient_checkpointing_disable (now a deprecated alias)
        disable = next(n for n in ("activation_checkpointing_disable", "gradient_checkpointing_disable")
                       if hasattr(model, n))
        raise DeltaConfigError(
            "prefix methods cannot train with gradient checkpointing: transformers drops the cache in "
            f"checkpointed layers, which would silently drop the prefix; call model.{disable}()"
        )
    from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache

    input_ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    ref = input_ids if input_ids is not None else embeds
    if ref is None:
        raise DeltaConfigError("prefix methods need input_ids or inputs_embeds in the forward call, got neither")
    if input_ids is not None and input_ids.dim() != 2:
        raise DeltaConfigError(
            f"prefix methods need 2-D input_ids (batch, seq), got shape {tuple(input_ids.shape)}"
        )
    batch, seq = ref.shape[0], ref.shape[1]
    device = ref.device
    signature = tuple((h.method_name, n, h.num_tokens(n)) for h, n in sources)
    n_prefix = sum(s[2] for s in signature)
    geometry = sources[0][0].geometry

    past = take_cache(kwargs)
    if past is not None and not isinstance(past, Cache):
        raise DeltaConfigTypeError(
            f"{arg} must be a transformers Cache (e.g. DynamicCache) with prefix methods, "
            f"got {type(past).__name__}"
        )
    cache = past.self_attention_cache if isinstance(past, EncoderDecoderCache) else past
    created = cache is None
    if created:
        cache = DynamicCache(config=model.config)
        past = cache
        fill = True
    else:
        mark = getattr(cache, CACHE_MARK, None)
        length = cache.get_seq_length()
        if mark is None:
            if length:
                raise DeltaConfigError(
                    f"{arg} holds {length} tokens but no prefix; with a prefix adapter active, pass a "
                    f"cache produced by this model with the same active adapter(s), or none"
                )
            fill = True
        elif mark != signature:
            raise DeltaConfigError(
                f"{arg} holds the prefix of {[m[:2] for m in mark]}, but the active prefix adapters are "
                f"{[s[:2] for s in signature]}; start generation again after switching adapters"
            )
        else:
            fill = False
    past_real = 0 if fill else cache.get_seq_length() - n_prefix

    if fill:
        dtype = _activation_dtype(model, kwargs, device)
        parts = [holder.prefix(name, batch, dtype) for holder, name in sources]
        states = torch.cat(parts, dim=1).to(device)  # (B, P, L * 2 * kv)
        g = geometry
        states = states.view(batch, n_prefix, g.num_layers, 2, g.num_kv_heads, g.head_dim)
        states = states.permute(2, 3, 0, 4, 1, 5)  # (L, 2, B, kv_heads, P, head_dim)
        for layer in range(g.num_layers):
            cache.update(states[layer, 0], states[layer, 1], layer)
        setattr(cache, CACHE_MARK, signature)

    mask = kwargs.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise DeltaConfigError(
                f"prefix methods need a 2-D attention_mask (batch, past + seq), got "
                f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}"
            )
        if mask.shape[1] != past_real + seq:
            raise DeltaConfigError(
                f"attention_mask has {mask.shape[1]} columns, expected {past_real + seq} "
                f"({past_real} cached tokens + {seq} new ones; the prefix is added by deltatune)"
            )
    real_mask = mask if mask is not None else torch.ones(batch, past_real + seq, dtype=torch.long, device=device)
    prefix_mask = torch.ones(batch, n_prefix, dtype=real_mask.dtype, device=real_mask.device)
    kwargs["attention_mask"] = torch.cat([prefix_mask, real_mask], dim=1)

    if kwargs.get("position_ids") is None:
        if geometry.causal and mask is not None:
            pos = real_mask.long().cumsum(-1) - 1
            pos = pos.masked_fill(real_mask == 0, 0)[:, -seq:]
        else:
            pos = torch.arange(past_real, past_real + seq, device=device).unsqueeze(0).expand(batch, -1)
        kwargs["position_ids"] = pos
    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, torch.Tensor) and cache_position.numel() and int(cache_position[0]) == past_real:
        kwargs["cache_position"] = cache_position + n_prefix  # transformers 4.x passes real-token positions

    use_cache = kwargs.get("use_cache")
    wants_cache = use_cache if use_cache is not None else bool(getattr(model.config, "use_cache", True))
    kwargs[arg] = past
    stack[-1] = _CallState(cache=past, drop_cache=created and not wants_cache)
    return (), kwargs


def _post_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
    stack = module.__dict__.get(CALLS_ATTR)
    if not stack:
        return None
    state = stack.pop()
    if state is None or not state.drop_cache:
        return None
    field = output_field(output)
    if field is None or getattr(output, field) is not state.cache:
        return None
    return without_cache(output)


def _install_hooks(model: nn.Module) -> None:
    """Register the pre/post forward hooks once, on :func:`hook_target` (found by identity, so deep
    copies work; a hooked backbone keeps a plain reference to its model, which deep copies remap)."""
    target = hook_target(model)
    assert target is not None  # prefix_geometry refused the model otherwise
    if any(h is _pre_hook for h in target._forward_pre_hooks.values()):
        return
    target.__dict__[ARG_ATTR] = cache_arg(target)
    if target is not model:
        target.__dict__[OWNER_ATTR] = model
    target.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    target.register_forward_hook(_post_hook, with_kwargs=True, always_call=True)


def _remove_hooks(model: nn.Module) -> None:
    """Remove the prefix hooks of the model and its backbone (by identity: handles would point into
    the original of a copy)."""
    base = getattr(model, "base_model", None)
    for module in (model, base) if isinstance(base, nn.Module) and base is not model else (model,):
        for hook_id, hook in list(module._forward_pre_hooks.items()):
            if hook is _pre_hook:
                del module._forward_pre_hooks[hook_id]
                module._forward_pre_hooks_with_kwargs.pop(hook_id, None)
        for hook_id, hook in list(module._forward_hooks.items()):
            if hook is _post_hook:
                del module._forward_hooks[hook_id]
                module._forward_hooks_with_kwargs.pop(hook_id, None)
                module._forward_hooks_always_called.pop(hook_id, None)
        for attr in (CALLS_ATTR, OWNER_ATTR, ARG_ATTR):
            module.__dict__.pop(attr, None)


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
        _install_hooks(model)
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
        if not _holders(model):
            _remove_hooks(model)

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
    holder = next((h for h in _holders(model) if name in h.adapter_names and h.method_name == record.method), None)
    if holder is None:
        raise DeltaConfigError(
            f"adapter {name!r} is a {record.method!r} adapter; only prefix and ptuning_v2 adapters can be folded"
        )
    holder.encoder(name).fold()
    record.config = holder.folded_config(record.config)


def fold(model: nn.Module) -> nn.Module:
    """Fold every Prefix-Tuning / P-Tuning v2 adapter on the model (see :func:`fold_prefix`); returns it."""
    for holder in _holders(model):
        for name in list(holder.adapter_names):
            fold_prefix(model, name)
    return model


METHOD = PrefixMethod()
