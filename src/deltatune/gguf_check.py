"""Check an exported GGUF file in llama.cpp against the PyTorch model it came from.

Thin helpers over ``llama-cpp-python`` (an optional package: ``bash scripts/build_llama_cpp.sh``
builds and installs it) used by the tests and ``benchmarks/bench_gguf_llama_cpp.py``: logits of a
token sequence, greedy decoding and windowed perplexity, the same functions for llama.cpp and for a
PyTorch causal LM, so the two can be compared token for token. Token ids go in directly (no
tokenisation), so both sides see the same input.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .errors import DeltaConfigError, MissingPackageError

__all__ = [
    "llama_cpp_greedy",
    "llama_cpp_logits",
    "llama_cpp_model",
    "perplexity",
    "torch_greedy",
    "torch_logits",
]


def llama_cpp_model(
    path: str | os.PathLike, *, lora: str | os.PathLike | None = None, n_ctx: int = 512, n_threads: int | None = None
) -> Any:
    """A ``llama_cpp.Llama`` over the GGUF file ``path`` (with the GGUF LoRA adapter ``lora`` applied),
    keeping the logits of every position.

    Raises:
        MissingPackageError: llama-cpp-python is not installed (the message says how to build it).
    """
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        raise MissingPackageError(
            "running GGUF files needs llama-cpp-python; build and install it with: bash scripts/build_llama_cpp.sh"
        ) from exc
    return Llama(
        model_path=os.fspath(path), lora_path=os.fspath(lora) if lora is not None else None, n_ctx=n_ctx,
        n_batch=n_ctx, n_threads=n_threads or os.cpu_count() or 1, logits_all=True, verbose=False, seed=0,
    )


def _ids(ids: Sequence[int]) -> list[int]:
    out = [int(i) for i in ids]
    if not out:
        raise DeltaConfigError("ids must hold at least one token id, got []")
    return out


def llama_cpp_logits(llm: Any, ids: Sequence[int]) -> np.ndarray:
    """llama.cpp's logits (float32, ``len(ids) x vocab``) of every position of ``ids``, from a fresh context."""
    ids = _ids(ids)
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def llama_cpp_greedy(llm: Any, ids: Sequence[int], steps: int) -> list[int]:
    """The ``steps`` token ids llama.cpp's greedy decoding (argmax) appends to ``ids``."""
    ids = _ids(ids)
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    for _ in range(steps):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def torch_logits(model: torch.nn.Module, ids: Sequence[int]) -> np.ndarray:
    """The PyTorch causal LM's logits (float32 numpy, ``len(ids) x vocab``) for ``ids``."""
    ids = _ids(ids)
    device = next(model.parameters()).device
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu().numpy()


def torch_greedy(model: torch.nn.Module, ids: Sequence[int], steps: int) -> list[int]:
    """The ``steps`` token ids greedy decoding of the PyTorch model appends to ``ids`` (a full forward
    per step, as plain as it gets)."""
    seq = _ids(ids)
    for _ in range(steps):
        seq.append(int(torch_logits(model, seq)[-1].argmax()))
    return seq[len(ids):]


def perplexity(logits_fn: Callable[[list[int]], np.ndarray], ids: Sequence[int], window: int) -> float:
    """Perplexity of ``ids`` in consecutive, non-overlapping windows of ``window`` tokens: each window is
    scored from a fresh context by ``logits_fn(window_ids)`` (``llama_cpp_logits`` or ``torch_logits``
    bound to a model), and every token but each window's first is predicted."""
    ids = _ids(ids)
    if window < 2:
        raise DeltaConfigError(f"window must be at least 2 tokens, got {window!r}")
    total, count = 0.0, 0
    for start in range(0, len(ids), window):
        chunk = ids[start : start + window]
        if len(chunk) < 2:
            break
        x = np.asarray(logits_fn(chunk), dtype=np.float64)[:-1]
        top = x.max(axis=1)
        logz = np.log(np.exp(x - top[:, None]).sum(axis=1)) + top
        total += float(np.sum(logz - x[np.arange(len(chunk) - 1), chunk[1:]]))
        count += len(chunk) - 1
    if count == 0:
        raise DeltaConfigError(f"ids must hold at least 2 tokens to score, got {len(ids)}")
    return math.exp(total / count)
