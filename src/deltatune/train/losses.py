"""Token-level losses and the default collate function.

A loss function returns ``(loss, n)``: ``loss`` is the *mean* over ``n`` units (tokens for a
language model, examples for a classifier). The trainer weights each micro-batch by ``n`` so that
an accumulated (or distributed) batch is averaged over all of its units, exactly as one big batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DeltaConfigError
from ..kernels import linear_cross_entropy
from ..kernels.cross_entropy import _check_label_range
from ..validation import check_int

__all__ = [
    "CHUNKED_LOSS_MODEL_TYPES",
    "CPU_CHUNK_ELEMS",
    "check_lm_examples",
    "IGNORE_INDEX",
    "PadCollator",
    "check_label_range",
    "chunked_head",
    "count_loss_tokens",
    "get_logits",
    "lm_loss_sum",
    "logits_loss_sum",
]

IGNORE_INDEX = -100

#: logits per chunk of the chunked loss on the CPU when ``chunk_size`` is not given: 16M (64 MiB in fp32; 341
#: rows of a 49,152-token vocabulary), half of :func:`deltatune.kernels.default_chunk_size`'s GPU-sized chunk.
#: A chunk's logits exist at the end of the forward, when every activation is alive, so the chunk adds to the
#: process's peak RSS; on the CPU an fp32 chunk's log-softmax overwrites its logits in one buffer that all
#: the chunks reuse (8M chunks used to hold two fresh tensors each), so 16M chunks peak as high as the former
#: 8M ones. The rows' losses do not depend on the chunking. Each chunk reads the whole head weight again
#: (twice), so smaller chunks cost time (README, "Fast by default").
CPU_CHUNK_ELEMS = 2**24


def get_logits(outputs: Any) -> torch.Tensor:
    """The logits of a model output: ``outputs.logits``, ``outputs["logits"]`` or the tensor itself."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, Mapping):
        logits = outputs.get("logits")
    if logits is None and isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        logits = outputs[0]
    if logits is None:
        raise DeltaConfigError(
            f"the default loss needs model outputs with .logits (or a logits tensor), got {type(outputs).__name__}; "
            "pass loss_fn=... to the Trainer for other models"
        )
    return logits


def _aligned_labels(labels: torch.Tensor, shift: bool) -> torch.Tensor:
    return labels[..., 1:] if shift else labels


def count_loss_tokens(labels: torch.Tensor, shift: bool = True) -> int:
    """How many label positions count in the loss (not ``-100``; after the causal shift if ``shift``)."""
    return int((_aligned_labels(labels, shift) != IGNORE_INDEX).sum())


