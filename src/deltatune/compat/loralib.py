"""loralib's API (Hu et al.'s ``loralib`` 0.1.x) on deltatune's LoRA kernels.

The LoRA paper's code runs with one changed import::

    import deltatune.compat.loralib as lora

    layer = lora.Linear(in_features, out_features, r=16)
    qkv = lora.MergedLinear(d_model, 3 * d_model, r=8, enable_lora=[True, False, True])
    lora.mark_only_lora_as_trainable(model, bias="lora_only")
    torch.save(lora.lora_state_dict(model, bias="lora_only"), path)
    model.load_state_dict(torch.load(path), strict=False)

The layers subclass ``nn.Linear`` / ``nn.Embedding`` / ``nn.Conv2d`` and keep loralib's parameter
names (``weight``, ``bias``, ``lora_A``, ``lora_B``), so a pretrained ``state_dict`` loads into them
unchanged. As in loralib, ``r > 0`` freezes the layer's weight, ``lora_A`` starts kaiming-uniform
(``a=sqrt(5)``) and ``lora_B`` at zero (for :class:`Embedding`: ``lora_A`` zero, ``lora_B`` normal),
the update is scaled by ``lora_alpha / r``, and with ``merge_weights=True`` the update is folded into
the weight on ``.eval()`` and taken out again on ``.train()``.

The forward of :class:`Linear` and :class:`MergedLinear` is :func:`deltatune.kernels.lora_function.lora_linear`
/ :func:`~deltatune.kernels.lora_function.lora_merged_linear` (their lean backward) while the weight is
frozen. Bad arguments are :class:`~deltatune.errors.DeltaConfigError` (loralib asserts or ignores):
``r`` must be an int >= 0, ``lora_dropout`` in [0, 1), ``bias`` one of ``"none"``, ``"all"``,
``"lora_only"``; :class:`MergedLinear` needs ``out_features`` divisible by ``len(enable_lora)`` and
:class:`Conv2d` an int ``kernel_size``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import DeltaConfigError, DeltaConfigTypeError
from ..kernels.lora_function import lora_linear, lora_merged_linear
from ..methods.lora import LoraLayer
from ..validation import check_bool, check_choice, check_float, check_int, check_type

__all__ = [
    "Conv2d",
    "Embedding",
    "LoRALayer",
    "Linear",
    "MergedLinear",
    "lora_state_dict",
    "mark_only_lora_as_trainable",
]

BIAS_CHOICES = ("none", "all", "lora_only")


class LoRALayer:
    """The loralib fields shared by every LoRA layer: ``r``, ``lora_alpha``, ``lora_dropout``,
    ``merge_weights`` and ``merged``."""

    def __init__(self, r: int, lora_alpha: float, lora_dropout: float, merge_weights: bool) -> None:
        cls = type(self).__name__
        self.r = check_int(f"{cls}.r", r, minimum=0)
        check_type(f"{cls}.lora_alpha", lora_alpha, (int, float), "a number")
        if isinstance(lora_alpha, bool):
            raise DeltaConfigTypeError(f"{cls}.lora_alpha must be a number, got {lora_alpha!r} (bool)")
        self.lora_alpha = lora_alpha
        self.lora_dropout_p = check_float(f"{cls}.lora_dropout", lora_dropout, low=0.0, high=1.0, high_inclusive=False)
        self.lora_dropout = nn.Dropout(self.lora_dropout_p) if self.lora_dropout_p > 0 else nn.Identity()
        self.merge_weights = check_bool(f"{cls}.merge_weights", merge_weights)
        self.merged = False
        self.scaling = self.lora_alpha / self.r if self.r > 0 else 0.0

    @property
    def _active(self) -> bool:
        """Does the layer carry a LoRA update?"""
        return self.r > 0

    def train(self, mode: bool = True) -> LoRALayer:
        """``nn.Module.train`` plus loralib's rule: unmerge when training starts, merge when it stops."""
        super().train(mode)  # type: ignore[misc]
        self._set_merged(mode)
        return self

    def _set_merged(self, mode: bool) -> None:
        if not self.merge_weights or not self._active:
            return
        if mode and self.merged:
            self._apply_delta(-1.0)
            self.merged = False
        elif not mode and not self.merged:
            self._apply_delta(1.0)
            self.merged = True

    def _apply_delta(self, sign: float) -> None:  # pragma: no cover - every layer overrides it
        raise NotImplementedError


