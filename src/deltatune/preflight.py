"""Preflight: refuse a delta method that cannot apply to a model BEFORE any weight is loaded.

Loading a model, tokenising a training set and only then learning that BitFit has no bias to train
(Llama/SmolLM2 models have none) or that a LoRA ``target_modules`` entry names no module wastes
minutes. :func:`check_applicable` decides from the model's configuration alone:

* the configuration is read from ``config.json`` (a Hugging Face directory) or from the key/value
  header of a ``.gguf`` file (:func:`read_model_config`; the tokenizer arrays and the tensor data are
  skipped, so a 100 MB GGUF file is read in milliseconds);
* the module tree is built from it on PyTorch's ``meta`` device (:func:`model_skeleton`: shapes
  only, no memory, no weights), so module names and which modules own a bias are those of the real
  model;
* the method's target entries are resolved on that tree with the same matcher the methods use
  (:func:`deltatune.inject.select_targets`), and BitFit needs at least one bias among its modules.

:func:`natural_task` picks the task a model is meant for (``causal-lm`` for decoders and GGUF files,
``base`` for encoders without a head), which ``deltatune info`` uses when ``--task`` is absent.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from .config import DeltaConfig, config_from_dict
from .errors import CheckpointError, DeltaConfigError, TargetNotFoundError
from .inject import select_targets
from .models import REGISTERED_MODELS, TASKS
from .validation import check_choice, check_type

__all__ = [
    "FULL_FINETUNING",
    "check_applicable",
    "model_skeleton",
    "natural_task",
    "read_gguf_metadata",
    "read_model_config",
]

#: The method name meaning full fine-tuning: it trains every parameter, so it always applies.
FULL_FINETUNING = "full"

_GGUF_MAGIC = b"GGUF"
# GGUF value types (gguf.GGUFValueType): struct format of the fixed-size ones
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING = 8
_GGUF_ARRAY = 9


# ------------------------------------------------------------------------------------------------
# reading a model's configuration


def _model_path(model_source: str | os.PathLike) -> Path:
    """The HF directory or GGUF file of a registered name or a path (nothing is loaded)."""
    check_type("model", model_source, (str, os.PathLike), "a registered model name or a path")
    if isinstance(model_source, str) and model_source in REGISTERED_MODELS:
        return REGISTERED_MODELS[model_source].locate()
    path = Path(model_source).expanduser()
    if not path.exists():
        raise DeltaConfigError(
            f"model must be a registered name ({', '.join(sorted(REGISTERED_MODELS))}), a Hugging Face model "
            f"directory or a .gguf file, got {os.fspath(model_source)!r} (no such file or directory)"
        )
    return path


def _read_exact(fh: BinaryIO, n: int, path: Path) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise CheckpointError(f"{os.fspath(path)!r}: the GGUF header ends early (truncated file)")
    return data


def _gguf_value(fh: BinaryIO, vtype: int, path: Path, *, keep_arrays: bool) -> Any:
    if vtype in _GGUF_SCALARS:
        fmt = _GGUF_SCALARS[vtype]
        return struct.unpack(fmt, _read_exact(fh, struct.calcsize(fmt), path))[0]
    if vtype == _GGUF_STRING:
        (n,) = struct.unpack("<Q", _read_exact(fh, 8, path))
        return _read_exact(fh, n, path).decode("utf-8", errors="replace")
    if vtype == _GGUF_ARRAY:
        etype, count = struct.unpack("<IQ", _read_exact(fh, 12, path))
        if keep_arrays or etype not in _GGUF_SCALARS:
            items = [_gguf_value(fh, etype, path, keep_arrays=keep_arrays) for _ in range(count)]
            return items if keep_arrays else None
        fh.seek(struct.calcsize(_GGUF_SCALARS[etype]) * count, os.SEEK_CUR)  # skipped unread
        return None
    raise CheckpointError(f"{os.fspath(path)!r}: unknown GGUF value type {vtype} in the header")


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The key/value header of a GGUF file (version 2 or 3) as a dict.

    Array values (the tokenizer's vocabulary, merges, scores) are not decoded: their keys map to
    ``None``. Only the header is read, never the tensor data.

    Raises:
        CheckpointError: not a GGUF file, an unsupported version or a truncated header.
    """
    p = Path(path)
    with open(p, "rb") as fh:
        if fh.read(4) != _GGUF_MAGIC:
            raise CheckpointError(f"{os.fspath(p)!r} is not a GGUF file (its first bytes are not the GGUF magic)")
        (version,) = struct.unpack("<I", _read_exact(fh, 4, p))
        if version not in (2, 3):
            raise CheckpointError(f"{os.fspath(p)!r}: GGUF version {version} is not supported (expected 2 or 3)")
        _tensors, kv_count = struct.unpack("<QQ", _read_exact(fh, 16, p))
        out: dict[str, Any] = {}
        for _ in range(kv_count):
            key = _gguf_value(fh, _GGUF_STRING, p, keep_arrays=False)
            (vtype,) = struct.unpack("<I", _read_exact(fh, 4, p))
            out[key] = _gguf_value(fh, vtype, p, keep_arrays=False)
    return out


