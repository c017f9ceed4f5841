"""Sequence classification / regression heads on Hugging Face encoders and decoders.

Three poolings turn the hidden states of a base model into one vector per sequence:

* ``"cls"``: Hugging Face's own ``*ForSequenceClassification`` (BERT: the pooler on the first
  ``[CLS]`` token, then dropout and ``classifier``); encoders only.
* ``"mean"``: :class:`PooledClassifier` over ``AutoModel``: the mean of the last hidden states over
  the real tokens (attention mask 1), then dropout and a linear ``classifier``.
* ``"last"``: :class:`PooledClassifier` with the last real token's hidden state (found from the
  attention mask, so left and right padding both work and a pad token equal to EOS is harmless),
  then dropout and a linear ``score`` (the name Hugging Face decoders use); the usual pooling for
  decoders (Llama, GPT-2).

:func:`build_classifier` loads a model with the requested head and returns the head's module name,
which delta methods train in full through ``modules_to_save``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import DeltaConfigError
from ..models import load
from ..validation import check_choice, check_float, check_positive_int, check_type

__all__ = [
    "POOLINGS",
    "ClassifierBundle",
    "PooledClassifier",
    "build_classifier",
    "is_decoder_model",
    "last_token_index",
    "masked_mean",
]

#: Poolings accepted by :func:`build_classifier` (``"auto"`` picks ``cls`` for encoders, ``last`` for decoders).
POOLINGS: tuple[str, ...] = ("auto", "cls", "mean", "last")


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (B, T, H) over the positions where ``mask`` (B, T) is non-zero."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position whose ``mask`` (B, T) is non-zero, per row (left or right padding)."""
    positions = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
    return (positions * (mask != 0).long()).argmax(dim=-1)


def is_decoder_model(model: nn.Module) -> bool:
    """Whether ``model`` is a causal (decoder-only) transformer: one of its attention modules is causal."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "is_encoder_decoder", False):
        return False
    return any(getattr(m, "is_causal", None) is True for m in model.modules())


@dataclass
class _Output:
    """Minimal model output: ``logits`` (and ``loss`` when labels were given)."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None

    def __getitem__(self, key: str) -> Any:  # HF-style access
        return getattr(self, key)