class Embedding(LoRALayer, nn.Embedding):
    """loralib's LoRA ``Embedding``: ``E[x] + (A^T[x] · B^T) · lora_alpha / r``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, r: int = 0, lora_alpha: float = 1,
                 merge_weights: bool = True, **kwargs: Any) -> None:
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, **kwargs)
        LoRALayer.__init__(self, r, lora_alpha, 0.0, merge_weights)
        if self.r > 0:
            self.lora_A = nn.Parameter(self.weight.new_zeros((self.r, num_embeddings)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((embedding_dim, self.r)))
            self.weight.requires_grad = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.Embedding.reset_parameters(self)
        if getattr(self, "r", 0) > 0 and hasattr(self, "lora_A"):
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)

    def _apply_delta(self, sign: float) -> None:
        with torch.no_grad():
            self.weight += sign * (self.lora_B @ self.lora_A).transpose(0, 1) * self.scaling


    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.Embedding.forward(self, x)
        if self.r > 0 and not self.merged:
            after_a = F.embedding(x, self.lora_A.transpose(0, 1), self.padding_idx, self.max_norm, self.norm_type,
                                  self.scale_grad_by_freq, self.sparse)
            out = out + (after_a @ self.lora_B.transpose(0, 1)) * self.scaling
        return out


class Linear(LoRALayer, nn.Linear):
    """loralib's LoRA ``Linear``: ``x·Wᵀ + b + (dropout(x)·Aᵀ·Bᵀ) · lora_alpha / r``.

    ``fan_in_fan_out=True`` stores the weight as ``(in, out)`` (GPT-2's ``Conv1D`` layout), as loralib.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, fan_in_fan_out: bool = False, merge_weights: bool = True,
                 **kwargs: Any) -> None:
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        LoRALayer.__init__(self, r, lora_alpha, lora_dropout, merge_weights)
        self.fan_in_fan_out = check_bool("Linear.fan_in_fan_out", fan_in_fan_out)
        if self.r > 0:
            self.lora_A = nn.Parameter(self.weight.new_zeros((self.r, in_features)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((out_features, self.r)))
            self.weight.requires_grad = False
        self.reset_parameters()
        if fan_in_fan_out:
            self.weight.data = self.weight.data.transpose(0, 1)

    def reset_parameters(self) -> None:
        nn.Linear.reset_parameters(self)
        if getattr(self, "r", 0) > 0 and hasattr(self, "lora_A"):
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def _t(self, w: torch.Tensor) -> torch.Tensor:
        return w.transpose(0, 1) if self.fan_in_fan_out else w

    def _apply_delta(self, sign: float) -> None:
        with torch.no_grad():
            self.weight += sign * self._t(self.lora_B @ self.lora_A) * self.scaling


    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.r > 0 and not self.merged:
            if self.weight.requires_grad and torch.is_grad_enabled():
                # the weight was unfrozen by hand: the plain formula (the kernel wants a frozen weight)
                out = F.linear(x, self._t(self.weight), self.bias)
                return out + (self.lora_dropout(x) @ self.lora_A.transpose(0, 1) @ self.lora_B.transpose(0, 1)) * self.scaling
            return lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling, self.lora_dropout_p,
                               self.training, fan_in_fan_out=self.fan_in_fan_out)
        return F.linear(x, self._t(self.weight), self.bias)


class MergedLinear(LoRALayer, nn.Linear):
    """loralib's ``MergedLinear``: one fused projection (e.g. ``qkv``) split into ``len(enable_lora)`` equal
    output slices, LoRA on the slices marked True (``lora_A``: ``(r·k, in)``, ``lora_B``: ``(out/n·k, r)``,
    ``k`` the number of enabled slices)."""

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, enable_lora: Sequence[bool] = (False,), fan_in_fan_out: bool = False,
                 merge_weights: bool = True, **kwargs: Any) -> None:
        if not isinstance(enable_lora, (list, tuple)) or not enable_lora or not all(
            isinstance(b, bool) for b in enable_lora
        ):
            raise DeltaConfigTypeError(f"MergedLinear.enable_lora must be a non-empty list of bool, got {enable_lora!r}")
        if out_features % len(enable_lora):
            raise DeltaConfigError(
                f"MergedLinear.out_features {out_features} must be divisible by len(enable_lora) = {len(enable_lora)}"
            )
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        LoRALayer.__init__(self, r, lora_alpha, lora_dropout, merge_weights)
        self.enable_lora = list(enable_lora)
        self.fan_in_fan_out = check_bool("MergedLinear.fan_in_fan_out", fan_in_fan_out)
        k = sum(self.enable_lora)
        self.slice = out_features // len(self.enable_lora)
        if self.r > 0 and k:
            self.lora_A = nn.Parameter(self.weight.new_zeros((self.r * k, in_features)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((self.slice * k, self.r)))
            self.weight.requires_grad = False
        self.reset_parameters()
        if fan_in_fan_out:
            self.weight.data = self.weight.data.transpose(0, 1)

    @property
    def _active(self) -> bool:
        return self.r > 0 and any(self.enable_lora)

    def reset_parameters(self) -> None:
        nn.Linear.reset_parameters(self)
        if getattr(self, "r", 0) > 0 and hasattr(self, "lora_A"):
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """The ``(out, in)`` update ``lora_alpha/r · B_j·A_j`` on the enabled slices, zero elsewhere."""
        delta = self.lora_A.new_zeros((self.out_features, self.in_features))
        j = 0
        for s, on in enumerate(self.enable_lora):
            if on:
                a = self.lora_A[j * self.r:(j + 1) * self.r]
                b = self.lora_B[j * self.slice:(j + 1) * self.slice]
                delta[s * self.slice:(s + 1) * self.slice] = b @ a
                j += 1
        return delta * self.scaling

    def _apply_delta(self, sign: float) -> None:
        if not self._active:
            return
        with torch.no_grad():
            d = self.delta_weight()
            self.weight += sign * (d.transpose(0, 1) if self.fan_in_fan_out else d)


    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.transpose(0, 1) if self.fan_in_fan_out else self.weight
        if not self._active or self.merged:
            return F.linear(x, w, self.bias)
        if self.weight.requires_grad and torch.is_grad_enabled():
            # the weight was unfrozen by hand: the plain formula (the kernel wants a frozen weight)
            return F.linear(x, w, self.bias) + F.linear(self.lora_dropout(x), self.delta_weight())
        return lora_merged_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.enable_lora, self.scaling,
                                  self.lora_dropout_p, self.training, fan_in_fan_out=self.fan_in_fan_out)


