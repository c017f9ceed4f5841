"""Loading a base model and its tokenizer: :func:`load`.

Owns the argument checks of :func:`load` (task, dtype, device, labels, padding side), the tokenizer's
pad-token fallback and the ``from_pretrained`` calls on a local Hugging Face directory. Where the files
are comes from :mod:`.registry` (:func:`~.registry.resolve_source`); a GGUF file is read through
:mod:`.gguf_cache`'s converted directory; the device from :func:`deltatune.device.resolve_device`.
transformers' model classes are imported where they are used (``import deltatune`` must stay light).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..device import resolve_device
from ..errors import CheckpointError, DeltaConfigError
from ..validation import check_bool, check_choice, check_positive_int, check_type
from .gguf_cache import ensure_gguf_cache, gguf_cache_name, resolve_cache_dir
from .progress import library_progress
from .registry import TASKS, resolve_source, unknown_source_error

__all__ = ["DTYPES", "load", "resolve_dtype"]

#: dtype names :func:`load` accepts (``None`` means float32; torch dtypes are accepted too).
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_dtype(dtype: Any) -> torch.dtype:
    """``None`` -> float32, a name in :data:`DTYPES` -> its torch dtype; a torch dtype must be one of them."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise DeltaConfigError(
                f"dtype must be None, one of {', '.join(repr(k) for k in DTYPES)} or the matching torch dtype, "
                f"got {dtype!r}"
            )
        return dtype
    check_type("dtype", dtype, str, "None, a str or a torch.dtype")
    check_choice("dtype", dtype, [None, *DTYPES])
    return DTYPES[dtype]


def _ensure_pad_token(tokenizer: Any) -> bool:
    """Give the tokenizer a pad token; returns True if a new token had to be added to the vocabulary."""
    if tokenizer.pad_token is not None:
        return False
    if tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
        return False
    if tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token
        return False
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return True


def _load_hf_dir(
    path: Path,
    *,
    task: str,
    dtype: torch.dtype,
    device: torch.device | None,
    num_labels: int | None,
    padding_side: str,
) -> tuple[Any, Any]:
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"could not load the tokenizer from {str(path)!r}: {exc}") from exc
    added = _ensure_pad_token(tokenizer)
    tokenizer.padding_side = padding_side

    cls = {
        "causal-lm": AutoModelForCausalLM,
        "sequence-classification": AutoModelForSequenceClassification,
        "base": AutoModel,
    }[task]
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
    if task == "sequence-classification":
        kwargs["num_labels"] = num_labels
    try:
        model = cls.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"could not load a {task!r} model from {str(path)!r}: {exc}") from exc

    if added and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    # Set after construction so the embedding's padding_idx (and thus its gradient) is untouched.
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(gen, "pad_token_id", None) is None:
        gen.pad_token_id = tokenizer.pad_token_id
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if isinstance(max_pos, int) and max_pos > 0 and tokenizer.model_max_length > 10**8:
        tokenizer.model_max_length = max_pos
    if device is not None:
        model.to(device)
    return model, tokenizer


def load(
    name_or_path: str | os.PathLike,
    *,
    task: str = "causal-lm",
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    num_labels: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    padding_side: str = "right",
    progress: bool = True,
) -> tuple[Any, Any]:
    """Load a base model and its tokenizer.

    Args:
        name_or_path: a registered name (:func:`~.registry.list_models`), a local Hugging Face model directory, or a
            ``.gguf`` file. A registered name wins over a same-named relative path; write ``./name`` for the
            path.
        task: ``"causal-lm"`` (``AutoModelForCausalLM``), ``"sequence-classification"``
            (``AutoModelForSequenceClassification``, needs ``num_labels``; the head is newly initialised
            unless the checkpoint has one) or ``"base"`` (``AutoModel``, no head).
        dtype: ``None`` (float32), ``"float32"``, ``"bfloat16"``, ``"float16"`` or the torch dtype.
        device: where to put the model (``None``: stay on CPU; ``"auto"``: CUDA if available, else CPU;
            see :func:`deltatune.device.resolve_device`).
        num_labels: number of classes; required for and only allowed with ``"sequence-classification"``.
        cache_dir: models cache directory for GGUF conversions (default:
            :func:`~.gguf_cache.default_cache_dir`).
        padding_side: tokenizer padding side, ``"right"`` (training) or ``"left"`` (batched generation).
        progress: show progress bars (transformers' ``Loading weights``, and a GGUF file's conversion);
            ``False`` shows none.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode. The tokenizer always has a pad token: its own,
        else its eos token (Llama/GPT-2 style models, so padding positions must be masked by the attention
        mask, not by the pad id), else its unk token, else a new ``<pad>`` token (embeddings resized).
        ``model.config.pad_token_id`` (needed by decoder sequence classifiers, which pool the last non-pad
        token) and ``generation_config.pad_token_id`` are set to it when missing.

    Raises:
        DeltaConfigError / DeltaConfigTypeError: bad arguments, unknown name or missing path.
        MissingPackageError: a registered model's package is not installed (the message has the pip command).
        CheckpointError: the files exist but cannot be loaded.
    """
    check_type("name_or_path", name_or_path, (str, os.PathLike), "a registered model name or a path")
    if isinstance(name_or_path, str) and not name_or_path:
        raise unknown_source_error(name_or_path)
    check_type("task", task, str, "a str")
    check_choice("task", task, TASKS)
    torch_dtype = resolve_dtype(dtype)
    if device is not None:
        check_type("device", device, (str, torch.device), "None, a str or a torch.device")
    dev = None if device is None else resolve_device(device)
    if task == "sequence-classification":
        check_positive_int("num_labels", num_labels)
    elif num_labels is not None:
        raise DeltaConfigError(
            f"num_labels is only used with task='sequence-classification', got num_labels={num_labels!r} "
            f"with task={task!r}"
        )
    check_choice("padding_side", padding_side, ("right", "left"))
    check_bool("progress", progress)
    root = resolve_cache_dir(cache_dir)
    source = resolve_source(name_or_path, task)

    path = source.path
    if source.kind == "gguf":
        path = ensure_gguf_cache(path, root, gguf_cache_name(path, source.cache_name), progress=progress)
    with library_progress(progress):
        return _load_hf_dir(
            path, task=task, dtype=torch_dtype, device=dev, num_labels=num_labels, padding_side=padding_side
        )
