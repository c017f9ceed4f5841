"""WebNLG 2017 (XML + LoRA JSON) and DART (JSON + XML) readers on fixtures in the official shapes."""

from __future__ import annotations

import gzip
import json

import pytest

from deltatune.data import (
    WEBNLG_SEEN_CATEGORIES,
    dart_source_family,
    linearize_triples,
    read_dart_json,
    read_dart_xml,
    read_webnlg_json,
    read_webnlg_xml,
)
from deltatune.errors import DataFormatError, DeltaConfigError

XML_HEAD = "<?xml version='1.0' encoding='UTF-8'?>\n<benchmark>\n  <entries>\n"
XML_TAIL = "  </entries>\n</benchmark>\n"


def _entry(category, eid, mtriples, lexes, otriples=True):
    out = [f'    <entry category="{category}" eid="{eid}" size="{len(mtriples)}">']
    if otriples:
        out.append("      <originaltripleset>")
        out += [f"        <otriple>{t}</otriple>" for t in mtriples]
        out.append("      </originaltripleset>")
    out.append("      <modifiedtripleset>")
    out += [f"        <mtriple>{t}</mtriple>" for t in mtriples]
    out.append("      </modifiedtripleset>")
    for i, (comment, text) in enumerate(lexes, start=1):
        out.append(f'      <lex comment="{comment}" lid="Id{i}">{text}</lex>')
    out.append("    </entry>")
    return "\n".join(out) + "\n"


# (category, eid, mtriples, lexes) in the order the LoRA JSON would list them
ENTRIES_2 = [
    ("Airport", "Id1", ["Aarhus_Airport | cityServed | Aarhus,_Denmark", "Aarhus | leaderName | Jacob_Bundsgaard"],
     [("good", "Aarhus Airport serves Aarhus, Denmark, led by Jacob Bundsgaard."), ("toFix", "Aarhus airport ok")]),
]
ENTRIES_10 = [
    ("Athlete", "Id1", ["A | club | B"] * 2 + ["A | height | 1.8"] * 8, [("good", "A plays for B &amp; is 1.8 m.")]),
]
ENTRIES_1 = [
    ("Food", "Id1", ["Bakso | country | Indonesia"], [("good", "Bakso is from Indonesia.")]),
    ("Food", "Id2", ["Bakso | country | Indonesia"], [("good", "Bakso comes from Indonesia.")]),
    ("Astronaut", "Id3", ["Buzz_Aldrin | birthPlace | Glen_Ridge,_New_Jersey"], [("toFix", "Buzz was born.")]),
]


def _write_xml_tree(tmp_path):
    root = tmp_path / "xml" / "dev"
    for folder, fname, entries in [
        ("10triples", "10triples_Athlete_dev_challenge.xml", ENTRIES_10),
        ("2triples", "2triples_Airport_dev_challenge.xml", ENTRIES_2),
        ("1triples", "1triple_allSolutions_Food_dev_challenge.xml", ENTRIES_1),
    ]:
        (root / folder).mkdir(parents=True)
        (root / folder / fname).write_text(XML_HEAD + "".join(_entry(*e) for e in entries) + XML_TAIL, "utf-8")
    return root


def _json_entries():
    """The same entries as the XML tree, in natural file order, in the LoRA JSON shape."""
    out = []
    for cat, _eid, mtriples, lexes in ENTRIES_1 + ENTRIES_2 + ENTRIES_10:
        triples = [dict(zip(("subject", "property", "object"), t.split(" | "))) for t in mtriples]
        n = len(out) + 1
        out.append({str(n): {
            "category": cat, "dbpedialinks": [], "links": [], "modifiedtripleset": triples,
            "originaltriplesets": {"originaltripleset": [triples]}, "shape": "NA", "shape_type": "NA",
            "size": str(len(triples)), "xml_id": f"Id{n}",
            "lexicalisations": [{"comment": c, "lang": "", "lex": t.replace("&amp;", "&"), "xml_id": f"Id{i}"}
                                for i, (c, t) in enumerate(lexes, start=1)],
        }})
    return {"entries": out}


def test_linearize_triples():
    assert linearize_triples([("A_b", "p", "C"), ("D", "q", "E")]) == "A_b : p : C | D : q : E"
    assert linearize_triples([("A", "JOINED", "1973")], lowercase_predicate=True) == "A : joined : 1973"


def test_webnlg_xml_directory_natural_order_grouping_and_seen(tmp_path):
    exs = read_webnlg_xml(str(_write_xml_tree(tmp_path)))
    assert [e.source for e in exs] == [
        "Bakso : country : Indonesia",
        "Buzz_Aldrin : birthPlace : Glen_Ridge,_New_Jersey",
        "Aarhus_Airport : cityServed : Aarhus,_Denmark | Aarhus : leaderName : Jacob_Bundsgaard",
        " | ".join(["A : club : B"] * 2 + ["A : height : 1.8"] * 8),
    ]
    assert exs[0].references == ["Bakso is from Indonesia.", "Bakso comes from Indonesia."]
    assert exs[0].meta["eids"] == ["Id1", "Id2"]
    assert exs[1].references == []  # only a "toFix" lexicalisation
    assert exs[2].references == ["Aarhus Airport serves Aarhus, Denmark, led by Jacob Bundsgaard."]
    assert exs[3].references == ["A plays for B & is 1.8 m."]
    assert [e.category for e in exs] == ["Food", "Astronaut", "Airport", "Athlete"]
    assert [e.meta["seen"] for e in exs] == [True, True, True, False]
    assert "Athlete" not in WEBNLG_SEEN_CATEGORIES and len(WEBNLG_SEEN_CATEGORIES) == 10
    assert exs[2].meta["size"] == 2


