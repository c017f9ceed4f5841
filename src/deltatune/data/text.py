"""Generic classification CSV/TSV reader (AG News and the like) and the WikiText-2 reader."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence

from ..errors import DataFormatError, DeltaConfigError, DeltaConfigTypeError
from ..validation import check_bool, check_type
from .base import TextPairExample, _check_input_file, _fail, _open_text, _read_text

__all__ = ["read_classification_csv", "read_wikitext", "read_wikitext_lines"]


def _column_index(name: str, col: int | str, header: list[str] | None, path: str) -> int:
    if isinstance(col, bool) or not isinstance(col, (int, str)):
        raise DeltaConfigTypeError(f"{name} must be a column index (int) or a header name (str), got {col!r}")
    if isinstance(col, int):
        if col < 0:
            raise DeltaConfigError(f"{name} must be an int >= 0, got {col}")
        return col
    if header is None:
        raise DeltaConfigError(f"{name} is the header name {col!r} but has_header is False; use a column index")
    if col not in header:
        raise _fail(path, "line 1", f"{name} {col!r} is not in the header {header!r}")
    return header.index(col)


def _default_label_map(raw_labels: list[str]) -> dict[str, int]:
    unique = set(raw_labels)
    try:
        ordered = sorted(unique, key=lambda s: (float(s), s))
    except ValueError:
        ordered = sorted(unique)
    return {lab: i for i, lab in enumerate(ordered)}


def read_classification_csv(
    path: str,
    *,
    text_columns: Sequence[int | str],
    label_column: int | str | None,
    has_header: bool = False,
    delimiter: str = ",",
    label_map: Mapping[str, int] | None = None,
    join_with: str | None = None,
) -> tuple[list[TextPairExample], dict[str, int]]:
    """Read a classification CSV/TSV into :class:`TextPairExample` s with labels ``0..K-1``.

    AG News (``test.csv``: no header; class index 1–4, title, description) is read with
    ``text_columns=[1, 2], label_column=0`` (title and description as a pair) or with ``join_with=" "``
    (both in ``text_a``); its labels become ``{"1": 0, "2": 1, "3": 2, "4": 3}``.

    Args:
        path: the file (standard CSV quoting; use ``delimiter="\\t"`` for TSV).
        text_columns: one or two columns (index or header name) for ``text_a``/``text_b``; with ``join_with``
            any number of columns, joined into ``text_a``.
        label_column: the label column, or ``None`` for unlabeled data (labels ``None``).
        has_header: whether the first row is a header (needed for column names).
        delimiter: the field separator.
        label_map: raw label string → class id. ``None`` builds it from the labels found: sorted
            numerically when every label is a number (so ``"1".."4"`` map to ``0..3``), else alphabetically.
        join_with: join all text columns with this string into ``text_a``.

    Returns:
        ``(examples, label_map)``; the map is the one used (``{}`` when ``label_column`` is ``None``).

    Raises:
        DataFormatError: a row with too few fields, an empty text or a label missing from ``label_map``
            (file and line).
    """
    path = _check_input_file("path", path)
    check_bool("has_header", has_header)
    check_type("delimiter", delimiter, str, "a one-character str")
    if len(delimiter) != 1:
        raise DeltaConfigError(f"delimiter must be a one-character str, got {delimiter!r}")
    if isinstance(text_columns, (str, int)) or not isinstance(text_columns, Sequence) or not text_columns:
        raise DeltaConfigTypeError(f"text_columns must be a non-empty list of column indices/names, got {text_columns!r}")
    if join_with is None and len(text_columns) > 2:
        raise DeltaConfigError(
            f"text_columns must have 1 or 2 columns unless join_with is given, got {len(text_columns)}"
        )
    if join_with is not None:
        check_type("join_with", join_with, str, "a str or None")
    if label_map is not None:
        if not isinstance(label_map, Mapping):
            raise DeltaConfigTypeError(f"label_map must be a dict of str -> int, got {type(label_map).__name__}")
        for k, v in label_map.items():
            if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise DeltaConfigTypeError(f"label_map must map str -> int >= 0, got {k!r}: {v!r}")
    rows: list[tuple[int, list[str], str | None]] = []
    with _open_text(path) as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        header: list[str] | None = None
        start = 1
        try:
            if has_header:
                header = [h.lstrip("\ufeff").strip() for h in next(reader, [])]
                start = reader.line_num + 1
            tidx = [_column_index(f"text_columns[{i}]", c, header, path) for i, c in enumerate(text_columns)]
            lidx = None if label_column is None else _column_index("label_column", label_column, header, path)
            need = max(tidx + ([lidx] if lidx is not None else [])) + 1
            for row in reader:
                lineno, start = start, reader.line_num + 1
                if not row:
                    continue
                if len(row) < need:
                    raise _fail(path, f"line {lineno}", f"expected at least {need} fields, got {len(row)}: {row!r}")
                texts = [row[i].strip() for i in tidx]
                if join_with is not None:
                    texts = [join_with.join(texts)]
                if not texts[0]:
                    raise _fail(path, f"line {lineno}", "empty text")
                rows.append((lineno, texts, None if lidx is None else row[lidx].strip()))
        except csv.Error as exc:
            raise _fail(path, f"line {start}", f"CSV error: {exc}") from None
    if label_column is None:
        used: dict[str, int] = {}
    elif label_map is None:
        used = _default_label_map([r[2] for r in rows])  # type: ignore[misc]
    else:
        used = dict(label_map)
    examples = []
    for lineno, texts, raw in rows:
        label = None
        if raw is not None:
            if raw not in used:
                raise DataFormatError(f"{path}, line {lineno}: label {raw!r} is not in label_map {sorted(used)}")
            label = used[raw]
        examples.append(TextPairExample(texts[0], texts[1] if len(texts) == 2 else None, label))
    return examples, used


def read_wikitext_lines(path: str) -> list[str]:
    """Read a WikiText file into rows the way the Hugging Face ``wikitext`` dataset does.

    Every line of the file is one row: non-blank lines keep their text *and* trailing ``"\\n"``; blank
    (whitespace-only) lines become ``""``. The tokenised v1 text is kept as is: ``<unk>`` stays a literal
    string and no ``<eos>`` is added (the ``<eos>`` of word-level LM setups is not in the file).
    """
    path = _check_input_file("path", path)
    # bad UTF-8 or a NUL byte: DataFormatError naming the file and line (_read_text)
    return [line if line.strip() else "" for line in io.StringIO(_read_text(path), newline="\n")]


def read_wikitext(path: str, *, joiner: str = "\n\n") -> str:
    """Read a WikiText file (``wiki.*.tokens``) as one string for perplexity evaluation with an HF tokenizer.

    Reproduces the Hugging Face perplexity recipe: the rows of :func:`read_wikitext_lines` joined with
    ``"\\n\\n"`` (``joiner``). Tokenise the result once and slide a window over it.
    """
    check_type("joiner", joiner, str, "a str")
    return joiner.join(read_wikitext_lines(path))
