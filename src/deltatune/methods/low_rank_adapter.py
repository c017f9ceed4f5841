"""Low-rank adapters (Mahabadi et al., 2021, "Compacter"'s LowRank-Adapter).

A bottleneck adapter (see :mod:`deltatune.methods.adapter`) whose two projection matrices are each
a product of two rank-``low_rank_size`` factors::

    W_down = L_d · R_d   (L_d: h × k, R_d: k × b)
    W_up   = L_u · R_u   (L_u: b × k, R_u: k × h)
    adapter(x) = x + (dropout(act(x · W_down + b_down))) · W_up + b_up

with bottleneck ``b = hidden // reduction_factor``. Per insertion this trains
``2·k·(h + b) + b + h`` parameters.

Initialisation: every factor with ``low_rank_w_init`` and zero biases, except that with
``identity_init=True`` (default) the up-projection's right factor ``R_u`` is zero, so the adapter
is exactly the identity at initialisation (training still starts: ``R_u`` gets a gradient at once).

Placement, modes (``"dense"`` / ``"layer"``) and width inference are the adapter module's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import DeltaConfigError
from ..inject import ModuleSlot
from ..validation import check_bool, check_choice, check_positive_int
from .adapter import (
    BottleneckAdapterLayer,
    BottleneckAdapterMethod,
    check_adapter_fields,
    needs_grad,
    param_cache,
)
from .base import DeltaConfig

__all__ = ["LowRankAdapterConfig", "LowRankAdapterLayer", "LowRankAdapterMethod", "LowRankLinear", "METHOD"]

_INITS: dict[str, Callable[[torch.Tensor], Any]] = {
    "xavier_uniform": nn.init.xavier_uniform_,
    "xavier_normal": nn.init.xavier_normal_,
    "kaiming_uniform": lambda t: nn.init.kaiming_uniform_(t, nonlinearity="linear"),
    "kaiming_normal": lambda t: nn.init.kaiming_normal_(t, nonlinearity="linear"),
}


@dataclasses.dataclass
class LowRankAdapterConfig(DeltaConfig):
    """Low-rank adapter hyper-parameters.

    Attributes:
        reduction_factor: bottleneck = hidden // reduction_factor (positive int, at most the hidden
            size of every adapted module).
        low_rank_size: rank ``k`` of each projection's factorisation (positive int, at most the
            bottleneck size).
        low_rank_w_init: initialisation of the factors: ``"xavier_uniform"`` (default),
            ``"xavier_normal"``, ``"kaiming_uniform"``, ``"kaiming_normal"``.
        identity_init: zero the up-projection's right factor so the adapter starts as the identity.
        non_linearity, dropout, mode, placement, hidden_size: as :class:`~deltatune.methods.adapter.AdapterConfig`.
    """

    method: ClassVar[str] = "low_rank_adapter"

    reduction_factor: int = 32
    low_rank_size: int = 1
    low_rank_w_init: str = "xavier_uniform"
    identity_init: bool = True
    non_linearity: str = "gelu"
    dropout: float = 0.0
    mode: str = "layer"
    placement: str | None = None
    hidden_size: int | None = None

    def validate(self) -> None:
        super().validate()
        name = "LowRankAdapterConfig"
        self.reduction_factor = check_positive_int(f"{name}.reduction_factor", self.reduction_factor)
        self.low_rank_size = check_positive_int(f"{name}.low_rank_size", self.low_rank_size)
        check_choice(f"{name}.low_rank_w_init", self.low_rank_w_init, tuple(_INITS))
        check_bool(f"{name}.identity_init", self.identity_init)
        check_adapter_fields(name, self)
        if self.hidden_size is not None:
            self._check_hidden(self.hidden_size, "hidden_size")

    def _check_hidden(self, hidden: int, where: str) -> None:
        if self.reduction_factor > hidden:
            raise DeltaConfigError(
                f"LowRankAdapterConfig.reduction_factor must be <= the hidden size {hidden} of {where}, "
                f"got {self.reduction_factor}"
            )
        bottleneck = hidden // self.reduction_factor
        if self.low_rank_size > bottleneck:
            raise DeltaConfigError(
                f"LowRankAdapterConfig.low_rank_size must be <= the bottleneck size {bottleneck} "
                f"(hidden {hidden} // reduction_factor {self.reduction_factor}) of {where}, got {self.low_rank_size}"
            )


class LowRankLinear(nn.Module):
    """``y = x · (w_left · w_right) + bias`` with ``w_left`` (in × k), ``w_right`` (k × out).

    With gradients the input goes through the two factors (no ``in × out`` matrix is formed). When no
    gradient is needed (``torch.is_grad_enabled()`` is False, or no parameter of the layer requires a
    gradient: decoding, evaluation, a frozen adapter) the layer uses the composed matrix ``w_left · w_right``
    in the input's dtype and the bias in that dtype, computed once and kept while the parameters are
    unchanged, so a decoding step dispatches one ``linear`` per projection (not a matmul, casts and the
    linear); :class:`~deltatune.methods.adapter.ParamCache` says when it is recomputed (never stale). Only
    the composed tensors are kept (``in × out``, small), outside the ``state_dict``.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, *, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.w_left = nn.Parameter(torch.empty(in_features, rank, **kw))
        self.w_right = nn.Parameter(torch.empty(rank, out_features, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw))

    def weight(self) -> torch.Tensor:
        """The full ``(in, out)`` matrix ``w_left · w_right``."""
        return self.w_left @ self.w_right

    def composed(self, dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``((w_left · w_right)ᵀ, bias)`` in ``dt``, for ``F.linear``: the kept pair while the parameters
        are the ones (same tensors, storage, dtype, device and version) it was computed from."""
        w_left, w_right, bias = params = (self.w_left, self.w_right, self.bias)
        w, b = param_cache(self).get(params, dt, lambda: ((w_left @ w_right).to(dt).t(), bias.to(dt)))
        return w, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        if needs_grad(self.w_left, self.w_right, self.bias):
            return (x @ self.w_left.to(dt)) @ self.w_right.to(dt) + self.bias.to(dt)
        # without gradients: the small composed matrix (cached), then the batch through one matmul with the
        # bias fused in, instead of two matmuls and an add
        w, b = self.composed(dt)
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class LowRankAdapterLayer(BottleneckAdapterLayer):
    """Low-rank adapters after one module: ``low_rank_adapter_down`` / ``low_rank_adapter_up``."""

    method_name = "low_rank_adapter"
    prefix = "low_rank_adapter_"
    delta_attrs = ("low_rank_adapter_down", "low_rank_adapter_up", "low_rank_adapter_act", "low_rank_adapter_dropout")
    mergeable = False

    def _make_projections(self, hidden: int, config: DeltaConfig, kw: dict[str, Any]) -> tuple[nn.Module, nn.Module, int]:
        assert isinstance(config, LowRankAdapterConfig)
        b = hidden // config.reduction_factor
        k = config.low_rank_size
        down = LowRankLinear(hidden, b, k, **kw)
        up = LowRankLinear(b, hidden, k, **kw)
        init = _INITS[config.low_rank_w_init]
        with torch.no_grad():
            for t in (down.w_left, down.w_right, up.w_left, up.w_right):
                init(t)
            if config.identity_init:
                nn.init.zeros_(up.w_right)
        return down, up, b


class LowRankAdapterMethod(BottleneckAdapterMethod):
    """Registry entry for low-rank adapters (not mergeable)."""

    name = "low_rank_adapter"
    config_cls = LowRankAdapterConfig
    layer_cls = LowRankAdapterLayer
    delta_prefixes = ("low_rank_adapter_",)
    mergeable = False

    def check_sizes(self, slot: ModuleSlot, hidden: int, config: DeltaConfig) -> None:
        """``reduction_factor <= hidden`` and ``low_rank_size <= bottleneck`` for this module."""
        assert isinstance(config, LowRankAdapterConfig)
        config._check_hidden(hidden, repr(slot.name))

    @staticmethod
    def num_params(hidden: int, reduction_factor: int, low_rank_size: int) -> int:
        """Trainable parameters of one insertion: ``2·k·(h + b) + b + h`` with ``b = h // reduction_factor``."""
        b = hidden // reduction_factor
        return 2 * low_rank_size * (hidden + b) + b + hidden


METHOD = LowRankAdapterMethod()
