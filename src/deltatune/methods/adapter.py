"""Bottleneck adapters (Houlsby et al., 2019): a small residual MLP inserted after a module.

For a module output ``h`` of width ``d`` the adapter computes::

    adapter(h) = h + W_up · dropout(act(W_down · h + b_down)) + b_up

with ``W_down`` (b × d) and ``W_up`` (d × b), ``b`` the bottleneck size. Two insertion modes:

* ``mode="dense"`` wraps a linear layer (``nn.Linear`` or transformers' GPT-2 ``Conv1D``) and
  adapts its output: ``y = adapter(linear(x))``.
* ``mode="layer"`` wraps any module and adapts its output; a module that returns a tuple has
  its first element adapted and the rest passed through unchanged.

Placement: with ``target_modules=None`` the adapter goes where the paper puts it, by
architecture: ``"houlsby"`` (default) after the attention output projection and after the FFN
output projection, ``"pfeiffer"`` after the FFN output projection only.

Initialisation (near identity): ``W_down`` gets PyTorch's default ``nn.Linear`` initialisation,
``W_up`` is drawn from N(0, init_scale²) truncated to ±2·init_scale, both biases are zero. So at
initialisation ``|adapter(h) - h|`` is at most ``2 · init_scale · ‖act(W_down·h)‖₁`` per
element, and exactly zero with ``init_scale=0``.

The module also holds the machinery shared with :mod:`deltatune.methods.low_rank_adapter`
(:class:`BottleneckAdapterLayer`, :class:`BottleneckAdapterMethod`, the placement tables).
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable
from functools import partial
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..delta_layer import DeltaLayer, unwrap
from ..errors import DeltaConfigError, UnsupportedModuleError
from ..inject import ModuleSlot, is_linear_like
from ..validation import check_choice, check_float, check_positive_int
from .base import DeltaConfig, DeltaMethod

__all__ = [
    "ACTIVATIONS",
    "AdapterConfig",
    "AdapterLayer",
    "AdapterMethod",
    "BottleneckAdapterLayer",
    "BottleneckAdapterMethod",
    "check_adapter_fields",
    "METHOD",
    "PLACEMENTS",
    "linear_out_features",
    "placement_targets",
]

#: non-linearities by name (the ``non_linearity`` field's choices). ``"gelu"`` is the exact (erf)
#: GELU, our default; ``"gelu_tanh"`` is the tanh approximation, which is what MindSpore's ``gelu``
#: computes and so what the MindPet shells (:mod:`deltatune.compat.mindpet`) use.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "gelu_tanh": partial(nn.GELU, approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}

#: the ``placement`` field's choices.
PLACEMENTS = ("houlsby", "pfeiffer")

# model_type -> (attention output projection, FFN output projection). Patterns use the
# target_modules syntax; BERT's FFN output is ``layer.N.output.dense`` (not the attention's
# ``attention.output.dense``), hence the regex.
_BERT_FFN = r"re:(.*\.)?layer\.\d+\.output\.dense"
_PLACEMENT_MODULES: dict[str, tuple[str, str]] = {
    "llama": ("self_attn.o_proj", "mlp.down_proj"),
    "mistral": ("self_attn.o_proj", "mlp.down_proj"),
    "qwen2": ("self_attn.o_proj", "mlp.down_proj"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    "bert": ("attention.output.dense", _BERT_FFN),
    "roberta": ("attention.output.dense", _BERT_FFN),
}


def placement_targets(model: nn.Module, placement: str) -> list[str] | None:
    """Target patterns for ``placement`` (``"houlsby"``/``"pfeiffer"``) on a known architecture.

    Returns None when the model's ``config.model_type`` has no entry.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    entry = _PLACEMENT_MODULES.get(model_type) if isinstance(model_type, str) else None
    if entry is None:
        return None
    attn_out, ffn_out = entry
    return [attn_out, ffn_out] if placement == "houlsby" else [ffn_out]


