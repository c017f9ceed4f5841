"""AdamW with a bias-correction switch, and the weight-decay grouping rule.

``torch.optim.AdamW`` always applies Adam's bias corrections. :class:`AdamW` here computes the
same update when ``bias_correction=True`` and the uncorrected one (as in the original BERT
optimiser) when ``False``::

    p <- p * (1 - lr * wd)                        # decoupled weight decay
    m <- beta1 * m + (1 - beta1) * g
    v <- beta2 * v + (1 - beta2) * g * g
    bias_correction=True:   p <- p - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)
    bias_correction=False:  p <- p - lr * m / (sqrt(v) + eps)

Weight-decay rule (:func:`param_groups`): a trainable parameter is decayed unless it is
one-dimensional (biases, norm scales, 1-D adapter vectors), its name ends with ``bias``, or it
belongs to a normalisation module (``LayerNorm``, ``GroupNorm``, ``BatchNorm*``, ``InstanceNorm*``,
``LocalResponseNorm`` or any class whose name contains ``Norm``, e.g. ``LlamaRMSNorm``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..validation import check_bool, check_float

__all__ = ["AdamW", "param_groups", "uses_weight_decay"]

_NORM_TYPES = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase,
)


def _is_norm_module(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or "Norm" in type(module).__name__


def uses_weight_decay(name: str, param: torch.Tensor, owner: nn.Module | None = None) -> bool:
    """Whether the rule above decays parameter ``name`` (``owner`` is the module that holds it)."""
    if param.ndim < 2 or name.split(".")[-1].endswith("bias"):
        return False
    return not (owner is not None and _is_norm_module(owner))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split the ``requires_grad`` parameters of ``model`` into a decayed and a non-decayed group.

    Each group carries ``"names"`` (parameter names, in ``named_parameters`` order) so that a
    checkpoint can check it is loaded into the same parameters. Empty groups are left out.
    """
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for p_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            (decay if uses_weight_decay(full, param, module) else no_decay).append((full, param))
    groups = []
    if decay:
        groups.append({"params": [p for _, p in decay], "names": [n for n, _ in decay], "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": [p for _, p in no_decay], "names": [n for n, _ in no_decay], "weight_decay": 0.0})
    return groups


