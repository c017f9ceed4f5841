"""Fused elementwise work of Llama-style blocks: RMSNorm, rotary embeddings (RoPE) and SwiGLU.

At the sizes LoRA trains, much of a step's GPU time is the elementwise work of the Hugging Face
Llama layers (the fp32 RMSNorm, the rotary embeddings, SiLU times the up projection), each a chain of
small kernels that also keeps its intermediates for the backward. :func:`fuse_llama` patches the
modules of a loaded model *in place* so that this work runs through one function per site:

* ``backend="liger"``: liger-kernel's Triton kernels (``LigerRMSNormFunction`` in its ``"llama"``
  casting mode, ``LigerSiLUMulFunction``, ``LigerRopeFunction``); needs CUDA, ``triton`` and
  ``liger-kernel`` (tested with 0.8.5).
* ``backend="torch"``: the same functions in plain PyTorch (an RMSNorm and a SwiGLU autograd Function
  that keep only their inputs, and recompute the rest in the backward; the rotary embedding formula of
  transformers). This is the fallback CI tests on CPU: outputs and gradients equal the unfused model.

Only what the model's own modules call is replaced: an RMSNorm module's ``forward``, an MLP's
``forward`` (``down_proj(silu(gate_proj(x)) * up_proj(x))``, so delta layers wrapped around the three
projections still run) and, inside each attention module's ``forward``, the modeling module's
``apply_rotary_pos_emb``. Nothing is changed for other models in the process.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys
import threading
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DeltaConfigError
from .regional_compile import compile_blocks

__all__ = ["FUSED_MODEL_TYPES", "SITES", "apply_fused_kernels", "fuse_llama", "liger_available", "rms_norm", "swiglu"]

logger = logging.getLogger("deltatune.train")

#: ``config.model_type`` of the models whose blocks :func:`fuse_llama` knows (Llama-style: RMSNorm with
#: ``weight * normalised``, SiLU-gated MLP, rotate-half RoPE)
FUSED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})
#: the sites :func:`fuse_llama` can fuse
SITES = ("rms_norm", "swiglu", "rope")
_MARK = "_deltatune_fused"


class _RMSNormFn(torch.autograd.Function):
    """``weight * (x * rsqrt(mean(x**2) + eps)).to(x.dtype)`` with the statistics in fp32, as transformers'
    ``LlamaRMSNorm``; keeps ``x`` and the per-row ``rstd`` only."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, weight, rstd = ctx.saved_tensors
        normed = x.float() * rstd
        dx = dw = None
        if ctx.needs_input_grad[1]:
            dw = (dy * normed.to(x.dtype)).reshape(-1, x.shape[-1]).float().sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            g = (dy * weight).float()
            dx = (rstd * (g - normed * (g * normed).mean(-1, keepdim=True))).to(x.dtype)
        return dx, dw, None


