"""``load_data_to_text`` dispatch on a fake data folder, and a smoke test on the real shared data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deltatune.data import data_to_text_path, load_data_to_text, load_glue, read_webnlg_xml
from deltatune.errors import DeltaConfigError

# ../shared/data beside the checkout
SHARED_DATA = Path(__file__).parents[2].parent / "shared" / "data"

CSV = 'mr,ref\n"name[A], eatType[pub]",A is a pub.\n"name[A], eatType[pub]",A pub.\n'
LORA = "name : A | Type : pub||A is a pub . \nname : A | Type : pub||A pub . \n"
DART = [{"tripleset": [["A", "IS", "B"]], "annotations": [{"source": "e2e", "text": "A is B."}]}]


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "e2e").mkdir()
    (tmp_path / "e2e" / "devset.csv").write_text(CSV, "utf-8")
    (tmp_path / "e2e" / "lora_valid.txt").write_text(LORA, "utf-8")
    (tmp_path / "dart").mkdir()
    (tmp_path / "dart" / "dart-v1.1.1-full-dev.json").write_text(json.dumps(DART), "utf-8")
    (tmp_path / "dart" / "dart-v1.1.1-full-test.xml").write_text(
        "<benchmark><entries><entry category='MISC' eid='Id1' size='1'><modifiedtripleset>"
        "<mtriple>C | HAS | D</mtriple></modifiedtripleset><lex comment='webnlg' lid='Id1'>C has D.</lex>"
        "</entry></entries></benchmark>",
        "utf-8",
    )
    return str(tmp_path)


def test_dispatch_formats(data_dir):
    csv_ex = load_data_to_text("e2e", "dev", data_dir)
    lora_ex = load_data_to_text("e2e", "dev", data_dir, fmt="lora")
    assert [e.source for e in csv_ex] == [e.source for e in lora_ex] == ["name : A | Type : pub"]
    assert csv_ex[0].references == ["A is a pub.", "A pub."]
    (d,) = load_data_to_text("dart", "dev", data_dir)
    assert d.source == "A : is : B"
    (t,) = load_data_to_text("dart", "test", data_dir)  # auto falls back to XML
    assert t.source == "C : has : D" and t.category == "webnlg"
    assert data_to_text_path("dart", "test", data_dir) == (f"{data_dir}/dart/dart-v1.1.1-full-test.xml", "xml")


def test_missing_split_names_path_and_available_splits(data_dir):
    with pytest.raises(DeltaConfigError, match=r"dart split 'train' not found: looked for .*dart-v1\.1\.1-full-train\.json.*"
                       r"splits available under .*dart: dev, test \(the train file is not shipped there\)"):
        load_data_to_text("dart", "train", data_dir)
    with pytest.raises(DeltaConfigError, match=r"e2e split 'test' not found: .*testset_w_refs\.csv.*available.*: dev"):
        load_data_to_text("e2e", "test", data_dir)
    with pytest.raises(DeltaConfigError, match=r"webnlg split 'dev' .*available.*: none"):
        load_data_to_text("webnlg", "dev", data_dir)


def test_bad_arguments(data_dir):
    with pytest.raises(DeltaConfigError, match="dataset must be one of 'e2e', 'webnlg', 'dart', got 'wmt'"):
        load_data_to_text("wmt", "dev", data_dir)
    with pytest.raises(DeltaConfigError, match="split must be one of 'train', 'dev', 'test', got 'valid'"):
        load_data_to_text("e2e", "valid", data_dir)
    with pytest.raises(DeltaConfigError, match="fmt must be one of 'auto', 'csv', 'lora', got 'xml'"):
        load_data_to_text("e2e", "dev", data_dir, fmt="xml")


needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is absent")


@needs_shared
def test_real_files_load_with_documented_counts():
    d = str(SHARED_DATA)
    dev = load_data_to_text("e2e", "dev", d)
    assert (len(dev), sum(len(e.references) for e in dev)) == (547, 4672)
    lora_dev = load_data_to_text("e2e", "dev", d, fmt="lora")
    assert [e.source for e in lora_dev] == [e.source for e in dev]
    test = load_data_to_text("e2e", "test", d)
    assert (len(test), sum(len(e.references) for e in test)) == (630, 4693)

    web = load_data_to_text("webnlg", "dev", d)
    assert sum(len(e.meta["eids"]) for e in web) == 872  # entries (two share one input)
    assert sum(len(e.references) for e in web) == 2258  # the "good" of the 2,268 lexicalisations
    web_all = load_data_to_text("webnlg", "dev", d, fmt="json")
    assert [e.source for e in web_all] == [e.source for e in read_webnlg_xml(str(SHARED_DATA / "webnlg2017/xml/dev"))]

    dart = load_data_to_text("dart", "dev", d)
    assert sum(len(e.meta["eids"]) for e in dart) == 2768
    assert sum(len(e.references) for e in dart) == 6980
    with pytest.raises(DeltaConfigError, match="splits available.*: dev, test"):
        load_data_to_text("dart", "train", d)

    glue_dev = {"cola": 1043, "sst2": 872, "mrpc": 408, "stsb": 1500, "rte": 277, "wnli": 71}
    for task, n in glue_dev.items():
        ex = load_glue(task, "dev", d)
        assert len(ex) == n, task
        assert all(e.label is not None for e in ex)
    assert all(e.label is None for e in load_glue("RTE", "test", d))
