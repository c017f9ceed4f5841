"""Example types shared by every reader, and small I/O helpers.

* :class:`DataToTextExample`: one linearised input (``source``) with all of its reference texts.
* :class:`TextPairExample`: one (single sentence or sentence pair) classification / regression example.

Readers group references per identical ``source`` string (first-seen order), the way the LoRA
repository's decoding script groups references per context before scoring.
"""

from __future__ import annotations

import gzip
import io
import os
import zlib
from dataclasses import dataclass, field
from typing import Any

from ..errors import DataFormatError, DeltaConfigError
from ..validation import check_type

__all__ = ["DataToTextExample", "TextPairExample"]


@dataclass
class DataToTextExample:
    """One data-to-text input with all of its references.

    Attributes:
        source: the linearised input (meaning representation or triples) that goes into the prompt.
        references: every reference text for this input (empty for inputs-only test files).
        category: the stratification key (E2E: the ``eatType`` value or ``"unknown"``; WebNLG: the
            DBpedia category; DART: the annotation source family), or ``None``.
        meta: reader-specific extras (entry ids, the original MR, ``seen`` for WebNLG, ...).
    """

    source: str
    references: list[str]
    category: str | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class TextPairExample:
    """One classification or regression example.

    Attributes:
        text_a: the (first) sentence.
        text_b: the second sentence of a pair task, or ``None``.
        label: an ``int`` class id, a ``float`` score (regression), or ``None`` (hidden test labels).
    """

    text_a: str
    text_b: str | None = None
    label: int | float | None = None


def _check_input_file(name: str, path: Any) -> str:
    """``path`` must be an existing regular file; returns it as a str (DeltaConfigError otherwise)."""
    check_type(name, path, (str, os.PathLike), "a path (str or os.PathLike)")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DeltaConfigError(f"{name} must be an existing file, got {path!r}")
    return path


def _read_text(path: str) -> str:
    """The UTF-8 text of a data file (transparently gunzipping ``*.gz``).

    Raises:
        DataFormatError: a truncated or corrupt ``.gz``, bytes that are not UTF-8, or a NUL byte;
            the message names the file and the line.
    """
    if path.endswith(".gz"):
        try:
            with gzip.open(path, "rb") as fh:
                data = fh.read()
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise _fail(path, "line 1", f"not a complete gzip file ({exc})") from None
    else:
        with open(path, "rb") as fh:
            data = fh.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise _fail(
            path, f"line {line}", f"not valid UTF-8 (byte {data[exc.start:exc.start + 1]!r} at offset {exc.start})"
        ) from None
    nul = text.find("\0")
    if nul >= 0:
        raise _fail(path, f"line {text.count(chr(10), 0, nul) + 1}", "NUL byte in a text file")
    return text


def _open_text(path: str) -> io.TextIOBase:
    """A UTF-8 text file (transparently gunzipping ``*.gz``) as a stream with universal newlines off;
    checked by :func:`_read_text` first."""
    return io.StringIO(_read_text(path), newline="")


class _Grouper:
    """Collect ``(source, reference)`` pairs into :class:`DataToTextExample` s in first-seen order.

    With ``group=False`` every :meth:`start` opens a new example, even for a repeated source.
    """

    def __init__(self, group: bool) -> None:
        self.group = group
        self._by_key: dict[Any, DataToTextExample] = {}
        self._order: list[DataToTextExample] = []

    def start(self, source: str, category: str | None, meta: dict) -> tuple[DataToTextExample, bool]:
        """Return ``(example, is_new)`` for ``source``, creating it with ``category``/``meta`` when new."""
        key: Any = source if self.group else len(self._order)
        ex = self._by_key.get(key)
        if ex is not None:
            return ex, False
        ex = DataToTextExample(source=source, references=[], category=category, meta=meta)
        self._by_key[key] = ex
        self._order.append(ex)
        return ex, True

    def result(self) -> list[DataToTextExample]:
        return self._order


def _fail(path: str, where: str, what: str) -> DataFormatError:
    """Build a DataFormatError ``"<path>, <where>: <what>"``."""
    return DataFormatError(f"{path}, {where}: {what}")
