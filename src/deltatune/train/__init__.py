"""The training engine: :class:`Trainer`, :class:`TrainConfig` and their helpers."""

from __future__ import annotations

from .config import TrainConfig
from .cuda_graph import CapturedStep, optimizer_is_capturable
from .distributed import EpochBatchSampler
from .fsdp import find_block_modules, full_parameters, save_delta_sharded, shard_model
from .fused import apply_fused_kernels, fuse_llama
from .logging import read_log
from .losses import PadCollator, chunked_head, lm_loss_sum, logits_loss_sum
from .optim import AdamW, param_groups
from .regional_compile import compile_blocks
from .resume import (
    find_latest_checkpoint,
    list_checkpoints,
    load_trainable_params,
    save_trainable_params,
)
from .schedules import build_scheduler, lr_factor
from .trainer import Trainer, TrainerCallback, TrainState, set_seed

__all__ = [
    "AdamW",
    "CapturedStep",
    "EpochBatchSampler",
    "PadCollator",
    "TrainConfig",
    "TrainState",
    "Trainer",
    "TrainerCallback",
    "apply_fused_kernels",
    "build_scheduler",
    "chunked_head",
    "compile_blocks",
    "find_block_modules",
    "fuse_llama",
    "find_latest_checkpoint",
    "full_parameters",
    "list_checkpoints",
    "lm_loss_sum",
    "load_trainable_params",
    "logits_loss_sum",
    "lr_factor",
    "optimizer_is_capturable",
    "param_groups",
    "read_log",
    "save_delta_sharded",
    "save_trainable_params",
    "set_seed",
    "shard_model",
]
