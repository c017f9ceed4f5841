"""The vocabulary and descriptive metadata of an exported GGUF model (used by :mod:`deltatune.export_gguf`).

A merged GGUF file carries its tokenizer as ``tokenizer.*`` metadata. This module owns where it comes
from: the GGUF file the base model was loaded from (:func:`find_source_gguf`, through the marker file of
:mod:`deltatune.models`' conversion cache) or one named by the caller, whose ``tokenizer.*`` and
``general.*`` fields are copied after checking the architecture and token count fit; else a Hugging Face
byte-level BPE tokenizer, from which the fields are built.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .errors import CheckpointError, DeltaConfigError
from .gguf_tensors import Arch, gguf_module
from .models import is_gguf_file as _is_gguf_file
from .validation import check_type

__all__ = ["Field", "find_source_gguf", "vocab_fields"]

_SOURCE_MARKER = ".deltatune-cache.json"  # written by deltatune.models' GGUF conversion cache
# copied from the source GGUF besides tokenizer.*; general.architecture/type/file_type are written anew
_GENERAL_KEYS = (
    "general.name", "general.organization", "general.finetune", "general.basename", "general.size_label",
    "general.license", "general.languages",
)


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
class Field:
    """One metadata key-value pair to write: ``GGUFWriter.add_key_value(key, value, vtype, sub_type=...)``."""

    key: str
    value: Any
    vtype: Any
    sub_type: Any


@functools.lru_cache(maxsize=4)
def _source_fields(path: str, size: int, mtime_ns: int) -> tuple[str | None, int | None, tuple[Field, ...]]:
    """``(architecture, token count, fields to copy)`` of a GGUF file. Cached per file version: the
    ``gguf`` package parses a 49k-token vocabulary in tens of seconds."""
    gguf = gguf_module()
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
            out.append(Field(key, field.contents(), vtype, sub))
    return src_arch, n_tokens, tuple(out)


def _read_source(path: Path, arch: Arch) -> tuple[Field, ...]:
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


def _hf_tokenizer_fields(tokenizer: Any, arch: Arch) -> tuple[Field, ...]:
    """``tokenizer.*`` fields built from a Hugging Face byte-level BPE tokenizer (GPT-2 style, the kind
    llama.cpp calls ``gpt2``). llama.cpp picks its pre-tokeniser regex from ``tokenizer.ggml.pre``; the
    exporter writes ``default`` (GPT-2's), so text with unusual spacing or digits may be split
    differently from the Hugging Face tokenizer: prefer a source GGUF where there is one."""
    gguf = gguf_module()
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
        Field("tokenizer.ggml.model", "gpt2", V.STRING, None),
        Field("tokenizer.ggml.pre", "default", V.STRING, None),
        Field("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
        Field("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32),
        Field("tokenizer.ggml.merges", merges, V.ARRAY, V.STRING),
        Field("tokenizer.ggml.add_bos_token", bool(getattr(tokenizer, "add_bos_token", False)), V.BOOL, None),
    ]
    for key, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unknown", "unk_token_id"),
                      ("padding", "pad_token_id")):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            fields.append(Field(f"tokenizer.ggml.{key}_token_id", value, V.UINT32, None))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        fields.append(Field("tokenizer.chat_template", template, V.STRING, None))
    return tuple(fields)



def vocab_fields(
    model: nn.Module, arch: Arch, source_gguf: str | os.PathLike | None, tokenizer: Any
) -> tuple[Field, ...]:
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

