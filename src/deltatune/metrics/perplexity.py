"""Perplexity of a causal language model on a token stream, with a sliding window.

The stream is cut into windows of at most ``max_length`` tokens whose starts are ``stride`` apart
(the method of the Hugging Face perplexity guide). Every token is scored exactly once: the first
window scores all its tokens but the first, each later window scores only the tokens that the
previous window did not reach, so each token is predicted with as much left context as its
window gives (at least ``max_length - stride`` tokens once the stream is long enough). With
``stride == max_length`` the windows do not overlap and the first token of each window, which has
no context inside it, is not scored.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import DeltaConfigError, DeltaConfigTypeError
from ..validation import check_bool, check_int, check_positive_int

__all__ = ["perplexity", "sliding_windows"]


def sliding_windows(num_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows ``(begin, end, score_from)`` over a stream of ``num_tokens`` tokens.

    The model reads tokens ``[begin, end)`` and scores tokens ``[score_from, end)``; the scored
    ranges of consecutive windows tile ``[1, num_tokens)`` (less the window starts when
    ``stride == max_length``).
    """
    check_int("num_tokens", num_tokens, minimum=2)
    check_int("max_length", max_length, minimum=2)
    check_positive_int("stride", stride)
    if stride > max_length:
        raise DeltaConfigError(f"stride must be an int <= max_length ({max_length}), got {stride}")
    windows = []
    prev_end = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + max_length, num_tokens)
        score_from = max(prev_end, begin + 1)
        if score_from < end:
            windows.append((begin, end, score_from))
        prev_end = end
        if end == num_tokens:
            break
    return windows


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


@torch.no_grad()
def perplexity(
    model: Any,
    input_ids: torch.Tensor,
    *,
    max_length: int,
    stride: int,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, float | int]:
    """Sliding-window perplexity of ``model`` on the 1-D token stream ``input_ids``.

    Args:
        model: a causal LM called as ``model(input_ids=...)`` whose output has ``.logits``
            (any Hugging Face ``*ForCausalLM``). It is put in eval mode for the call and its
            previous mode is restored afterwards.
        input_ids: 1-D integer tensor, at least 2 tokens.
        max_length: window length (the model's context size, at least 2).
        stride: distance between window starts, ``1 <= stride <= max_length``; smaller is slower
            and gives each token more context.
        batch_size: windows per forward pass (windows of unequal length go in separate passes).
        device: where to run; default: the device of the model's parameters.
        progress: show a tqdm progress bar over windows.

    Returns:
        ``{"perplexity": exp(nll), "nll": mean negative log-likelihood per scored token (nats),
        "tokens": number of scored tokens}``.
    """
    if not callable(model):
        raise DeltaConfigTypeError(f"model must be a callable causal LM, got {type(model).__name__}")
    if not isinstance(input_ids, torch.Tensor):
        raise DeltaConfigTypeError(
            f"input_ids must be a 1-D torch.LongTensor, got {type(input_ids).__name__}"
        )
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise DeltaConfigTypeError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
    if input_ids.dim() != 1:
        raise DeltaConfigError(f"input_ids must be a 1-D token stream, got shape {tuple(input_ids.shape)}")
    if input_ids.numel() < 2:
        raise DeltaConfigError(f"input_ids must hold at least 2 tokens, got {input_ids.numel()}")
    check_int("max_length", max_length, minimum=2)
    check_positive_int("stride", stride)
    if stride > max_length:
        raise DeltaConfigError(f"stride must be an int <= max_length ({max_length}), got {stride}")
    check_positive_int("batch_size", batch_size)
    check_bool("progress", progress)
    dev = torch.device(device) if device is not None else _model_device(model)

    windows = sliding_windows(input_ids.numel(), max_length, stride)
    ids = input_ids.to(device=dev, dtype=torch.long)

    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    total_nll = 0.0
    total_tokens = 0
    try:
        bar = tqdm(total=len(windows), desc="perplexity", unit="window", disable=not progress)
        i = 0
        while i < len(windows):
            length = windows[i][1] - windows[i][0]
            batch = [windows[i]]
            while (
                len(batch) < batch_size
                and i + len(batch) < len(windows)
                and windows[i + len(batch)][1] - windows[i + len(batch)][0] == length
            ):
                batch.append(windows[i + len(batch)])
            x = torch.stack([ids[b:e] for b, e, _ in batch])
            logits = model(input_ids=x).logits
            for row, (b, e, s) in enumerate(batch):
                # logits at window position t - 1 - b predict token t
                pred = logits[row, s - 1 - b : e - 1 - b].float()
                target = ids[s:e]
                total_nll += float(F.cross_entropy(pred, target, reduction="sum").double())
                total_tokens += e - s
            i += len(batch)
            bar.update(len(batch))
        bar.close()
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    nll = total_nll / total_tokens
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": total_tokens}
