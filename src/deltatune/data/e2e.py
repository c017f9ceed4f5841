"""E2E NLG Challenge readers: the official CSV files and the LoRA-repository text format.

Both readers produce the same ``source`` string for the same meaning representation (MR), in the
LoRA / Prefix-Tuning style ``name : The Eagle | Type : coffee shop | price : less than £ 20 | ...``:

* attributes keep their MR order and are joined as ``key : value`` with ``" | "``;
* keys are renamed eatType→``Type``, priceRange→``price``, familyFriendly→``family friendly``
  (``customer rating`` and the others are kept);
* values from the CSV are tokenised the way the LoRA files were preprocessed: ``£`` is split from a
  following digit and a hyphen between digits is spaced (``£20-25`` → ``£ 20 - 25``). On the real data
  this makes every CSV source equal to the corresponding ``lora_*.txt`` source.

Category (stratification key): the ``eatType`` value (``restaurant``, ``pub``, ``coffee shop``), or
``"unknown"`` when the MR has no ``eatType``.
"""

from __future__ import annotations

import csv
import re

from ..validation import check_bool
from .base import DataToTextExample, _check_input_file, _fail, _Grouper, _open_text

__all__ = [
    "E2E_KEY_RENAMES",
    "E2E_UNKNOWN_CATEGORY",
    "linearize_e2e_mr",
    "parse_e2e_mr",
    "read_e2e_csv",
    "read_e2e_lora",
]

#: Key renames of the LoRA-format E2E files (official MR key → LoRA key).
E2E_KEY_RENAMES: dict[str, str] = {
    "eatType": "Type",
    "priceRange": "price",
    "customer rating": "customer rating",
    "familyFriendly": "family friendly",
}
#: Category used for E2E inputs without an ``eatType`` attribute.
E2E_UNKNOWN_CATEGORY = "unknown"

_ATTR_RE = re.compile(r"\s*([^\[\],]+?)\s*\[([^\[\]]*)\]\s*")
_POUND_RE = re.compile(r"£(?=\d)")
_RANGE_RE = re.compile(r"(?<=\d)-(?=\d)")


def parse_e2e_mr(mr: str) -> list[tuple[str, str]]:
    """Parse an official MR ``"name[The Eagle], eatType[pub], ..."`` into ``[(key, value), ...]``.

    Raises:
        ValueError: when the string is not a comma-separated list of ``key[value]`` attributes
            (the readers turn this into a :class:`~deltatune.errors.DataFormatError` naming file and row).
    """
    pairs: list[tuple[str, str]] = []
    pos = 0
    text = mr.strip()
    if not text:
        raise ValueError("empty meaning representation")
    while True:
        m = _ATTR_RE.match(text, pos)
        if m is None:
            raise ValueError(f"cannot parse MR attribute at character {pos}: {text[pos:pos + 40]!r}")
        pairs.append((m.group(1), m.group(2).strip()))
        pos = m.end()
        if pos == len(text):
            return pairs
        if text[pos] != ",":
            raise ValueError(f"expected ',' between MR attributes at character {pos}: {text[pos:pos + 40]!r}")
        pos += 1


def _tokenize_value(value: str) -> str:
    return _RANGE_RE.sub(" - ", _POUND_RE.sub("£ ", value))


def linearize_e2e_mr(pairs: list[tuple[str, str]], *, tokenize_values: bool = True) -> str:
    """Linearise parsed MR attributes in the LoRA style (``key : value`` joined by ``" | "``).

    Args:
        pairs: ``(key, value)`` pairs as returned by :func:`parse_e2e_mr`.
        tokenize_values: apply the LoRA-file value tokenisation (``£20-25`` → ``£ 20 - 25``).
    """
    parts = []
    for key, value in pairs:
        value = _tokenize_value(value) if tokenize_values else value
        parts.append(f"{E2E_KEY_RENAMES.get(key, key)} : {value}")
    return " | ".join(parts)


