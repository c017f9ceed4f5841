"""E2E readers: official CSV and LoRA text format, on fixture files written in the official shapes."""

from __future__ import annotations

import pytest

from deltatune.data import (
    E2E_UNKNOWN_CATEGORY,
    DataToTextExample,
    linearize_e2e_mr,
    parse_e2e_mr,
    read_e2e_csv,
    read_e2e_lora,
)
from deltatune.errors import DataFormatError, DeltaConfigError

# Same shape as devset.csv: header "mr,ref", quoted MR, refs quoted only when needed, one ref spans two lines.
TRAIN_CSV = (
    "mr,ref\n"
    '"name[The Eagle], eatType[pub], priceRange[£20-25], customer rating[5 out of 5], familyFriendly[yes]",'
    "The Eagle is a pub.\n"
    '"name[The Eagle], eatType[pub], priceRange[£20-25], customer rating[5 out of 5], familyFriendly[yes]",'
    '"The Eagle, a pub,\nis nice."\n'
    '"name[Alimentum], area[city centre], near[Burger King]",Alimentum is in the city centre.\n'
    '"name[The Eagle], eatType[pub], priceRange[£20-25], customer rating[5 out of 5], familyFriendly[yes]",'
    "Eagle pub again.\n"
)
LORA_TXT = (
    "name : The Eagle | Type : pub | price : £ 20 - 25 | customer rating : 5 out of 5 | family friendly : yes"
    "||The Eagle is a pub . \n"
    "name : The Eagle | Type : pub | price : £ 20 - 25 | customer rating : 5 out of 5 | family friendly : yes"
    "||The Eagle , a pub , is nice . \n"
    "name : Alimentum | area : city centre | near : Burger King||Alimentum is in the city centre . \n"
    "name : The Eagle | Type : pub | price : £ 20 - 25 | customer rating : 5 out of 5 | family friendly : yes"
    "||Eagle pub again . \n"
)
EAGLE = "name : The Eagle | Type : pub | price : £ 20 - 25 | customer rating : 5 out of 5 | family friendly : yes"
ALIMENTUM = "name : Alimentum | area : city centre | near : Burger King"


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


def test_parse_and_linearize_mr():
    pairs = parse_e2e_mr("name[The Eagle], eatType[coffee shop], priceRange[more than £30], area[riverside]")
    assert pairs == [("name", "The Eagle"), ("eatType", "coffee shop"), ("priceRange", "more than £30"),
                     ("area", "riverside")]
    assert linearize_e2e_mr(pairs) == (
        "name : The Eagle | Type : coffee shop | price : more than £ 30 | area : riverside"
    )
    assert linearize_e2e_mr(pairs, tokenize_values=False).endswith("price : more than £30 | area : riverside")
    assert linearize_e2e_mr([("familyFriendly", "no"), ("customer rating", "1 out of 5")]) == (
        "family friendly : no | customer rating : 1 out of 5"
    )


@pytest.mark.parametrize("bad", ["", "name[X", "name[X] eatType[pub]", "name[X],", "[X]"])
def test_parse_mr_rejects_malformed(bad):
    with pytest.raises(ValueError):
        parse_e2e_mr(bad)


def test_read_csv_groups_refs_in_first_seen_order(tmp_path):
    exs = read_e2e_csv(_write(tmp_path, "trainset.csv", TRAIN_CSV))
    assert [e.source for e in exs] == [EAGLE, ALIMENTUM]
    assert exs[0].references == ["The Eagle is a pub.", "The Eagle, a pub,\nis nice.", "Eagle pub again."]
    assert exs[1].references == ["Alimentum is in the city centre."]
    assert exs[0].category == "pub"
    assert exs[1].category == E2E_UNKNOWN_CATEGORY
    assert exs[1].meta["mr"] == "name[Alimentum], area[city centre], near[Burger King]"
    assert all(isinstance(e, DataToTextExample) for e in exs)


def test_read_csv_ungrouped_gives_one_example_per_row(tmp_path):
    exs = read_e2e_csv(_write(tmp_path, "trainset.csv", TRAIN_CSV), group=False)
    assert [e.source for e in exs] == [EAGLE, EAGLE, ALIMENTUM, EAGLE]
    assert [len(e.references) for e in exs] == [1, 1, 1, 1]


