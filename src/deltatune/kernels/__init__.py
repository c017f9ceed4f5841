"""Fast-path kernels (pure PyTorch): lean LoRA autograd Functions and chunked linear + cross-entropy.

* :mod:`.common`: compute dtype, casts, dropout masks and their bit packing;
* :mod:`.lora_autograd`: the one LoRA autograd Function and the entry points with named fields
  (:class:`LoraProjection`) that the LoRA layers call;
* :mod:`.lora_function`: the argument-checked LoRA kernels;
* :mod:`.cross_entropy`: chunked linear + cross-entropy (no full logits).

This package imports only :mod:`deltatune.errors`, :mod:`deltatune.validation` and torch.
"""

from __future__ import annotations

from .common import compute_dtype, dropout_mask, pack_mask, saved_mask, unpack_mask
from .cross_entropy import causal_lm_loss, default_chunk_size, linear_cross_entropy
from .lora_autograd import LoraProjection, lora_projection, lora_projections
from .lora_function import fused_lora_A, lora_linear, lora_linear_multi, lora_merged_linear

__all__ = [
    "LoraProjection",
    "causal_lm_loss",
    "compute_dtype",
    "default_chunk_size",
    "dropout_mask",
    "fused_lora_A",
    "linear_cross_entropy",
    "lora_linear",
    "lora_linear_multi",
    "lora_merged_linear",
    "lora_projection",
    "lora_projections",
    "pack_mask",
    "saved_mask",
    "unpack_mask",
]
