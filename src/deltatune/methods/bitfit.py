"""BitFit (Ben Zaken et al., 2022): train the model's own bias terms, nothing else.

``apply`` wraps nothing. It selects the bias parameters (every bias of the model, or those of the
``target_modules`` when given, narrowed by ``bias_patterns`` wildcards over parameter names) and
records them; :meth:`BitFitMethod.extra_trainable` returns their current (real) parameter names,
which is how ``freeze_delta(model, "bitfit")`` and ``deltatune.checkpoint.save_delta/load_delta``
find them. Biases that belong to other delta methods (e.g. an adapter's ``adapter_down`` bias) are
never selected.

Because BitFit trains the base model's tensors in place:

* a model holds at most one BitFit adapter;
* ``disable_adapters`` cannot switch it off (there is no wrapper);
* the original biases are kept (a copy, a few KB) so that ``delete_adapter`` restores them bit
  for bit. ``deltatune.api.unload`` removes wrappers only and leaves trained biases as they are.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import ClassVar

import torch
import torch.nn as nn

from ..delta_layer import DeltaLayer, get_records
from ..errors import DeltaConfigError, TargetNotFoundError
from ..inject import select_targets
from ..validation import check_str_list
from .base import DeltaConfig, DeltaMethod

__all__ = ["BitFitConfig", "BitFitMethod", "METHOD", "bias_parameters"]

_ORIGINAL_ATTR = "_deltatune_bitfit_original"


@dataclasses.dataclass
class BitFitConfig(DeltaConfig):
    """BitFit settings.

    Attributes:
        bias_patterns: shell-style wildcards over bias parameter names (logical names, e.g.
            ``"*attention*"`` or ``"bert.encoder.layer.*.output.dense.bias"``); a bias trains when it
            matches one. None trains every selected bias. Each pattern must match some bias.
        target_modules / exclude_modules / layers_to_transform / layers_pattern: restrict to the
            biases owned directly by these modules (None: the whole model).
    """

    method: ClassVar[str] = "bitfit"

    bias_patterns: str | list[str] | None = None

    def validate(self) -> None:
        super().validate()
        if self.bias_patterns is not None:
            self.bias_patterns = check_str_list("BitFitConfig.bias_patterns", self.bias_patterns)


def bias_parameters(model: nn.Module) -> list[tuple[str, str, nn.Parameter]]:
    """Every base-model bias as ``(real name, logical name, parameter)``, shared ones once.

    Base-model biases are parameters named ``bias`` on modules outside any delta method's own
    containers (inside a delta wrapper only the wrapped ``base_layer`` is visited).
    """
    out: list[tuple[str, str, nn.Parameter]] = []
    seen: set[int] = set()

    def join(a: str, b: str) -> str:
        return f"{a}.{b}" if a else b

    def visit(real: str, logical: str, module: nn.Module) -> None:
        if isinstance(module, DeltaLayer):
            visit(join(real, "base_layer"), logical, module.base_layer)
            return
        bias = module._parameters.get("bias")
        if isinstance(bias, nn.Parameter) and id(bias) not in seen:
            seen.add(id(bias))
            out.append((join(real, "bias"), join(logical, "bias"), bias))
        for cname, child in module.named_children():
            visit(join(real, cname), join(logical, cname), child)

    visit("", "", model)
    return out


def _model_type(model: nn.Module) -> str:
    mt = getattr(getattr(model, "config", None), "model_type", None)
    return repr(mt) if mt else type(model).__name__


class BitFitMethod(DeltaMethod):
    """Registry entry for BitFit: no wrappers, the selected biases are the adapter's parameters."""

    name = "bitfit"
    config_cls = BitFitConfig
    layer_cls = None
    delta_prefixes = ()
    mergeable = False

    def selected_biases(self, model: nn.Module, config: DeltaConfig) -> list[tuple[str, str, nn.Parameter]]:
        """The biases ``config`` selects, as ``(real name, logical name, parameter)``; raises when none."""
        assert isinstance(config, BitFitConfig)
        biases = bias_parameters(model)
        if not biases:
            raise DeltaConfigError(
                f"BitFit needs bias parameters, but the {_model_type(model)} model ({type(model).__name__}) "
                f"has no bias parameters; use another method (e.g. 'lora' or 'ia3')"
            )
        if config.target_modules is not None:
            slots = select_targets(
                model,
                config.target_modules,
                exclude_modules=config.exclude_modules,
                layers_to_transform=config.layers_to_transform,
                layers_pattern=config.layers_pattern,
            )
            owners = {s.name for s in slots}
            chosen = [b for b in biases if b[1].rpartition(".")[0] in owners]
            if not chosen:
                raise DeltaConfigError(
                    f"BitFitConfig.target_modules={config.target_modules!r} selects modules of the "
                    f"{_model_type(model)} model that have no bias parameters"
                )
        else:
            if config.exclude_modules is not None or config.layers_to_transform is not None:
                raise DeltaConfigError(
                    "BitFitConfig.target_modules must be given with exclude_modules / layers_to_transform "
                    "(use target_modules='*' for the whole model), got None"
                )
            chosen = biases
        if config.bias_patterns is not None:
            patterns = list(config.bias_patterns)
            unmatched = [p for p in patterns if not any(self._match(b, p) for b in chosen)]
            if unmatched:
                examples = [b[1] for b in chosen[:5]]
                raise TargetNotFoundError(
                    f"BitFitConfig.bias_patterns entr{'y' if len(unmatched) == 1 else 'ies'} {unmatched} "
                    f"matched no bias parameter; bias names look like {examples}"
                )
            chosen = [b for b in chosen if any(self._match(b, p) for p in patterns)]
        return chosen

    @staticmethod
    def _match(bias: tuple[str, str, nn.Parameter], pattern: str) -> bool:
        return fnmatch.fnmatchcase(bias[1], pattern) or fnmatch.fnmatchcase(bias[0], pattern)

    def apply(self, model: nn.Module, config: DeltaConfig, adapter_name: str) -> list[str]:
        """Select the biases (all checks first), remember their original values; wraps nothing.

        Returns the logical names of the modules whose biases train.
        """
        others = [n for n, r in get_records(model).items() if r.method == self.name]
        if others:
            raise DeltaConfigError(
                f"a model holds at most one BitFit adapter (it trains the model's own biases); "
                f"{others[0]!r} is already one, delete it before adding {adapter_name!r}"
            )
        chosen = self.selected_biases(model, config)
        with torch.no_grad():
            model.__dict__.setdefault(_ORIGINAL_ATTR, {})[adapter_name] = {
                logical: p.detach().clone() for _, logical, p in chosen
            }
        return [logical.rpartition(".")[0] for _, logical, _ in chosen]

    def remove(self, model: nn.Module, adapter_name: str) -> None:
        """Restore the biases adapter ``adapter_name`` trained to their values before ``apply``."""
        saved = model.__dict__.get(_ORIGINAL_ATTR, {}).pop(adapter_name, None)
        if not saved:
            return
        with torch.no_grad():
            for _, logical, p in bias_parameters(model):
                if logical in saved:
                    p.copy_(saved[logical])

    def keep(self, model: nn.Module, adapter_name: str) -> None:
        """The trained biases already are the model's own: forget their original values."""
        saved = model.__dict__.get(_ORIGINAL_ATTR)
        if saved is not None:
            saved.pop(adapter_name, None)
            if not saved:
                del model.__dict__[_ORIGINAL_ATTR]

    def extra_trainable(self, model: nn.Module, config: DeltaConfig, adapter_name: str) -> list[str]:
        """The real names of the biases this adapter trains (recomputed: wrappers may have moved them)."""
        return [real for real, _, _ in self.selected_biases(model, config)]

    @staticmethod
    def num_params(model: nn.Module) -> int:
        """Number of base-model bias parameters (what BitFit trains with no restriction)."""
        return sum(p.numel() for _, _, p in bias_parameters(model))


METHOD = BitFitMethod()