class AdamW(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam with ``bias_correction`` on or off (see the module docstring).

    Works on any float parameters; the moment buffers have the parameter's dtype and device.
    Uses multi-tensor (``torch._foreach_*``) kernels per parameter group.

    ``capturable=True`` makes :meth:`step` safe to capture in a CUDA graph
    (:class:`~deltatune.train.CapturedStep`): the step counts live on the parameters' device and the
    bias corrections are computed there, and the learning rate is read from a device copy of each
    group's ``"lr"``. The copy is refreshed by every eager :meth:`step` and by :meth:`sync_lr`, which
    must be called before each replay of a captured step (a replay runs no Python, so a scheduler's
    new ``"lr"`` reaches the graph only through that copy). The update equals the default one up to
    float32 rounding of the bias corrections.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        bias_correction: bool = True,
        capturable: bool = False,
    ) -> None:
        lr = check_float("lr", lr, low=0.0, low_inclusive=False)  # > 0, as TrainConfig.lr
        check_float("betas[0]", betas[0], low=0.0, high=1.0, high_inclusive=False)
        check_float("betas[1]", betas[1], low=0.0, high=1.0, high_inclusive=False)
        check_float("eps", eps, low=0.0, low_inclusive=False)
        check_float("weight_decay", weight_decay, low=0.0)
        check_bool("bias_correction", bias_correction)
        check_bool("capturable", capturable)
        defaults = {
            "lr": lr,
            "betas": (float(betas[0]), float(betas[1])),
            "eps": float(eps),
            "weight_decay": float(weight_decay),
            "bias_correction": bias_correction,
            "capturable": capturable,
        }
        super().__init__(params, defaults)
        self._lr_on_device: dict[tuple[int, torch.device], torch.Tensor] = {}

    def _device_lr(self, index: int, group: dict[str, Any], device: torch.device) -> torch.Tensor:
        """The device copy of group ``index``'s learning rate, refreshed unless a graph is being captured."""
        key = (index, device)
        t = self._lr_on_device.get(key)
        new = t is None
        if new:
            t = self._lr_on_device[key] = torch.empty((), dtype=torch.float32, device=device)
        if new or not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            t.fill_(float(group["lr"]))
        return t

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict; each group keeps this optimiser's ``capturable`` setting (a checkpoint written
        without it can be resumed under CUDA graphs, and the other way round)."""
        capturable = [bool(g.get("capturable", False)) for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, value in zip(self.param_groups, capturable):
            group["capturable"] = value

    def sync_lr(self) -> None:
        """Copy every group's current ``"lr"`` into its device copy (call before replaying a captured step)."""
        for (index, _), t in self._lr_on_device.items():
            t.fill_(float(self.param_groups[index]["lr"]))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Apply one update to every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            capturable = bool(group.get("capturable", False))
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("deltatune AdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if capturable:  # a float32 count on the parameter's device, advanced below
                    if not (isinstance(state["step"], torch.Tensor) and state["step"].device == p.device):
                        state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32, device=p.device)
                else:
                    state["step"] = int(state["step"]) + 1
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            if not params:
                continue
            if capturable:
                self._capturable_update(index, group, params, grads, exp_avgs, exp_avg_sqs, steps)
                continue
            lr, eps = group["lr"], group["eps"]
            beta1, beta2 = group["betas"]
            denom = _decay_and_moments(params, grads, exp_avgs, exp_avg_sqs, lr, group)
            if group["bias_correction"]:
                torch._foreach_div_(denom, [math.sqrt(1.0 - beta2**t) for t in steps])
                torch._foreach_add_(denom, eps)
                torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / (1.0 - beta1**t) for t in steps])
            else:
                torch._foreach_add_(denom, eps)
                torch._foreach_addcdiv_(params, exp_avgs, denom, value=-lr)
        return loss

    def _capturable_update(
        self,
        index: int,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        exp_avgs: list[torch.Tensor],
        exp_avg_sqs: list[torch.Tensor],
        steps: list[torch.Tensor],
    ) -> None:
        """The update of :meth:`step` with device-side step counts, bias corrections and learning rate."""
        lr = self._device_lr(index, group, params[0].device)
        eps = group["eps"]
        beta1, beta2 = group["betas"]
        torch._foreach_add_(steps, 1.0)
        denom = _decay_and_moments(params, grads, exp_avgs, exp_avg_sqs, lr, group)
        if group["bias_correction"]:
            root_bc2 = torch._foreach_pow(beta2, steps)  # sqrt(1 - beta2**t)
            torch._foreach_neg_(root_bc2)
            torch._foreach_add_(root_bc2, 1.0)
            torch._foreach_sqrt_(root_bc2)
            torch._foreach_div_(denom, root_bc2)
            torch._foreach_add_(denom, eps)
            step_size = torch._foreach_pow(beta1, steps)  # -lr / (1 - beta1**t)
            torch._foreach_neg_(step_size)
            torch._foreach_add_(step_size, 1.0)
            torch._foreach_reciprocal_(step_size)
            torch._foreach_mul_(step_size, -lr)
            torch._foreach_div_(denom, step_size)  # p += exp_avg / (denom / step_size)
        else:
            torch._foreach_add_(denom, eps)
            torch._foreach_div_(denom, -lr)
        torch._foreach_addcdiv_(params, exp_avgs, denom)


def _decay_and_moments(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    lr: float | torch.Tensor,
    group: dict[str, Any],
) -> list[torch.Tensor]:
    """Decoupled weight decay and the moment updates, in place; returns ``sqrt(v)`` per parameter (the
    denominator before bias correction and ``eps``). ``lr`` is a float or a 0-d device tensor."""
    wd = group["weight_decay"]
    beta1, beta2 = group["betas"]
    if wd != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * wd)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    return torch._foreach_sqrt(exp_avg_sqs)