class PooledClassifier(nn.Module):
    """A base model (``AutoModel``) + masked pooling + dropout + a linear head.

    Args:
        base: the transformer without head; called as ``base(input_ids=..., attention_mask=..., **kw)``
            and must return ``last_hidden_state``.
        num_labels: classes (1 = regression).
        pooling: ``"mean"`` or ``"last"``.
        dropout: dropout probability before the head.
        head_name: the head's attribute name (default ``"classifier"`` for mean, ``"score"`` for last).

    ``forward`` accepts the base model's keyword arguments (``token_type_ids``, ``past_key_values``,
    ``position_ids`` ...) and passes them on; prefix methods may widen ``attention_mask`` by their
    prefix columns in front, so the pooling uses the last ``T`` columns of the mask (T = sequence
    length). With ``labels`` the loss is cross-entropy (MSE for ``num_labels == 1``).
    """

    def __init__(
        self,
        base: nn.Module,
        num_labels: int,
        pooling: str = "mean",
        *,
        dropout: float = 0.1,
        head_name: str | None = None,
    ) -> None:
        super().__init__()
        check_type("base", base, nn.Module, "a torch.nn.Module (a Hugging Face AutoModel)")
        check_positive_int("num_labels", num_labels)
        check_choice("pooling", pooling, ("mean", "last"))
        check_float("dropout", dropout, low=0.0, high=1.0, high_inclusive=False)
        hidden = getattr(getattr(base, "config", None), "hidden_size", None)
        if not isinstance(hidden, int):
            raise DeltaConfigError(f"base must have config.hidden_size (an int), got {hidden!r}")
        self.head_name = head_name or ("classifier" if pooling == "mean" else "score")
        if not self.head_name.isidentifier() or self.head_name in ("base", "dropout"):
            raise DeltaConfigError(f"head_name must be an identifier other than 'base'/'dropout', got {self.head_name!r}")
        self.base = base
        self.config = base.config
        self.num_labels = num_labels
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        setattr(self, self.head_name, nn.Linear(hidden, num_labels))

    @property
    def head(self) -> nn.Module:
        """The linear head."""
        return getattr(self, self.head_name)

    def get_input_embeddings(self) -> nn.Module:
        """The base model's input embedding (used by prefix methods for the dtype)."""
        return self.base.get_input_embeddings()

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Pool (B, T, H) hidden states to (B, H) with the real-token mask (its last T columns)."""
        b, t = hidden.shape[:2]
        if attention_mask is None:
            mask = torch.ones(b, t, dtype=torch.long, device=hidden.device)
        else:
            mask = attention_mask[:, -t:]
        if self.pooling == "mean":
            return masked_mean(hidden, mask)
        idx = last_token_index(mask)
        return hidden[torch.arange(b, device=hidden.device), idx]

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> _Output:
        kwargs.pop("return_dict", None)
        out = self.base(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        pooled = self.pool(hidden, attention_mask)
        logits = self.head(self.dropout(pooled))
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = nn.functional.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = nn.functional.cross_entropy(logits.float(), labels.long())
        return _Output(logits=logits, loss=loss)


@dataclass
class ClassifierBundle:
    """What :func:`build_classifier` returns.

    Attributes:
        model: the classifier (``model(**batch).logits`` has shape ``(batch, num_labels)``).
        tokenizer: its tokenizer (with a pad token).
        head_modules: module names of the newly initialised head (for ``modules_to_save``).
        pooling: the pooling used (``"auto"`` resolved).
        is_decoder: whether the base model is a causal decoder.
    """

    model: nn.Module
    tokenizer: Any
    head_modules: list[str]
    pooling: str
    is_decoder: bool


def _hf_head_name(model: nn.Module) -> str:
    for name in ("classifier", "score"):
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise DeltaConfigError(
        f"pooling 'cls' uses {type(model).__name__}, which has no 'classifier' or 'score' head; "
        f"use pooling 'mean' or 'last'"
    )


def build_classifier(
    model_name_or_path: str,
    num_labels: int,
    *,
    pooling: str = "auto",
    dropout: float = 0.1,
    dtype: str | None = None,
    progress: bool = True,
) -> ClassifierBundle:
    """Load ``model_name_or_path`` (see :func:`deltatune.models.load`) with a classification head.

    Args:
        model_name_or_path: a registered name (``"minilm-l6"``, ``"smollm2-135m"``), an HF directory
            or a ``.gguf`` file.
        num_labels: classes (1 = regression).
        pooling: ``"auto"`` (``cls`` for encoders, ``last`` for decoders), ``"cls"`` (Hugging Face's
            ``*ForSequenceClassification``; encoders only), ``"mean"`` or ``"last"``.
        dropout: dropout before the head of :class:`PooledClassifier` (``cls`` uses the model's own).
        dtype: model dtype (``None`` = float32).
        progress: the loading bars (``False``: none).

    Raises:
        DeltaConfigError: pooling ``"cls"`` on a decoder (its first token sees no other token).
    """
    check_choice("pooling", pooling, POOLINGS)
    check_positive_int("num_labels", num_labels)
    check_float("dropout", dropout, low=0.0, high=1.0, high_inclusive=False)
    base, tokenizer = load(model_name_or_path, task="base", dtype=dtype, progress=progress)
    decoder = is_decoder_model(base)
    if pooling == "auto":
        pooling = "last" if decoder else "cls"
    if pooling == "cls":
        model_type = getattr(base.config, "model_type", "?")
        if decoder:
            raise DeltaConfigError(
                f"pooling 'cls' needs an encoder (BERT-like) model, got the decoder model type {model_type!r}; "
                f"use pooling 'last' (or 'mean')"
            )
        del base
        model, tokenizer = load(model_name_or_path, task="sequence-classification", num_labels=num_labels, dtype=dtype,
                                 progress=progress)
        return ClassifierBundle(model, tokenizer, [_hf_head_name(model)], "cls", decoder)
    model = PooledClassifier(base, num_labels, pooling, dropout=dropout)
    if dtype is not None:
        model.head.to(next(base.parameters()).dtype)
    return ClassifierBundle(model, tokenizer, [model.head_name], pooling, decoder)