def _config_from_gguf(path: Path) -> Any:
    """A transformers config from a GGUF header (transformers' own key mapping); architectures that
    mapping does not cover fall back to transformers' full GGUF reader (slower, same result)."""
    from transformers import AutoConfig
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    meta = read_gguf_metadata(path)
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise CheckpointError(f"{os.fspath(path)!r}: the GGUF header has no general.architecture")
    mapping = GGUF_CONFIG_MAPPING.get(arch)
    name = str(meta.get("general.name") or "").lower()
    if mapping is None or (arch == "llama" and "mistral" in name):
        try:
            return AutoConfig.from_pretrained(os.fspath(path.parent), gguf_file=path.name, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"could not read the model configuration of {os.fspath(path)!r}: {exc}") from exc
    fields = {
        hf: meta[f"{arch}.{key}"] for key, hf in mapping.items() if hf is not None and meta.get(f"{arch}.{key}") is not None
    }
    if "vocab_size" not in fields:
        # llama.cpp leaves <arch>.vocab_size out when it equals the token list's length; the module
        # names and biases do not depend on it
        fields["vocab_size"] = 32
    return AutoConfig.for_model(arch, **fields)


def read_model_config(model_source: str | os.PathLike) -> Any:
    """The transformers configuration of a registered model, an HF directory or a ``.gguf`` file,
    read without loading any weight.

    Raises:
        DeltaConfigError: an unknown name or a missing path.
        MissingPackageError: a registered model's package is not installed.
        CheckpointError: no ``config.json``, or a file that cannot be read as a configuration.
    """
    from transformers import AutoConfig

    path = _model_path(model_source)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise DeltaConfigError(
                f"model must be a Hugging Face model directory or a .gguf file, got the file {os.fspath(path)!r}"
            )
        return _config_from_gguf(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"model directory {os.fspath(path)!r} has no config.json")
    try:
        return AutoConfig.from_pretrained(os.fspath(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"could not read {os.fspath(cfg_file)!r} as a model configuration: {exc}") from exc


def natural_task(model_source: str | os.PathLike) -> str:
    """The task a model is meant for: ``causal-lm`` for GGUF files and decoders whose ``config.json``
    names a ``*ForCausalLM`` / ``*LMHeadModel`` class, ``sequence-classification`` for a saved
    classifier, else ``base``; always one the registry allows for a registered model."""
    path = _model_path(model_source)
    allowed = TASKS
    if isinstance(model_source, str) and model_source in REGISTERED_MODELS:
        allowed = REGISTERED_MODELS[model_source].tasks
    if path.is_file():
        task = "causal-lm"
    else:
        try:
            archs = json.loads((path / "config.json").read_text(encoding="utf-8")).get("architectures") or []
        except (OSError, ValueError, AttributeError):
            archs = []
        if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
            task = "causal-lm"
        elif any(a.endswith("ForSequenceClassification") for a in archs):
            task = "sequence-classification"
        else:
            task = "base"
    if task in allowed:
        return task
    return next(t for t in ("causal-lm", "base", "sequence-classification") if t in allowed)


def model_skeleton(model_source: str | os.PathLike, task: str = "causal-lm") -> nn.Module:
    """The module tree of the model :func:`deltatune.models.load` would return for ``task``, built on
    the ``meta`` device from the configuration alone (no weights, no memory)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    check_choice("task", task, TASKS)
    config = read_model_config(model_source)
    cls = {"causal-lm": AutoModelForCausalLM, "sequence-classification": AutoModelForSequenceClassification,
           "base": AutoModel}[task]
    try:
        with torch.device("meta"):
            return cls.from_config(config)
    except (ValueError, KeyError) as exc:
        raise DeltaConfigError(
            f"task {task!r} does not fit model {os.fspath(model_source)!r} ({type(config).__name__}): {exc}"
        ) from exc


# ------------------------------------------------------------------------------------------------
# the check


def _bias_owners(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m._parameters.get("bias"), nn.Parameter)}


def _bias_facts(config: Any) -> str:
    facts = {k: v for k, v in sorted(config.to_dict().items()) if "bias" in k and isinstance(v, bool)}
    shown = ", ".join(f"{k}={v}" for k, v in facts.items())
    return f" ({type(config).__name__} {shown})" if shown else ""


def check_applicable(
    method_name: str,
    method_config: Mapping[str, Any] | DeltaConfig | None,
    model_source: str | os.PathLike,
    *,
    task: str = "causal-lm",
    added_modules: Sequence[str] = (),
) -> None:
    """Refuse a method that cannot apply to a model, reading only the model's configuration.

    Args:
        method_name: a registered delta method or ``"full"`` (always applies).
        method_config: the method's fields (a dict without or with a matching ``method`` key, a
            MindFormers ``pet_config`` mapping, or a :class:`~deltatune.config.DeltaConfig`); ``None``
            means the method's defaults.
        model_source: a registered model name, an HF directory or a ``.gguf`` file.
        task: the task the pipeline loads the model for (see :data:`deltatune.models.TASKS`).
        added_modules: names of modules the pipeline adds to the loaded model (a classification
            head); target entries naming them are accepted, and BitFit counts them as bias owners.

    Raises:
        DeltaConfigError: an unknown method, or a config whose ``method`` differs from ``method_name``.
        TargetNotFoundError: the model lacks what the method needs; the message names the method, the
            model and what is missing.
    """
    check_type("method_name", method_name, str, "a method name")
    if method_name == FULL_FINETUNING:
        return
    if isinstance(method_config, DeltaConfig):
        config = method_config
    else:
        data = dict(method_config or {})
        if "method" not in data and "pet_type" not in data:
            data["method"] = method_name
        config = config_from_dict(data)
    if config.method != method_name:
        raise DeltaConfigError(f"method_config is a {config.method!r} config, but the method is {method_name!r}")
    model_cfg = read_model_config(model_source)
    skeleton = model_skeleton(model_source, task)
    label = f"model {os.fspath(model_source)!r} ({type(skeleton).__name__})"
    added = set(added_modules)

    targets = getattr(config, "target_modules", None)
    if isinstance(targets, str):
        own = [targets] if targets not in added else []
    else:
        own = [t for t in targets or [] if t not in added]
    if own:
        try:
            slots = select_targets(
                skeleton,
                own if not isinstance(targets, str) else targets,
                exclude_modules=getattr(config, "exclude_modules", None),
                layers_to_transform=getattr(config, "layers_to_transform", None),
                layers_pattern=getattr(config, "layers_pattern", None),
            )
        except TargetNotFoundError as exc:
            raise TargetNotFoundError(f"{method_name} cannot apply to {label}: {exc}") from None
    else:
        slots = []

    if method_name == "bitfit":
        owners = _bias_owners(skeleton)
        if not owners and not added:
            raise TargetNotFoundError(
                f"bitfit cannot apply to {label}: the model has no bias parameters{_bias_facts(model_cfg)}, "
                f"and BitFit trains biases only; use another method (e.g. 'lora' or 'ia3')"
            )
        if own and not {s.name for s in slots} & owners:
            raise TargetNotFoundError(
                f"bitfit cannot apply to {label}: target_modules={targets!r} selects only modules without a "
                f"bias parameter{_bias_facts(model_cfg)}"
            )
