"""WebNLG 2017 readers: the challenge XML (a file or a directory tree) and the LoRA JSON (``.json``/``.json.gz``).

Linearisation follows the LoRA repository's WebNLG converter (behaviour only): the *modified* triples of an
entry become ``"subject : property : object"`` joined with ``" | "``, with the DBpedia spelling kept
(underscores in entity names are not replaced). Only lexicalisations whose ``comment`` is ``"good"`` are
kept by default, as in that converter (``comments=None`` keeps every lexicalisation).

``category`` is the entry's DBpedia category and ``meta["seen"]`` says whether it is one of the ten
categories of the training data (the WebNLG 2017 test set adds five unseen categories).
``meta["eids"]`` lists the entry ids merged into the example, ``meta["size"]`` the triple count.
Empty lexicalisations are skipped and counted in ``meta["empty_references"]``.
"""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import Any

from ..errors import DeltaConfigError
from ..validation import check_bool, check_str_list, check_type
from .base import DataToTextExample, _check_input_file, _fail, _Grouper, _open_text

__all__ = [
    "WEBNLG_SEEN_CATEGORIES",
    "linearize_triples",
    "read_webnlg_json",
    "read_webnlg_xml",
]

#: The ten DBpedia categories of the WebNLG 2017 training data ("seen" categories).
WEBNLG_SEEN_CATEGORIES: tuple[str, ...] = (
    "Airport",
    "Astronaut",
    "Building",
    "City",
    "ComicsCharacter",
    "Food",
    "Monument",
    "SportsTeam",
    "University",
    "WrittenWork",
)


def linearize_triples(triples: Sequence[Sequence[str]], *, lowercase_predicate: bool = False) -> str:
    """Join ``(subject, predicate, object)`` triples as ``"s : p : o | s : p : o"`` (LoRA style)."""
    out = []
    for s, p, o in triples:
        out.append(f"{s} : {p.lower() if lowercase_predicate else p} : {o}")
    return " | ".join(out)


