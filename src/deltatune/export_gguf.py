"""Export fine-tuned models to GGUF, the file format of llama.cpp (and Ollama, LM Studio, ...).

:func:`export_gguf` writes one of two kinds of file:

* ``kind="merged"``: the base model with the delta merged into its weights, as a complete GGUF model
  (``f32``, ``f16``, ``q8_0``, ``q4_0`` or ``q4_1``; quantised by the ``gguf`` package). Any mergeable
  delta method works (LoRA, IA3, BitFit, ...); a model without a delta is exported as it is. The
  tokenizer and the descriptive metadata (``general.*``, ``tokenizer.*``: vocabulary, merges, special
  token ids, chat template) are copied from the GGUF file the base model came from, or, for a
  Hugging Face base, built from its byte-level BPE tokenizer; the architecture's hyper-parameters are
  written from the model's own config.
* ``kind="adapter"``: a LoRA adapter in the GGUF layout llama.cpp loads with ``--lora``
  (``general.type = "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha``; tensors named after
  the base's GGUF tensors with ``.lora_a`` / ``.lora_b`` appended: ``blk.3.attn_q.weight.lora_a``).
  ``lora_a`` is stored as LoRA's ``A`` (``r x in``) and ``lora_b`` as ``B`` (``out x r``), which in GGUF's
  reversed dimension order is what llama.cpp checks against the base tensor. llama.cpp scales each
  pair by ``alpha / rank``; per-module ranks or scalings that one ``alpha`` cannot express are folded
  into ``B``.

llama.cpp stores the query and key projections of Llama models with the rotary halves interleaved
(its converter permutes the rows of ``q_proj``/``k_proj``); the exporter applies the same row permutation
to the merged weights and to LoRA's ``B`` of those projections (``A`` acts on the input side and is
left as it is).

Every check runs before the output file is opened; the file is written to a temporary name in the
target directory, flushed to disk and renamed into place, so a crash never leaves a partial ``.gguf``.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import CheckpointError, DeltaConfigError, MissingPackageError
from .io_utils import fsync_dir
from .models import is_gguf_file as _is_gguf_file
from .validation import check_bool, check_choice, check_type

__all__ = [
    "ADAPTER_QUANTS",
    "ARCHITECTURES",
    "DEFAULT_QUANTS",
    "KINDS",
    "MERGED_QUANTS",
    "ExportSpec",
    "check_exportable",
    "default_filename",
    "export_gguf",
    "find_source_gguf",
    "source_gguf_of",
]

#: what :func:`export_gguf` writes
KINDS: tuple[str, ...] = ("adapter", "merged")
#: ``quant`` values of ``kind="merged"``
MERGED_QUANTS: tuple[str, ...] = ("f32", "f16", "q8_0", "q4_0", "q4_1")
#: ``quant`` values of ``kind="adapter"``
ADAPTER_QUANTS: tuple[str, ...] = ("f32", "f16")
#: Hugging Face ``model_type`` -> llama.cpp architecture name, for the models the exporter knows
ARCHITECTURES: dict[str, str] = {"llama": "llama"}

#: the ``quant`` used when none is given
DEFAULT_QUANTS: dict[str, str] = {"merged": "f16", "adapter": "f32"}
_SOURCE_MARKER = ".deltatune-cache.json"  # written by deltatune.models' GGUF conversion cache
# copied from the source GGUF besides tokenizer.*; general.architecture/type/file_type are written anew
_GENERAL_KEYS = (
    "general.name", "general.organization", "general.finetune", "general.basename", "general.size_label",
    "general.license", "general.languages",
)


def _supported_architectures() -> str:
    return ", ".join(f"{v} (Hugging Face model_type {k!r})" for k, v in ARCHITECTURES.items())


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - gguf is a core dependency
        raise MissingPackageError("export_gguf needs the 'gguf' package: pip install gguf") from exc
    return gguf


def _qtype(quant: str) -> Any:
    t = _gguf().GGMLQuantizationType
    return {"f32": t.F32, "f16": t.F16, "q8_0": t.Q8_0, "q4_0": t.Q4_0, "q4_1": t.Q4_1}[quant]


def _file_type(quant: str) -> int:
    ft = _gguf().LlamaFileType
    return int({
        "f32": ft.ALL_F32, "f16": ft.MOSTLY_F16, "q8_0": ft.MOSTLY_Q8_0, "q4_0": ft.MOSTLY_Q4_0,
        "q4_1": ft.MOSTLY_Q4_1,
    }[quant])


# --------------------------------------------------------------------------------------------------
# model checks


@dataclass
class _Arch:
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


def _check_arch(model: nn.Module) -> _Arch:
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
    return _Arch(
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


def _permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q/k projection (or of LoRA's B for it) from Hugging Face's rotary layout (two halves per
    head) to llama.cpp's (the two halves interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_heads(hf_name: str, arch: _Arch) -> int | None:
    """The head count of the rows to permute for ``hf_name``'s tensor (None: no permutation)."""
    if hf_name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        return arch.n_head
    if hf_name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
        return arch.n_head_kv
    return None


