"""LoRA for the Jittor models, and deltatune's delta format in both directions.

A :class:`LoraLinear` replaces a frozen :class:`~deltatune.jittor.models.Linear`::

    y = base(x) + scaling * (dropout(x) @ A^T) @ B^T          scaling = alpha / r

with ``A`` ``(r, in)`` and ``B`` ``(out, r)`` as in :class:`deltatune.methods.lora.LoraLayer`. With
``enable_lora`` slices (GPT-2's fused ``c_attn`` with ``[True, False, True]``: LoRA on q and v, as
loralib's ``MergedLinear``) ``A`` is ``(r * n_on, in)``, ``B`` is ``(out / k * n_on, r)`` and rank block
``j`` of ``A`` feeds output slice ``j`` of ``B`` only (one dropout mask shared by the slices).

:func:`save_delta` writes ``delta.safetensors`` + ``delta_config.json`` exactly as
:func:`deltatune.save_delta` does (same keys, config, targets, SHA-256), so :func:`deltatune.load_delta`
loads it into the PyTorch model; :func:`load_delta` reads a PyTorch-written delta into a Jittor model.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, DeltaConfigError
from . import require_jittor
from .models import Linear, to_jt, to_np

__all__ = ["LoraLinear", "apply_lora", "check_lora_config", "delta_arrays", "load_delta", "save_delta", "trainable"]


def check_lora_config(config: Any) -> Any:
    """Check a delta config is a LoRA config the Jittor side implements; returns the LoraConfig.

    Raises:
        DeltaConfigError: another method (named, LoRA being the one supported) or an unsupported LoRA option.
    """
    from ..config import DeltaConfig, config_from_dict

    if isinstance(config, dict):
        method = config.get("method")
        if method != "lora":
            raise DeltaConfigError(
                f"the Jittor side implements the delta method 'lora' only, got delta.method {method!r}"
            )
        config = config_from_dict(config)
    if not isinstance(config, DeltaConfig) or getattr(config, "method", None) != "lora":
        raise DeltaConfigError(
            f"the Jittor side implements the delta method 'lora' only, got {getattr(config, 'method', type(config).__name__)!r}"
        )
    bad = [
        f"{name}={getattr(config, name)!r}"
        for name, ok in (("use_dora", False), ("bias", "none"), ("modules_to_save", None))
        if getattr(config, name) not in (ok, [] if ok is None else ok)
    ]
    if config.rank_pattern or config.alpha_pattern:
        bad.append("rank_pattern/alpha_pattern")
    if bad:
        raise DeltaConfigError(
            f"the Jittor LoRA implements plain LoRA (use_dora=False, bias='none', no modules_to_save, no "
            f"rank/alpha patterns); got {', '.join(bad)}"
        )
    return config


class LoraLinear:
    """A frozen linear layer with a trainable LoRA update (see the module docstring)."""

    def __init__(
        self, base: Linear, r: int, alpha: float, dropout: float, slices: list[bool] | None = None,
        use_rslora: bool = False, seed: int = 0,
    ) -> None:
        require_jittor()
        self.layer = base
        self.r = r
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.p = dropout
        self.slices = slices
        self.training = False
        self.dropout_enabled = True
        n_on = sum(slices) if slices else 1
        k = len(slices) if slices else 1
        if base.out_features % k:
            raise DeltaConfigError(
                f"enable_lora has {k} slices but the layer has {base.out_features} outputs (not divisible)"
            )
        rng = np.random.default_rng(seed)
        bound = 1.0 / math.sqrt(base.in_features)  # kaiming_uniform_(a=sqrt(5)), as PyTorch's default
        self.A = to_jt(rng.uniform(-bound, bound, (r * n_on, base.in_features)).astype(np.float32))
        self.B = to_jt(np.zeros(((base.out_features // k) * n_on, r), dtype=np.float32))

    @property
    def in_features(self) -> int:
        return self.layer.in_features

    @property
    def out_features(self) -> int:
        return self.layer.out_features

    def __call__(self, x: Any) -> Any:
        jt = require_jittor()
        y = self.layer.base(x)
        xd = x
        if self.training and self.dropout_enabled and self.p > 0:
            keep = (jt.rand(x.shape) >= self.p).float32()
            xd = x * keep / (1.0 - self.p)
        h = jt.nn.matmul_transpose(xd, self.A)
        if self.slices is None:
            return y + jt.nn.matmul_transpose(h, self.B) * self.scaling
        k, r = len(self.slices), self.r
        step = self.out_features // k
        parts, j = [], 0
        lead = tuple(x.shape[:-1])
        for on in self.slices:
            if on:
                hj = h[..., j * r : (j + 1) * r]
                parts.append(jt.nn.matmul_transpose(hj, self.B[j * step : (j + 1) * step, :]) * self.scaling)
                j += 1
            else:
                parts.append(jt.zeros(lead + (step,), dtype=y.dtype))
        return y + jt.concat(parts, dim=-1)


def _targets(model: Any, config: Any) -> list[str]:
    from ..inject import match_pattern, normalise_patterns

    pats = normalise_patterns(config.target_modules)
    if pats is None:
        pats = ["q_proj", "v_proj"] if model.model_type == "llama" else ["c_attn"]
    names = [n for n in model.linears if any(match_pattern(n, p) for p in pats)]
    if config.exclude_modules:
        ex = normalise_patterns(config.exclude_modules) or []
        names = [n for n in names if not any(match_pattern(n, p) for p in ex)]
    if not names:
        raise DeltaConfigError(
            f"LoRA target_modules {pats} match no linear layer of the Jittor {model.model_type} model "
            f"(its layers end in: {sorted({n.rsplit('.', 1)[-1] for n in model.linears})})"
        )
    return names


def apply_lora(model: Any, config: Any, targets: list[str] | None = None, seed: int = 0) -> list[str]:
    """Wrap the target layers of a Jittor model with :class:`LoraLinear` (A kaiming-uniform, B zero);
    returns the wrapped names. ``targets`` (full names) replaces the config's patterns."""
    config = check_lora_config(config)
    if getattr(model, "lora_config", None) is not None:
        raise DeltaConfigError("the Jittor model already has LoRA applied")
    names = list(targets) if targets is not None else _targets(model, config)
    unknown = [n for n in names if n not in model.linears]
    if unknown:
        raise CheckpointError(f"LoRA targets not in the Jittor {model.model_type} model: {unknown[:5]}")
    for i, n in enumerate(names):
        from ..inject import match_pattern

        slices = next((list(v) for pat, v in config.enable_lora.items() if match_pattern(n, pat)), None)
        model.linears[n] = LoraLinear(
            model.linears[n], config.r, config.alpha, config.dropout, slices, config.use_rslora, seed=seed + i
        )
    model.lora_config = config
    model.lora_targets = names
    return names