def logits_loss_sum(
    logits: torch.Tensor, labels: torch.Tensor, *, label_smoothing: float = 0.0, shift: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token cross-entropy (fp32) of materialised logits and the number of counted tokens.

    With ``shift`` the logits at position ``t`` predict ``labels[t + 1]`` (Hugging Face causal-LM
    convention, labels aligned with ``input_ids``). Positions labelled ``-100`` are ignored.
    ``sum / n`` equals ``F.cross_entropy(..., ignore_index=-100, label_smoothing=...)``.
    """
    if shift:
        logits = logits[..., :-1, :]
        labels = labels[..., 1:]
    logits = logits.reshape(-1, logits.shape[-1]).float()
    labels = labels.reshape(-1).to(logits.device)
    total = F.cross_entropy(
        logits, labels, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing, reduction="sum"
    )
    return total, (labels != IGNORE_INDEX).sum()


#: ``config.model_type`` of Hugging Face causal LMs whose ``forward`` is ``lm_head(backbone(...)[0])``
#: with nothing in between (no logit scaling or soft-capping): their loss may skip the logits
CHUNKED_LOSS_MODEL_TYPES = frozenset(
    {"gpt2", "llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo", "olmo2", "phi3", "gemma", "opt"}
)


def chunked_head(model: nn.Module) -> tuple[tuple[nn.Module, nn.Linear] | None, str]:
    """``((backbone, lm_head), "")`` when the default loss of ``model`` can call the backbone and apply the
    chunked linear + cross-entropy (:func:`deltatune.kernels.causal_lm_loss`) with the head's weight
    instead of materialising the logits; else ``(None, why not)``.

    It can when ``model`` is a Hugging Face causal LM of a type in :data:`CHUNKED_LOSS_MODEL_TYPES`,
    its output embedding (``get_output_embeddings()``) is a plain ``nn.Linear`` (not wrapped by a delta
    method), its backbone is the attribute named by ``base_model_prefix``, and no forward hook sits on
    the model itself (prefix-tuning's hooks do: they must run).
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in CHUNKED_LOSS_MODEL_TYPES:
        return None, f"model_type {model_type!r} is not one whose head is a plain linear layer"
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if type(head) is not nn.Linear:
        return None, f"the output embedding is a {type(head).__name__}, not a plain nn.Linear"
    backbone = getattr(model, str(getattr(model, "base_model_prefix", "")), None)
    if not isinstance(backbone, nn.Module) or backbone is model:
        return None, "the model has no backbone under its base_model_prefix"
    if model._forward_hooks or model._forward_pre_hooks:
        return None, "forward hooks sit on the model (e.g. prefix-tuning's), so its own forward must run"
    return (backbone, head), ""


def lm_loss_sum(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    *,
    label_smoothing: float = 0.0,
    shift: bool = True,
    chunked: bool = True,
    check_labels: bool = True,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The default causal-LM loss of ``model`` on ``batch``: (summed token cross-entropy in fp32, counted
    tokens). The one loss entry point of the Trainer, the recipes and the benchmarks.

    ``batch`` holds the model's inputs and ``labels`` (aligned with ``input_ids``; ``-100`` ignored;
    shifted when ``shift``). With ``chunked`` and a model whose head allows it (:func:`chunked_head`)
    the backbone is called and :func:`deltatune.kernels.linear_cross_entropy` applies the head in chunks
    (the fp32 logits are never materialised); otherwise the model is called and its ``.logits`` go
    through :func:`logits_loss_sum`. ``check_labels=False`` skips the chunked path's label range check
    (a read of device labels; the Trainer checks the CPU copies with :func:`check_label_range`);
    ``chunk_size``: rows per chunk (default: :data:`CPU_CHUNK_ELEMS` logits per chunk on the CPU,
    :func:`deltatune.kernels.default_chunk_size` elsewhere). Both equal ``F.cross_entropy(logits.float(), ...)`` with
    ``reduction="sum"`` (values and gradients, within float rounding).
    """
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    found = chunked_head(model)[0] if chunked else None
    if found is None:
        return logits_loss_sum(get_logits(model(**inputs)), labels, label_smoothing=label_smoothing, shift=shift)
    backbone, head = found
    out = backbone(**inputs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    if shift:
        labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    labels = labels.reshape(-1).to(hidden.device)
    if chunk_size is None and hidden.device.type == "cpu":
        chunk_size = max(1, CPU_CHUNK_ELEMS // head.weight.shape[0])
    total = linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]),
        head.weight,
        labels,
        bias=head.bias,
        ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing,
        reduction="sum",
        chunk_size=chunk_size,
        check_labels=check_labels,
    )
    return total, (labels != IGNORE_INDEX).sum()


def check_label_range(model: nn.Module, labels: torch.Tensor) -> None:
    """Raise :class:`DeltaConfigError` when ``labels`` (a host tensor) hold a class outside the vocabulary of
    ``model``'s chunked head (no-op for models without one: their loss checks as it computes)."""
    found = chunked_head(model)[0]
    if found is not None:
        _check_label_range(labels, found[1].weight.shape[0], IGNORE_INDEX)


_SEQ_PAD = {"attention_mask": 0, "labels": IGNORE_INDEX, "token_type_ids": 0, "special_tokens_mask": 1}


class PadCollator:
    """Collate a list of feature dicts, right-padding the variable-length sequence fields.

    ``input_ids`` are padded with ``pad_token_id``, ``attention_mask`` with 0, ``labels`` with -100,
    ``token_type_ids`` with 0. Without ``attention_mask`` one is built from the lengths; without
    ``labels`` (and without a ``label`` key) the labels are a copy of ``input_ids`` with padding
    set to -100 (causal LM). Other keys go through ``torch.utils.data.default_collate``.
    Non-dict examples are passed to ``default_collate`` unchanged.

    ``pad_to_multiple_of`` rounds the padded length up to a multiple of it, so batches come in few
    shapes (what a captured CUDA-graph step, ``TrainConfig.cuda_graph``, needs).
    """

    def __init__(self, pad_token_id: int = 0, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        if pad_to_multiple_of is not None:
            check_int("pad_to_multiple_of", pad_to_multiple_of, minimum=1)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[Any]) -> Any:
        if not features or not isinstance(features[0], Mapping):
            return torch.utils.data.default_collate(list(features))
        keys = list(features[0].keys())
        for i, f in enumerate(features):
            if set(f.keys()) != set(keys):
                raise DeltaConfigError(
                    f"every example in a batch must have the same keys; example 0 has {sorted(keys)}, "
                    f"example {i} has {sorted(f.keys())}"
                )
        batch: dict[str, Any] = {}
        # a key of _SEQ_PAD is padded only when it holds sequences: a classification batch's
        # ``labels`` are one number per example and are stacked as they are
        seq_keys = [k for k in keys if k == "input_ids" or (k in _SEQ_PAD and _is_sequence(features[0][k]))]
        lengths = None
        if "input_ids" in keys:
            lengths = [len(f["input_ids"]) for f in features]
        for key in keys:
            if key in seq_keys:
                pad = self.pad_token_id if key == "input_ids" else _SEQ_PAD[key]
                batch[key] = _pad([f[key] for f in features], pad, self.pad_to_multiple_of)
            else:
                batch[key] = torch.utils.data.default_collate([f[key] for f in features])
        if lengths is not None:
            width = batch["input_ids"].shape[1]
            valid = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
            if "attention_mask" not in batch:
                batch["attention_mask"] = valid.long()
            if "labels" not in batch and "label" not in batch:
                batch["labels"] = batch["input_ids"].masked_fill(~valid, IGNORE_INDEX)
        return batch


def _is_sequence(value: Any) -> bool:
    """Whether one example's field is a sequence (padded) rather than a single number (stacked)."""
    if isinstance(value, torch.Tensor):
        return value.dim() > 0
    return isinstance(value, Sequence) and not isinstance(value, str)


def _pad(seqs: list[Any], value: int, multiple: int | None = None) -> torch.Tensor:
    tensors = [s if isinstance(s, torch.Tensor) else torch.as_tensor(s) for s in seqs]
    width = max(int(t.shape[0]) for t in tensors)
    if multiple is not None:
        width = -(-width // multiple) * multiple
    out = torch.full((len(tensors), width), value, dtype=tensors[0].dtype)
    for i, t in enumerate(tensors):
        out[i, : t.shape[0]] = t
    return out


def _model_vocab(model: torch.nn.Module) -> tuple[int | None, int | None]:
    """(input vocabulary size, output size) of a language model, where it can be read off its embeddings."""
    n_in = n_out = None
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    if isinstance(emb, torch.nn.Embedding):
        n_in = emb.num_embeddings
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        n_out = int(weight.shape[0])
    return n_in, n_out if n_out is not None else n_in


def check_lm_examples(dataset: Any, model: torch.nn.Module, name: str = "train_dataset", ignore_index: int = -100) -> None:
    """Check causal-LM examples (mappings with ``input_ids`` and optional ``labels``) before training.

    Every input id must lie in ``[0, vocabulary size)`` and every label other than ``ignore_index`` in
    ``[0, output size)`` (sizes read off the model's embeddings when it has them), and at least one
    example must have a label the shifted loss uses (not all ``ignore_index``): training on such
    data computes no loss and changes nothing. Datasets that are not a list/tuple of mappings (lazy
    datasets) are not scanned.

    Raises:
        DataFormatError: naming the dataset, the example index, the field and the value.
    """
    from ..errors import DataFormatError

    if not isinstance(dataset, (list, tuple)) or not dataset or not isinstance(dataset[0], Mapping):
        return
    if "input_ids" not in dataset[0]:
        return
    n_in, n_out = _model_vocab(model)
    usable = False
    for i, ex in enumerate(dataset):
        if not isinstance(ex, Mapping) or "input_ids" not in ex:
            continue
        ids = torch.as_tensor(ex["input_ids"])
        if ids.numel() and (int(ids.min()) < 0 or (n_in is not None and int(ids.max()) >= n_in)):
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise DataFormatError(
                f"{name}[{i}]['input_ids'] holds token id {bad}, outside the model's vocabulary [0, {n_in})"
            )
        labels = torch.as_tensor(ex["labels"]) if "labels" in ex else ids
        kept = labels[labels != ignore_index]
        if kept.numel() and (int(kept.min()) < 0 or (n_out is not None and int(kept.max()) >= n_out)):
            bad = int(kept.min()) if int(kept.min()) < 0 else int(kept.max())
            raise DataFormatError(
                f"{name}[{i}]['labels'] holds {bad}, neither {ignore_index} (ignored) nor a class in [0, {n_out})"
            )
        usable = usable or bool((labels.reshape(-1)[1:] != ignore_index).any())
    if not usable:
        raise DataFormatError(
            f"every label of {name} is {ignore_index} (or only the first position, which the shifted causal-LM "
            f"loss never uses, has one): there is nothing to train on"
        )