def read_e2e_csv(path: str, *, group: bool = True, tokenize_values: bool = True) -> list[DataToTextExample]:
    """Read an official E2E CSV (``mr,ref`` columns, or a single ``MR`` column for ``testset.csv``).

    Args:
        path: the CSV file.
        group: merge rows with the same MR into one example (first-seen order); ``False`` gives one
            example per row.
        tokenize_values: see :func:`linearize_e2e_mr`.

    Returns:
        One :class:`DataToTextExample` per distinct MR; ``references`` is empty for an MR-only file.
        ``meta["mr"]`` keeps the original MR string.

    Raises:
        DataFormatError: bad header, wrong number of fields, unparsable MR or empty reference; the
            message names the file and the line where the CSV record starts.
    """
    path = _check_input_file("path", path)
    check_bool("group", group)
    check_bool("tokenize_values", tokenize_values)
    grouper = _Grouper(group)
    with _open_text(path) as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise _fail(path, "line 1", "empty file (expected a header 'mr,ref' or 'MR')") from None
        except csv.Error as exc:
            raise _fail(path, "line 1", f"CSV error: {exc}") from None
        names = [h.strip().lstrip("\ufeff").lower() for h in header]
        if names == ["mr", "ref"]:
            has_ref = True
        elif names == ["mr"]:
            has_ref = False
        else:
            raise _fail(path, "line 1", f"expected the header 'mr,ref' or 'MR', got {header!r}")
        width = 2 if has_ref else 1
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                raise _fail(path, f"line {start}", f"CSV error: {exc}") from None
            if not row:  # blank line
                continue
            if len(row) != width:
                raise _fail(path, f"line {start}", f"expected {width} field(s), got {len(row)}: {row!r}")
            mr = row[0]
            try:
                pairs = parse_e2e_mr(mr)
            except ValueError as exc:
                raise _fail(path, f"line {start}", str(exc)) from None
            category = next((v for k, v in pairs if k == "eatType"), E2E_UNKNOWN_CATEGORY)
            source = linearize_e2e_mr(pairs, tokenize_values=tokenize_values)
            ex, _ = grouper.start(source, category, {"mr": mr.strip()})
            if has_ref:
                ref = row[1].strip()
                if not ref:
                    raise _fail(path, f"line {start}", "empty reference")
                ex.references.append(ref)
    if not grouper.result():
        raise _fail(path, "line 2", "no data rows after the header (expected at least one MR)")
    return grouper.result()


def read_e2e_lora(path: str, *, group: bool = True) -> list[DataToTextExample]:
    """Read a LoRA-format E2E text file: one ``name : X | Type : Y | ... ||reference`` line per reference.

    The reference is the text after the first ``||``, stripped (as the LoRA converter does). Blank lines
    are skipped. Category: the ``Type`` value, or ``"unknown"``.

    Raises:
        DataFormatError: a line without ``||``, an empty source or reference, or a source segment that
            is not ``key : value``; the message names the file and the line number.
    """
    path = _check_input_file("path", path)
    check_bool("group", group)
    grouper = _Grouper(group)
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if "||" not in line:
                raise _fail(path, f"line {lineno}", "expected 'source ||reference', found no '||'")
            source, ref = line.split("||", 1)
            source, ref = source.strip(), ref.strip()
            if not source:
                raise _fail(path, f"line {lineno}", "empty source before '||'")
            if not ref:
                raise _fail(path, f"line {lineno}", "empty reference after '||'")
            category = E2E_UNKNOWN_CATEGORY
            for seg in source.split(" | "):
                if " : " not in seg:
                    raise _fail(path, f"line {lineno}", f"source segment {seg!r} is not 'key : value'")
                key, value = seg.split(" : ", 1)
                if key == "Type":
                    category = value
            ex, _ = grouper.start(source, category, {})
            ex.references.append(ref)
    if not grouper.result():
        raise _fail(path, "line 1", "no examples (expected 'source ||reference' lines)")
    return grouper.result()
