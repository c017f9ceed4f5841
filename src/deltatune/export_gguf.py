"""Export fine-tuned models to GGUF, the file format of llama.cpp (and Ollama, LM Studio, ...).

:func:`export_gguf` writes one of two kinds of file:

* ``kind="merged"``: the base model with the delta merged into its weights, as a complete GGUF model
  (``f32``, ``f16``, ``q8_0``, ``q4_0`` or ``q4_1``; quantised by the ``gguf`` package). Any mergeable
  delta method works (LoRA, IA3, BitFit, ...); a model without a delta is exported as it is. The
  tokenizer and the descriptive metadata (``general.*``, ``tokenizer.*``: vocabulary, merges, special
  token ids, chat template) are copied from the GGUF file the base model came from, or, for a
  Hugging Face base, built from its byte-level BPE tokenizer; the architecture's hyper-parameters are
  written from the model's own config. The output matrix (the token embedding when tied) can be kept at
  a higher precision than the rest (``output_quant``; the 4-bit types keep it at Q8_0 by default).
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

This module owns the public entry points, the checks of their arguments and the file writing; the
tensors (names, layouts, storage types) are :mod:`deltatune.gguf_tensors`' and the vocabulary and
metadata :mod:`deltatune.gguf_vocab`'s.

Every check runs before the output file is opened; the file is written to a temporary name in the
target directory, flushed to disk and renamed into place, so a crash never leaves a partial ``.gguf``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from .errors import DeltaConfigError
from .gguf_tensors import (
    ARCHITECTURES,
    Arch,
    adapter_tensors,
    check_arch,
    encode,
    file_type,
    gguf_module,
    merged_tensors,
    tensor_quant,
)
from .gguf_vocab import find_source_gguf, vocab_fields
from .io_utils import fsync_dir
from .methods import get_method
from .methods.base import get_records
from .models import REGISTERED_MODELS
from .models import is_gguf_file as _is_gguf_file
from .validation import check_bool, check_choice, check_type

__all__ = [
    "ADAPTER_QUANTS",
    "ARCHITECTURES",
    "DEFAULT_OUTPUT_QUANTS",
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

#: the ``quant`` used when none is given
DEFAULT_QUANTS: dict[str, str] = {"merged": "f16", "adapter": "f32"}
#: a merged file's ``output_quant`` (the output matrix; the token embedding when tied) when none is given,
#: per ``quant``: the 4-bit files keep it at Q8_0, as llama.cpp's quantiser keeps it above the other
#: matrices (at Q6_K, which the ``gguf`` package cannot write) and as the bundled SmolLM2 Q4_1 file does
DEFAULT_OUTPUT_QUANTS: dict[str, str] = {"f32": "f32", "f16": "f16", "q8_0": "q8_0", "q4_0": "q8_0", "q4_1": "q8_0"}

# --------------------------------------------------------------------------------------------------
# the writer


def _write_atomic(
    path: Path, arch: Arch, fill: Callable[[Any], None], tensors: Iterable[tuple[str, np.ndarray]], n_tensors: int,
    quant: str, quant_of: Callable[[str], str], progress: bool,
) -> None:
    """Write a GGUF file to a temporary name beside ``path`` and rename it into place; tensor ``name`` is
    stored as ``quant_of(name)``."""
    gguf = gguf_module()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(tmp, arch.name)
        fill(writer)
        for name, data in tqdm(tensors, total=n_tensors, desc=f"deltatune: GGUF {quant}", unit="tensor", disable=not progress):
            stored, qtype = encode(data, quant_of(name))
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


def _add_arch_kv(writer: Any, arch: Arch, quant: str) -> None:
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
    writer.add_file_type(file_type(quant))
    writer.add_quantization_version(gguf_module().GGML_QUANT_VERSION)

def check_exportable(
    model: nn.Module, kind: str, source_gguf: str | os.PathLike | None = None, tokenizer: Any = None
) -> None:
    """Check, before training, that ``model`` can later be exported as ``kind``: a known architecture and,
    for ``"merged"``, a tokenizer that fits. Raises what :func:`export_gguf` would."""
    check_choice("kind", kind, KINDS)
    arch = check_arch(model)
    if kind == "merged":
        vocab_fields(model, arch, source_gguf, tokenizer)


def export_gguf(
    model: nn.Module,
    path: str | os.PathLike,
    kind: str = "merged",
    quant: str | None = None,
    *,
    output_quant: str | None = None,
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
        output_quant: the storage type of the output matrix (``output.weight``, or ``token_embd.weight``
            when the model ties its input and output embeddings, as SmolLM2 does), the tensor the logits
            are most sensitive to (``merged`` only): one of :data:`MERGED_QUANTS`; default
            :data:`DEFAULT_OUTPUT_QUANTS` of ``quant`` (``q8_0`` for the 4-bit types, else ``quant``).
            ``general.file_type`` stays that of ``quant`` (as llama.cpp's quantiser writes it); the
            tensor's own type records the choice.
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
    if output_quant is not None:
        if kind != "merged":
            raise DeltaConfigError(
                f"output_quant is used with kind='merged' only (an adapter has no output matrix), got {output_quant!r}"
            )
        _check_quant("output_quant", kind, output_quant)
    check_bool("progress", progress)
    out = Path(path).expanduser()
    if out.is_dir():
        raise DeltaConfigError(f"path must be a file path, got {str(out)!r}, which is a directory")
    arch = check_arch(model)

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
        alpha, tensors = adapter_tensors(model, arch, adapter_name)

        def fill(writer: Any) -> None:
            writer.add_type("adapter")
            writer.add_string("adapter.type", "lora")
            writer.add_float32("adapter.lora.alpha", alpha)
            writer.add_file_type(file_type(quant))

        out.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(out, arch, fill, tensors, len(tensors), quant, lambda _name: quant, progress)
        return out

    if adapter_name is not None:
        raise DeltaConfigError("adapter_name is used with kind='adapter' only (kind='merged' merges the active adapters)")
    for name, record in records.items():
        if not get_method(record.method).mergeable:
            raise DeltaConfigError(
                f"adapter {name!r} ({record.method!r}) cannot be merged into the weights, so it cannot be exported "
                "as a GGUF model; mergeable methods can (LoRA, IA3, BitFit, ...)"
            )
    fields = vocab_fields(model, arch, source_gguf, tokenizer)
    names, tensors_iter = merged_tensors(model, arch)  # merges and maps names: raises before the file is opened
    out_quant = output_quant if output_quant is not None else DEFAULT_OUTPUT_QUANTS[quant]

    def fill_model(writer: Any) -> None:
        writer.add_type("model")
        for f in fields:
            writer.add_key_value(f.key, f.value, f.vtype, sub_type=f.sub_type)
        _add_arch_kv(writer, arch, quant)

    out.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(
        out, arch, fill_model, tensors_iter, len(names), quant,
        lambda name: tensor_quant(name, quant, out_quant, names), progress,
    )
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
    """A recipe's ``export`` section: ``export: {gguf: adapter|merged, quant: q8_0, output_quant: f16}``.

    Attributes:
        gguf: ``None`` (no export), ``"adapter"`` or ``"merged"`` (see :func:`export_gguf`).
        quant: the storage type (default: ``"f16"`` for merged, ``"f32"`` for adapter).
        output_quant: merged only: the output matrix's storage type (:func:`export_gguf`'s
            ``output_quant``; default: Q8_0 in 4-bit files, else ``quant``).
    """

    gguf: str | None = None
    quant: str | None = None
    output_quant: str | None = None

    def __post_init__(self) -> None:
        if self.gguf is None:
            for name in ("quant", "output_quant"):
                value = getattr(self, name)
                if value is not None:
                    raise DeltaConfigError(
                        f"export.{name} needs export.gguf (adapter or merged), got {name} {value!r} alone"
                    )
            return
        check_type("export.gguf", self.gguf, str, "None, 'adapter' or 'merged'")
        check_choice("export.gguf", self.gguf, KINDS)
        if self.quant is None:
            self.quant = DEFAULT_QUANTS[self.gguf]
        _check_quant("export.quant", self.gguf, self.quant)
        if self.output_quant is not None:
            if self.gguf != "merged":
                raise DeltaConfigError(
                    f"export.output_quant is used with gguf 'merged' only (an adapter has no output matrix), got "
                    f"output_quant {self.output_quant!r} with gguf {self.gguf!r}"
                )
            _check_quant("export.output_quant", self.gguf, self.output_quant)


def default_filename(kind: str, quant: str) -> str:
    """The file name a run directory gets: ``model.<quant>.gguf`` or ``adapter.<quant>.gguf``."""
    return f"{'model' if kind == 'merged' else 'adapter'}.{quant}.gguf"


def source_gguf_of(name_or_path: str) -> Path | None:
    """The GGUF file behind a base model name or path (a registered GGUF model or a ``.gguf`` path), else None."""
    entry = REGISTERED_MODELS.get(name_or_path)
    if entry is not None:
        path = entry.locate()
        return path if path.is_file() and _is_gguf_file(path) else None
    path = Path(name_or_path).expanduser()
    return path if path.is_file() and _is_gguf_file(path) else None