def test_webnlg_xml_keep_all_comments_and_ungrouped(tmp_path):
    root = _write_xml_tree(tmp_path)
    exs = read_webnlg_xml(str(root), comments=None, group=False)
    assert len(exs) == 5
    assert exs[2].references == ["Buzz was born."]
    assert exs[3].references[1] == "Aarhus airport ok"


def test_webnlg_json_matches_xml_plain_and_gz(tmp_path):
    root = _write_xml_tree(tmp_path)
    data = _json_entries()
    p = tmp_path / "lora_dev.json"
    p.write_text(json.dumps(data, indent=4, sort_keys=True, ensure_ascii=False), "utf-8")
    gz = tmp_path / "lora_train.json.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as fh:
        json.dump(data, fh)
    x = read_webnlg_xml(str(root))
    for path in (p, gz):
        j = read_webnlg_json(str(path))
        assert [(e.source, e.references, e.category, e.meta["seen"]) for e in j] == [
            (e.source, e.references, e.category, e.meta["seen"]) for e in x
        ]
        assert j[0].meta["eids"] == ["1", "2"]


def test_webnlg_single_file(tmp_path):
    f = tmp_path / "testdata_with_lex.xml"
    f.write_text(XML_HEAD + _entry(*ENTRIES_2[0], otriples=False) + XML_TAIL, "utf-8")
    (e,) = read_webnlg_xml(str(f))
    assert e.category == "Airport" and len(e.references) == 1


def test_webnlg_xml_malformed(tmp_path):
    f = tmp_path / "broken.xml"
    f.write_text(XML_HEAD + "    <entry category='Food' eid='Id1'>\n      <modifiedtripleset>\n" + XML_TAIL, "utf-8")
    with pytest.raises(DataFormatError, match=r"broken\.xml, line \d+, column \d+: malformed XML"):
        read_webnlg_xml(str(f))
    f = tmp_path / "nocat.xml"
    f.write_text(XML_HEAD + _entry(*ENTRIES_1[0]) + _entry("", "Id7", ["a | b | c"], []) + XML_TAIL, "utf-8")
    with pytest.raises(DataFormatError, match=r"nocat\.xml, entry #2 \(eid='Id7'\): missing 'category'"):
        read_webnlg_xml(str(f))
    f = tmp_path / "badtriple.xml"
    f.write_text(XML_HEAD + _entry("Food", "Id3", ["Bakso | country"], []) + XML_TAIL, "utf-8")
    with pytest.raises(DataFormatError, match=r"badtriple\.xml, entry #1 \(eid='Id3'\): mtriple must be"):
        read_webnlg_xml(str(f))
    f = tmp_path / "notriples.xml"
    f.write_text(XML_HEAD + '    <entry category="Food" eid="Id4" size="0"></entry>\n' + XML_TAIL, "utf-8")
    with pytest.raises(DataFormatError, match=r"notriples\.xml, entry #1 \(eid='Id4'\): no <modifiedtripleset>"):
        read_webnlg_xml(str(f))
    empty = tmp_path / "emptydir"
    empty.mkdir()
    with pytest.raises(DeltaConfigError, match="without any"):
        read_webnlg_xml(str(empty))


