"""GLUE TSV readers, the generic classification CSV reader (AG News shape) and the WikiText reader."""

from __future__ import annotations

import pytest

from deltatune.data import (
    GLUE_TASKS,
    TextPairExample,
    glue_task,
    load_glue,
    read_classification_csv,
    read_glue_tsv,
    read_wikitext,
    read_wikitext_lines,
)
from deltatune.errors import DataFormatError, DeltaConfigError

T = "\t"
# Invented sentences in the official column layouts of each task.
GLUE_FILES = {
    ("CoLA", "train"): "gj04\t1\t\tThe cat sat on the mat.\ngj04\t0\t*\tCat the mat sat.\n",
    ("CoLA", "test"): "index\tsentence\n0\tBill whistled a tune.\n",
    ("SST-2", "dev"): "sentence\tlabel\nit 's a \"charming journey . \t1\ndull .\t0\n",
    ("SST-2", "test"): "index\tsentence\n0\tuneasy mix .\n",
    ("MRPC", "dev"): "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    "1\t11\t12\tHe said \" yes .\tHe agreed .\n0\t13\t14\tIt rained .\tThe sun shone .\n",
    ("STS-B", "train"): "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane takes off.\t\"An air plane is taking off.\t5.000\n"
    "1\tmain-news\theadlines\t2013\t0002\tnone\tnone\tA dog runs.\tMarkets fall.\t0.25\n",
    ("STS-B", "test"): "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\n"
    "0\tmain-captions\tMSRvid\t2012test\t0024\tnone\tnone\tA girl styles hair.\tA girl brushes hair.\n",
    ("RTE", "train"): "index\tsentence1\tsentence2\tlabel\n0\tA is B.\tB is A.\tnot_entailment\n"
    "1\tA ran.\tSomeone ran.\tentailment\n",
    ("RTE", "test"): "index\tsentence1\tsentence2\n0\tX.\tY.\n",
    ("WNLI", "dev"): "index\tsentence1\tsentence2\tlabel\n0\tThe drain is clogged.\tIt is clogged.\t0\n",
}


@pytest.fixture
def glue_dir(tmp_path):
    for (folder, split), text in GLUE_FILES.items():
        d = tmp_path / "glue" / folder
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{split}.tsv").write_text(text, encoding="utf-8")
    return tmp_path


def test_glue_readers(glue_dir):
    assert load_glue("cola", "train", glue_dir) == [
        TextPairExample("The cat sat on the mat.", None, 1),
        TextPairExample("Cat the mat sat.", None, 0),
    ]
    assert load_glue("CoLA", "test", glue_dir) == [TextPairExample("Bill whistled a tune.", None, None)]
    sst = load_glue("SST-2", "dev", glue_dir)
    assert sst[0] == TextPairExample('it \'s a "charming journey . ', None, 1)  # QUOTE_NONE keeps the quote
    assert load_glue("sst2", "test", glue_dir)[0].label is None
    mrpc = load_glue("mrpc", "dev", glue_dir)
    assert mrpc == [TextPairExample('He said " yes .', "He agreed .", 1),
                    TextPairExample("It rained .", "The sun shone .", 0)]
    sts = load_glue("sts-b", "train", glue_dir)
    assert [e.label for e in sts] == [5.0, 0.25] and isinstance(sts[1].label, float)
    assert sts[0].text_b == '"An air plane is taking off.'
    assert load_glue("STS-B", "test", str(glue_dir / "glue"))[0] == TextPairExample(
        "A girl styles hair.", "A girl brushes hair.", None
    )
    assert [e.label for e in load_glue("rte", "train", glue_dir)] == [1, 0]
    assert load_glue("rte", "test", glue_dir)[0].label is None
    assert load_glue("WNLI", "dev", glue_dir)[0].label == 0


def test_glue_metadata():
    assert GLUE_TASKS["stsb"].num_labels == 1 and GLUE_TASKS["stsb"].is_regression
    assert all(GLUE_TASKS[t].num_labels == 2 and not GLUE_TASKS[t].is_regression
               for t in ("cola", "sst2", "mrpc", "rte", "wnli"))
    assert GLUE_TASKS["rte"].label_names == ("entailment", "not_entailment")
    assert glue_task("SST-2") is GLUE_TASKS["sst2"] and glue_task("sts_b") is GLUE_TASKS["stsb"]
    assert GLUE_TASKS["mrpc"].is_pair and not GLUE_TASKS["cola"].is_pair
    assert GLUE_TASKS["mrpc"].text_columns == ("#1 String", "#2 String")


