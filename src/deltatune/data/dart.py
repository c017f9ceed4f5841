"""DART v1.1.1 readers: the JSON release (``dart-v1.1.1-full-*.json``) and the XML release.

Linearisation follows the LoRA repository's DART converter (behaviour only): ``"subject : predicate :
object"`` joined with ``" | "``, with the predicate lower-cased (``JOINED`` → ``joined``). Every annotation
is a reference. Both formats give the same ``source`` strings for the same tripleset.

``category`` is the *family* of the first annotation's source (``WikiSQL_decl_sents`` → ``WikiSQL``,
``WikiTableQuestions_mturk`` → ``WikiTableQuestions``, ``e2e``, ``webnlg``: the text before the first
``_``); ``meta["sources"]`` keeps the raw source of every reference and ``meta["eids"]`` the merged entries.
Empty annotations (the v1.1.1 test XML has one, ``<lex .../>`` in entry ``Id116``) are skipped and counted
in ``meta["empty_references"]``.
"""

from __future__ import annotations

import json
from typing import Any

from ..validation import check_bool
from .base import DataToTextExample, _check_input_file, _fail, _Grouper, _open_text
from .webnlg import _parse_xml, _split_mtriple, linearize_triples

__all__ = ["dart_source_family", "read_dart_json", "read_dart_xml"]


def dart_source_family(source: str | None) -> str:
    """Map a DART annotation source to its family (the text before the first ``_``; ``"unknown"`` if empty)."""
    if not source:
        return "unknown"
    return source.split("_", 1)[0]


def _add(grouper: _Grouper, triples: list, refs: list[str], sources: list[str], eid: Any, empty: int) -> None:
    source = linearize_triples(triples, lowercase_predicate=True)
    category = dart_source_family(sources[0] if sources else None)
    ex, _ = grouper.start(source, category, {"eids": [], "sources": []})
    ex.meta["eids"].append(eid)
    ex.meta["sources"].extend(sources)
    ex.references.extend(refs)
    if empty:
        ex.meta["empty_references"] = ex.meta.get("empty_references", 0) + empty


def read_dart_json(path: str, *, group: bool = True) -> list[DataToTextExample]:
    """Read a DART JSON file: a list of ``{"tripleset": [[s, p, o], ...], "annotations": [{"source", "text"}]}``.

    Args:
        path: the JSON file (``.json`` or ``.json.gz``).
        group: merge triplesets with an identical linearised source (first-seen order); ``False`` keeps
            one example per tripleset.

    Raises:
        DataFormatError: invalid JSON (file, line, column) or an entry of the wrong shape (file, ``entry #n``).
    """
    path = _check_input_file("path", path)
    check_bool("group", group)
    with _open_text(path) as fh:
        try:
            data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise _fail(path, f"line {exc.lineno}, column {exc.colno}", f"invalid JSON: {exc.msg}") from None
    if not isinstance(data, list):
        raise _fail(path, "top level", "expected a list of triplesets")
    grouper = _Grouper(group)
    for n, entry in enumerate(data, start=1):
        where = f"entry #{n}"
        if not isinstance(entry, dict):
            raise _fail(path, where, "entry must be an object")
        tset = entry.get("tripleset")
        if not isinstance(tset, list) or not tset:
            raise _fail(path, where, "'tripleset' must be a non-empty list")
        for t in tset:
            if not (isinstance(t, list) and len(t) == 3 and all(isinstance(x, str) for x in t)):
                raise _fail(path, where, f"triple must be a list of 3 strings, got {t!r}")
        anns = entry.get("annotations", [])
        if not isinstance(anns, list):
            raise _fail(path, where, "'annotations' must be a list")
        refs, sources, empty = [], [], 0
        for a in anns:
            if not isinstance(a, dict) or not isinstance(a.get("text"), str):
                raise _fail(path, where, f"annotation must have a string 'text', got {a!r}")
            if not a["text"].strip():
                empty += 1
                continue
            refs.append(a["text"].strip())
            sources.append(str(a.get("source", "")))
        _add(grouper, tset, refs, sources, n, empty)
    return grouper.result()


def read_dart_xml(path: str, *, group: bool = True) -> list[DataToTextExample]:
    """Read a DART XML file (WebNLG-like ``<entry>``/``<mtriple>``/``<lex comment=SOURCE>``).

    See :func:`read_dart_json` for ``group``; ``meta["eids"]`` holds the ``eid`` attributes.

    Raises:
        DataFormatError: malformed XML (file, line, column), an entry without ``mtriple`` or with a bad
            one (file and ``entry #n (eid=...)``).
    """
    path = _check_input_file("path", path)
    check_bool("group", group)
    root = _parse_xml(path)
    grouper = _Grouper(group)
    for n, entry in enumerate(root.iter("entry"), start=1):
        where = f"entry #{n} (eid={entry.get('eid')!r})"
        mset = entry.find("modifiedtripleset")
        mtriples = [] if mset is None else mset.findall("mtriple")
        if not mtriples:
            raise _fail(path, where, "no <modifiedtripleset>/<mtriple>")
        triples = [_split_mtriple(path, where, m.text) for m in mtriples]
        refs, sources, empty = [], [], 0
        for lex in entry.findall("lex"):
            text = (lex.text or "").strip()
            if not text:
                empty += 1
                continue
            refs.append(text)
            sources.append(lex.get("comment", ""))
        _add(grouper, triples, refs, sources, entry.get("eid"), empty)
    return grouper.result()
