"""GGUF tensors of a Llama-architecture model: what the GGUF exporter (:mod:`deltatune.export_gguf`) writes.

Owns the architecture check (:func:`check_arch`: the Hugging Face config -> llama.cpp hyper-parameters,
refusing what llama.cpp's ``llama`` cannot run), the tensor names (the ``gguf`` package's name map), the
query/key row permutation llama.cpp's converter applies (its rotary halves are interleaved), the merged
model's tensors and a LoRA adapter's ``lora_a`` / ``lora_b`` pairs in llama.cpp's layout, and the storage
types: :func:`encode` turns a float32 tensor into F32, F16 or a ``gguf``-package quantisation, and
:func:`tensor_quant` picks the type of each tensor (norms F32; the output matrix, which is the token
embedding when the model ties them, at ``output_quant``, as llama.cpp's own quantiser keeps it at a higher
precision than the other matrices).
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .api import merge_and_unload
from .errors import CheckpointError, DeltaConfigError, MissingPackageError
from .methods.base import ModulesToSaveWrapper, delta_layers, get_records, logical_param_name
from .methods.lora import LoraLayer
from .peft_io import unfused_lora_B

__all__ = [
    "ARCHITECTURES", "Arch", "adapter_tensors", "check_arch", "encode", "file_type", "gguf_module", "merged_tensors",
    "tensor_quant",
]

#: Hugging Face ``model_type`` -> llama.cpp architecture name, for the models the exporter knows
ARCHITECTURES: dict[str, str] = {"llama": "llama"}


def _supported_architectures() -> str:
    return ", ".join(f"{v} (Hugging Face model_type {k!r})" for k, v in ARCHITECTURES.items())


def gguf_module() -> Any:
    """The ``gguf`` package (a core dependency; a clear error if it is missing)."""
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - gguf is a core dependency
        raise MissingPackageError("export_gguf needs the 'gguf' package: pip install gguf") from exc
    return gguf


def _qtype(quant: str) -> Any:
    t = gguf_module().GGMLQuantizationType
    return {"f32": t.F32, "f16": t.F16, "q8_0": t.Q8_0, "q4_0": t.Q4_0, "q4_1": t.Q4_1}[quant]


def file_type(quant: str) -> int:
    """``general.file_type`` of a file whose matrices are mostly ``quant``."""
    ft = gguf_module().LlamaFileType
    return int({
        "f32": ft.ALL_F32, "f16": ft.MOSTLY_F16, "q8_0": ft.MOSTLY_Q8_0, "q4_0": ft.MOSTLY_Q4_0,
        "q4_1": ft.MOSTLY_Q4_1,
    }[quant])


# --------------------------------------------------------------------------------------------------
# model checks and names


@dataclass
class Arch:
    """What the exporter needs of a Llama-architecture config."""

    name: str
    n_layer: int
    n_head: int
    n_head_kv: int
    hidden: int
    head_dim: int
    ffn: int
    context: int
    vocab: int
    eps: float
    rope_theta: float


def _rope_parameters(config: Any) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return dict(params) if isinstance(params, dict) else {}


def check_arch(model: nn.Module) -> Arch:
    """The model's llama.cpp hyper-parameters; :class:`DeltaConfigError` for what llama.cpp cannot run."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise DeltaConfigError(
            f"model architecture {model_type!r} ({type(model).__name__}) cannot be exported to GGUF; "
            f"supported: {_supported_architectures()}"
        )
    rope = _rope_parameters(config)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in (None, "default"):
        raise DeltaConfigError(
            f"model config rope_type {rope_type!r} cannot be exported to GGUF yet; supported: 'default' (no RoPE scaling)"
        )
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise DeltaConfigError(f"model config hidden_act {act!r} cannot be exported to GGUF; llama.cpp's llama uses 'silu'")
    n_head = int(config.num_attention_heads)
    hidden = int(config.hidden_size)
    head_dim = int(getattr(config, "head_dim", None) or hidden // n_head)
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    return Arch(
        name=ARCHITECTURES[model_type],
        n_layer=int(config.num_hidden_layers),
        n_head=n_head,
        n_head_kv=int(getattr(config, "num_key_value_heads", None) or n_head),
        hidden=hidden,
        head_dim=head_dim,
        ffn=int(config.intermediate_size),
        context=int(config.max_position_embeddings),
        vocab=int(model.get_input_embeddings().weight.shape[0]),  # type: ignore[operator]
        eps=float(config.rms_norm_eps),
        rope_theta=float(theta if theta is not None else 10000.0),
    )
def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q/k projection (or of LoRA's B for it) from Hugging Face's rotary layout (two halves per
    head) to llama.cpp's (the two halves interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_heads(hf_name: str, arch: Arch) -> int | None:
    """The head count of the rows to permute for ``hf_name``'s tensor (None: no permutation)."""
    if hf_name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        return arch.n_head
    if hf_name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
        return arch.n_head_kv
    return None


def _name_map(arch: Arch) -> Any:
    gguf = gguf_module()
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, arch.n_layer)


def _gguf_name(hf_name: str, name_map: Any) -> str | None:
    return name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))


# --------------------------------------------------------------------------------------------------
# tensors