def test_webnlg_json_malformed(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text('{"entries": [\n  {"1": {"category": "Food",}}\n]}', "utf-8")
    with pytest.raises(DataFormatError, match=r"bad\.json, line 2, column \d+: invalid JSON"):
        read_webnlg_json(str(f))
    data = _json_entries()
    del data["entries"][1]["2"]["modifiedtripleset"]
    f.write_text(json.dumps(data), "utf-8")
    with pytest.raises(DataFormatError, match=r"bad\.json, entry #2 \(key '2'\): 'modifiedtripleset' must be"):
        read_webnlg_json(str(f))
    f.write_text(json.dumps([1, 2]), "utf-8")
    with pytest.raises(DataFormatError, match=r"bad\.json, top level"):
        read_webnlg_json(str(f))
    with pytest.raises(DeltaConfigError, match=r"comments\[0\] must be a str"):
        read_webnlg_json(str(f), comments=[1])


DART_JSON = [
    {"tripleset": [["Mars Hill College", "JOINED", "1973"], ["Mars Hill College", "LOCATION", "Mars Hill, NC"]],
     "subtree_was_extended": True,
     "annotations": [{"source": "WikiSQL_decl_sents", "text": "A school from Mars Hill, NC, joined in 1973."}]},
    {"tripleset": [["Alimentum", "area", "city centre"]],
     "annotations": [{"source": "e2e", "text": "Alimentum is in the city centre."},
                     {"source": "e2e", "text": "   "}]},
    {"tripleset": [["Mars Hill College", "JOINED", "1973"], ["Mars Hill College", "LOCATION", "Mars Hill, NC"]],
     "annotations": [{"source": "WikiTableQuestions_mturk", "text": "Mars Hill College joined in 1973."}]},
]


def _dart_xml():
    parts = []
    for i, e in enumerate(DART_JSON, start=1):
        mt = [" | ".join(t) for t in e["tripleset"]]
        lexes = [(a["source"], a["text"].strip()) for a in e["annotations"]]
        parts.append(_entry("MISC", f"Id{i}", mt, lexes, otriples=False))
    return XML_HEAD + "".join(parts) + XML_TAIL


def test_dart_json_and_xml_agree(tmp_path):
    jp = tmp_path / "dart-v1.1.1-full-dev.json"
    jp.write_text(json.dumps(DART_JSON, indent=2), "utf-8")
    xp = tmp_path / "dart-v1.1.1-full-dev.xml"
    xp.write_text(_dart_xml(), "utf-8")
    j, x = read_dart_json(str(jp)), read_dart_xml(str(xp))
    src0 = "Mars Hill College : joined : 1973 | Mars Hill College : location : Mars Hill, NC"
    assert [e.source for e in j] == [src0, "Alimentum : area : city centre"]
    assert j[0].references == ["A school from Mars Hill, NC, joined in 1973.", "Mars Hill College joined in 1973."]
    assert j[0].category == "WikiSQL"
    assert j[0].meta["sources"] == ["WikiSQL_decl_sents", "WikiTableQuestions_mturk"]
    assert j[0].meta["eids"] == [1, 3]
    assert j[1].references == ["Alimentum is in the city centre."]
    assert j[1].meta["empty_references"] == 1 and x[1].meta["empty_references"] == 1
    assert [(e.source, e.references, e.category, e.meta["sources"]) for e in x] == [
        (e.source, e.references, e.category, e.meta["sources"]) for e in j
    ]
    assert x[0].meta["eids"] == ["Id1", "Id3"]
    assert len(read_dart_json(str(jp), group=False)) == 3


def test_dart_source_family():
    assert dart_source_family("WikiTableQuestions_lily") == "WikiTableQuestions"
    assert dart_source_family("webnlg") == "webnlg"
    assert dart_source_family("") == "unknown"


def test_dart_malformed(tmp_path):
    f = tmp_path / "d.json"
    bad = json.loads(json.dumps(DART_JSON))
    bad[2]["tripleset"][1] = ["only", "two"]
    f.write_text(json.dumps(bad), "utf-8")
    with pytest.raises(DataFormatError, match=r"d\.json, entry #3: triple must be a list of 3 strings"):
        read_dart_json(str(f))
    f.write_text(json.dumps({"tripleset": []}), "utf-8")
    with pytest.raises(DataFormatError, match=r"d\.json, top level: expected a list"):
        read_dart_json(str(f))
    bad = json.loads(json.dumps(DART_JSON))
    bad[0]["annotations"] = [{"source": "e2e"}]
    f.write_text(json.dumps(bad), "utf-8")
    with pytest.raises(DataFormatError, match=r"d\.json, entry #1: annotation must have a string 'text'"):
        read_dart_json(str(f))
    x = tmp_path / "d.xml"
    x.write_text(XML_HEAD + '    <entry category="MISC" eid="Id9" size="1">\n    </entry>\n' + XML_TAIL, "utf-8")
    with pytest.raises(DataFormatError, match=r"d\.xml, entry #1 \(eid='Id9'\): no <modifiedtripleset>"):
        read_dart_xml(str(x))


def test_webnlg_xml_counts_empty_references_per_entry(tmp_path):
    from deltatune.data import read_webnlg_xml

    xml = """<?xml version="1.0" ?>
<benchmark><entries>
<entry category="Airport" eid="Id1" size="1">
<modifiedtripleset><mtriple>A | b | C</mtriple></modifiedtripleset>
<lex comment="good" lid="Id1"></lex><lex comment="good" lid="Id2">A b C.</lex>
</entry>
<entry category="Airport" eid="Id2" size="1">
<modifiedtripleset><mtriple>D | e | F</mtriple></modifiedtripleset>
<lex comment="good" lid="Id1">D e F.</lex>
</entry>
</entries></benchmark>"""
    (tmp_path / "a.xml").write_text(xml)
    (tmp_path / "b.xml").write_text('<?xml version="1.0" ?>\n<benchmark><entries></entries></benchmark>')
    examples = read_webnlg_xml(tmp_path)
    assert [e.references for e in examples] == [["A b C."], ["D e F."]]
    assert examples[0].meta.get("empty_references") == 1 and "empty_references" not in examples[1].meta