class Conv2d(LoRALayer, nn.Module):
    """loralib's LoRA ``Conv2d`` (0.1.2's ``ConvLoRA``): ``self.conv`` (an ``nn.Conv2d``, so a pretrained
    kernel loads as ``conv.weight``) plus ``(B·A).view(conv.weight.shape) · lora_alpha / r``, with ``lora_A``
    ``(r·k, in·k)`` and ``lora_B`` ``(out/groups·k, r·k)`` for ``kernel_size`` ``k``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, merge_weights: bool = True, **kwargs: Any) -> None:
        if not isinstance(kernel_size, int) or isinstance(kernel_size, bool):
            raise DeltaConfigTypeError(f"Conv2d.kernel_size must be an int (loralib's square kernels), got {kernel_size!r}")
        nn.Module.__init__(self)
        LoRALayer.__init__(self, r, lora_alpha, lora_dropout, merge_weights)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, **kwargs)
        if self.r > 0:
            k = kernel_size
            self.lora_A = nn.Parameter(self.conv.weight.new_zeros((self.r * k, in_channels * k)))
            self.lora_B = nn.Parameter(self.conv.weight.new_zeros((out_channels // self.conv.groups * k, self.r * k)))
            self.conv.weight.requires_grad = False
        self.reset_parameters()

    @property
    def weight(self) -> nn.Parameter:
        """The kernel (``conv.weight``)."""
        return self.conv.weight

    @property
    def bias(self) -> nn.Parameter | None:
        """The convolution's bias."""
        return self.conv.bias

    def reset_parameters(self) -> None:
        """The convolution's own initialisation; ``lora_A`` kaiming-uniform, ``lora_B`` zero."""
        self.conv.reset_parameters()
        if self.r > 0:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """The update to the kernel, shaped like ``conv.weight``."""
        return (self.lora_B @ self.lora_A).view(self.conv.weight.shape) * self.scaling

    def _apply_delta(self, sign: float) -> None:
        with torch.no_grad():
            self.conv.weight += sign * self.delta_weight()


    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.r > 0 and not self.merged:
            return self.conv._conv_forward(x, self.conv.weight + self.delta_weight(), self.conv.bias)
        return self.conv(x)


def _check_bias(bias: Any) -> str:
    return check_choice("bias", bias, BIAS_CHOICES)


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Freeze every parameter whose name lacks ``lora_``; ``bias="all"`` trains every bias too,
    ``"lora_only"`` the biases of LoRA layers (loralib's and deltatune's)."""
    check_type("model", model, nn.Module, "a torch.nn.Module")
    _check_bias(bias)
    for n, p in model.named_parameters():
        if "lora_" not in n:
            p.requires_grad = False
    if bias == "all":
        for n, p in model.named_parameters():
            if "bias" in n:
                p.requires_grad = True
    elif bias == "lora_only":
        for m in model.modules():
            if isinstance(m, LoRALayer) and getattr(m, "bias", None) is not None:
                m.bias.requires_grad = True
            elif isinstance(m, LoraLayer) and getattr(m.base_layer, "bias", None) is not None:
                m.base_layer.bias.requires_grad = True


def lora_state_dict(model: nn.Module, bias: str = "none") -> dict[str, torch.Tensor]:
    """The entries of ``model.state_dict()`` whose name contains ``lora_``; ``bias="all"`` adds every bias,
    ``"lora_only"`` the biases of the modules that hold LoRA parameters."""
    check_type("model", model, nn.Module, "a torch.nn.Module")
    _check_bias(bias)
    state = model.state_dict()
    if bias == "none":
        return {k: v for k, v in state.items() if "lora_" in k}
    if bias == "all":
        return {k: v for k, v in state.items() if "lora_" in k or "bias" in k}
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if "lora_" in k:
            out[k] = v
            bias_name = k.split("lora_")[0] + "bias"
            if bias_name in state:
                out[bias_name] = state[bias_name]
    return out