def merged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights with every delta merged (the model itself is not changed)."""
    if not get_records(model) and not any(True for _ in delta_layers(model)):
        state = model.state_dict()
    else:
        state = merge_and_unload(copy.deepcopy(model)).state_dict()
    seen: dict[tuple[int, int], str] = {}
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset())
        if ident in seen and t.shape == out[seen[ident]].shape:  # tied weights (lm_head = embeddings)
            continue
        seen[ident] = key
        out[key] = t.detach()
    return out


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """``t`` as a contiguous float32 numpy array on the CPU."""
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()


def encode(data: np.ndarray, quant: str) -> tuple[np.ndarray, Any]:
    """``data`` (float32) as stored: 1-D tensors stay F32 (as llama.cpp's converter keeps norms), rows
    that do not split into whole quantisation blocks fall back to F16."""
    gguf = gguf_module()
    qt = _qtype(quant)
    if data.ndim == 1 or qt == gguf.GGMLQuantizationType.F32:
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32
    if qt == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    block = gguf.GGML_QUANT_SIZES[qt][0]
    if data.shape[-1] % block:
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(data, qt), qt


def tensor_quant(name: str, quant: str, output_quant: str, names: Collection[str]) -> str:
    """The storage type of GGUF tensor ``name`` in a merged file of ``quant`` holding the tensors ``names``:
    ``output_quant`` for the output matrix, which is ``output.weight``, or ``token_embd.weight`` when the
    file has no ``output.weight`` (tied embeddings: llama.cpp computes the logits with the token embedding),
    as llama.cpp's quantiser chooses it; ``quant`` for every other tensor (:func:`encode` keeps 1-D
    tensors F32)."""
    if name == "output.weight" or (name == "token_embd.weight" and "output.weight" not in names):
        return output_quant
    return quant


def merged_tensors(model: nn.Module, arch: Arch) -> tuple[list[str], Iterator[tuple[str, np.ndarray]]]:
    """``(names, tensors)`` of the merged model under GGUF names (q/k rows permuted); the tensors are
    converted to numpy one at a time as the writer takes them."""
    state = merged_state(model)
    name_map = _name_map(arch)
    mapped: list[tuple[str, str, torch.Tensor]] = []
    unknown = []
    for hf_name, t in state.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        g = _gguf_name(hf_name, name_map)
        if g is None:
            unknown.append(hf_name)
        else:
            mapped.append((hf_name, g, t))
    if unknown:
        raise DeltaConfigError(
            f"the merged model has tensors llama.cpp's {arch.name!r} architecture has no place for: {unknown[:5]}"
        )

    def gen() -> Iterator[tuple[str, np.ndarray]]:
        for hf_name, g, t in mapped:
            heads = _rope_heads(hf_name, arch)
            if heads is not None:
                t = permute_rows(t, heads)
            yield g, to_numpy(t)

    return [g for _, g, _ in mapped], gen()


def adapter_tensors(model: nn.Module, arch: Arch, adapter_name: str) -> tuple[float, list[tuple[str, np.ndarray]]]:
    """``(alpha, [(name, tensor)])`` of LoRA adapter ``adapter_name`` in llama.cpp's layout."""
    record = get_records(model)[adapter_name]
    cfg = record.config
    if record.modules_to_save:
        raise DeltaConfigError(
            f"adapter {adapter_name!r} trains whole modules (modules_to_save={list(record.modules_to_save)}), which a "
            "llama.cpp LoRA adapter cannot carry; export kind='merged' instead"
        )
    if getattr(cfg, "bias", "none") != "none":
        raise DeltaConfigError(
            f"adapter {adapter_name!r} trains biases (bias={cfg.bias!r}), which a llama.cpp LoRA adapter cannot "
            "carry; export kind='merged' instead"
        )
    if getattr(cfg, "use_dora", False):
        raise DeltaConfigError(
            f"adapter {adapter_name!r} is DoRA (use_dora=True), which llama.cpp's LoRA adapters do not support; "
            "export kind='merged' instead"
        )
    name_map = _name_map(arch)
    pairs: list[tuple[str, str, torch.Tensor, torch.Tensor, float]] = []
    for path, layer in delta_layers(model):
        if isinstance(layer, ModulesToSaveWrapper) or not isinstance(layer, LoraLayer):
            continue
        if adapter_name not in layer.adapter_names:
            continue
        hf_name = f"{logical_param_name(path)}.weight"
        if layer.kind != "linear" or layer.fan_in_fan_out:
            raise DeltaConfigError(
                f"LoRA on {hf_name[:-7]!r} ({layer.kind}) cannot be exported as a llama.cpp adapter: only Linear "
                "projections are supported; export kind='merged' instead"
            )
        g = _gguf_name(hf_name, name_map)
        if g is None:
            raise DeltaConfigError(
                f"LoRA on {hf_name[:-7]!r} has no GGUF tensor name in llama.cpp's {arch.name!r} architecture"
            )
        A = layer.lora_A[adapter_name].weight.detach()
        B = unfused_lora_B(layer, adapter_name)  # fused-slice layers: one block-structured B
        heads = _rope_heads(hf_name, arch)
        if heads is not None:
            B = permute_rows(B, heads)
        pairs.append((hf_name, g, A, B, float(layer.scaling[adapter_name])))
    if not pairs:
        raise CheckpointError(f"adapter {adapter_name!r} has no LoRA layer to export")
    # llama.cpp scales a pair by alpha / rank (rank = B's columns): one alpha for the file
    alpha = pairs[0][4] * pairs[0][3].shape[1]
    out: list[tuple[str, np.ndarray]] = []
    for _, g, A, B, scaling in pairs:
        factor = scaling * B.shape[1] / alpha
        if factor != 1.0:
            B = B * factor
        out.append((f"{g}.lora_a", to_numpy(A)))
        out.append((f"{g}.lora_b", to_numpy(B)))
    return float(alpha), out