def test_csv_and_lora_formats_give_the_same_sources(tmp_path):
    a = read_e2e_csv(_write(tmp_path, "devset.csv", TRAIN_CSV))
    b = read_e2e_lora(_write(tmp_path, "lora_valid.txt", LORA_TXT))
    assert [e.source for e in a] == [e.source for e in b]
    assert [e.category for e in a] == [e.category for e in b]
    assert [len(e.references) for e in a] == [len(e.references) for e in b]
    # the LoRA converter strips the reference (the files end lines with a space)
    assert b[0].references[0] == "The Eagle is a pub ."


def test_testset_without_refs(tmp_path):
    text = 'MR\n"name[Blue Spice], eatType[coffee shop], area[city centre]"\n"name[Blue Spice], area[riverside]"\n'
    exs = read_e2e_csv(_write(tmp_path, "testset.csv", text))
    assert [e.source for e in exs] == [
        "name : Blue Spice | Type : coffee shop | area : city centre",
        "name : Blue Spice | area : riverside",
    ]
    assert [e.references for e in exs] == [[], []]
    assert [e.category for e in exs] == ["coffee shop", "unknown"]


def test_csv_bad_header(tmp_path):
    path = _write(tmp_path, "x.csv", "meaning,text\n\"name[A]\",hi\n")
    with pytest.raises(DataFormatError, match=r"x\.csv, line 1: expected the header 'mr,ref' or 'MR'"):
        read_e2e_csv(path)


def test_csv_wrong_field_count_names_the_record_start_line(tmp_path):
    # header (line 1), a record spanning lines 2-3, a good record on line 4, then a 3-field record on line 5
    bad = "mr,ref\n" + '"name[A]","two\nlines"\n' + '"name[B]",fine\n' + '"name[C]",a,b\n'
    path = _write(tmp_path, "trainset.csv", bad)
    with pytest.raises(DataFormatError, match=r"trainset\.csv, line 5: expected 2 field\(s\), got 3"):
        read_e2e_csv(path)


def test_csv_unparsable_mr_and_empty_ref(tmp_path):
    path = _write(tmp_path, "a.csv", 'mr,ref\n"name[A]",ok\n"name[B], eatType[pub",bad\n')
    with pytest.raises(DataFormatError, match=r"a\.csv, line 3: cannot parse MR attribute"):
        read_e2e_csv(path)
    path = _write(tmp_path, "b.csv", 'mr,ref\n"name[A]",ok\n"name[B]",  \n')
    with pytest.raises(DataFormatError, match=r"b\.csv, line 3: empty reference"):
        read_e2e_csv(path)


def test_lora_malformed_lines(tmp_path):
    path = _write(tmp_path, "l.txt", "name : A||ok\n\nname : B no separator\n")
    with pytest.raises(DataFormatError, match=r"l\.txt, line 3: expected 'source \|\|reference'"):
        read_e2e_lora(path)
    path = _write(tmp_path, "m.txt", "name : A||ok\nname : A||   \n")
    with pytest.raises(DataFormatError, match=r"m\.txt, line 2: empty reference"):
        read_e2e_lora(path)
    path = _write(tmp_path, "n.txt", "name A | Type : pub||text\n")
    with pytest.raises(DataFormatError, match=r"n\.txt, line 1: source segment 'name A' is not 'key : value'"):
        read_e2e_lora(path)
    path = _write(tmp_path, "o.txt", " ||text\n")
    with pytest.raises(DataFormatError, match=r"o\.txt, line 1: empty source"):
        read_e2e_lora(path)


def test_missing_file_and_bad_args(tmp_path):
    with pytest.raises(DeltaConfigError, match="path must be an existing file, got"):
        read_e2e_csv(str(tmp_path / "nope.csv"))
    path = _write(tmp_path, "t.csv", TRAIN_CSV)
    with pytest.raises(DeltaConfigError, match="group must be a bool, got 1"):
        read_e2e_csv(path, group=1)
