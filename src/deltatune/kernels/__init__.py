"""Fast-path kernels: lean LoRA autograd Functions and chunked linear + cross-entropy (pure PyTorch)."""

from __future__ import annotations

from .cross_entropy import causal_lm_loss, default_chunk_size, linear_cross_entropy
from .lora_function import (
    dropout_mask,
    fused_lora_A,
    lora_linear,
    lora_linear_multi,
    lora_merged_linear,
    pack_mask,
    unpack_mask,
)

__all__ = [
    "causal_lm_loss",
    "default_chunk_size",
    "dropout_mask",
    "fused_lora_A",
    "linear_cross_entropy",
    "lora_linear",
    "lora_linear_multi",
    "lora_merged_linear",
    "pack_mask",
    "unpack_mask",
]
