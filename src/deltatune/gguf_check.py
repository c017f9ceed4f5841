"""Check an exported GGUF file in llama.cpp against the PyTorch model it came from.

Thin helpers over ``llama-cpp-python`` (an optional package: ``bash scripts/build_llama_cpp.sh``
builds and installs it) used by the tests and ``benchmarks/bench_gguf_llama_cpp.py``: logits of a
token sequence, greedy decoding and windowed perplexity, the same functions for llama.cpp and for a
PyTorch causal LM, so the two can be compared token for token. Token ids go in directly (no
tokenisation), so both sides see the same input.

:func:`f16_matmuls` makes a PyTorch model compute as llama.cpp does with an F16 file on the CPU (weights
rounded to F16, and every matrix product's input too: ggml converts the activations to F16 for an F16
weight), to tell the format's rounding from an export error; ``kv_cache="f32"`` keeps llama.cpp's
attention cache at F32 (its default is F16) for the same purpose.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from .errors import DeltaConfigError, MissingPackageError

__all__ = [
    "KV_CACHE_TYPES",
    "f16_matmuls",
    "llama_cpp_greedy",
    "llama_cpp_logits",
    "llama_cpp_model",
    "perplexity",
    "torch_greedy",
    "torch_logits",
]


#: llama.cpp's attention cache types (``--cache-type-k/-v``) :func:`llama_cpp_model` takes -> ggml type id
KV_CACHE_TYPES: dict[str, int] = {"f32": 0, "f16": 1}


def llama_cpp_model(
    path: str | os.PathLike, *, lora: str | os.PathLike | None = None, n_ctx: int = 512, n_threads: int | None = None,
    kv_cache: str = "f16",
) -> Any:
    """A ``llama_cpp.Llama`` over the GGUF file ``path`` (with the GGUF LoRA adapter ``lora`` applied),
    keeping the logits of every position. ``kv_cache`` is the type of the attention's key/value cache:
    ``"f16"`` (llama.cpp's default) or ``"f32"`` (``--cache-type-k f32 --cache-type-v f32``).

    Raises:
        DeltaConfigError: an unknown ``kv_cache``.
        MissingPackageError: llama-cpp-python is not installed (the message says how to build it).
    """
    if kv_cache not in KV_CACHE_TYPES:
        raise DeltaConfigError(f"kv_cache must be one of {', '.join(map(repr, KV_CACHE_TYPES))}, got {kv_cache!r}")
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        raise MissingPackageError(
            "running GGUF files needs llama-cpp-python; build and install it with: bash scripts/build_llama_cpp.sh"
        ) from exc
    return Llama(
        model_path=os.fspath(path), lora_path=os.fspath(lora) if lora is not None else None, n_ctx=n_ctx,
        n_batch=n_ctx, n_threads=n_threads or os.cpu_count() or 1, logits_all=True, verbose=False, seed=0,
        type_k=KV_CACHE_TYPES[kv_cache], type_v=KV_CACHE_TYPES[kv_cache],
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


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(x.dtype)


@contextlib.contextmanager
def f16_matmuls(model: torch.nn.Module, *, weights: bool = True, activations: bool = True) -> Iterator[torch.nn.Module]:
    """Inside the block, ``model`` computes its matrix products as llama.cpp's CPU backend does for an F16
    GGUF file: every matrix parameter (Linear and embedding weights) rounded to F16 (``weights``) and every
    ``nn.Linear``'s input rounded to F16 (``activations``: ggml converts the activations to the weight's
    type before the product); the products themselves accumulate in float32 as ggml's do. Norms,
    rotary embeddings, softmax and the attention's own products stay float32 (llama.cpp's F16 key/value
    cache is not emulated: compare with ``kv_cache="f32"``). The weights are restored on exit.
    """
    saved = []
    hooks = []
    try:
        if weights:
            with torch.no_grad():
                for p in model.parameters():  # a tied matrix is one parameter, rounded once
                    if p.ndim == 2 and p.is_floating_point():
                        saved.append((p, p.detach().clone()))
                        p.copy_(_f16(p))
        if activations:
            for m in model.modules():
                if isinstance(m, torch.nn.Linear):
                    hooks.append(m.register_forward_pre_hook(lambda _m, args: (_f16(args[0]), *args[1:])))
        yield model
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for p, v in saved:
                p.copy_(v)


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