def test_glue_errors(glue_dir, tmp_path):
    with pytest.raises(DeltaConfigError, match="task must be one of 'cola', 'sst2'.*got 'qnli'"):
        load_glue("qnli", "dev", glue_dir)
    with pytest.raises(DeltaConfigError, match=r"GLUE CoLA split 'dev' not found: .*splits present in .*: train, test"):
        load_glue("cola", "dev", glue_dir)
    with pytest.raises(DeltaConfigError, match="split must be one of 'train', 'dev', 'test', got 'validation'"):
        load_glue("cola", "validation", glue_dir)
    bad = tmp_path / "bad.tsv"
    bad.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\n", "utf-8")
    with pytest.raises(DataFormatError, match=r"bad\.tsv, line 3: expected 4 tab-separated fields, got 3"):
        read_glue_tsv(str(bad), "rte")
    bad.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tmaybe\n", "utf-8")
    with pytest.raises(DataFormatError, match=r"bad\.tsv, line 3: label must be 'entailment' or 'not_entailment'"):
        read_glue_tsv(str(bad), "rte")
    bad.write_text("sentence\tlabel\ngood\t2\n", "utf-8")
    with pytest.raises(DataFormatError, match=r"bad\.tsv, line 2: label must be an int in \[0, 1\], got '2'"):
        read_glue_tsv(str(bad), "sst2")
    bad.write_text("a\tb\tc\n", "utf-8")
    with pytest.raises(DataFormatError, match=r"bad\.tsv, line 1: expected a WNLI header with column"):
        read_glue_tsv(str(bad), "wnli")
    bad.write_text("s\t1\t\tok\ns\tx\t\tbad label\n", "utf-8")
    with pytest.raises(DataFormatError, match=r"bad\.tsv, line 2: label must be an int"):
        read_glue_tsv(str(bad), "cola")
    bad.write_text("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
                   "0\tg\tf\ty\to\ts\ts\ta\tb\tfive\n", "utf-8")
    with pytest.raises(DataFormatError, match=r"bad\.tsv, line 2: label must be a number for stsb, got 'five'"):
        read_glue_tsv(str(bad), "stsb")


AG = (
    '"3","Fears for pension after talks","Unions say they are \'disappointed\' after talks."\n'
    '"4","Team sets launch date (SPACE.com)","SPACE.com - A second\\team of rocketeers, competing."\n'
    '"1","Talks, again","Leaders met on Monday."\n'
    '"2","Win","The home team won 3-1."\n'
)


def test_ag_news_format(tmp_path):
    p = tmp_path / "test.csv"
    p.write_text(AG, "utf-8")
    exs, mapping = read_classification_csv(str(p), text_columns=[1, 2], label_column=0)
    assert mapping == {"1": 0, "2": 1, "3": 2, "4": 3}
    assert [e.label for e in exs] == [2, 3, 0, 1]
    assert exs[2] == TextPairExample("Talks, again", "Leaders met on Monday.", 0)
    joined, _ = read_classification_csv(str(p), text_columns=[1, 2], label_column=0, join_with=". ")
    assert joined[2] == TextPairExample("Talks, again. Leaders met on Monday.", None, 0)
    given = {"1": 3, "2": 2, "3": 1, "4": 0}
    exs2, m2 = read_classification_csv(str(p), text_columns=[1], label_column=0, label_map=given)
    assert m2 == given and [e.label for e in exs2] == [1, 0, 3, 2]
    unl, m3 = read_classification_csv(str(p), text_columns=[2], label_column=None)
    assert m3 == {} and all(e.label is None for e in unl)


def test_classification_csv_header_tsv_and_errors(tmp_path):
    p = tmp_path / "data.tsv"
    p.write_text("text\tlabel\ngreat film\tpos\nawful\tneg\nfine\tpos\n", "utf-8")
    exs, m = read_classification_csv(str(p), text_columns=["text"], label_column="label", has_header=True,
                                     delimiter="\t")
    assert m == {"neg": 0, "pos": 1} and [e.label for e in exs] == [1, 0, 1]
    with pytest.raises(DataFormatError, match=r"data\.tsv, line 3: label 'neg' is not in label_map"):
        read_classification_csv(str(p), text_columns=[0], label_column=1, has_header=True, delimiter="\t",
                                label_map={"pos": 0})
    with pytest.raises(DeltaConfigError, match="header name 'text' but has_header is False"):
        read_classification_csv(str(p), text_columns=["text"], label_column=1, delimiter="\t")
    with pytest.raises(DataFormatError, match=r"data\.tsv, line 1: label_column 'y' is not in the header"):
        read_classification_csv(str(p), text_columns=["text"], label_column="y", has_header=True, delimiter="\t")
    q = tmp_path / "short.csv"
    q.write_text('"1","a","b"\n"2","only"\n', "utf-8")
    with pytest.raises(DataFormatError, match=r"short\.csv, line 2: expected at least 3 fields, got 2"):
        read_classification_csv(str(q), text_columns=[1, 2], label_column=0)
    with pytest.raises(DeltaConfigError, match="text_columns must have 1 or 2 columns unless join_with"):
        read_classification_csv(str(q), text_columns=[0, 1, 2], label_column=None)


def test_wikitext_hf_rows_and_join(tmp_path):
    p = tmp_path / "wiki.valid.tokens"
    p.write_text(" \n = Homarus = \n \n Homarus is a <unk> lobster , known @-@ well .\n", "utf-8")
    rows = read_wikitext_lines(str(p))
    assert rows == ["", " = Homarus = \n", "", " Homarus is a <unk> lobster , known @-@ well .\n"]
    text = read_wikitext(str(p))
    assert text == "\n\n".join(rows)
    assert "<unk>" in text and "<eos>" not in text
    assert read_wikitext(str(p), joiner="") == "".join(rows)
