"""Sibling LoRA projections that read one and the same input (q/k/v, gate/up): :class:`SharedInputGroup`
computes their outputs with one A matmul, in one autograd node, and hands each member its output.

The members are :class:`~deltatune.methods.lora.LoraLayer` objects (which attach the groups); this module
needs only their ``_fast_spec(x)`` (``(adapter, LoraProjection)`` or None) and imports the kernels alone.
"""

from __future__ import annotations

import weakref
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from ..kernels import lora_autograd
from ..kernels.common import compute_dtype
from ..kernels.lora_autograd import LoraProjection

__all__ = ["SHARED_INPUT_GROUPS", "SharedInputGroup"]

#: Sibling projections that read the same input tensor; their LoRA A products are computed with one
#: matmul against the concatenated A matrices (one shared dropout mask, as loralib's MergedLinear).
SHARED_INPUT_GROUPS: tuple[frozenset[str], ...] = (
    frozenset({"q_proj", "k_proj", "v_proj"}),
    frozenset({"gate_proj", "up_proj"}),
    frozenset({"query", "key", "value"}),
    frozenset({"w1", "w3"}),
)


class SharedInputGroup:
    """LoRA layers that are called on one and the same input tensor (q/k/v, gate/up).

    The first member called with a new input computes the outputs of every eligible member (frozen base
    projection plus LoRA update) in ONE autograd node, with one matmul against the concatenated A
    matrices (:func:`~deltatune.kernels.lora_autograd.lora_projections`); the other members
    are handed their output when they are called with the identical tensor. An output is handed out at
    most once, and only when everything it was computed from is unchanged: the same input object at the
    same version, the same grad/inference/autocast mode, the same adapter, parameter objects and
    parameter versions, scaling and dropout. Any mismatch computes the member on its own, so results never
    depend on grouping. Inference tensors (no version counter) are never grouped.

    Groups whose members turn out to read different tensors (e.g. cross-attention k/v) or not to be
    called at all stop computing ahead after :attr:`MAX_WASTED` wasted computations in a row (a
    computation is wasted when outputs computed ahead are dropped unused; one whose outputs are all handed
    out resets the count).
    """

    #: consecutive wasted group computations after which the group computes its members separately
    MAX_WASTED = 4

    def __init__(self, members: list[nn.Module]) -> None:
        self.members = members
        self._reset()
        self.enabled = True
        self._wasted = 0

    def _reset(self) -> None:
        self._x: weakref.ref | None = None
        self._key: tuple | None = None
        self._pending: dict[int, _Ahead] = {}

    def __getstate__(self) -> dict[str, Any]:
        # the per-call cache (a weak reference and graph tensors) is never pickled or deep-copied
        return {"members": self.members, "enabled": self.enabled, "_wasted": 0}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("enabled", True)
        self.__dict__.setdefault("_wasted", 0)
        self._reset()

    def clear(self) -> None:
        """Drop any output computed ahead (and the graph it holds)."""
        self._reset()

    def output(self, layer: nn.Module, adapter: str, proj: LoraProjection, x: torch.Tensor) -> torch.Tensor | None:
        """``layer``'s output for ``x`` (its adapter ``adapter`` with projection ``proj``), computed with its
        siblings; None: compute it on its own."""
        if torch.compiler.is_compiling() or not self.enabled or x.is_inference():
            return None
        key = (x._version, torch.is_grad_enabled(), torch.is_inference_mode_enabled(), compute_dtype(x))
        pending = self._pending
        if pending:
            hit = pending.pop(id(layer), None)
            if (
                hit is not None and self._x() is x and self._key == key and hit.adapter == adapter
                and _same_projection(hit.projection, proj) and hit.versions == _versions(proj)
            ):
                if not pending:
                    self._reset()
                    self._wasted = 0
                return hit.output
            # what was computed ahead for the previous input is not going to be used
            self._reset()
            pending = self._pending
            self._wasted += 1
            if self._wasted >= self.MAX_WASTED:
                self.enabled = False
                return None
        if not any(m is layer for m in self.members):
            return None  # e.g. a DataParallel replica: the group belongs to the original modules
        p, fifo, in_f = proj.dropout_p, proj.fan_in_fan_out, x.shape[-1]
        chosen: list[tuple[nn.Module, LoraProjection, tuple[int, ...]]] = []
        for m in self.members:
            if m is layer:
                name, pr = adapter, proj
            else:
                fast = m._fast_spec(x)
                if fast is None:
                    continue
                name, pr = fast
            if name != adapter or pr.dropout_p != p or pr.fan_in_fan_out != fifo or _weight_in(pr) != in_f:
                continue
            versions = _versions(pr)
            if versions is None:
                continue
            chosen.append((m, pr, versions))
        if len(chosen) < 2 or not any(m is layer for m, _, _ in chosen):
            return None
        # looked up on the module each call (tests wrap it)
        outs = lora_autograd.lora_projections(x, [pr for _, pr, _ in chosen])
        mine = None
        for (m, pr, versions), out in zip(chosen, outs):
            if m is layer:
                mine = out
            else:
                pending[id(m)] = _Ahead(adapter, pr, versions, out)
        self._x, self._key = weakref.ref(x), key
        return mine


class _Ahead(NamedTuple):
    """An output computed ahead for a sibling, and everything it was computed from."""

    adapter: str
    projection: LoraProjection
    versions: tuple[int, ...]
    output: torch.Tensor


def _same_projection(a: LoraProjection, b: LoraProjection) -> bool:
    """Two projections with identical tensors and equal values."""
    return (
        a.weight is b.weight and a.bias is b.bias and a.lora_A is b.lora_A and a.lora_B is b.lora_B
        and a.scaling == b.scaling and a.dropout_p == b.dropout_p and a.fan_in_fan_out == b.fan_in_fan_out
    )


def _versions(proj: LoraProjection) -> tuple[int, ...] | None:
    """Version counters of a projection's tensors (in-place changes since an output was computed); None when
    one of them is an inference tensor (no version counter)."""
    w, b, a, bb = proj.weight, proj.bias, proj.lora_A, proj.lora_B
    if w.is_inference() or a.is_inference() or bb.is_inference() or (b is not None and b.is_inference()):
        return None
    return (w._version, -1 if b is None else b._version, a._version, bb._version)


def _weight_in(proj: LoraProjection) -> int:
    """Input features of a projection's base weight (its actual shape: a partitioned weight never matches)."""
    w = proj.weight
    if w.dim() != 2:
        return -1
    return w.shape[0] if proj.fan_in_fan_out else w.shape[1]
