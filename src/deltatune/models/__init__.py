"""Base models for delta fine-tuning: where they come from, the GGUF conversion cache, and loading.

:func:`load` takes a registered name (see :data:`REGISTERED_MODELS`), a local Hugging Face model
directory (``config.json`` + weights + tokenizer files) or a ``.gguf`` file, and returns
``(model, tokenizer)``. A GGUF file is converted once into a float32 safetensors directory in a cache
(:func:`convert_gguf`) and read from there afterwards.

Modules (each imports only the ones above it in this list):

- :mod:`.registry`: the bundled real models (:data:`REGISTERED_MODELS`, :func:`register_model`) and
  :func:`resolve_source`, which maps a name or path to a checked :class:`ModelSource`;
- :mod:`.helpers`: :func:`chat_prompt` and :func:`model_info`;
- :mod:`.progress`: switching transformers' own progress bars off for ``progress=False``;
- :mod:`.gguf_cache`: the GGUF -> safetensors cache (:func:`convert_gguf`, :func:`default_cache_dir`,
  :func:`gguf_cache_name`);
- :mod:`.loading`: :func:`load`.
"""

from __future__ import annotations

from .gguf_cache import (
    CACHE_ENV_VAR,
    CACHE_MARKER,
    convert_gguf,
    default_cache_dir,
    ensure_gguf_cache,
    gguf_cache_name,
    resolve_cache_dir,
)
from .helpers import chat_prompt, model_info
from .loading import DTYPES, load, resolve_dtype
from .registry import (
    REGISTERED_MODELS,
    TASKS,
    ModelSource,
    RegisteredModel,
    is_gguf_file,
    list_models,
    register_model,
    resolve_source,
)

__all__ = [
    "CACHE_ENV_VAR",
    "CACHE_MARKER",
    "DTYPES",
    "REGISTERED_MODELS",
    "TASKS",
    "ModelSource",
    "RegisteredModel",
    "chat_prompt",
    "convert_gguf",
    "default_cache_dir",
    "ensure_gguf_cache",
    "gguf_cache_name",
    "is_gguf_file",
    "list_models",
    "load",
    "model_info",
    "register_model",
    "resolve_cache_dir",
    "resolve_dtype",
    "resolve_source",
]