def linear_out_features(module: nn.Module) -> int:
    """Output width of ``nn.Linear`` or GPT-2 ``Conv1D`` (weight stored ``(in, out)``)."""
    if isinstance(module, nn.Linear):
        return module.out_features
    return int(module.weight.shape[1])


def check_adapter_fields(cls_name: str, cfg: Any) -> None:
    """Checks shared by the adapter configs (non_linearity, dropout, mode, placement, hidden_size)."""
    check_choice(f"{cls_name}.non_linearity", cfg.non_linearity, tuple(ACTIVATIONS))
    cfg.dropout = check_float(f"{cls_name}.dropout", cfg.dropout, low=0.0, high=1.0, high_inclusive=False)
    check_choice(f"{cls_name}.mode", cfg.mode, ("dense", "layer"))
    check_choice(f"{cls_name}.placement", cfg.placement, (*PLACEMENTS, None))
    if cfg.placement is not None and cfg.target_modules is not None:
        raise DeltaConfigError(
            f"{cls_name}.placement must be None when target_modules is given (placement only picks default "
            f"targets), got placement={cfg.placement!r} with target_modules={cfg.target_modules!r}"
        )
    if cfg.hidden_size is not None:
        check_positive_int(f"{cls_name}.hidden_size", cfg.hidden_size)


@dataclasses.dataclass
class AdapterConfig(DeltaConfig):
    """Bottleneck adapter hyper-parameters.

    Attributes:
        bottleneck_size: width of the bottleneck (positive int).
        non_linearity: ``"gelu"`` (exact, the default), ``"gelu_tanh"`` (tanh approximation, MindSpore's
            and MindPet's GELU), ``"relu"``, ``"silu"`` or ``"tanh"``.
        dropout: dropout on the bottleneck activation, in [0, 1).
        init_scale: std of the up-projection initialisation (>= 0; 0 gives an exact identity at
            init). The up-projection weights are truncated to ±2·init_scale.
        mode: ``"dense"`` (wrap a linear layer, adapt its output) or ``"layer"`` (wrap any module,
            adapt its output or the first element of a returned tuple).
        placement: ``"houlsby"`` / ``"pfeiffer"`` picks the targets on llama, mistral, qwen2, gpt2,
            bert and roberta when ``target_modules`` is None (None there means ``"houlsby"``);
            must be None when ``target_modules`` is given.
        hidden_size: the adapted width; None infers it (a linear layer's output width, a norm's
            width, else ``model.config.hidden_size``).
    """

    method: ClassVar[str] = "adapter"

    bottleneck_size: int = 64
    non_linearity: str = "gelu"
    dropout: float = 0.0
    init_scale: float = 1e-3
    mode: str = "layer"
    placement: str | None = None
    hidden_size: int | None = None

    def validate(self) -> None:
        super().validate()
        self.bottleneck_size = check_positive_int("AdapterConfig.bottleneck_size", self.bottleneck_size)
        check_adapter_fields("AdapterConfig", self)
        self.init_scale = check_float("AdapterConfig.init_scale", self.init_scale, low=0.0)


