"""Helpers for prompts and reports: :func:`chat_prompt` (one user turn through a tokenizer's chat
template) and :func:`model_info` (a model's summary for reports)."""

from __future__ import annotations

from typing import Any

import torch

from ..validation import check_type

__all__ = ["chat_prompt", "model_info"]


def chat_prompt(tokenizer: Any, user_text: str, system: str | None = None) -> str:
    """Render one user turn with the tokenizer's chat template, ending with the assistant's prompt.

    Without a chat template the raw ``user_text`` is returned (preceded by ``system`` and a blank line
    when ``system`` is given). The result already contains any special tokens the template adds, so
    tokenise it with ``add_special_tokens=False`` if the tokenizer would add a BOS token of its own.
    """
    check_type("user_text", user_text, str, "a str")
    if system is not None:
        check_type("system", system, str, "None or a str")
    if not getattr(tokenizer, "chat_template", None):
        return user_text if system is None else f"{system}\n\n{user_text}"
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages.append({"role": "user", "content": user_text})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(text, str):  # some versions return a list for batched input
        text = text[0]
    return text


def model_info(model: torch.nn.Module) -> dict[str, Any]:
    """Summary of a model for reports.

    Returns a dict with ``architecture`` (class name), ``model_type``, ``num_parameters`` (tied weights
    counted once), ``trainable_parameters``, ``dtype`` (e.g. ``"float32"``; comma-joined if mixed),
    ``device``, ``hidden_size``, ``num_layers``, ``vocab_size`` and ``num_labels`` (``None`` where the
    model has no config or the field does not apply).
    """
    check_type("model", model, torch.nn.Module, "a torch.nn.Module")
    params = list(model.parameters())  # parameters() yields shared tensors once
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in params})
    devices = sorted({str(p.device) for p in params})
    config = getattr(model, "config", None)

    def field(*names: str) -> Any:
        for n in names:
            value = getattr(config, n, None) if config is not None else None
            if value is not None:
                return value
        return None

    is_classifier = type(model).__name__.endswith(("ForSequenceClassification", "ForTokenClassification"))
    return {
        "architecture": type(model).__name__,
        "model_type": field("model_type"),
        "num_parameters": sum(p.numel() for p in params),
        "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
        "dtype": ",".join(dtypes) if dtypes else None,
        "device": ",".join(devices) if devices else None,
        "hidden_size": field("hidden_size", "n_embd", "d_model"),
        "num_layers": field("num_hidden_layers", "n_layer", "num_layers"),
        "vocab_size": field("vocab_size"),
        "num_labels": field("num_labels") if is_classifier else None,
    }

