"""Import and export of the PEFT LoRA adapter format (``adapter_config.json`` +
``adapter_model.safetensors``), so deltatune adapters load in PEFT/vLLM and theirs load here.

Fused-slice layers (``enable_lora``) are exported exactly as an ordinary LoRA of rank
``r * enabled_slices`` whose B matrix is block-structured (zeros on the disabled slices), with the
rank and alpha written into ``rank_pattern`` / ``alpha_pattern`` so the scaling stays the same.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load as load_bytes
from safetensors.torch import save

from .api import adapter_record, apply, delete_adapter
from .delta_layer import ModulesToSaveWrapper, delta_layers, logical_param_name
from .errors import CheckpointError, DeltaConfigError, DeltaError, FileFormatError
from .io_utils import atomic_write_bytes, atomic_write_text, check_output_dir, load_json_file
from .methods import get_method
from .methods.lora import LoraConfig, LoraLayer
from .validation import check_type

__all__ = ["export_peft", "import_peft", "unfused_lora_B"]

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_WEIGHTS_BIN = "adapter_model.bin"
PREFIX = "base_model.model."


def export_peft(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
                *, base_model_name_or_path: str | None = None, task_type: str | None = None) -> Path:
    """Write adapter ``adapter_name`` (LoRA) in PEFT's format; returns the directory."""
    record = adapter_record(model, adapter_name)
    if record.method != "lora":
        raise DeltaConfigError(f"export_peft supports LoRA adapters only; adapter {adapter_name!r} is {record.method!r}")
    cfg = record.config
    assert isinstance(cfg, LoraConfig)
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    targets: list[str] = []
    for path, layer in delta_layers(model):
        if isinstance(layer, ModulesToSaveWrapper):
            if adapter_name in layer.adapter_names:
                name = logical_param_name(path)
                for pname, p in layer.modules_to_save[adapter_name].named_parameters():
                    tensors[f"{PREFIX}{name}.{pname}"] = p.detach()
            continue
        if not isinstance(layer, LoraLayer) or adapter_name not in layer.adapter_names:
            continue
        name = logical_param_name(path)
        targets.append(name)
        r, alpha = layer.r[adapter_name], layer.alpha[adapter_name]
        key = f"{PREFIX}{name}"
        if layer.kind == "embedding":
            tensors[f"{key}.lora_embedding_A"] = layer.lora_embedding_A[adapter_name].detach()
            tensors[f"{key}.lora_embedding_B"] = layer.lora_embedding_B[adapter_name].detach()
        else:
            A = layer.lora_A[adapter_name].weight.detach()
            B = unfused_lora_B(layer, adapter_name)
            slices = layer.slices[adapter_name]
            if slices is not None:
                n_on = sum(slices)
                alpha = alpha * (math.sqrt(n_on) if cfg.use_rslora else n_on)
                r = r * n_on
            tensors[f"{key}.lora_A.weight"] = A
            tensors[f"{key}.lora_B.weight"] = B
        if layer.use_dora[adapter_name]:
            mag = layer.lora_magnitude[adapter_name].detach()
            if layer.kind == "conv":
                mag = mag.view(1, -1, *([1] * (layer.base_layer.weight.dim() - 2)))
            tensors[f"{key}.lora_magnitude_vector"] = mag
        if r != cfg.r:
            rank_pattern[name] = r
        if alpha != cfg.alpha:
            alpha_pattern[name] = alpha
    for pname in get_method("lora").extra_trainable(model, cfg, adapter_name):
        p = model.get_parameter(pname)
        logical = logical_param_name(pname)
        owner = logical.rsplit(".", 1)[0]
        suffix = "base_layer.bias" if owner in targets else "bias"
        tensors[f"{PREFIX}{owner}.{suffix}"] = p.detach()
    if not tensors:
        raise CheckpointError(f"adapter {adapter_name!r} owns no LoRA tensors; nothing to export")
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path
        or getattr(getattr(model, "config", None), "_name_or_path", None),
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.use_rslora,
        "use_dora": cfg.use_dora,
        "bias": cfg.bias,
        "fan_in_fan_out": any(layer.fan_in_fan_out for _, layer in delta_layers(model) if isinstance(layer, LoraLayer)),
        "target_modules": sorted(targets),
        "exclude_modules": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": list(record.modules_to_save) or None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
        "lora_bias": False,
    }
    directory = Path(directory)
    check_output_dir(directory, (PEFT_WEIGHTS, PEFT_CONFIG))
    directory.mkdir(parents=True, exist_ok=True)
    out = {k: v.contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(directory / PEFT_WEIGHTS, save(out, metadata={"format": "pt"}))
    atomic_write_text(directory / PEFT_CONFIG, json.dumps(config, indent=2) + "\n")
    return directory


def unfused_lora_B(layer: LoraLayer, adapter_name: str) -> torch.Tensor:
    """LoRA's B of a Linear layer as an ordinary ``(out, rank)`` matrix (detached). For a fused-slice
    layer (``enable_lora``) that is the block-structured ``(out, r * enabled_slices)`` matrix with zeros on
    the disabled slices, which with the layer's A gives the same update."""
    B = layer.lora_B[adapter_name].weight.detach()
    slices = layer.slices[adapter_name]
    if slices is None:
        return B
    r = layer.r[adapter_name]
    n_on, k = sum(slices), len(slices)
    step = layer.out_features // k
    full_B = B.new_zeros(layer.out_features, r * n_on)
    j = 0
    for i, on in enumerate(slices):
        if on:
            full_B[i * step : (i + 1) * step, j * r : (j + 1) * r] = B[j * step : (j + 1) * step]
            j += 1
    return full_B


def _read_peft_config(cfg_path: Path) -> dict[str, Any]:
    """``adapter_config.json`` as a dict, its fields' types checked (CheckpointError naming file and field)."""
    try:
        pc = load_json_file(cfg_path, PEFT_CONFIG)
    except FileFormatError as exc:
        raise CheckpointError(str(exc)) from None
    where = repr(str(cfg_path))
    if not isinstance(pc, dict):
        raise CheckpointError(f"{where} must hold a JSON object, got {type(pc).__name__}")
    if "r" not in pc and pc.get("peft_type") == "LORA":
        raise CheckpointError(f"{where} has no 'r' field (the LoRA rank)")
    for key in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if pc.get(key) is not None and not isinstance(pc[key], bool):
            raise CheckpointError(f"{where}: field {key!r} must be a JSON boolean (true/false), got {pc[key]!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if pc.get(key) is not None and not isinstance(pc[key], dict):
            raise CheckpointError(f"{where}: field {key!r} must be a JSON object, got {pc[key]!r}")
    return pc


def _read_peft_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors from ``adapter_model.safetensors`` or (plain tensors only) ``adapter_model.bin``."""
    st, binary = directory / PEFT_WEIGHTS, directory / PEFT_WEIGHTS_BIN
    if st.is_file():
        try:
            tensors = load_bytes(st.read_bytes())
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for a malformed file
            raise CheckpointError(f"{str(st)!r} is not a valid safetensors file: {exc}") from None
    elif binary.is_file():
        try:
            tensors = torch.load(binary, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - an unpickling failure: corrupt, or objects other than tensors
            raise CheckpointError(
                f"{str(binary)!r} cannot be read as a plain tensor dict (weights_only=True refused it or it is "
                f"corrupt; convert it to {PEFT_WEIGHTS}): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ) from None
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise CheckpointError(f"{str(binary)!r} must hold a dict of tensors, got {type(tensors).__name__}")
    else:
        raise CheckpointError(f"{str(directory)!r} has neither {PEFT_WEIGHTS} nor {PEFT_WEIGHTS_BIN}")
    return tensors


def _peft_patterns(table: dict[str, Any]) -> dict[str, Any]:
    # PEFT matches pattern keys as a suffix regex: "(.*\.)?<key>$".
    return {f"re:(.*\\.)?{k}": v for k, v in (table or {}).items()}


def import_peft(model: nn.Module, directory: str | os.PathLike, name: str = "default") -> nn.Module:
    """Apply a PEFT LoRA adapter directory to ``model`` as adapter ``name`` (in place; returns it)."""
    check_type("directory", directory, (str, os.PathLike), "a path")
    directory = Path(directory)
    cfg_path = directory / PEFT_CONFIG
    if not cfg_path.is_file():
        raise DeltaConfigError(f"directory must hold a PEFT {PEFT_CONFIG}, got {str(directory)!r}")
    pc = _read_peft_config(cfg_path)
    if pc.get("peft_type") != "LORA":
        raise CheckpointError(f"import_peft reads LoRA adapters only; {str(cfg_path)!r} has peft_type {pc.get('peft_type')!r}")
    unsupported = {k: pc[k] for k in ("lora_bias", "layer_replication", "use_qalora", "target_parameters") if pc.get(k)}
    if pc.get("init_lora_weights") not in (True, False, "gaussian", None):
        unsupported["init_lora_weights"] = pc["init_lora_weights"]
    if unsupported:
        raise CheckpointError(f"PEFT adapter uses options deltatune does not import: {unsupported}")
    tensors = _read_peft_tensors(directory)
    targets = pc.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":
        targets = ["re:" + targets]
    lp = pc.get("layers_pattern")
    try:
        config = _peft_lora_config(pc, targets, lp)
    except DeltaError as exc:
        raise CheckpointError(f"{str(cfg_path)!r} does not describe a valid LoRA adapter: {exc}") from None
    state = {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise CheckpointError(f"unexpected key {key!r} in the PEFT adapter (expected the prefix {PREFIX!r})")
        state[key[len(PREFIX):]] = value
    apply(model, config, name)
    try:
        _load_peft_tensors(model, state, name)
    except BaseException:
        delete_adapter(model, name)  # leave no randomly initialised adapter behind
        raise
    return model


def _peft_lora_config(pc: dict[str, Any], targets: Any, lp: Any) -> LoraConfig:
    """The :class:`LoraConfig` an ``adapter_config.json`` describes."""
    return LoraConfig(
        r=pc["r"],
        alpha=pc.get("lora_alpha", 8),
        dropout=pc.get("lora_dropout", 0.0) or 0.0,
        use_rslora=pc.get("use_rslora") or False,
        use_dora=pc.get("use_dora") or False,
        bias=pc.get("bias", "none"),
        target_modules=targets,
        exclude_modules=pc.get("exclude_modules") or None,
        layers_to_transform=pc.get("layers_to_transform"),
        layers_pattern=lp or None,
        rank_pattern=_peft_patterns(pc.get("rank_pattern")),
        alpha_pattern=_peft_patterns(pc.get("alpha_pattern")),
        modules_to_save=pc.get("modules_to_save") or None,
        fan_in_fan_out=pc.get("fan_in_fan_out") or False,
    )


def _load_peft_tensors(model: nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    params = {logical_param_name(k): v for k, v in model.named_parameters(remove_duplicate=False)}
    wanted: dict[str, torch.nn.Parameter] = {}
    for path, layer in delta_layers(model):
        logical = logical_param_name(path)
        if isinstance(layer, ModulesToSaveWrapper) and name in layer.adapter_names:
            for pname, p in layer.modules_to_save[name].named_parameters():
                wanted[f"{logical}.{pname}"] = p
        elif isinstance(layer, LoraLayer) and name in layer.adapter_names:
            if layer.kind == "embedding":
                wanted[f"{logical}.lora_embedding_A"] = layer.lora_embedding_A[name]
                wanted[f"{logical}.lora_embedding_B"] = layer.lora_embedding_B[name]
            else:
                wanted[f"{logical}.lora_A.weight"] = layer.lora_A[name].weight
                wanted[f"{logical}.lora_B.weight"] = layer.lora_B[name].weight
            if layer.use_dora[name]:
                wanted[f"{logical}.lora_magnitude_vector"] = layer.lora_magnitude[name]
    for key in state:
        if key.endswith("bias") and key not in wanted:
            logical = key.replace(".base_layer.bias", ".bias")
            if logical in params:
                wanted[key] = params[logical]
    missing = sorted(set(wanted) - set(state) - {k for k in wanted if k.endswith("bias") and k not in state})
    unexpected = sorted(set(state) - set(wanted))
    if missing or unexpected:
        raise CheckpointError(
            f"PEFT adapter does not fit the model: missing {missing[:10]}, not in the model {unexpected[:10]}"
        )
    def fits(t: torch.Tensor, p: torch.Tensor, key: str) -> bool:
        # exact shapes; only PEFT's conv DoRA magnitude (1, out, 1, 1) is squeezed to ours (out,)
        return tuple(t.shape) == tuple(p.shape) or (key.endswith("lora_magnitude_vector") and t.squeeze().shape == p.shape)

    bad = [f"{k}: PEFT {tuple(state[k].shape)} vs model {tuple(p.shape)}" for k, p in wanted.items()
           if k in state and not fits(state[k], p, k)]
    if bad:
        raise CheckpointError(f"PEFT adapter shapes do not fit the model: {bad[:10]}")
    with torch.no_grad():
        for key, p in wanted.items():
            if key in state:
                p.copy_(state[key].reshape(p.shape).to(dtype=p.dtype, device=p.device))