class BottleneckAdapterLayer(DeltaLayer):
    """A module plus residual bottleneck adapters applied to its output (shared adapter machinery).

    Subclasses set ``prefix`` (the delta attribute prefix) and implement :meth:`_make_projections`.
    The containers are ``<prefix>down``, ``<prefix>up`` (projection modules), ``<prefix>act`` and
    ``<prefix>dropout`` (parameter-free), all keyed by adapter name.
    """

    prefix: ClassVar[str] = ""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        for part in ("down", "up", "act", "dropout"):
            setattr(self, self.prefix + part, nn.ModuleDict())
        self.hidden_size: dict[str, int] = {}
        self.bottleneck: dict[str, int] = {}

    def _make_projections(self, hidden: int, config: DeltaConfig, kw: dict[str, Any]) -> tuple[nn.Module, nn.Module, int]:
        raise NotImplementedError  # pragma: no cover

    def add_adapter(
        self, name: str, config: DeltaConfig, *, module_name: str = "", hidden_size: int | None = None, **kwargs: Any
    ) -> None:
        """Create adapter ``name`` of width ``hidden_size`` (the adapted output's last dimension)."""
        if hidden_size is None:
            raise DeltaConfigError(f"hidden_size must be given to add an adapter to {module_name!r}, got None")
        weight = next((p for p in self.base_layer.parameters() if p.is_floating_point()), None)
        device = weight.device if weight is not None else torch.device("cpu")
        kw = {"device": device, "dtype": torch.float32}
        down, up, bottleneck = self._make_projections(hidden_size, config, kw)
        self._register_adapter(name)
        getattr(self, self.prefix + "down")[name] = down
        getattr(self, self.prefix + "up")[name] = up
        getattr(self, self.prefix + "act")[name] = ACTIVATIONS[config.non_linearity]()
        getattr(self, self.prefix + "dropout")[name] = (
            nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        )
        self.hidden_size[name] = hidden_size
        self.bottleneck[name] = bottleneck

    def _delete_extra(self, name: str) -> None:
        self.hidden_size.pop(name, None)
        self.bottleneck.pop(name, None)

    def adapt(self, name: str, h: torch.Tensor) -> torch.Tensor:
        """Adapter ``name`` applied to ``h`` (residual included)."""
        if h.shape[-1] != self.hidden_size[name]:
            raise DeltaConfigError(
                f"adapter {name!r} expects outputs of width {self.hidden_size[name]}, got a tensor of shape "
                f"{tuple(h.shape)}; set hidden_size in the config"
            )
        z = getattr(self, self.prefix + "down")[name](h)
        z = getattr(self, self.prefix + "act")[name](z)
        drop = getattr(self, self.prefix + "dropout")[name]
        if drop.training:  # (Dropout and Identity in eval mode return their input: no op dispatched)
            z = drop(z)
        z = getattr(self, self.prefix + "up")[name](z)
        return h + (z if z.dtype == h.dtype else z.to(h.dtype))

    def delta_forward(self, active: list[str], *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            for name in active:
                out = self.adapt(name, out)
            return out
        if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
            h = out[0]
            for name in active:
                h = self.adapt(name, h)
            return (h, *out[1:])
        raise UnsupportedModuleError(
            f"{self.method_name} adapters need a module returning a tensor or a tuple starting with one; "
            f"{type(unwrap(self)).__name__} returned {type(out).__name__}"
        )


class ParamCache:
    """Tensors derived from some parameters (a cast, a product), made once when no gradient is needed and
    reused while the parameters are unchanged, so a decoding step dispatches no cast or product again.

    The entry is keyed on each parameter's identity, ``data_ptr``, dtype, device, shape and version counter
    (``tensor._version``: an optimiser step and ``load_state_dict`` write in place and bump it; ``.to()``,
    FSDP and ``param.data = ...`` change the storage, which the entry holds on to, so its address cannot be
    reused by another tensor while the entry lives): a stale tensor is never used. Nothing is kept for
    inference tensors (no version counter), under ``torch.compile`` or during a CUDA capture (a tensor made
    then lives in the graph's pool). Not pickled (``torch.save`` and copies start empty)."""

    entry: tuple[Any, ...] | None = None  # (key, derived tensors, weak references, aliases)

    def __getstate__(self) -> dict[str, Any]:
        return {}

    @staticmethod
    def key(params: tuple[torch.Tensor, ...], dt: torch.dtype) -> tuple[Any, ...] | None:
        """What the derived tensors depend on; None: nothing may be cached now."""
        if any(p.is_inference() for p in params) or torch.compiler.is_compiling():
            return None
        if params[0].is_cuda and torch.cuda.is_current_stream_capturing():
            return None
        # (inference mode makes inference tensors, which a later autograd-recording call cannot save)
        inference = torch.is_inference_mode_enabled()
        return (dt, inference, *((p.data_ptr(), p.dtype, p.device, p.shape, p._version) for p in params))

    def get(
        self, params: tuple[torch.Tensor, ...], dt: torch.dtype, make: Callable[[], tuple[torch.Tensor, ...]]
    ) -> tuple[torch.Tensor, ...]:
        """``make()`` (run without gradients), or the kept result while ``params`` are the ones it came from."""
        key = ParamCache.key(params, dt)
        hit = self.entry
        if key is not None and hit is not None and hit[0] == key and all(r() is p for r, p in zip(hit[2], params)):
            return hit[1]
        with torch.no_grad():
            out = make()
        if key is not None:
            # the detached aliases keep the storages alive, so no other tensor can take their addresses
            self.entry = (key, out, tuple(weakref.ref(p) for p in params), tuple(p.detach() for p in params))
        return out


def param_cache(module: nn.Module) -> ParamCache:
    """The :class:`ParamCache` of ``module`` (made on first use; modules pickled before it existed lack it)."""
    cache = module.__dict__.get("_param_cache")
    if cache is None:
        cache = module.__dict__["_param_cache"] = ParamCache()
    return cache


def needs_grad(*params: torch.Tensor | None) -> bool:
    """Whether autograd is recording and one of ``params`` requires a gradient."""
    return torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params)


