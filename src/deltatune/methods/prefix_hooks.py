"""The forward hooks of the prefix methods: before the hooked forward, the active adapters' prefixes go
into the key/value cache, the attention mask and the positions (see :mod:`deltatune.methods.prefix` for
the mechanism); after it, a cache the caller did not ask for is dropped again.

:func:`install_hooks` / :func:`remove_hooks` put them on (and take them off) :func:`hook_target`;
:func:`holders` finds the :class:`~deltatune.methods.prefix_parts.PrefixHolder` modules of a model.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..errors import DeltaConfigError, DeltaConfigTypeError
from ..hf_cache import cache_arg, output_field, take_cache, without_cache
from .prefix_parts import PrefixHolder, hook_target

__all__ = ["ARG_ATTR", "CACHE_MARK", "CALLS_ATTR", "OWNER_ATTR", "holders", "install_hooks", "remove_hooks"]

CALLS_ATTR = "_deltatune_prefix_calls"
CACHE_MARK = "_deltatune_prefix"
OWNER_ATTR = "_deltatune_prefix_owner"  # on a hooked backbone: the model that holds the prefixes
ARG_ATTR = "_deltatune_prefix_cache_arg"  # on the hooked module: the name its forward takes the cache by


def holders(model: nn.Module) -> list[PrefixHolder]:
    """The prefix holders attached to ``model`` (its direct children)."""
    return [m for m in model._modules.values() if isinstance(m, PrefixHolder)]


def _active_sources(model: nn.Module) -> list[tuple[PrefixHolder, str]]:
    out = []
    for holder in holders(model):
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
        if p.is_floating_point() and not any(name.startswith(h.holder_attr + ".") for h in holders(model)):
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
    # imported on first use: importing transformers costs more than all of ``import deltatune``
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


def install_hooks(model: nn.Module) -> None:
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


def remove_hooks(model: nn.Module) -> None:
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