class _SwiGLUFn(torch.autograd.Function):
    """``silu(gate) * up``; keeps ``gate`` and ``up`` only (SiLU is recomputed in the backward).

    The backward runs the very operations autograd runs for the unfused ``F.silu(gate) * up`` (``dy * up``
    into ``aten.silu_backward``, ``dy * silu(gate)``) on the same operands, so its gradients are bitwise
    those of the unfused expression, in every dtype; only the SiLU output is not kept between forward and
    backward (one ``gate``-sized tensor per MLP)."""

    @staticmethod
    def forward(ctx: Any, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, Tensor | None]:
        gate, up = ctx.saved_tensors
        dgate = dup = None
        if ctx.needs_input_grad[1]:
            dup = dy * F.silu(gate)
        if ctx.needs_input_grad[0]:
            dgate = torch.ops.aten.silu_backward(dy * up, gate)
        return dgate, dup


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Llama's RMSNorm as one autograd Function (pure PyTorch; the ``"torch"`` backend)."""
    return _RMSNormFn.apply(x, weight, eps)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` as one autograd Function (pure PyTorch; the ``"torch"`` backend)."""
    return _SwiGLUFn.apply(gate, up)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope_torch(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1) -> tuple[Tensor, Tensor]:
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def liger_available() -> str:
    """"" when liger-kernel's Triton ops can run here, else why not (CUDA, triton or liger-kernel missing)."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    for module in ("triton", "liger_kernel"):
        if importlib.util.find_spec(module) is None:
            return f"the {module!r} package is not installed"
    return ""


def _liger_ops() -> dict[str, Callable[..., Any]]:
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    from liger_kernel.ops.rope import LigerRopeFunction
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1) -> tuple[Tensor, Tensor]:
        return LigerRopeFunction.apply(q, k, cos, sin, None, unsqueeze_dim)

    return {
        # offset 0, the Llama casting mode (fp32 statistics, cast before the weight), not in place
        "rms_norm": lambda x, w, eps: LigerRMSNormFunction.apply(x, w, eps, 0.0, "llama", False),
        "swiglu": LigerSiLUMulFunction.apply,
        "rope": rope,
    }


def _torch_ops() -> dict[str, Callable[..., Any]]:
    return {"rms_norm": rms_norm, "swiglu": swiglu, "rope": _rope_torch}


# ----------------------------------------------------------------------------- RoPE dispatch
_ROPE = threading.local()
_PATCHED_MODULES: set[str] = set()


def _unsqueeze_dim(args: tuple, kwargs: dict[str, Any]) -> int:
    # transformers 4.x passed (position_ids, unsqueeze_dim); 5.x passes unsqueeze_dim alone
    return int(kwargs.get("unsqueeze_dim", args[-1] if args else 1))


def _rope_dispatch(original: Any) -> Any:
    """A stand-in for ``original`` (``apply_rotary_pos_emb``) that calls the fused RoPE while a fused attention
    module's forward runs on this thread, and ``original`` otherwise.

    Where the ``kernels`` package is installed, transformers makes ``apply_rotary_pos_emb`` an instance of
    a small ``nn.Module`` class that pickling rebuilds with ``type(global)()``; the stand-in is then an
    instance of a subclass of that class (same state), so models still pickle."""
    if isinstance(original, nn.Module):
        base = type(original)

        class Dispatch(base):  # type: ignore[misc, valid-type]
            def forward(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *args: Any, **kwargs: Any) -> Any:
                fused = getattr(_ROPE, "fn", None)
                if fused is None:
                    return super().forward(q, k, cos, sin, *args, **kwargs)
                return fused(q, k, cos, sin, _unsqueeze_dim(args, kwargs))

        for attr in ("__name__", "__qualname__", "__module__"):
            setattr(Dispatch, attr, getattr(base, attr))
        stand_in = Dispatch()
        stand_in.__dict__.update({k: v for k, v in original.__dict__.items() if k != "forward"})
        return stand_in

    def apply_rotary_pos_emb(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *args: Any, **kwargs: Any) -> Any:
        fused = getattr(_ROPE, "fn", None)
        if fused is None:
            return original(q, k, cos, sin, *args, **kwargs)
        return fused(q, k, cos, sin, _unsqueeze_dim(args, kwargs))

    apply_rotary_pos_emb.__wrapped__ = original  # type: ignore[attr-defined]
    return apply_rotary_pos_emb


def _install_rope_dispatch(modeling: types.ModuleType) -> None:
    """Replace ``modeling.apply_rotary_pos_emb`` once by :func:`_rope_dispatch`'s stand-in."""
    if modeling.__name__ in _PATCHED_MODULES:
        return
    modeling.apply_rotary_pos_emb = _rope_dispatch(modeling.apply_rotary_pos_emb)
    _PATCHED_MODULES.add(modeling.__name__)


@contextlib.contextmanager
def _rope_active(fn: Callable[..., Any]) -> Iterator[None]:
    previous = getattr(_ROPE, "fn", None)
    _ROPE.fn = fn
    try:
        yield
    finally:
        _ROPE.fn = previous


# ----------------------------------------------------------------------------- patching
def _patch_rms_norm(module: nn.Module, op: Callable[..., Any]) -> None:
    def forward(self: nn.Module, hidden_states: Tensor) -> Tensor:
        return op(hidden_states, self.weight, self.variance_epsilon)

    module.forward = types.MethodType(forward, module)


def _patch_mlp(module: nn.Module, op: Callable[..., Any]) -> None:
    def forward(self: nn.Module, x: Tensor) -> Tensor:
        return self.down_proj(op(self.gate_proj(x), self.up_proj(x)))

    module.forward = types.MethodType(forward, module)


def _patch_attention(module: nn.Module, rope: Callable[..., Any]) -> None:
    original = type(module).forward

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        with _rope_active(rope):
            return original(self, *args, **kwargs)

    module.forward = types.MethodType(forward, module)


def _model_type(model: nn.Module) -> Any:
    return getattr(getattr(model, "config", None), "model_type", None)


def fuse_llama(model: nn.Module, backend: str = "liger", *, sites: Iterable[str] = SITES) -> dict[str, int]:
    """Patch the RMSNorm, MLP and attention modules of a Llama-style Hugging Face model in place so that
    RMSNorm, SwiGLU and RoPE each run as one fused function; returns how many modules of each kind were
    patched (``{"rms_norm": n, "swiglu": n, "rope": n}``). Sites fused before (by any backend) are left
    as they are.

    Args:
        model: a transformers model whose ``config.model_type`` is in :data:`FUSED_MODEL_TYPES` (delta
            layers inside it are fine: the projections are still called as modules).
        backend: ``"liger"`` (Triton kernels; needs CUDA, ``triton`` and ``liger-kernel``) or ``"torch"``.
        sites: which of :data:`SITES` to fuse (default all; the others keep the model's own code).

    Raises:
        DeltaConfigError: unknown backend or site, a model of another type or with a non-SiLU MLP, or liger
            asked for where it cannot run.
    """
    if backend not in ("liger", "torch"):
        raise DeltaConfigError(f"fuse_llama backend must be 'liger' or 'torch', got {backend!r}")
    sites = tuple(sites) if not isinstance(sites, str) else (sites,)
    unknown = [x for x in sites if x not in SITES]
    if unknown or not sites:
        raise DeltaConfigError(f"fuse_llama sites must be a non-empty subset of {list(SITES)}, got {list(sites)!r}")
    model_type = _model_type(model)
    if model_type not in FUSED_MODEL_TYPES:
        raise DeltaConfigError(
            f"fused kernels need a Llama-style model (config.model_type one of {sorted(FUSED_MODEL_TYPES)}), "
            f"got {type(model).__name__} with model_type {model_type!r}"
        )
    act = getattr(model.config, "hidden_act", None)
    if act != "silu":
        raise DeltaConfigError(f"fused kernels need config.hidden_act 'silu' (SwiGLU), got {act!r}")
    if backend == "liger":
        why = liger_available()
        if why:
            raise DeltaConfigError(f"fused_kernels='liger' cannot run here: {why}; use 'torch', 'compile' or 'none'")
    counts = dict(getattr(model, _MARK, None) or {"rms_norm": 0, "swiglu": 0, "rope": 0})
    sites = tuple(x for x in sites if not counts[x])  # sites fused before are left as they are
    if not sites:
        return counts
    ops = _liger_ops() if backend == "liger" else _torch_ops()
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm") and hasattr(module, "variance_epsilon") and "rms_norm" in sites:
            _patch_rms_norm(module, ops["rms_norm"])
            counts["rms_norm"] += 1
        elif name.endswith("MLP") and "swiglu" in sites and all(
            hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj")
        ):
            _patch_mlp(module, ops["swiglu"])
            counts["swiglu"] += 1
        elif name.endswith("Attention") and "rope" in sites:
            modeling = sys.modules[type(module).__module__]
            if not callable(getattr(modeling, "apply_rotary_pos_emb", None)):
                continue
            _install_rope_dispatch(modeling)
            _patch_attention(module, ops["rope"])
            counts["rope"] += 1
    setattr(model, _MARK, counts)
    return counts


def apply_fused_kernels(model: nn.Module, choice: str, device: torch.device) -> str:
    """Apply ``TrainConfig.fused_kernels`` to ``model`` (in place); returns the backend used.

    ``"auto"`` fuses only Llama-style models with a SiLU MLP (else ``"none"``): on a CUDA ``device`` it is
    ``"liger"`` where liger can run (:func:`liger_available`), else ``"none"``; on the CPU it is
    ``"torch-swiglu"``, the pure-torch SwiGLU alone (:func:`swiglu`: bitwise the unfused gradients, one
    intermediate-sized activation less kept per block; the fused RMSNorm and RoPE keep no less in fp32
    and are not exact to the bit, so they are left as they are). ``"compile"`` calls
    :func:`compile_blocks`.
    """
    if choice == "none":
        return "none"
    if choice == "compile":
        compile_blocks(model)
        return "compile"
    if choice == "auto":
        if _model_type(model) not in FUSED_MODEL_TYPES or getattr(model.config, "hidden_act", None) != "silu":
            return "none"
        if device.type == "cpu":
            fuse_llama(model, "torch", sites=("swiglu",))
            return "torch-swiglu"
        if device.type != "cuda":
            return "none"
        why = liger_available()
        if why:
            logger.info("fused_kernels='auto': not fusing the Llama blocks (%s)", why)
            return "none"
        choice = "liger"
    fuse_llama(model, choice)
    return choice
