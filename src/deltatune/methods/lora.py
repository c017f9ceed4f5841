"""LoRA (Hu et al., 2021) with rsLoRA scaling, DoRA, and loralib-style fused projections.

Supported layers: ``nn.Linear``, ``nn.Embedding``, ``nn.Conv1d/2d/3d`` (groups=1), transformers'
GPT-2 ``Conv1D`` (weight stored ``(in, out)``), and fused projections with LoRA on chosen output
slices only (``enable_lora``, e.g. GPT-2 ``c_attn`` with LoRA on q and v but not k).

Shapes follow PEFT so adapters convert one to one: ``lora_A`` (r, in), ``lora_B`` (out, r) for
linear layers; ``lora_embedding_A`` (r, num_embeddings), ``lora_embedding_B`` (dim, r) for
embeddings; a conv ``lora_A`` with the base kernel and a 1x1 ``lora_B``.

The adapter path runs in the activation dtype: adapter weights (fp32 master copies by default) are
cast to ``x.dtype``; activations are never upcast.

This module owns the config, the layer (its plain-torch paths and the fast path through
:func:`~deltatune.kernels.lora_autograd.lora_projection`) and the method; sibling projections that share
an input are computed together by :mod:`deltatune.methods.lora_group`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..delta_layer import DeltaLayer, unwrap
from ..errors import DeltaConfigError, DeltaConfigTypeError, TargetNotFoundError, UnsupportedModuleError
from ..inject import ModuleSlot, check_patterns, is_gpt2_conv1d, match_pattern
from ..kernels.lora_autograd import LoraProjection, lora_projection
from ..validation import check_bool, check_choice, check_float, check_positive_int, check_type
from .base import DeltaConfig, DeltaMethod
from .lora_group import SHARED_INPUT_GROUPS, SharedInputGroup

__all__ = ["LoraConfig", "LoraLayer", "LoraMethod", "METHOD", "SharedInputGroup", "group_shared_inputs"]

#: Use the lean fused autograd function (:func:`deltatune.kernels.lora_autograd.lora_projection`) for
#: plain linear LoRA (no DoRA, no slices). Its dropout mask comes from a seed (nothing of the input's
#: size is stored for dropout). Set to False to compute with plain ``torch.nn`` ops instead.
FAST_PATH = True


@dataclasses.dataclass
class LoraConfig(DeltaConfig):
    """LoRA hyper-parameters.

    Attributes:
        r: rank of the update (positive int).
        alpha: scaling numerator (> 0); the update is scaled by ``alpha / r``, or ``alpha / sqrt(r)``
            with ``use_rslora``.
        dropout: dropout probability on the LoRA branch input, in [0, 1).
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
        use_dora: weight-decomposed LoRA (magnitude vector times normalised direction).
        init: ``"kaiming"`` (A kaiming-uniform, B = 0; the LoRA paper's and PEFT's default),
            ``"gaussian"`` (A ~ N(0, 1/r), B = 0) or ``"random"`` (B random too: output changes at
            init; for tests). Embeddings use A = 0 and B ~ N(0, 1) for the first two, as loralib.
        bias: which biases train with the adapter: ``"none"``, ``"all"`` (every bias of the model),
            ``"lora_only"`` (biases of the adapted layers).
        rank_pattern / alpha_pattern: per-module overrides ``{pattern: r}`` / ``{pattern: alpha}``
            with patterns in the ``target_modules`` syntax; the first matching key wins.
        enable_lora: fused projections with LoRA on some output slices only:
            ``{pattern: [True, False, True]}`` splits the matched layer's output into equal slices
            and adapts only those marked True (loralib's ``MergedLinear``).
        fan_in_fan_out: treat the weight as ``(in, out)``; detected automatically for GPT-2 Conv1D.
        adapter_dtype: dtype of the adapter parameters: ``"float32"`` (master weights for the
            optimiser; the matmuls still run in the activation dtype) or ``"base"`` (the base weight's).
    """

    method = "lora"

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "kaiming"
    bias: str = "none"
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    enable_lora: dict[str, list[bool]] = dataclasses.field(default_factory=dict)
    fan_in_fan_out: bool = False
    adapter_dtype: str = "float32"

    def validate(self) -> None:
        super().validate()
        self.r = check_positive_int("LoraConfig.r", self.r)
        self.alpha = check_float("LoraConfig.alpha", self.alpha, low=0, low_inclusive=False)
        self.dropout = check_float("LoraConfig.dropout", self.dropout, low=0.0, high=1.0, high_inclusive=False)
        check_bool("LoraConfig.use_rslora", self.use_rslora)
        check_bool("LoraConfig.use_dora", self.use_dora)
        check_bool("LoraConfig.fan_in_fan_out", self.fan_in_fan_out)
        check_choice("LoraConfig.init", self.init, ("kaiming", "gaussian", "random"))
        check_choice("LoraConfig.bias", self.bias, ("none", "all", "lora_only"))
        check_choice("LoraConfig.adapter_dtype", self.adapter_dtype, ("float32", "base"))
        for fname in ("rank_pattern", "alpha_pattern", "enable_lora"):
            check_type(f"LoraConfig.{fname}", getattr(self, fname), dict, "a dict {pattern: value}")
        for fname in ("rank_pattern", "alpha_pattern", "enable_lora"):
            for k in getattr(self, fname):
                check_type(f"LoraConfig.{fname} key", k, str, "a str pattern")
                check_patterns(f"LoraConfig.{fname}", [k])
        for k, v in self.rank_pattern.items():
            check_type("LoraConfig.rank_pattern key", k, str, "a str pattern")
            check_positive_int(f"LoraConfig.rank_pattern[{k!r}]", v)
        for k, v in list(self.alpha_pattern.items()):
            check_type("LoraConfig.alpha_pattern key", k, str, "a str pattern")
            self.alpha_pattern[k] = check_float(f"LoraConfig.alpha_pattern[{k!r}]", v, low=0, low_inclusive=False)
        for k, v in self.enable_lora.items():
            check_type("LoraConfig.enable_lora key", k, str, "a str pattern")
            if not isinstance(v, (list, tuple)) or not v or not all(isinstance(b, bool) for b in v):
                raise DeltaConfigTypeError(
                    f"LoraConfig.enable_lora[{k!r}] must be a non-empty list of bool, got {v!r}"
                )
            if not any(v):
                raise DeltaConfigError(f"LoraConfig.enable_lora[{k!r}] must enable at least one slice, got {list(v)!r}")
            if self.use_dora:
                raise DeltaConfigError("LoraConfig.use_dora must be False when enable_lora is given (fused slices), got True")

    # per-module values ----------------------------------------------------------------------
    def _lookup(self, table: dict[str, Any], module_name: str, default: Any) -> Any:
        for pattern, value in table.items():
            if match_pattern(module_name, pattern):
                return value
        return default

    def rank_for(self, module_name: str) -> int:
        """The rank used for ``module_name`` (``rank_pattern`` first, else ``r``)."""
        return self._lookup(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        """The alpha used for ``module_name`` (``alpha_pattern`` first, else ``alpha``)."""
        return self._lookup(self.alpha_pattern, module_name, self.alpha)

    def slices_for(self, module_name: str) -> list[bool] | None:
        """The ``enable_lora`` flags for ``module_name`` (None: an ordinary, unsliced layer)."""
        return self._lookup(self.enable_lora, module_name, None)


class LoraLayer(DeltaLayer):
    """LoRA around one ``Linear`` / GPT-2 ``Conv1D`` / ``Embedding`` / ``ConvNd`` layer."""

    method_name = "lora"
    delta_attrs = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude")
    mergeable = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        inner = unwrap(base_layer)  # another method's wrapper may sit in between
        if isinstance(inner, nn.Embedding):
            self.kind = "embedding"
            self.in_features, self.out_features = inner.num_embeddings, inner.embedding_dim
        elif isinstance(inner, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            self.kind = "conv"
            self.in_features, self.out_features = inner.in_channels, inner.out_channels
        elif is_gpt2_conv1d(inner):
            self.kind = "linear"
            self.in_features, self.out_features = inner.weight.shape
        elif isinstance(inner, nn.Linear):
            self.kind = "linear"
            self.in_features, self.out_features = inner.in_features, inner.out_features
        else:  # pragma: no cover - guarded by LoraMethod.check_module
            raise UnsupportedModuleError(f"LoRA cannot wrap {type(inner).__name__}")
        self.fan_in_fan_out = is_gpt2_conv1d(inner)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        self.slices: dict[str, list[bool] | None] = {}
        self._dora_norm: dict[str, torch.Tensor] = {}

    # -- creation -------------------------------------------------------------------------
    def add_adapter(self, name: str, config: DeltaConfig, *, module_name: str = "", **kwargs: Any) -> None:
        """Create adapter ``name`` from a :class:`LoraConfig` (per-module rank/alpha/slices applied)."""
        assert isinstance(config, LoraConfig)
        r, alpha = config.rank_for(module_name), config.alpha_for(module_name)
        slices = config.slices_for(module_name)
        base_w = self.base_layer.weight
        dtype = base_w.dtype if config.adapter_dtype == "base" else torch.float32
        if not base_w.dtype.is_floating_point:
            dtype = torch.float32
        device = base_w.device
        self._register_adapter(name)
        self.r[name], self.alpha[name] = r, alpha
        self.scaling[name] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        self.use_dora[name] = config.use_dora
        self.slices[name] = slices
        self.lora_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        kw = {"device": device, "dtype": dtype}
        if self.kind == "embedding":
            self.lora_embedding_A[name] = nn.Parameter(torch.empty(r, self.in_features, **kw))
            self.lora_embedding_B[name] = nn.Parameter(torch.empty(self.out_features, r, **kw))
        elif self.kind == "conv":
            base = self.base_layer
            nd = base.weight.dim() - 2
            conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
            self.lora_A[name] = conv_cls(
                self.in_features, r, base.kernel_size, base.stride, base.padding, base.dilation, bias=False, **kw
            )
            self.lora_B[name] = conv_cls(r, self.out_features, 1, 1, bias=False, **kw)
        else:
            if slices is not None:
                k = len(slices)
                if self.out_features % k:
                    raise DeltaConfigError(
                        f"enable_lora for {module_name!r} has {k} slices but the layer has "
                        f"{self.out_features} outputs, which is not divisible by {k}"
                    )
                n_on = sum(slices)
                self.lora_A[name] = nn.Linear(self.in_features, r * n_on, bias=False, **kw)
                self.lora_B[name] = nn.Linear(r, (self.out_features // k) * n_on, bias=False, **kw)
            else:
                self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, **kw)
                self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, **kw)
        self.reset_adapter(name, config.init)
        if config.use_dora:
            with torch.no_grad():
                norm = self._weight_norm(name, self._base_weight_oi(), self._delta_oi(name))
            self.lora_magnitude[name] = nn.Parameter(norm.to(dtype))

    def reset_adapter(self, name: str, init: str = "kaiming") -> None:
        """Re-initialise adapter ``name`` (``kaiming``, ``gaussian`` or ``random``)."""
        with torch.no_grad():
            if self.kind == "embedding":
                A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]
                nn.init.zeros_(A) if init != "random" else nn.init.normal_(A)
                nn.init.normal_(B)
                return
            A, B = self.lora_A[name].weight, self.lora_B[name].weight
            if init == "gaussian":
                nn.init.normal_(A, std=1 / self.r[name])
            else:
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            if init == "random":
                nn.init.normal_(B, std=0.1)
            else:
                nn.init.zeros_(B)

    def _delete_extra(self, name: str) -> None:
        for d in (self.r, self.alpha, self.scaling, self.use_dora, self.slices, self._dora_norm):
            d.pop(name, None)
        if name in self.lora_dropout:
            del self.lora_dropout[name]

    # -- weights --------------------------------------------------------------------------
    def _base_weight_oi(self) -> torch.Tensor:
        """The base weight in (out, in, ...) layout."""
        w = self.base_layer.weight
        if self.kind == "embedding" or self.fan_in_fan_out:
            return w.T
        return w

    def _delta_oi(self, name: str) -> torch.Tensor:
        """The unscaled update B @ A in (out, in, ...) layout."""
        if self.kind == "embedding":
            return self.lora_embedding_B[name] @ self.lora_embedding_A[name]
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        r = self.r[name]
        if self.kind == "conv":
            return torch.einsum("or,ri...->oi...", B.flatten(1), A)
        slices = self.slices[name]
        if slices is None:
            return B @ A
        k = len(slices)
        step = self.out_features // k
        delta = A.new_zeros(self.out_features, self.in_features)
        j = 0
        for i, on in enumerate(slices):
            if on:
                delta[i * step : (i + 1) * step] = B[j * step : (j + 1) * step] @ A[j * r : (j + 1) * r]
                j += 1
        return delta

    def get_delta_weight(self, name: str) -> torch.Tensor:
        """The scaled update in the base weight's own layout (``(in, out)`` for GPT-2 Conv1D)."""
        delta = self._delta_oi(name) * self.scaling[name]
        if self.kind == "embedding" or self.fan_in_fan_out:
            delta = delta.T
        return delta

    def _weight_norm(self, name: str, weight_oi: torch.Tensor, delta_oi: torch.Tensor) -> torch.Tensor:
        w = weight_oi.to(delta_oi.dtype) + self.scaling[name] * delta_oi
        return w.flatten(1).norm(p=2, dim=1)

    # -- merging --------------------------------------------------------------------------
    def _merge_one(self, name: str, *, safe: bool) -> None:
        weight = self.base_layer.weight
        with torch.no_grad():
            delta = self.get_delta_weight(name).to(torch.float32)
            if self.use_dora[name]:
                norm = self._weight_norm(name, self._base_weight_oi().float(), self._delta_oi(name).float())
                factor = self.lora_magnitude[name].float() / norm
                factor = factor.view(-1, *([1] * (weight.dim() - 1)))
                if self.kind == "embedding" or self.fan_in_fan_out:
                    factor = factor.view(1, -1)
                new = factor * (weight.float() + delta)
                self._dora_norm[name] = norm
            else:
                new = weight.float() + delta
            if safe and not torch.isfinite(new).all():
                raise DeltaConfigError(f"merging adapter {name!r} would produce non-finite weights; not merged")
            weight.data.copy_(new.to(weight.dtype))

    def _unmerge_one(self, name: str) -> None:
        weight = self.base_layer.weight
        with torch.no_grad():
            delta = self.get_delta_weight(name).to(torch.float32)
            if self.use_dora[name]:
                norm = self._dora_norm.pop(name)
                factor = self.lora_magnitude[name].float() / norm
                factor = factor.view(-1, *([1] * (weight.dim() - 1)))
                if self.kind == "embedding" or self.fan_in_fan_out:
                    factor = factor.view(1, -1)
                new = weight.float() / factor - delta
            else:
                new = weight.float() - delta
            weight.data.copy_(new.to(weight.dtype))

    # -- forward --------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Base output plus the active adapters' deltas (see :meth:`DeltaLayer.forward`).

        One active, unmerged plain linear adapter takes the fast path: the whole layer (frozen base and
        LoRA) is one autograd node, or the group's one node when its siblings share the input
        (:class:`SharedInputGroup`). Everything else goes through :meth:`delta_forward`.
        """
        if len(args) == 1 and not kwargs and FAST_PATH:
            x = args[0]
            fast = self._fast_spec(x)
            if fast is not None:
                adapter, proj = fast
                group: SharedInputGroup | None = self.__dict__.get("_shared_group")
                if group is not None:
                    out = group.output(self, adapter, proj, x)
                    if out is not None:
                        return out
                return lora_projection(x, proj)
        return super().forward(*args, **kwargs)

    def _fast_spec(self, x: Any) -> tuple[str, LoraProjection] | None:
        """The one active, unmerged adapter and its :meth:`_adapter_spec` when the call ``self(x)`` can take
        the fast path, else None."""
        if self.disabled:
            return None
        active = self.active_adapters
        merged = self.merged_adapters
        if merged:
            active = [a for a in active if a not in merged]
        if len(active) != 1:
            return None
        proj = self._adapter_spec(active[0], x)
        return None if proj is None else (active[0], proj)

    def _adapter_spec(self, name: str, x: Any) -> LoraProjection | None:
        """The :class:`~deltatune.kernels.lora_autograd.LoraProjection` of adapter ``name`` when applying it to
        ``x`` can take the fast path (a plain linear LoRA on a frozen ``nn.Linear``/GPT-2 ``Conv1D``, no DoRA,
        no slices, ``nn.Dropout``/``nn.Identity`` dropout, a floating-point input), else None.

        Read straight from the module dictionaries each call (no ``nn.Module.__getattr__``, nothing cached
        that adding, deleting, switching or merging adapters could leave stale); its ``dropout_p`` is the
        dropout probability in effect (0 in eval mode)."""
        if self.kind != "linear" or not isinstance(x, torch.Tensor):
            return None
        if self.use_dora[name] or self.slices[name] is not None or not x.is_floating_point():
            return None
        modules = self._modules
        base = modules["base_layer"]
        if type(base) is not nn.Linear and not is_gpt2_conv1d(base):
            return None
        params = base._parameters
        W = params.get("weight")
        if W is None or W.requires_grad:
            return None
        dropout = modules["lora_dropout"]._modules[name]
        if isinstance(dropout, nn.Dropout):
            p = float(dropout.p) if self.training else 0.0
        elif isinstance(dropout, nn.Identity):
            p = 0.0
        else:
            return None
        A = modules["lora_A"]._modules[name]._parameters["weight"]
        B = modules["lora_B"]._modules[name]._parameters["weight"]
        return LoraProjection(W, params.get("bias"), A, B, self.scaling[name], p, self.fan_in_fan_out)

    def delta_forward(self, active: list[str], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        proj = self._adapter_spec(active[0], x) if FAST_PATH and not args and not kwargs else None
        if proj is not None:  # the first adapter together with the base, in one node
            result = lora_projection(x, proj)
            active = active[1:]
        else:
            result = self.base_layer(x, *args, **kwargs)
        for name in active:
            if self.kind == "embedding":
                result = self._embedding_delta(name, x, result)
            elif self.kind == "conv":
                result = self._conv_delta(name, x, result)
            else:
                result = self._linear_delta(name, x, result)
        return result

    def _linear_delta(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        A = self.lora_A[name].weight.to(dtype)
        B = self.lora_B[name].weight.to(dtype)
        scaling = self.scaling[name]
        dropout = self.lora_dropout[name]
        xd = dropout(x)
        if self.use_dora[name]:
            return self._dora_linear(name, x, xd, A, B, result)
        slices = self.slices[name]
        h = F.linear(xd, A)
        if slices is None:
            return result + F.linear(h, B) * scaling
        r = self.r[name]
        k = len(slices)
        step = self.out_features // k
        n_on = sum(slices)
        # block-diagonal B: slice j of the enabled outputs uses rank block j of h.
        out = torch.einsum("...jr,jsr->...js", h.unflatten(-1, (n_on, r)), B.view(n_on, step, r))
        out = out.flatten(-2) * scaling
        idx = torch.cat([torch.arange(i * step, (i + 1) * step, device=x.device) for i, on in enumerate(slices) if on])
        return result.index_add(-1, idx, out.to(result.dtype))

    def _dora_linear(
        self, name: str, x: torch.Tensor, xd: torch.Tensor, A: torch.Tensor, B: torch.Tensor, result: torch.Tensor
    ) -> torch.Tensor:
        scaling = self.scaling[name]
        weight = self._base_weight_oi().to(x.dtype)
        with torch.no_grad():
            norm = self._weight_norm(name, weight, (B @ A))
        scale = self.lora_magnitude[name].to(x.dtype) / norm  # the norm is a constant (DoRA paper, 4.3)
        lora_out = F.linear(F.linear(xd, A), B) * scaling
        if xd is x:
            bias = getattr(self.base_layer, "bias", None)
            base_out = result - bias if bias is not None else result
        else:
            base_out = F.linear(xd, weight)
        return result + (scale - 1) * base_out + scale * lora_out

    def _embedding_delta(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        A = self.lora_embedding_A[name]
        B = self.lora_embedding_B[name]
        after_a = F.embedding(
            x, A.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
        )
        out = (after_a.to(result.dtype) @ B.T.to(result.dtype)) * self.scaling[name]
        if self.use_dora[name]:
            with torch.no_grad():
                norm = self._weight_norm(name, self._base_weight_oi(), B @ A)
            scale = self.lora_magnitude[name].to(result.dtype) / norm.detach().to(result.dtype)
            return scale * (result + out)
        return result + out

    def _conv_delta(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        dtype = x.dtype
        nd = base.weight.dim() - 2
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
        A = self.lora_A[name].weight.to(dtype)
        B = self.lora_B[name].weight.to(dtype)
        xd = self.lora_dropout[name](x)
        h = conv(xd, A, None, base.stride, base.padding, base.dilation)
        lora_out = conv(h, B) * self.scaling[name]
        if not self.use_dora[name]:
            return result + lora_out
        weight = base.weight.to(dtype)
        with torch.no_grad():
            norm = self._weight_norm(name, weight, self._delta_oi(name).to(dtype))
        shape = (1, -1) + (1,) * nd
        scale = (self.lora_magnitude[name].to(dtype) / norm.detach()).view(shape)
        if xd is x:
            base_out = result - base.bias.view(shape) if base.bias is not None else result
        else:
            base_out = conv(xd, weight, None, base.stride, base.padding, base.dilation)
        return result + (scale - 1) * base_out + scale * lora_out


class LoraMethod(DeltaMethod):
    """Registry entry for LoRA."""

    name = "lora"
    config_cls = LoraConfig
    layer_cls = LoraLayer
    delta_prefixes = ("lora_",)
    mergeable = True

    DEFAULT_TARGETS = {
        "llama": ["q_proj", "v_proj"],
        "mistral": ["q_proj", "v_proj"],
        "qwen2": ["q_proj", "v_proj"],
        "gpt2": ["c_attn"],
        "bert": ["query", "value"],
        "roberta": ["query", "value"],
    }

    def default_target_modules(self, model: nn.Module) -> list[str] | None:
        """q/v projections for known transformers architectures (as the LoRA paper)."""
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        return self.DEFAULT_TARGETS.get(model_type)

    def resolve_targets(self, model: nn.Module, config: DeltaConfig) -> list[ModuleSlot]:
        """The targets; every ``rank_pattern`` / ``alpha_pattern`` / ``enable_lora`` key must match one
        of them (a key that matches nothing is a typo, never silently ignored)."""
        slots = super().resolve_targets(model, config)
        assert isinstance(config, LoraConfig)
        names = [s.name for s in slots]
        for fname in ("rank_pattern", "alpha_pattern", "enable_lora"):
            unmatched = [k for k in getattr(config, fname) if not any(match_pattern(n, k) for n in names)]
            if unmatched:
                raise TargetNotFoundError(
                    f"LoraConfig.{fname} key(s) {unmatched} match none of the adapted modules "
                    f"{names[:8]}{' ...' if len(names) > 8 else ''} (target_modules={config.target_modules!r})"
                )
        return slots

    def apply(self, model: nn.Module, config: DeltaConfig, adapter_name: str) -> list[str]:
        """Wrap the targets, then group sibling projections that share an input."""
        targets = super().apply(model, config, adapter_name)
        group_shared_inputs(model)
        return targets

    def check_module(self, slot: ModuleSlot, config: DeltaConfig) -> None:
        module = unwrap(slot.module)
        ok = isinstance(module, (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or is_gpt2_conv1d(module)
        if not ok:
            raise UnsupportedModuleError(
                f"LoRA cannot wrap module {slot.name!r} of type {type(module).__name__}; supported: Linear, "
                f"Embedding, Conv1d/2d/3d, transformers Conv1D (pick its projections, e.g. "
                f"{slot.name + '.q_proj'!r}, not the container)"
            )
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups != 1:
            raise UnsupportedModuleError(
                f"LoRA cannot wrap grouped conv {slot.name!r} (groups={module.groups}); expected groups=1"
            )
        assert isinstance(config, LoraConfig)
        slices = config.slices_for(slot.name)
        linear = isinstance(module, nn.Linear) or is_gpt2_conv1d(module)
        if slices is not None and not linear:
            raise UnsupportedModuleError(
                f"enable_lora applies to linear layers only; {slot.name!r} is {type(module).__name__}"
            )
        if slices is not None:
            out = module.weight.shape[1] if is_gpt2_conv1d(module) else module.out_features
            if out % len(slices):
                raise DeltaConfigError(
                    f"enable_lora for {slot.name!r} has {len(slices)} slices but the layer has "
                    f"{out} outputs, which is not divisible by {len(slices)}"
                )
        if config.fan_in_fan_out and not is_gpt2_conv1d(module):
            raise DeltaConfigError(
                f"LoraConfig.fan_in_fan_out=True needs weights stored (in, out) as in transformers' Conv1D, but "
                f"{slot.name!r} is {type(module).__name__} (the layout is detected automatically; leave it False)"
            )

    def extra_trainable(self, model: nn.Module, config: DeltaConfig, adapter_name: str) -> list[str]:
        """Bias parameters trained with the adapter (``bias='all'`` or ``'lora_only'``)."""
        assert isinstance(config, LoraConfig)
        if config.bias == "none":
            return []
        names = []
        for name, _ in model.named_parameters():
            if not name.endswith("bias") or self.is_delta_param(name):
                continue
            if config.bias == "all":
                names.append(name)
        if config.bias == "lora_only":
            for name, module in model.named_modules():
                if isinstance(module, LoraLayer) and adapter_name in module.adapter_names:
                    if getattr(module.base_layer, "bias", None) is not None:
                        names.append(f"{name}.base_layer.bias")
        return names


def group_shared_inputs(model: nn.Module) -> int:
    """Attach a :class:`SharedInputGroup` to sibling LoRA projections (q/k/v, gate/up) of equal input
    size; returns the number of groups. Called by ``apply``; harmless to call again."""
    count = 0
    for parent in model.modules():
        children = dict(parent.named_children())
        for names in SHARED_INPUT_GROUPS:
            members = [children[n] for n in sorted(names) if isinstance(children.get(n), LoraLayer)]
            if len(members) >= 2 and len({m.in_features for m in members}) == 1:
                group = SharedInputGroup(members)
                for m in members:
                    m.__dict__["_shared_group"] = group
                count += 1
    return count


METHOD = LoraMethod()
