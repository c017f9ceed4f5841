"""Jittor re-implementations of the two architectures deltatune fine-tunes: Llama and GPT-2.

Both load the weights of a Hugging Face directory (``config.json`` + ``model.safetensors``, read with
``safetensors.numpy``): the directory :func:`deltatune.models.load` caches, or any local one. Module
names follow the Hugging Face ones (``model.layers.0.self_attn.q_proj``,
``transformer.h.0.attn.c_attn``), so a delta checkpoint's keys address the same layers in both
frameworks.

* Llama: RMSNorm, rotary embeddings (``rope_type: default``), grouped-query attention, SwiGLU MLP,
  tied or separate ``lm_head``.
* GPT-2: learned positions, LayerNorm, ``Conv1D`` layout (weights ``(in, out)``), fused ``c_attn``,
  ``gelu_new`` MLP, tied ``lm_head``; embedding/attention/residual dropout with the config's
  probabilities (only while training with dropout on).

Every base weight is frozen (``stop_grad``); only LoRA matrices train (see :mod:`.lora`).
Calls: ``model(input_ids, attention_mask=None, position_ids=None, past=None, last_only=False)`` with
numpy or Jittor integer arrays; returns ``(logits, past)``, ``past`` being the per-layer key/value cache.

Numerics follow transformers' float32 formulas; where Jittor's CPU reductions (which add one value after
another) would be measurably less exact than PyTorch's blocked sums, the sum runs in float64 (RMSNorm's
mean of squares), and the rotary tables are formed as transformers forms them (see :func:`rope_inv_freq`).
``model.capture = {}`` records named intermediates of the next forward passes (diagnostics:
``benchmarks/jittor_layer_diff.py``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, DeltaConfigError
from . import require_jittor

__all__ = ["SUPPORTED_ARCHITECTURES", "JtGPT2", "JtLlama", "check_architecture", "load_pretrained", "to_jt", "to_np"]

#: ``config.json`` ``model_type`` -> what the Jittor side implements
SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}
_NEG = -1.0e9
_WEIGHTS = "model.safetensors"


def check_architecture(model_dir: str | os.PathLike) -> dict[str, Any]:
    """Read ``config.json`` of ``model_dir`` and check the Jittor side implements it (nothing loaded).

    Raises:
        DeltaConfigError: an architecture other than Llama/GPT-2 (named, with those supported listed).
        CheckpointError: no ``config.json`` / ``model.safetensors`` in the directory.
    """
    d = Path(model_dir)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"model directory {os.fspath(d)!r} has no config.json")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    kind = cfg.get("model_type")
    if kind not in SUPPORTED_ARCHITECTURES:
        archs = cfg.get("architectures") or [kind]
        raise DeltaConfigError(
            f"the Jittor side does not implement the architecture {archs[0]!r} (model_type {kind!r} in "
            f"{os.fspath(cfg_path)!r}); it implements: "
            + ", ".join(f"{v} (model_type {k!r})" for k, v in SUPPORTED_ARCHITECTURES.items())
        )
    if kind == "gpt2" and cfg.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise DeltaConfigError(
            f"GPT-2 activation_function must be 'gelu_new' on the Jittor side, got {cfg.get('activation_function')!r} "
            f"in {os.fspath(cfg_path)!r}"
        )
    if kind == "llama":
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rtype = rope.get("rope_type", rope.get("type", "default"))
        if rtype != "default":
            raise DeltaConfigError(
                f"Llama rope_type must be 'default' on the Jittor side, got {rtype!r} in {os.fspath(cfg_path)!r}"
            )
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise DeltaConfigError(f"Llama with attention_bias/mlp_bias is not implemented on the Jittor side ({cfg_path})")
    if not (d / _WEIGHTS).is_file():
        raise CheckpointError(f"model directory {os.fspath(d)!r} has no {_WEIGHTS} (the Jittor side reads safetensors)")
    return cfg


# ------------------------------------------------------------------------------------------------ layers


def to_jt(x: Any) -> Any:
    """A Jittor Var of a numpy array: integers as int32, floats as float32.

    Jittor 1.3.11 under numpy 2 maps numpy int64 to its int32 type but copies the int64 bytes
    (garbage indices), so every array goes in as int32/float32.
    """
    jt = require_jittor()
    a = np.asarray(x)
    if a.dtype.kind in "iub":
        a = a.astype(np.int32)
    elif a.dtype != np.float32:
        a = a.astype(np.float32)
    return jt.array(np.ascontiguousarray(a))


def to_np(v: Any) -> np.ndarray:
    """A numpy copy of a Jittor Var (through ``.data``: ``Var.numpy()`` returns garbage under numpy 2)."""
    return np.array(v.data)



class Linear:
    """A frozen linear layer ``y = x @ W^T + b`` (``W`` ``(out, in)``), or GPT-2's ``Conv1D``
    (``conv1d=True``: ``W`` ``(in, out)``, ``y = x @ W + b``). :mod:`.lora` wraps it."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None = None, *, conv1d: bool = False) -> None:
        require_jittor()
        self.conv1d = conv1d
        self.weight = to_jt(weight).stop_grad()
        self.bias = None if bias is None else to_jt(bias).stop_grad()
        self.in_features, self.out_features = (weight.shape[0], weight.shape[1]) if conv1d else (weight.shape[1], weight.shape[0])

    def base(self, x: Any) -> Any:
        jt = require_jittor()
        y = jt.matmul(x, self.weight) if self.conv1d else jt.nn.matmul_transpose(x, self.weight)
        return y if self.bias is None else y + self.bias

    def __call__(self, x: Any) -> Any:
        return self.base(x)


