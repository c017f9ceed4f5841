"""(IA)³ (Liu et al., 2022): learned vectors that rescale activations.

Two kinds of target:

* **output scaling** (keys, values): ``y = base(x) ⊙ s`` with ``s`` of the layer's output width
  (the bias is scaled too, so merging is exact);
* **input scaling** (``feedforward_modules``, the FFN down projection): ``y = base(x ⊙ s)`` with
  ``s`` of the layer's input width, i.e. the FFN's intermediate activation is rescaled.

Vectors start at one, so the model's output at initialisation equals the base model's exactly.
Merging folds ``s`` into the weight (output rows and bias for output scaling, input columns for
input scaling; GPT-2 ``Conv1D``'s ``(in, out)`` layout handled) and unmerging divides it back out
(exact up to rounding; a vector entry of 0 cannot be unmerged and is refused at merge time).

Fused projections: ``fused_slices={pattern: [False, True, True]}`` splits the matched layer's output
into equal slices and rescales only those marked True; GPT-2's ``c_attn`` (q, k, v fused) gets
``[False, True, True]`` by default, so only keys and values are rescaled, as the paper wants.

Default targets (``target_modules=None``): llama/mistral/qwen2 ``k_proj, v_proj, down_proj``
(``down_proj`` feed-forward); gpt2 ``c_attn`` (k and v slices) and ``mlp.c_proj`` (feed-forward);
bert/roberta ``key, value`` and the FFN output ``layer.N.output.dense`` (feed-forward).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..delta_layer import DeltaLayer, unwrap
from ..errors import DeltaConfigError, DeltaConfigTypeError, UnsupportedModuleError
from ..inject import (
    ModuleSlot,
    check_patterns,
    is_gpt2_conv1d,
    is_linear_like,
    match_pattern,
    normalise_patterns,
)
from ..validation import check_str_list, check_type
from .base import DeltaConfig, DeltaMethod

__all__ = ["IA3Config", "IA3Layer", "IA3Method", "METHOD"]

_BERT_FFN = r"re:(.*\.)?layer\.\d+\.output\.dense"

# model_type -> (targets, feedforward targets, fused slices)
_DEFAULTS: dict[str, tuple[list[str], list[str], dict[str, list[bool]]]] = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"], {}),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"], {}),
    "qwen2": (["k_proj", "v_proj", "down_proj"], ["down_proj"], {}),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"], {"c_attn": [False, True, True]}),
    "bert": (["key", "value", _BERT_FFN], [_BERT_FFN], {}),
    "roberta": (["key", "value", _BERT_FFN], [_BERT_FFN], {}),
}


@dataclasses.dataclass
class IA3Config(DeltaConfig):
    """(IA)³ settings.

    Attributes:
        target_modules: linear layers to rescale (None: the architecture's default, see module doc).
        feedforward_modules: those targets whose *input* is rescaled (same pattern syntax); every
            entry must match one of the targets. Must be None when ``target_modules`` is None.
        fused_slices: ``{pattern: [bool, ...]}``: rescale only the marked equal output slices of
            matched fused projections (output-scaled targets only).
    """

    method: ClassVar[str] = "ia3"

    feedforward_modules: str | list[str] | None = None
    fused_slices: dict[str, list[bool]] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        if self.feedforward_modules is not None:
            check_str_list("IA3Config.feedforward_modules", self.feedforward_modules)
            check_patterns("IA3Config.feedforward_modules", self.feedforward_modules)
            if self.target_modules is None:
                raise DeltaConfigError(
                    "IA3Config.feedforward_modules must be None when target_modules is None (the "
                    f"architecture default picks both), got {self.feedforward_modules!r}"
                )
        check_type("IA3Config.fused_slices", self.fused_slices, dict, "a dict {pattern: [bool, ...]}")
        for k, v in self.fused_slices.items():
            check_type("IA3Config.fused_slices key", k, str, "a str pattern")
            check_patterns("IA3Config.fused_slices", [k])
            if not isinstance(v, (list, tuple)) or not v or not all(isinstance(b, bool) for b in v):
                raise DeltaConfigTypeError(f"IA3Config.fused_slices[{k!r}] must be a non-empty list of bool, got {v!r}")
            if not any(v):
                raise DeltaConfigError(
                    f"IA3Config.fused_slices[{k!r}] must enable at least one slice, got {list(v)!r}"
                )


class IA3Layer(DeltaLayer):
    """(IA)³ vectors on one ``nn.Linear`` / GPT-2 ``Conv1D``: ``ia3_scale`` keyed by adapter name."""

    method_name = "ia3"
    delta_attrs = ("ia3_scale",)
    mergeable = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        w = base_layer.weight
        self.conv1d = is_gpt2_conv1d(base_layer)
        if self.conv1d:
            self.in_features, self.out_features = int(w.shape[0]), int(w.shape[1])
        else:
            self.in_features, self.out_features = int(w.shape[1]), int(w.shape[0])
        self.ia3_scale = nn.ParameterDict()
        self.is_feedforward: dict[str, bool] = {}
        self.slices: dict[str, list[bool] | None] = {}

    def add_adapter(
        self,
        name: str,
        config: DeltaConfig,
        *,
        module_name: str = "",
        feedforward: bool = False,
        slices: list[bool] | None = None,
        **kwargs: Any,
    ) -> None:
        """Add vector ``name`` (ones): input scaling when ``feedforward``, else output scaling
        (of the ``slices`` marked True only, when given)."""
        if feedforward:
            size = self.in_features
        elif slices is not None:
            size = self.out_features // len(slices) * sum(slices)
        else:
            size = self.out_features
        self._register_adapter(name)
        w = self.base_layer.weight
        self.ia3_scale[name] = nn.Parameter(torch.ones(size, device=w.device, dtype=torch.float32))
        self.is_feedforward[name] = feedforward
        self.slices[name] = None if feedforward else slices

    def _delete_extra(self, name: str) -> None:
        self.is_feedforward.pop(name, None)
        self.slices.pop(name, None)

    def full_scale(self, name: str) -> torch.Tensor:
        """Vector ``name`` over the full input (feed-forward) or output width (ones on frozen slices)."""
        s = self.ia3_scale[name]
        slices = self.slices[name]
        if slices is None:
            return s
        step = self.out_features // len(slices)
        parts, j = [], 0
        for on in slices:
            if on:
                parts.append(s[j * step : (j + 1) * step])
                j += 1
            else:
                parts.append(s.new_ones(step))
        return torch.cat(parts)

    def delta_forward(self, active: list[str], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        in_scale = out_scale = None
        for name in active:
            s = self.full_scale(name)
            if self.is_feedforward[name]:
                in_scale = s if in_scale is None else in_scale * s
            else:
                out_scale = s if out_scale is None else out_scale * s
        if in_scale is not None:
            x = x * in_scale.to(x.dtype)
        y = self.base_layer(x, *args, **kwargs)
        if out_scale is not None:
            y = y * out_scale.to(y.dtype)
        return y

    # -- merging --------------------------------------------------------------------------
    def _scale_weight(self, name: str, s: torch.Tensor, *, divide: bool) -> None:
        base = self.base_layer
        w = base.weight
        ff = self.is_feedforward[name]
        # Linear weight is (out, in), Conv1D (in, out): output scaling hits the "out" axis.
        out_axis = 1 if self.conv1d else 0
        axis = (1 - out_axis) if ff else out_axis
        shape = [1, 1]
        shape[axis] = -1
        factor = s.view(shape)
        new = w.float() / factor if divide else w.float() * factor
        w.data.copy_(new.to(w.dtype))
        bias = getattr(base, "bias", None)
        if not ff and bias is not None:
            nb = bias.float() / s if divide else bias.float() * s
            bias.data.copy_(nb.to(bias.dtype))

    def _merge_one(self, name: str, *, safe: bool) -> None:
        with torch.no_grad():
            s = self.full_scale(name).detach().float()
            if bool((s == 0).any()):
                raise DeltaConfigError(
                    f"adapter {name!r} has (IA)³ entries equal to 0, which could not be unmerged; not merged"
                )
            if safe:
                w = self.base_layer.weight.float()
                if not torch.isfinite(s).all() or not torch.isfinite(w).all():
                    raise DeltaConfigError(f"merging adapter {name!r} would produce non-finite weights; not merged")
            self._scale_weight(name, s, divide=False)

    def _unmerge_one(self, name: str) -> None:
        with torch.no_grad():
            self._scale_weight(name, self.full_scale(name).detach().float(), divide=True)


class IA3Method(DeltaMethod):
    """Registry entry for (IA)³."""

    name = "ia3"
    config_cls = IA3Config
    layer_cls = IA3Layer
    delta_prefixes = ("ia3_",)
    mergeable = True

    def default_target_modules(self, model: nn.Module) -> list[str] | None:
        """Keys, values and the FFN down projection for known architectures."""
        entry = self._defaults(model)
        return list(entry[0]) if entry else None

    @staticmethod
    def _defaults(model: nn.Module) -> tuple[list[str], list[str], dict[str, list[bool]]] | None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        return _DEFAULTS.get(model_type) if isinstance(model_type, str) else None

    def check_module(self, slot: ModuleSlot, config: DeltaConfig) -> None:
        module = unwrap(slot.module)
        if not is_linear_like(module):
            raise UnsupportedModuleError(
                f"(IA)³ cannot wrap module {slot.name!r} of type {type(module).__name__}; supported: Linear, "
                f"transformers Conv1D"
            )

    def plan(self, model: nn.Module, config: DeltaConfig) -> list[tuple[ModuleSlot, bool, list[bool] | None]]:
        """``(slot, feedforward, slices)`` for every target; every check runs here."""
        assert isinstance(config, IA3Config)
        if config.target_modules is None:
            entry = self._defaults(model)
            if entry is None:
                raise DeltaConfigError(
                    f"IA3Config.target_modules must be given for {type(model).__name__} (no default is known "
                    f"for this architecture; known: {sorted(_DEFAULTS)}), got None"
                )
            ff_patterns, fused = entry[1], (config.fused_slices or entry[2])
        else:
            ff_patterns = normalise_patterns(config.feedforward_modules) or []
            fused = config.fused_slices
        slots = self.resolve_targets(model, config)
        unmatched = [p for p in ff_patterns if not any(match_pattern(s.name, p) for s in slots)]
        if unmatched:
            raise DeltaConfigError(
                f"IA3Config.feedforward_modules entries {unmatched} match none of the target modules "
                f"{[s.name for s in slots][:8]}; every feed-forward module must also be a target"
            )
        unused = [p for p in fused if not any(match_pattern(s.name, p) for s in slots)]
        if unused:
            raise DeltaConfigError(
                f"IA3Config.fused_slices keys {unused} match none of the target modules {[s.name for s in slots][:8]}"
            )
        out = []
        for slot in slots:
            self.check_module(slot, config)
            ff = any(match_pattern(slot.name, p) for p in ff_patterns)
            slices = next((v for p, v in fused.items() if match_pattern(slot.name, p)), None)
            if slices is not None:
                if ff:
                    raise DeltaConfigError(
                        f"IA3Config.fused_slices applies to output-scaled modules; {slot.name!r} is a feed-forward module"
                    )
                width = linear_out(unwrap(slot.module))
                if width % len(slices):
                    raise DeltaConfigError(
                        f"IA3Config.fused_slices for {slot.name!r} has {len(slices)} slices but the layer has "
                        f"{width} outputs, which is not divisible by {len(slices)}"
                    )
                slices = list(slices)
            out.append((slot, ff, slices))
        return out

    def apply(self, model: nn.Module, config: DeltaConfig, adapter_name: str) -> list[str]:
        """Wrap every target; all checks (targets, feed-forward subset, slices) run first."""
        plan = self.plan(model, config)
        for slot, ff, slices in plan:
            if type(slot.module) is IA3Layer:
                slot.module.add_adapter(adapter_name, config, module_name=slot.name, feedforward=ff, slices=slices)
            else:
                layer = IA3Layer(slot.module)
                layer.add_adapter(adapter_name, config, module_name=slot.name, feedforward=ff, slices=slices)
                setattr(slot.parent, slot.attr, layer)
        return [s.name for s, _, _ in plan]

    def num_params(self, model: nn.Module, config: DeltaConfig) -> int:
        """Trainable parameters ``config`` would add to ``model`` (sum of the vector lengths)."""
        total = 0
        for slot, ff, slices in self.plan(model, config):
            m = unwrap(slot.module)
            if ff:
                total += linear_in(m)
            elif slices is not None:
                total += linear_out(m) // len(slices) * sum(slices)
            else:
                total += linear_out(m)
        return total


def linear_out(module: nn.Module) -> int:
    """Output width of a Linear / Conv1D."""
    return int(module.weight.shape[1] if is_gpt2_conv1d(module) else module.weight.shape[0])


def linear_in(module: nn.Module) -> int:
    """Input width of a Linear / Conv1D."""
    return int(module.weight.shape[0] if is_gpt2_conv1d(module) else module.weight.shape[1])


METHOD = IA3Method()
