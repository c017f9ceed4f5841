"""The key/value cache argument and output field of Hugging Face models, across transformers versions.

transformers up to 5.23 calls the cache ``past_key_values`` (forward argument and output field);
5.24 renamed both to ``cache``, keep the old name as a deprecated alias (a
``FutureWarning`` for the argument, a logged warning for the output attribute) and, when a caller
passes both, use ``cache`` and drop the other. Code that hooks a model or drives it step by step must
therefore speak the name the installed version (and the model) uses, never the alias:

* :func:`cache_arg` names the cache argument of a module's ``forward``;
* :func:`output_cache` reads the cache from a model output by the field its class declares;
* :func:`take_cache` removes the cache from keyword arguments given under either name;
* :func:`without_cache` returns a model output without the cache field.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

import torch.nn as nn

from .errors import DeltaConfigError

__all__ = [
    "CACHE_NAMES",
    "cache_arg",
    "declared_cache_arg",
    "default_cache_arg",
    "output_cache",
    "output_field",
    "take_cache",
    "takes_var_kwargs",
    "without_cache",
]

CACHE_NAMES = ("cache", "past_key_values")
"""The two names of the cache: the current one first, then the older one."""


def _parameters(module: nn.Module) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover - a forward without a signature (C extension)
        return {}


def declared_cache_arg(module: nn.Module) -> str | None:
    """``"cache"`` or ``"past_key_values"``: the cache argument ``module.forward`` declares, else None."""
    params = _parameters(module)
    return next((name for name in CACHE_NAMES if name in params), None)


def takes_var_kwargs(module: nn.Module) -> bool:
    """True when ``module.forward`` has a ``**kwargs`` parameter."""
    return any(p.kind is p.VAR_KEYWORD for p in _parameters(module).values())


@functools.cache
def default_cache_arg() -> str:
    """The cache name of the installed transformers: ``"cache"`` once its model outputs carry that field."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    fields = {f.name for f in dataclasses.fields(BaseModelOutputWithPast)}
    return "cache" if "cache" in fields else "past_key_values"


def cache_arg(module: nn.Module) -> str:
    """The name under which ``module.forward`` takes the cache.

    The declared argument when there is one; for a forward that passes ``**kwargs`` on (task heads of
    transformers 5) the name its backbone (``module.base_model``) declares, else the installed
    transformers' name (:func:`default_cache_arg`).
    """
    declared = declared_cache_arg(module)
    if declared is not None:
        return declared
    base = getattr(module, "base_model", None)
    if isinstance(base, nn.Module) and base is not module:
        declared = declared_cache_arg(base)
        if declared is not None:
            return declared
    return default_cache_arg()


def output_field(output: Any) -> str | None:
    """The cache field a model output's class declares (``"cache"`` / ``"past_key_values"``), else None."""
    if not dataclasses.is_dataclass(output):
        return None
    names = {f.name for f in dataclasses.fields(output)}
    return next((name for name in CACHE_NAMES if name in names), None)


def output_cache(output: Any) -> Any:
    """The cache a model returned: its ``cache`` / ``past_key_values`` field, or item 1 of a tuple output.

    The field is read by the name its output class declares, so no deprecation alias is touched.
    None when the output carries no cache.
    """
    field = output_field(output)
    if field is not None:
        return getattr(output, field)
    if isinstance(output, (tuple, list)) and len(output) > 1:
        return output[1]
    return None


def take_cache(kwargs: dict[str, Any]) -> Any:
    """Remove the cache from forward keyword arguments given as ``cache`` or ``past_key_values``.

    Raises :class:`DeltaConfigError` when both names carry a cache (transformers would keep one and
    silently drop the other).
    """
    given = {name: kwargs.pop(name) for name in CACHE_NAMES if name in kwargs}
    present = {name: value for name, value in given.items() if value is not None}
    if len(present) > 1:
        raise DeltaConfigError(
            "got a cache under both 'cache' and 'past_key_values'; pass it once, as "
            f"{default_cache_arg()!r} (the name of the installed transformers)"
        )
    return next(iter(present.values()), None)


def without_cache(output: Any) -> Any:
    """A new model output of the same class without its cache field (``output`` itself if it has none,
    or is not a ``ModelOutput``-like mapping).

    A fresh object is built because a ``ModelOutput`` keeps a key that is set to None, and
    ``generate`` looks at the keys.
    """
    field = output_field(output)
    if field is None or not callable(getattr(output, "items", None)):
        return output
    return type(output)(**{k: v for k, v in output.items() if k != field})