class _CastLinear(nn.Linear):
    """``nn.Linear`` whose (fp32) weights are cast to the input's dtype; without gradients the cast copies
    are kept (:class:`ParamCache`), so decoding runs one ``linear`` per projection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        if self.weight.dtype == dt and (self.bias is None or self.bias.dtype == dt):
            return F.linear(x, self.weight, self.bias)
        if needs_grad(self.weight, self.bias):
            bias = self.bias.to(dt) if self.bias is not None else None
            return F.linear(x, self.weight.to(dt), bias)
        params = (self.weight,) if self.bias is None else (self.weight, self.bias)
        w, *b = param_cache(self).get(params, dt, lambda: tuple(p.to(dt) for p in params))
        return F.linear(x, w, b[0] if b else None)


class AdapterLayer(BottleneckAdapterLayer):
    """Houlsby bottleneck adapters after one module: ``adapter_down`` / ``adapter_up`` (``nn.Linear``)."""

    method_name = "adapter"
    prefix = "adapter_"
    delta_attrs = ("adapter_down", "adapter_up", "adapter_act", "adapter_dropout")
    mergeable = False

    def _make_projections(self, hidden: int, config: DeltaConfig, kw: dict[str, Any]) -> tuple[nn.Module, nn.Module, int]:
        assert isinstance(config, AdapterConfig)
        b = config.bottleneck_size
        down = _CastLinear(hidden, b, **kw)
        up = _CastLinear(b, hidden, **kw)
        with torch.no_grad():
            nn.init.zeros_(down.bias)
            nn.init.zeros_(up.bias)
            if config.init_scale > 0:
                s = config.init_scale
                nn.init.trunc_normal_(up.weight, mean=0.0, std=s, a=-2 * s, b=2 * s)
            else:
                nn.init.zeros_(up.weight)
        return down, up, b


class BottleneckAdapterMethod(DeltaMethod):
    """Shared ``apply`` of the bottleneck adapter methods: placement defaults, width inference,
    all checks before the model is touched."""

    def default_target_modules(self, model: nn.Module) -> list[str] | None:
        """Houlsby placement for known architectures."""
        return placement_targets(model, "houlsby")

    def resolve_targets(self, model: nn.Module, config: DeltaConfig) -> list[ModuleSlot]:
        if config.target_modules is None:
            placement = getattr(config, "placement", None) or "houlsby"
            targets = placement_targets(model, placement)
            if targets is None:
                model_type = getattr(getattr(model, "config", None), "model_type", None)
                known = sorted(_PLACEMENT_MODULES)
                raise DeltaConfigError(
                    f"{type(config).__name__}.target_modules must be given for {type(model).__name__} "
                    f"(model_type {model_type!r}); placement defaults exist for {known}, got None"
                )
            config = dataclasses.replace(config, target_modules=targets, placement=None)
        return super().resolve_targets(model, config)

    def check_module(self, slot: ModuleSlot, config: DeltaConfig) -> None:
        module = unwrap(slot.module)
        if getattr(config, "mode", "layer") == "dense" and not is_linear_like(module):
            raise UnsupportedModuleError(
                f"{type(config).__name__}.mode 'dense' wraps linear layers only (nn.Linear, transformers Conv1D); "
                f"{slot.name!r} is {type(module).__name__}; use mode='layer' to adapt any module's output"
            )

    def hidden_size_for(self, model: nn.Module, slot: ModuleSlot, config: DeltaConfig) -> int:
        """The width the adapter on ``slot`` works on (see ``AdapterConfig.hidden_size``)."""
        module = unwrap(slot.module)
        cname = type(config).__name__
        given = getattr(config, "hidden_size", None)
        if is_linear_like(module):
            width = linear_out_features(module)
            if given is not None and given != width and config.mode == "dense":
                raise DeltaConfigError(
                    f"{cname}.hidden_size must equal the output width {width} of {slot.name!r} in mode 'dense', "
                    f"got {given}"
                )
            return given if given is not None else width
        if given is not None:
            return given
        if isinstance(module, nn.LayerNorm):
            return int(module.normalized_shape[-1])
        w = getattr(module, "weight", None)
        if "norm" in type(module).__name__.lower() and isinstance(w, torch.Tensor) and w.dim() == 1:
            return int(w.shape[0])
        hs = getattr(getattr(model, "config", None), "hidden_size", None)
        if isinstance(hs, int) and not isinstance(hs, bool) and hs > 0:
            return hs
        raise DeltaConfigError(
            f"cannot infer the adapter width for {slot.name!r} ({type(module).__name__}); "
            f"set {cname}.hidden_size (a positive int), got None"
        )

    def check_sizes(self, slot: ModuleSlot, hidden: int, config: DeltaConfig) -> None:
        """Per-module size checks (hook for subclasses)."""

    def apply(self, model: nn.Module, config: DeltaConfig, adapter_name: str) -> list[str]:
        """Wrap every selected module; every check runs before the model is touched."""
        assert self.layer_cls is not None
        slots = self.resolve_targets(model, config)
        plan: list[tuple[ModuleSlot, int]] = []
        for slot in slots:
            self.check_module(slot, config)
            hidden = self.hidden_size_for(model, slot, config)
            self.check_sizes(slot, hidden, config)
            plan.append((slot, hidden))
        for slot, hidden in plan:
            if type(slot.module) is self.layer_cls:
                slot.module.add_adapter(adapter_name, config, module_name=slot.name, hidden_size=hidden)
            else:
                layer = self.layer_cls(slot.module)
                layer.add_adapter(adapter_name, config, module_name=slot.name, hidden_size=hidden)
                setattr(slot.parent, slot.attr, layer)
        return [s.name for s in slots]


class AdapterMethod(BottleneckAdapterMethod):
    """Registry entry for bottleneck adapters (not mergeable: the non-linearity cannot be folded)."""

    name = "adapter"
    config_cls = AdapterConfig
    layer_cls = AdapterLayer
    delta_prefixes = ("adapter_",)
    mergeable = False

    @staticmethod
    def num_params(hidden: int, bottleneck: int) -> int:
        """Trainable parameters of one insertion: ``2·h·b + b + h``."""
        return 2 * hidden * bottleneck + bottleneck + hidden


METHOD = AdapterMethod()