def _rms_norm(x: Any, weight: Any, eps: float) -> Any:
    """``weight * (x * rsqrt(mean(x^2) + eps))`` as ``LlamaRMSNorm``; the mean of squares is summed in
    float64 and rounded to float32 (PyTorch's float32 sum is blocked and near-exact; Jittor's CPU
    reduction adds the 576 or so squares one after another, ~10x the rounding error)."""
    jt = require_jittor()
    x64 = x.float64()
    var = (x64 * x64).mean(-1, keepdims=True).float32()
    return weight * (x * jt.rsqrt(var + eps))


def rope_inv_freq(theta: float, head_dim: int) -> np.ndarray:
    """The rotary inverse frequencies ``1 / theta ** (arange(0, d, 2) / d)`` bit for bit as transformers'
    ``compute_default_rope_parameters`` forms them in float32: the exponents are float32 quotients,
    the power is correctly rounded to float32 (as PyTorch's ``float ** float32 tensor``; numpy's float32
    ``**`` is not, and differs in the last bit for some frequencies), the reciprocal a float32 division."""
    x = np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim)
    power = np.power(np.float64(theta), x.astype(np.float64)).astype(np.float32)
    return (np.float32(1.0) / power).astype(np.float32)


def rope_cos_sin(inv_freq: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(cos, sin)`` of the rotary angles, each ``(B, T, d)``: the angles are float32 products
    ``position * inv_freq`` (as transformers' ``LlamaRotaryEmbedding``), their cosine and sine the
    correctly rounded float32 values (within one unit in the last place of PyTorch's)."""
    freqs = pos.astype(np.float32)[:, :, None] * inv_freq[None, None, :]
    emb = np.concatenate([freqs, freqs], -1).astype(np.float64)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def _layer_norm(x: Any, weight: Any, bias: Any, eps: float) -> Any:
    jt = require_jittor()
    mean = x.mean(-1, keepdims=True)
    xc = x - mean
    var = (xc * xc).mean(-1, keepdims=True)
    return xc * jt.rsqrt(var + eps) * weight + bias


def _gelu_new(x: Any) -> Any:
    jt = require_jittor()
    return 0.5 * x * (1.0 + jt.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def _dropout(x: Any, p: float, active: bool) -> Any:
    if not active or p <= 0.0:
        return x
    jt = require_jittor()
    keep = (jt.rand(x.shape) >= p).float32()
    return x * keep / (1.0 - p)


def _attention_bias(mask: np.ndarray, t_query: int) -> np.ndarray:
    """Additive ``(B, 1, Tq, Tk)`` bias: key ``j`` is visible to query ``i`` when it is not padding and
    ``j <= Tk - Tq + i`` (causal, the queries being the last ``Tq`` positions)."""
    b, tk = mask.shape
    q_pos = np.arange(tk - t_query, tk)[:, None]
    causal = np.arange(tk)[None, :] <= q_pos
    ok = causal[None, :, :] & (mask[:, None, :] > 0)
    return np.where(ok, 0.0, _NEG).astype(np.float32)[:, None, :, :]


def _np_int(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    elif hasattr(x, "data") and not isinstance(x, np.ndarray):  # a Jittor Var
        x = to_np(x)
    return np.asarray(x, dtype=np.int64)


class _Base:
    """What both models share: the module table, train/eval mode, dropout switch, the call."""

    model_type = ""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.training = False
        self.dropout_enabled = True
        self.linears: dict[str, Linear] = {}
        #: a dict to record named intermediate values of the next forward passes in (diagnostics:
        #: ``benchmarks/jittor_layer_diff.py``); ``None``: nothing is recorded
        self.capture: dict[str, Any] | None = None

    def _keep(self, name: str, value: Any) -> Any:
        if self.capture is not None:
            self.capture[name] = value
        return value

    def train(self, mode: bool = True) -> _Base:
        """Training mode (dropout active where enabled); returns self."""
        self.training = mode
        return self

    def eval(self) -> _Base:
        """Evaluation mode (no dropout); returns self."""
        return self.train(False)

    def _inputs(self, input_ids: Any, attention_mask: Any, position_ids: Any, past: Any) -> tuple:
        ids = _np_int(input_ids)
        if ids.ndim != 2:
            raise DeltaConfigError(f"input_ids must be 2-D (batch, length), got shape {ids.shape}")
        b, t = ids.shape
        t_past = 0 if past is None else int(past[0][0].shape[2])
        mask = np.ones((b, t_past + t), dtype=np.int64) if attention_mask is None else _np_int(attention_mask)
        if mask.shape != (b, t_past + t):
            raise DeltaConfigError(f"attention_mask must have shape {(b, t_past + t)}, got {mask.shape}")
        if position_ids is None:
            position_ids = np.broadcast_to(np.arange(t_past, t_past + t), (b, t))
        return ids, mask, _np_int(position_ids)

    def __call__(
        self, input_ids: Any, attention_mask: Any = None, position_ids: Any = None, past: Any = None, last_only: bool = False
    ) -> tuple[Any, list]:
        ids, mask, pos = self._inputs(input_ids, attention_mask, position_ids, past)
        return self.forward(ids, mask, pos, past, last_only)

    def forward(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: Any, last_only: bool) -> tuple[Any, list]:
        raise NotImplementedError


def _attend(q: Any, k: Any, v: Any, bias: Any, scale: float, p_drop: float, drop: bool) -> Any:
    jt = require_jittor()
    scores = jt.matmul(q, k.transpose(0, 1, 3, 2)) * scale + bias
    probs = jt.nn.softmax(scores, dim=-1)
    probs = _dropout(probs, p_drop, drop)
    return jt.matmul(probs, v)


class JtLlama(_Base):
    """Llama causal LM (SmolLM2 and kin) in Jittor; see the module docstring."""

    model_type = "llama"

    def __init__(self, config: dict[str, Any], weights: dict[str, np.ndarray]) -> None:
        super().__init__(config)
        require_jittor()
        self.hidden = int(config["hidden_size"])
        self.n_heads = int(config["num_attention_heads"])
        self.n_kv = int(config.get("num_key_value_heads") or self.n_heads)
        self.head_dim = int(config.get("head_dim") or self.hidden // self.n_heads)
        self.eps = float(config.get("rms_norm_eps", 1e-6))
        rope = config.get("rope_parameters") or {}
        self.theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
        self.n_layers = int(config["num_hidden_layers"])
        w = weights
        self.embed = to_jt(w["model.embed_tokens.weight"]).stop_grad()
        self.norms: dict[str, Any] = {"model.norm": to_jt(w["model.norm.weight"]).stop_grad()}
        for i in range(self.n_layers):
            p = f"model.layers.{i}"
            for n in ("input_layernorm", "post_attention_layernorm"):
                self.norms[f"{p}.{n}"] = to_jt(w[f"{p}.{n}.weight"]).stop_grad()
            for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
                self.linears[f"{p}.{n}"] = Linear(w[f"{p}.{n}.weight"])
        head = w.get("lm_head.weight")
        self.tied = head is None or bool(config.get("tie_word_embeddings", False))
        self.lm_head = self.embed if self.tied else to_jt(head).stop_grad()
        self.inv_freq = rope_inv_freq(self.theta, self.head_dim)

    def _rope(self, pos: np.ndarray) -> tuple[Any, Any]:
        require_jittor()
        cos, sin = rope_cos_sin(self.inv_freq, pos)
        return to_jt(cos[:, None]), to_jt(sin[:, None])  # (B, 1, T, d)

    @staticmethod
    def _rotate(x: Any, cos: Any, sin: Any) -> Any:
        jt = require_jittor()
        half = x.shape[-1] // 2
        rot = jt.concat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rot * sin

    def forward(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: Any, last_only: bool) -> tuple[Any, list]:
        jt = require_jittor()
        b, t = ids.shape
        drop = self.training and self.dropout_enabled
        x = self.embed[to_jt(ids)]
        cos, sin = self._rope(pos)
        bias = to_jt(_attention_bias(mask, t))
        rep = self.n_heads // self.n_kv
        new_past = []
        for i in range(self.n_layers):
            p = f"model.layers.{i}"
            lin = self.linears
            h = self._keep(f"{p}.input_layernorm", _rms_norm(x, self.norms[f"{p}.input_layernorm"], self.eps))
            q = lin[f"{p}.self_attn.q_proj"](h).reshape(b, t, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
            k = lin[f"{p}.self_attn.k_proj"](h).reshape(b, t, self.n_kv, self.head_dim).transpose(0, 2, 1, 3)
            v = lin[f"{p}.self_attn.v_proj"](h).reshape(b, t, self.n_kv, self.head_dim).transpose(0, 2, 1, 3)
            self._keep(f"{p}.self_attn.q_proj", q)
            self._keep(f"{p}.self_attn.v_proj", v)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            if past is not None:
                k = jt.concat([past[i][0], k], dim=2)
                v = jt.concat([past[i][1], v], dim=2)
            new_past.append((k, v))
            tk = k.shape[2]
            if rep > 1:
                k = k.reshape(b, self.n_kv, 1, tk, self.head_dim).broadcast((b, self.n_kv, rep, tk, self.head_dim))
                k = k.reshape(b, self.n_heads, tk, self.head_dim)
                v = v.reshape(b, self.n_kv, 1, tk, self.head_dim).broadcast((b, self.n_kv, rep, tk, self.head_dim))
                v = v.reshape(b, self.n_heads, tk, self.head_dim)
            a = _attend(q, k, v, bias, self.head_dim**-0.5, float(self.config.get("attention_dropout", 0.0)), drop)
            a = self._keep(f"{p}.self_attn.attn", a.transpose(0, 2, 1, 3).reshape(b, t, self.n_heads * self.head_dim))
            x = x + self._keep(f"{p}.self_attn.o_proj", lin[f"{p}.self_attn.o_proj"](a))
            h = self._keep(f"{p}.post_attention_layernorm", _rms_norm(x, self.norms[f"{p}.post_attention_layernorm"], self.eps))
            g = lin[f"{p}.mlp.gate_proj"](h)
            x = x + self._keep(f"{p}.mlp", lin[f"{p}.mlp.down_proj"](g * jt.sigmoid(g) * lin[f"{p}.mlp.up_proj"](h)))
            self._keep(p, x)
        x = self._keep("model.norm", _rms_norm(x, self.norms["model.norm"], self.eps))
        if last_only:
            x = x[:, -1:, :]
        return jt.nn.matmul_transpose(x, self.lm_head), new_past


class JtGPT2(_Base):
    """GPT-2 causal LM in Jittor; see the module docstring."""

    model_type = "gpt2"

    def __init__(self, config: dict[str, Any], weights: dict[str, np.ndarray]) -> None:
        super().__init__(config)
        require_jittor()
        pre = "transformer." if "transformer.wte.weight" in weights else ""
        w = {k[len(pre):] if pre and k.startswith(pre) else k: v for k, v in weights.items()}
        self.hidden = int(config["n_embd"])
        self.n_heads = int(config["n_head"])
        self.head_dim = self.hidden // self.n_heads
        self.n_layers = int(config["n_layer"])
        self.eps = float(config.get("layer_norm_epsilon", 1e-5))
        self.p_embd = float(config.get("embd_pdrop", 0.1))
        self.p_attn = float(config.get("attn_pdrop", 0.1))
        self.p_resid = float(config.get("resid_pdrop", 0.1))
        self.wte = to_jt(w["wte.weight"]).stop_grad()
        self.wpe = to_jt(w["wpe.weight"]).stop_grad()
        self.norms: dict[str, tuple[Any, Any]] = {}
        for name in ["ln_f"] + [f"h.{i}.{n}" for i in range(self.n_layers) for n in ("ln_1", "ln_2")]:
            self.norms[f"transformer.{name}"] = (
                to_jt(w[f"{name}.weight"]).stop_grad(), to_jt(w[f"{name}.bias"]).stop_grad()
            )
        for i in range(self.n_layers):
            for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
                self.linears[f"transformer.h.{i}.{n}"] = Linear(w[f"h.{i}.{n}.weight"], w[f"h.{i}.{n}.bias"], conv1d=True)
        self.lm_head = self.wte

    def forward(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: Any, last_only: bool) -> tuple[Any, list]:
        jt = require_jittor()
        b, t = ids.shape
        drop = self.training and self.dropout_enabled
        x = _dropout(self.wte[to_jt(ids)] + self.wpe[to_jt(pos)], self.p_embd, drop)
        bias = to_jt(_attention_bias(mask, t))
        new_past = []
        d, nh = self.hidden, self.n_heads
        for i in range(self.n_layers):
            p = f"transformer.h.{i}"
            lin = self.linears
            h = _layer_norm(x, *self.norms[f"{p}.ln_1"], self.eps)
            qkv = lin[f"{p}.attn.c_attn"](h)
            q, k, v = (qkv[:, :, j * d : (j + 1) * d].reshape(b, t, nh, self.head_dim).transpose(0, 2, 1, 3) for j in range(3))
            if past is not None:
                k = jt.concat([past[i][0], k], dim=2)
                v = jt.concat([past[i][1], v], dim=2)
            new_past.append((k, v))
            a = _attend(q, k, v, bias, self.head_dim**-0.5, self.p_attn, drop)
            a = a.transpose(0, 2, 1, 3).reshape(b, t, d)
            x = x + _dropout(lin[f"{p}.attn.c_proj"](a), self.p_resid, drop)
            h = _layer_norm(x, *self.norms[f"{p}.ln_2"], self.eps)
            x = x + _dropout(lin[f"{p}.mlp.c_proj"](_gelu_new(lin[f"{p}.mlp.c_fc"](h))), self.p_resid, drop)
        x = _layer_norm(x, *self.norms["transformer.ln_f"], self.eps)
        if last_only:
            x = x[:, -1:, :]
        return jt.nn.matmul_transpose(x, self.lm_head), new_past


def load_pretrained(model_dir: str | os.PathLike) -> JtLlama | JtGPT2:
    """Build the Jittor model of a Hugging Face directory (``config.json`` + ``model.safetensors``).

    Raises:
        DeltaConfigError: an architecture the Jittor side does not implement (see :func:`check_architecture`).
        CheckpointError: missing files or weights.
    """
    from safetensors.numpy import load_file

    cfg = check_architecture(model_dir)
    weights = load_file(os.fspath(Path(model_dir) / _WEIGHTS))
    weights = {k: (v.astype(np.float32) if v.dtype != np.float32 else v) for k, v in weights.items()}
    cls = JtLlama if cfg["model_type"] == "llama" else JtGPT2
    try:
        return cls(cfg, weights)
    except KeyError as exc:
        raise CheckpointError(f"{os.fspath(Path(model_dir) / _WEIGHTS)!r} lacks the tensor {exc.args[0]!r}") from None