def _name_map(arch: _Arch) -> Any:
    gguf = _gguf()
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, arch.n_layer)


def _gguf_name(hf_name: str, name_map: Any) -> str | None:
    return name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))


# --------------------------------------------------------------------------------------------------
# the source GGUF (tokenizer and metadata)


def find_source_gguf(model: nn.Module) -> Path | None:
    """The GGUF file a model was loaded from by :func:`deltatune.models.load`, or None.

    :func:`~deltatune.models.load` reads a GGUF base through a converted cache directory; that
    directory's marker file records the GGUF file it came from (``key.source``).
    """
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not name:
        return None
    marker = Path(str(name)) / _SOURCE_MARKER
    try:
        source = json.loads(marker.read_text(encoding="utf-8"))["key"]["source"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    path = Path(source)
    return path if path.is_file() else None


@dataclass(frozen=True)
class _Field:
    key: str
    value: Any
    vtype: Any
    sub_type: Any


@functools.lru_cache(maxsize=4)
def _source_fields(path: str, size: int, mtime_ns: int) -> tuple[str | None, int | None, tuple[_Field, ...]]:
    """``(architecture, token count, fields to copy)`` of a GGUF file. Cached per file version: the
    ``gguf`` package parses a 49k-token vocabulary in tens of seconds."""
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"source_gguf {path!r} is not a readable GGUF file: {exc}") from exc
    fields = reader.fields
    src_arch = fields["general.architecture"].contents() if "general.architecture" in fields else None
    n_tokens = len(fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in fields else None
    out = []
    for key, field in fields.items():
        if key.startswith("tokenizer.") or key in _GENERAL_KEYS:
            vtype = field.types[0]
            sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
            out.append(_Field(key, field.contents(), vtype, sub))
    return src_arch, n_tokens, tuple(out)


def _read_source(path: Path, arch: _Arch) -> tuple[_Field, ...]:
    """The ``general.*`` and ``tokenizer.*`` fields of the source GGUF to copy, after checking it fits."""
    if not _is_gguf_file(path):
        raise CheckpointError(f"source_gguf {str(path)!r} is not a GGUF file (its first bytes are not the GGUF magic)")
    st = path.stat()
    src_arch, n_tokens, fields = _source_fields(str(path.resolve()), st.st_size, st.st_mtime_ns)
    if src_arch != arch.name:
        raise DeltaConfigError(
            f"source_gguf {str(path)!r} has general.architecture {src_arch!r}, but the model is {arch.name!r}"
        )
    if n_tokens is None:
        raise DeltaConfigError(f"source_gguf {str(path)!r} has no tokenizer (no tokenizer.ggml.tokens)")
    if n_tokens != arch.vocab:
        raise DeltaConfigError(
            f"source_gguf {str(path)!r} has {n_tokens} tokens but the model's embedding has {arch.vocab} rows; "
            f"export needs the tokenizer the model was trained with"
        )
    return fields


def _hf_tokenizer_fields(tokenizer: Any, arch: _Arch) -> tuple[_Field, ...]:
    """``tokenizer.*`` fields built from a Hugging Face byte-level BPE tokenizer (GPT-2 style, the kind
    llama.cpp calls ``gpt2``). llama.cpp picks its pre-tokeniser regex from ``tokenizer.ggml.pre``; the
    exporter writes ``default`` (GPT-2's), so text with unusual spacing or digits may be split
    differently from the Hugging Face tokenizer: prefer a source GGUF where there is one."""
    gguf = _gguf()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model") or {}
    pre = spec.get("pre_tokenizer") or {}
    pre_types = {pre.get("type")} | {p.get("type") for p in pre.get("pretokenizers") or []}
    if model.get("type") != "BPE" or "ByteLevel" not in pre_types:
        raise DeltaConfigError(
            f"tokenizer {type(tokenizer).__name__} (model {model.get('type')!r}, pre-tokenizer "
            f"{pre.get('type')!r}) cannot be written to GGUF by deltatune; supported: byte-level BPE "
            "(GPT-2 style) fast tokenizers, or pass source_gguf=PATH to copy a GGUF file's tokenizer"
        )
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    added = {t["id"]: t for t in spec.get("added_tokens") or []}
    for i, t in added.items():
        vocab[t["content"]] = i
    if max(vocab.values(), default=-1) >= arch.vocab:
        raise DeltaConfigError(
            f"tokenizer has token ids up to {max(vocab.values())} but the model's embedding has {arch.vocab} rows"
        )
    by_id = {i: tok for tok, i in vocab.items()}
    tokens, types = [], []
    T = gguf.TokenType
    for i in range(arch.vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(T.UNUSED))
        else:
            tokens.append(by_id[i])
            types.append(int(T.CONTROL if added.get(i, {}).get("special") else T.USER_DEFINED if i in added else T.NORMAL))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    V = gguf.GGUFValueType
    fields = [
        _Field("tokenizer.ggml.model", "gpt2", V.STRING, None),
        _Field("tokenizer.ggml.pre", "default", V.STRING, None),
        _Field("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
        _Field("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32),
        _Field("tokenizer.ggml.merges", merges, V.ARRAY, V.STRING),
        _Field("tokenizer.ggml.add_bos_token", bool(getattr(tokenizer, "add_bos_token", False)), V.BOOL, None),
    ]
    for key, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unknown", "unk_token_id"),
                      ("padding", "pad_token_id")):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            fields.append(_Field(f"tokenizer.ggml.{key}_token_id", value, V.UINT32, None))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        fields.append(_Field("tokenizer.chat_template", template, V.STRING, None))
    return tuple(fields)


# --------------------------------------------------------------------------------------------------
# tensors


def _merged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights with every delta merged (the model itself is not changed)."""
    from .api import merge_and_unload
    from .methods.base import delta_layers, get_records

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


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()


def _encode(data: np.ndarray, quant: str) -> tuple[np.ndarray, Any]:
    """``data`` (float32) as stored: 1-D tensors stay F32 (as llama.cpp's converter keeps norms), rows
    that do not split into whole quantisation blocks fall back to F16."""
    gguf = _gguf()
    qt = _qtype(quant)
    if data.ndim == 1 or qt == gguf.GGMLQuantizationType.F32:
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32
    if qt == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    block = gguf.GGML_QUANT_SIZES[qt][0]
    if data.shape[-1] % block:
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(data, qt), qt


def _merged_tensors(model: nn.Module, arch: _Arch) -> tuple[int, Iterator[tuple[str, np.ndarray]]]:
    """``(count, tensors)`` of the merged model under GGUF names (q/k rows permuted); the tensors are
    converted to numpy one at a time as the writer takes them."""
    state = _merged_state(model)
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
                t = _permute_rows(t, heads)
            yield g, _to_numpy(t)

    return len(mapped), gen()


def _adapter_tensors(model: nn.Module, arch: _Arch, adapter_name: str) -> tuple[float, list[tuple[str, np.ndarray]]]:
    """``(alpha, [(name, tensor)])`` of LoRA adapter ``adapter_name`` in llama.cpp's layout."""
    from .methods.base import ModulesToSaveWrapper, delta_layers, get_records, logical_param_name
    from .methods.lora import LoraLayer
    from .peft_io import unfused_lora_B

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
            B = _permute_rows(B, heads)
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
        out.append((f"{g}.lora_a", _to_numpy(A)))
        out.append((f"{g}.lora_b", _to_numpy(B)))
    return float(alpha), out


# --------------------------------------------------------------------------------------------------
# the writer


def _write_atomic(path: Path, arch: _Arch, fill: Any, tensors: Any, n_tensors: int, quant: str, progress: bool) -> None:
    """Write a GGUF file to a temporary name beside ``path`` and rename it into place."""
    from tqdm.auto import tqdm

    gguf = _gguf()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(tmp, arch.name)
        fill(writer)
        for name, data in tqdm(tensors, total=n_tensors, desc=f"deltatune: GGUF {quant}", unit="tensor", disable=not progress):
            stored, qtype = _encode(data, quant)
            writer.add_tensor(name, stored, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _add_arch_kv(writer: Any, arch: _Arch, quant: str) -> None:
    writer.add_context_length(arch.context)
    writer.add_embedding_length(arch.hidden)
    writer.add_block_count(arch.n_layer)
    writer.add_feed_forward_length(arch.ffn)
    writer.add_head_count(arch.n_head)
    writer.add_head_count_kv(arch.n_head_kv)
    writer.add_rope_dimension_count(arch.head_dim)
    if arch.head_dim * arch.n_head != arch.hidden:
        writer.add_key_length(arch.head_dim)
        writer.add_value_length(arch.head_dim)
    writer.add_rope_freq_base(arch.rope_theta)
    writer.add_layer_norm_rms_eps(arch.eps)
    writer.add_vocab_size(arch.vocab)
    writer.add_file_type(_file_type(quant))
    writer.add_quantization_version(_gguf().GGML_QUANT_VERSION)


def _vocab_fields(
    model: nn.Module, arch: _Arch, source_gguf: str | os.PathLike | None, tokenizer: Any
) -> tuple[_Field, ...]:
    """The metadata a merged file takes from elsewhere: the source GGUF's (given, or the one the model
    was loaded from), else the fields built from the Hugging Face ``tokenizer``."""
    if source_gguf is None:
        source = find_source_gguf(model)
        if source is None:
            if tokenizer is not None:
                return _hf_tokenizer_fields(tokenizer, arch)
            raise DeltaConfigError(
                "kind='merged' needs a tokenizer: pass source_gguf=PATH (a GGUF file to copy it from) or "
                "tokenizer=TOKENIZER (a Hugging Face byte-level BPE tokenizer); the model was not loaded from a "
                "GGUF file by deltatune.models.load"
            )
    else:
        check_type("source_gguf", source_gguf, (str, os.PathLike), "None or a .gguf file path")
        source = Path(source_gguf).expanduser()
        if not source.is_file():
            raise DeltaConfigError(f"source_gguf must be an existing .gguf file, got {str(source)!r}")
    return _read_source(source, arch)


def check_exportable(
    model: nn.Module, kind: str, source_gguf: str | os.PathLike | None = None, tokenizer: Any = None
) -> None:
    """Check, before training, that ``model`` can later be exported as ``kind``: a known architecture and,
    for ``"merged"``, a tokenizer that fits. Raises what :func:`export_gguf` would."""
    check_choice("kind", kind, KINDS)
    arch = _check_arch(model)
    if kind == "merged":
        _vocab_fields(model, arch, source_gguf, tokenizer)


def export_gguf(
    model: nn.Module,
    path: str | os.PathLike,
    kind: str = "merged",
    quant: str | None = None,
    *,
    adapter_name: str | None = None,
    source_gguf: str | os.PathLike | None = None,
    tokenizer: Any = None,
    progress: bool = True,
) -> Path:
    """Write ``model`` (``kind="merged"``) or its LoRA adapter (``kind="adapter"``) as a GGUF file.

    Args:
        model: a Llama-architecture causal LM (Hugging Face ``model_type`` ``"llama"``), with or without
            deltas applied. It is not changed (merging happens on a copy).
        path: the ``.gguf`` file to write (its directory is created; an existing file is replaced).
        kind: ``"merged"`` (a complete model) or ``"adapter"`` (a llama.cpp LoRA adapter, for
            ``llama-cli -m BASE.gguf --lora FILE`` or ``Llama(model_path=..., lora_path=...)``).
        quant: the weights' storage type: for ``merged`` one of :data:`MERGED_QUANTS` (default ``"f16"``),
            for ``adapter`` one of :data:`ADAPTER_QUANTS` (default ``"f32"``). 1-D tensors (norms) are
            always F32; a matrix whose rows are not a whole number of quantisation blocks is stored F16.
        adapter_name: the LoRA adapter to export (``adapter`` only; default: the only adapter, else
            ``"default"``).
        source_gguf: the GGUF file whose tokenizer and ``general.*`` metadata the merged file copies
            (``merged`` only). Default: the GGUF file the model was loaded from
            (:func:`find_source_gguf`; set for GGUF bases such as ``smollm2-135m``).
        tokenizer: without a source GGUF, a Hugging Face byte-level BPE (GPT-2 style) tokenizer to build
            the ``tokenizer.*`` metadata from (``merged`` only); llama.cpp then pre-tokenises with its
            ``default`` (GPT-2) rules.
        progress: show a progress bar over the tensors.

    Returns:
        The written file's path.

    Raises:
        DeltaConfigError: an unknown kind or quant, an architecture llama.cpp does not know, a method
            other than LoRA for ``adapter``, a method that cannot be merged, no tokenizer source for
            ``merged``; all raised before any file is written.
        CheckpointError: ``source_gguf`` is not a GGUF file; the adapter has no LoRA layer.
    """
    check_type("model", model, nn.Module, "a torch.nn.Module")
    check_type("path", path, (str, os.PathLike), "a file path (str or os.PathLike)")
    check_type("kind", kind, str, "a str")
    check_choice("kind", kind, KINDS)
    if quant is None:
        quant = DEFAULT_QUANTS[kind]
    _check_quant("quant", kind, quant)
    check_bool("progress", progress)
    out = Path(path).expanduser()
    if out.is_dir():
        raise DeltaConfigError(f"path must be a file path, got {str(out)!r}, which is a directory")
    arch = _check_arch(model)

    from .methods import get_method
    from .methods.base import get_records

    records = get_records(model)
    if kind == "adapter":
        if source_gguf is not None or tokenizer is not None:
            raise DeltaConfigError(
                "source_gguf and tokenizer are used with kind='merged' only (an adapter file carries no tokenizer)"
            )
        if not records:
            raise DeltaConfigError("kind='adapter' needs a model with a LoRA adapter; the model has no adapter")
        if adapter_name is None:
            adapter_name = next(iter(records)) if len(records) == 1 else "default"
        check_type("adapter_name", adapter_name, str, "a str")
        if adapter_name not in records:
            raise DeltaConfigError(f"adapter_name must be one of {sorted(records)}, got {adapter_name!r}")
        method = records[adapter_name].method
        if method != "lora":
            raise DeltaConfigError(
                f"kind='adapter' exports LoRA adapters only (the adapter type llama.cpp loads); adapter "
                f"{adapter_name!r} is {method!r}; export kind='merged' instead (supported for every mergeable method)"
            )
        alpha, tensors = _adapter_tensors(model, arch, adapter_name)

        def fill(writer: Any) -> None:
            writer.add_type("adapter")
            writer.add_string("adapter.type", "lora")
            writer.add_float32("adapter.lora.alpha", alpha)
            writer.add_file_type(_file_type(quant))

        out.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(out, arch, fill, tensors, len(tensors), quant, progress)
        return out

    if adapter_name is not None:
        raise DeltaConfigError("adapter_name is used with kind='adapter' only (kind='merged' merges the active adapters)")
    for name, record in records.items():
        if not get_method(record.method).mergeable:
            raise DeltaConfigError(
                f"adapter {name!r} ({record.method!r}) cannot be merged into the weights, so it cannot be exported "
                "as a GGUF model; mergeable methods can (LoRA, IA3, BitFit, ...)"
            )
    fields = _vocab_fields(model, arch, source_gguf, tokenizer)
    n, tensors_iter = _merged_tensors(model, arch)  # merges and maps names: raises before the file is opened

    def fill_model(writer: Any) -> None:
        writer.add_type("model")
        for f in fields:
            writer.add_key_value(f.key, f.value, f.vtype, sub_type=f.sub_type)
        _add_arch_kv(writer, arch, quant)

    out.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(out, arch, fill_model, tensors_iter, n, quant, progress)
    return out



# --------------------------------------------------------------------------------------------------
# recipes and run directories


def _check_quant(field: str, kind: str, quant: str) -> None:
    allowed = MERGED_QUANTS if kind == "merged" else ADAPTER_QUANTS
    check_type(field, quant, str, "a str")
    if quant not in allowed:
        raise DeltaConfigError(
            f"{field} must be one of {', '.join(repr(q) for q in allowed)} for kind={kind!r}, got {quant!r}"
        )


@dataclass
class ExportSpec:
    """A recipe's ``export`` section: ``export: {gguf: adapter|merged, quant: q8_0}``.

    Attributes:
        gguf: ``None`` (no export), ``"adapter"`` or ``"merged"`` (see :func:`export_gguf`).
        quant: the storage type (default: ``"f16"`` for merged, ``"f32"`` for adapter).
    """

    gguf: str | None = None
    quant: str | None = None

    def __post_init__(self) -> None:
        if self.gguf is None:
            if self.quant is not None:
                raise DeltaConfigError(f"export.quant needs export.gguf (adapter or merged), got quant {self.quant!r} alone")
            return
        check_type("export.gguf", self.gguf, str, "None, 'adapter' or 'merged'")
        check_choice("export.gguf", self.gguf, KINDS)
        if self.quant is None:
            self.quant = DEFAULT_QUANTS[self.gguf]
        _check_quant("export.quant", self.gguf, self.quant)


def default_filename(kind: str, quant: str) -> str:
    """The file name a run directory gets: ``model.<quant>.gguf`` or ``adapter.<quant>.gguf``."""
    return f"{'model' if kind == 'merged' else 'adapter'}.{quant}.gguf"


def source_gguf_of(name_or_path: str) -> Path | None:
    """The GGUF file behind a base model name or path (a registered GGUF model or a ``.gguf`` path), else None."""
    from .models import REGISTERED_MODELS

    entry = REGISTERED_MODELS.get(name_or_path)
    if entry is not None:
        path = entry.locate()
        return path if path.is_file() and _is_gguf_file(path) else None
    path = Path(name_or_path).expanduser()
    return path if path.is_file() and _is_gguf_file(path) else None