def trainable(model: Any) -> dict[str, Any]:
    """``{checkpoint key: Jittor Var}`` of the LoRA matrices (the keys :func:`deltatune.save_delta` uses)."""
    out: dict[str, Any] = {}
    for n in getattr(model, "lora_targets", []):
        layer = model.linears[n]
        out[f"{n}.lora_A.weight"] = layer.A
        out[f"{n}.lora_B.weight"] = layer.B
    return out


def delta_arrays(model: Any) -> dict[str, np.ndarray]:
    """The LoRA matrices as float32 numpy arrays (checkpoint keys)."""
    return {k: np.ascontiguousarray(to_np(v).astype(np.float32)) for k, v in trainable(model).items()}


def set_mode(model: Any, training: bool, dropout: bool = True) -> None:
    """Train/eval mode and the dropout switch of the model and its LoRA layers."""
    model.train(training)
    model.dropout_enabled = dropout
    for n in getattr(model, "lora_targets", []):
        model.linears[n].training = training
        model.linears[n].dropout_enabled = dropout


def save_delta(model: Any, directory: str | os.PathLike) -> Path:
    """Write the model's LoRA matrices in deltatune's delta format (atomically; see the module docstring)."""
    from safetensors.numpy import save

    from ..checkpoint import write_delta_files

    if getattr(model, "lora_config", None) is None:
        raise CheckpointError("the Jittor model has no LoRA applied; nothing to save")
    tensors = delta_arrays(model)
    return write_delta_files(
        directory,
        save(tensors),
        adapter_name="default",
        config=model.lora_config.to_dict(),
        targets=list(model.lora_targets),
        modules_to_save=[],
        tensors={k: (list(v.shape), "float32") for k, v in tensors.items()},
    )


def load_delta(model: Any, directory: str | os.PathLike) -> Any:
    """Load a delta written by :func:`deltatune.save_delta` (or :func:`save_delta`) into a Jittor model.

    LoRA is applied first when the model has none (with the checkpoint's config and targets). The hash,
    names and shapes are checked; a mismatch raises :class:`~deltatune.errors.CheckpointError`.
    """
    from safetensors.numpy import load as load_bytes

    from ..checkpoint import read_delta_bytes, read_delta_meta
    from ..config import config_from_dict

    meta = read_delta_meta(directory)
    data = read_delta_bytes(directory, meta)
    config = check_lora_config(config_from_dict(meta["config"]))
    if getattr(model, "lora_config", None) is None:
        apply_lora(model, config, targets=list(meta["targets"]))
    elif model.lora_config.to_dict() != config.to_dict():
        raise CheckpointError("the Jittor model's LoRA config differs from the checkpoint's")
    tensors = load_bytes(data)
    have = trainable(model)
    missing, unexpected = sorted(set(have) - set(tensors)), sorted(set(tensors) - set(have))
    shapes = [f"{k}: {tensors[k].shape} vs {tuple(have[k].shape)}" for k in set(have) & set(tensors)
              if tuple(tensors[k].shape) != tuple(have[k].shape)]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"checkpoint {os.fspath(directory)!r} does not fit the Jittor model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, shape mismatches {shapes[:5]}"
        )
    for k, var in have.items():
        var.update(to_jt(tensors[k]))
    return model