def _natural_key(path: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def _xml_files(path: str) -> list[str]:
    check_type("path", path, (str, os.PathLike), "a path (str or os.PathLike)")
    path = os.fspath(path)
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise DeltaConfigError(f"path must be an existing XML file or directory, got {path!r}")
    found = []
    for root, _dirs, files in os.walk(path):
        found.extend(os.path.join(root, f) for f in files if f.endswith(".xml"))
    if not found:
        raise DeltaConfigError(f"path must contain *.xml files, got the directory {path!r} without any")
    # 1triples, 2triples, ... 7triples, and alphabetical inside each folder (the order of the LoRA JSON).
    return sorted(found, key=lambda f: _natural_key(os.path.relpath(f, path)))


def _parse_xml(path: str) -> ET.Element:
    try:
        return ET.parse(path).getroot()
    except ET.ParseError as exc:
        line, col = exc.position
        raise _fail(path, f"line {line}, column {col}", f"malformed XML: {exc}") from None


def _split_mtriple(path: str, where: str, text: str | None) -> tuple[str, str, str]:
    parts = (text or "").strip().split(" | ")
    if len(parts) != 3 or not all(p.strip() for p in parts):
        raise _fail(path, where, f"mtriple must be 'subject | predicate | object', got {text!r}")
    return parts[0], parts[1], parts[2]


def _comments(comments: Any) -> set[str] | None:
    items = check_str_list("comments", comments, allow_none=True)
    return None if items is None else set(items)


def read_webnlg_xml(
    path: str, *, comments: Sequence[str] | None = ("good",), group: bool = True
) -> list[DataToTextExample]:
    """Read WebNLG 2017 challenge XML: one file, or every ``*.xml`` under a directory (natural sort order).

    Args:
        path: an XML file (e.g. ``testdata_with_lex.xml``) or a split directory (``xml/train``).
        comments: keep only lexicalisations with one of these ``comment`` values (``None``: keep all).
        group: merge entries with an identical linearised source (first-seen order).

    Raises:
        DataFormatError: malformed XML (file, line and column) or an entry without category, triples or
            with a bad ``mtriple`` (file and ``entry #n (eid=...)``).
    """
    files = _xml_files(path)
    keep = _comments(comments)
    check_bool("group", group)
    grouper = _Grouper(group)
    for file in files:
        root = _parse_xml(file)
        for n, entry in enumerate(root.iter("entry"), start=1):
            where = f"entry #{n} (eid={entry.get('eid')!r})"
            category = entry.get("category")
            if not category:
                raise _fail(file, where, "missing 'category' attribute")
            mset = entry.find("modifiedtripleset")
            mtriples = [] if mset is None else mset.findall("mtriple")
            if not mtriples:
                raise _fail(file, where, "no <modifiedtripleset>/<mtriple>")
            triples = [_split_mtriple(file, where, m.text) for m in mtriples]
            refs, empty = [], 0
            for lex in entry.findall("lex"):
                if keep is not None and lex.get("comment") not in keep:
                    continue
                text = (lex.text or "").strip()
                if not text:
                    empty += 1
                    continue
                refs.append(text)
            source = linearize_triples(triples)
            meta = {"eids": [], "seen": category in WEBNLG_SEEN_CATEGORIES, "size": len(triples)}
            ex, _ = grouper.start(source, category, meta)
            ex.meta["eids"].append(entry.get("eid"))
            ex.references.extend(refs)
            if empty:
                ex.meta["empty_references"] = ex.meta.get("empty_references", 0) + empty
    return grouper.result()


def read_webnlg_json(
    path: str, *, comments: Sequence[str] | None = ("good",), group: bool = True
) -> list[DataToTextExample]:
    """Read the LoRA / WebNLG-corpus-reader JSON (``{"entries": [{"1": {...}}, {"2": {...}}, ...]}``).

    ``.json.gz`` files are read transparently. Each entry needs ``category``, ``modifiedtripleset``
    (``subject``/``property``/``object`` dicts) and ``lexicalisations`` (``lex``/``comment`` dicts).
    See :func:`read_webnlg_xml` for ``comments`` and ``group``; ``meta["eids"]`` holds the entry keys.

    Raises:
        DataFormatError: invalid JSON (file, line, column) or an entry of the wrong shape (file and
            ``entry #n (key ...)``).
    """
    path = _check_input_file("path", path)
    keep = _comments(comments)
    check_bool("group", group)
    with _open_text(path) as fh:
        try:
            data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise _fail(path, f"line {exc.lineno}, column {exc.colno}", f"invalid JSON: {exc.msg}") from None
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        raise _fail(path, "top level", 'expected an object {"entries": [...]}')
    grouper = _Grouper(group)
    for n, item in enumerate(data["entries"], start=1):
        if not isinstance(item, dict) or len(item) != 1:
            raise _fail(path, f"entry #{n}", "expected an object with exactly one key")
        ((key, entry),) = item.items()
        where = f"entry #{n} (key {key!r})"
        if not isinstance(entry, dict):
            raise _fail(path, where, "entry must be an object")
        category = entry.get("category")
        if not isinstance(category, str) or not category:
            raise _fail(path, where, "missing or non-string 'category'")
        mset = entry.get("modifiedtripleset")
        if not isinstance(mset, list) or not mset:
            raise _fail(path, where, "'modifiedtripleset' must be a non-empty list")
        triples = []
        for t in mset:
            if not isinstance(t, dict) or not all(isinstance(t.get(k), str) for k in ("subject", "property", "object")):
                raise _fail(path, where, f"triple must have string subject/property/object, got {t!r}")
            triples.append((t["subject"], t["property"], t["object"]))
        lexes = entry.get("lexicalisations", [])
        if not isinstance(lexes, list):
            raise _fail(path, where, "'lexicalisations' must be a list")
        refs, empty = [], 0
        for lex in lexes:
            if not isinstance(lex, dict) or not isinstance(lex.get("lex"), str):
                raise _fail(path, where, f"lexicalisation must have a string 'lex', got {lex!r}")
            if keep is not None and lex.get("comment") not in keep:
                continue
            text = lex["lex"].strip()
            if not text:
                empty += 1
                continue
            refs.append(text)
        source = linearize_triples(triples)
        meta = {"eids": [], "seen": category in WEBNLG_SEEN_CATEGORIES, "size": len(triples)}
        ex, _ = grouper.start(source, category, meta)
        ex.meta["eids"].append(key)
        ex.references.extend(refs)
        if empty:
            ex.meta["empty_references"] = ex.meta.get("empty_references", 0) + empty
    return grouper.result()
