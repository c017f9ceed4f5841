"""Batch collation: dynamic padding for causal-LM features, block packing, and classification batches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import DeltaConfigError, DeltaConfigTypeError
from ..validation import check_bool, check_choice, check_int, check_type
from .base import TextPairExample
from .features import IGNORE_INDEX

__all__ = ["CausalLMCollator", "ClassificationCollator", "pack_features"]


def _round_up(n: int, multiple: int | None) -> int:
    if multiple is None:
        return n
    return -(-n // multiple) * multiple


def _ids(features: Sequence[Mapping[str, Any]], i: int, name: str) -> list[int]:
    f = features[i]
    if not isinstance(f, Mapping) or name not in f:
        raise DeltaConfigError(f"features[{i}] must be a mapping with {name!r}, got {type(f).__name__}")
    ids = f[name]
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return list(ids)


class CausalLMCollator:
    """Pad a list of causal-LM features (``input_ids``, optional ``labels``/``attention_mask``) to one batch.

    Padding is dynamic: to the longest feature of the batch, rounded up to ``pad_to_multiple_of``.
    ``input_ids`` are padded with ``pad_token_id``, ``labels`` with ``label_pad``, ``attention_mask`` with 0
    (a feature's own ``attention_mask``, e.g. from :func:`pack_features`, is kept; otherwise it is all 1s).
    ``padding_side="left"`` puts the padding in front (for batched generation). Other keys are ignored.

    Returns from ``__call__``: ``input_ids``, ``attention_mask`` and (when the features have them)
    ``labels``, all ``torch.long`` tensors of shape ``(batch, length)``.
    """

    def __init__(
        self,
        pad_token_id: int,
        label_pad: int = IGNORE_INDEX,
        pad_to_multiple_of: int | None = None,
        padding_side: str = "right",
    ) -> None:
        self.pad_token_id = check_int("pad_token_id", pad_token_id, minimum=0)
        self.label_pad = check_int("label_pad", label_pad)
        if pad_to_multiple_of is not None:
            check_int("pad_to_multiple_of", pad_to_multiple_of, minimum=1)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_side = check_choice("padding_side", padding_side, ("right", "left"))

    def __repr__(self) -> str:
        return (
            f"CausalLMCollator(pad_token_id={self.pad_token_id}, label_pad={self.label_pad}, "
            f"pad_to_multiple_of={self.pad_to_multiple_of}, padding_side={self.padding_side!r})"
        )

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not isinstance(features, Sequence) or len(features) == 0:
            raise DeltaConfigError(f"features must be a non-empty list of dicts, got {features!r}")
        ids = [_ids(features, i, "input_ids") for i in range(len(features))]
        with_labels = [isinstance(f, Mapping) and "labels" in f for f in features]
        if any(with_labels) and not all(with_labels):
            missing = with_labels.index(False)
            raise DeltaConfigError(f"features[{missing}] has no 'labels' although other features have them")
        labels = [_ids(features, i, "labels") for i in range(len(features))] if all(with_labels) else None
        masks = [
            _ids(features, i, "attention_mask") if "attention_mask" in features[i] else [1] * len(ids[i])
            for i in range(len(features))
        ]
        for i, x in enumerate(ids):
            if labels is not None and len(labels[i]) != len(x):
                raise DeltaConfigError(
                    f"features[{i}]: labels has length {len(labels[i])} but input_ids has length {len(x)}"
                )
            if len(masks[i]) != len(x):
                raise DeltaConfigError(
                    f"features[{i}]: attention_mask has length {len(masks[i])} but input_ids has length {len(x)}"
                )
        length = _round_up(max(len(x) for x in ids), self.pad_to_multiple_of)
        n = len(ids)
        out_ids = torch.full((n, length), self.pad_token_id, dtype=torch.long)
        out_mask = torch.zeros((n, length), dtype=torch.long)
        out_labels = torch.full((n, length), self.label_pad, dtype=torch.long) if labels is not None else None
        for i, x in enumerate(ids):
            sl = slice(0, len(x)) if self.padding_side == "right" else slice(length - len(x), length)
            out_ids[i, sl] = torch.tensor(x, dtype=torch.long)
            out_mask[i, sl] = torch.tensor(masks[i], dtype=torch.long)
            if out_labels is not None:
                out_labels[i, sl] = torch.tensor(labels[i], dtype=torch.long)
        batch = {"input_ids": out_ids, "attention_mask": out_mask}
        if out_labels is not None:
            batch["labels"] = out_labels
        return batch


def pack_features(
    features: Sequence[Mapping[str, Any]],
    block_size: int,
    *,
    pad_token_id: int = 0,
    label_pad: int = IGNORE_INDEX,
    drop_last: bool = False,
) -> list[dict]:
    """Pack features end to end into blocks of exactly ``block_size`` tokens.

    The ``input_ids`` (and ``labels``; a feature without labels contributes its ``input_ids`` as labels)
    of all features are concatenated in order and cut into consecutive blocks, so a feature may span two
    blocks; labels stay aligned token for token. The last, partial block is padded with ``pad_token_id``,
    labels ``label_pad`` and ``attention_mask`` 0 (or dropped when ``drop_last``). Within a block the
    examples see each other under a plain causal mask, as in the usual HF ``group_texts`` recipe.

    Returns:
        A list of ``{"input_ids", "labels", "attention_mask"}`` dicts of int lists.
    """
    check_int("block_size", block_size, minimum=1)
    check_int("pad_token_id", pad_token_id, minimum=0)
    check_int("label_pad", label_pad)
    check_bool("drop_last", drop_last)
    check_type("features", features, (list, tuple), "a list of feature dicts")
    all_ids: list[int] = []
    all_labels: list[int] = []
    for i, f in enumerate(features):
        ids = _ids(features, i, "input_ids")
        labels = _ids(features, i, "labels") if "labels" in f else list(ids)
        if len(labels) != len(ids):
            raise DeltaConfigError(
                f"features[{i}]: labels has length {len(labels)} but input_ids has length {len(ids)}"
            )
        all_ids.extend(ids)
        all_labels.extend(labels)
    blocks = []
    for s in range(0, len(all_ids), block_size):
        ids, labels = all_ids[s : s + block_size], all_labels[s : s + block_size]
        pad = block_size - len(ids)
        if pad and drop_last:
            break
        blocks.append(
            {
                "input_ids": ids + [pad_token_id] * pad,
                "labels": labels + [label_pad] * pad,
                "attention_mask": [1] * len(ids) + [0] * pad,
            }
        )
    return blocks


class ClassificationCollator:
    """Tokenise and pad a list of :class:`TextPairExample` into a classification / regression batch.

    ``__call__`` returns the tokenizer's tensors (``input_ids``, ``attention_mask`` and, for BERT-like
    tokenizers, ``token_type_ids``), padded to the longest sequence of the batch (rounded up to
    ``pad_to_multiple_of``) and truncated to ``max_length`` (pairs: longest first), plus ``labels``:
    ``torch.long`` for classification, ``torch.float`` for regression. ``is_regression=None`` infers it
    per batch (any ``float`` label → regression). A batch whose labels are all ``None`` (hidden GLUE test
    labels) has no ``labels``; a batch must be all single sentences or all pairs.
    """

    def __init__(
        self,
        tokenizer: Any,
        max_length: int,
        *,
        is_regression: bool | None = None,
        pad_to_multiple_of: int | None = None,
    ) -> None:
        if not callable(tokenizer):
            raise DeltaConfigTypeError(f"tokenizer must be a Hugging Face tokenizer, got {type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        self.max_length = check_int("max_length", max_length, minimum=2)
        if is_regression is not None:
            check_bool("is_regression", is_regression)
        self.is_regression = is_regression
        if pad_to_multiple_of is not None:
            check_int("pad_to_multiple_of", pad_to_multiple_of, minimum=1)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[TextPairExample]) -> dict[str, torch.Tensor]:
        if not isinstance(examples, Sequence) or len(examples) == 0:
            raise DeltaConfigError(f"examples must be a non-empty list of TextPairExample, got {examples!r}")
        for i, ex in enumerate(examples):
            if not isinstance(ex, TextPairExample):
                raise DeltaConfigTypeError(f"examples[{i}] must be a TextPairExample, got {type(ex).__name__}")
        pair = [ex.text_b is not None for ex in examples]
        if any(pair) and not all(pair):
            raise DeltaConfigError(
                f"examples[{pair.index(False)}] has no text_b although other examples in the batch are pairs"
            )
        text_a = [ex.text_a for ex in examples]
        text_b = [ex.text_b for ex in examples] if all(pair) else None
        batch = dict(
            self.tokenizer(
                text_a,
                text_b,
                truncation=True,
                max_length=self.max_length,
                padding="longest",
                pad_to_multiple_of=self.pad_to_multiple_of,
                return_tensors="pt",
            )
        )
        labels = [ex.label for ex in examples]
        has = [lab is not None for lab in labels]
        if any(has) and not all(has):
            raise DeltaConfigError(f"examples[{has.index(False)}] has label None although other examples have labels")
        if all(has):
            for i, lab in enumerate(labels):
                if isinstance(lab, bool) or not isinstance(lab, (int, float)):
                    raise DeltaConfigTypeError(f"examples[{i}].label must be an int or float, got {lab!r}")
            regression = self.is_regression
            if regression is None:
                regression = any(isinstance(lab, float) for lab in labels)
            if not regression:
                for i, lab in enumerate(labels):
                    if isinstance(lab, float) and not lab.is_integer():
                        raise DeltaConfigError(
                            f"examples[{i}].label must be a class id for classification, got {lab!r}"
                        )
            dtype = torch.float if regression else torch.long
            batch["labels"] = torch.tensor(labels, dtype=dtype)
        return batch
