"""Data files that are not what they claim: no silent zero-example reads, no ``label=None`` from a
misspelled header, no NUL bytes kept, and bad bytes / truncated archives named with file and line."""

from __future__ import annotations

import gzip

import pytest

from deltatune.data import (
    read_classification_csv,
    read_dart_json,
    read_e2e_csv,
    read_e2e_lora,
    read_glue_tsv,
    read_wikitext_lines,
)
from deltatune.errors import DataFormatError

ROW = '"name[The Eagle], eatType[pub]","The Eagle is a pub ."\n'


def _write(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return str(p)


# -- empty where data is expected ---------------------------------------------------------------
@pytest.mark.parametrize("text", ["mr,ref\n", "mr,ref\n\n\n", "MR\n"])
def test_header_only_e2e_csv_is_an_error(tmp_path, text):
    with pytest.raises(DataFormatError, match=r"h\.csv, line 2: no data rows after the header"):
        read_e2e_csv(_write(tmp_path, "h.csv", text))
    assert len(read_e2e_csv(_write(tmp_path, "ok.csv", "mr,ref\n" + ROW))) == 1  # the neighbour that works


def test_empty_e2e_lora_file_is_an_error(tmp_path):
    with pytest.raises(DataFormatError, match=r"e\.txt, line 1: no examples"):
        read_e2e_lora(_write(tmp_path, "e.txt", "\n  \n"))


@pytest.mark.parametrize("text", ["", "sentence\tlabel\n", "sentence\tlabel\n\n"])
def test_empty_glue_tsv_is_an_error(tmp_path, text):
    path = _write(tmp_path, "dev.tsv", text)
    with pytest.raises(DataFormatError, match=r"dev\.tsv, line [12]: (empty file|no examples after the header)"):
        read_glue_tsv(path, "sst2")


# -- misspelled label column ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("task", "text", "unknown"),
    [
        ("sst2", "sentence\tlable\nit is fine .\t1\n", "lable"),
        ("rte", "index\tsentence1\tsentence2\tlabels\n0\tA .\tB .\tentailment\n", "labels"),
        ("mrpc", "Qualty\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tA .\tB .\n", "Qualty"),
        ("stsb", "index\tsentence1\tsentence2\tscores\n0\tA .\tB .\t1.0\n", "scores"),
    ],
)
def test_glue_header_without_label_column_is_an_error(tmp_path, task, text, unknown):
    path = _write(tmp_path, "train.tsv", text)
    with pytest.raises(DataFormatError, match=rf"train\.tsv, line 1: header has no label column .*unknown column\(s\) \['{unknown}'\]"):
        read_glue_tsv(path, task)


def test_glue_test_files_without_labels_still_read(tmp_path):
    sst = read_glue_tsv(_write(tmp_path, "a.tsv", "index\tsentence\n0\tfine .\n"), "sst2")
    assert [(e.text_a, e.label) for e in sst] == [("fine .", None)]
    mrpc = read_glue_tsv(_write(tmp_path, "b.tsv", "index\t#1 ID\t#2 ID\t#1 String\t#2 String\n0\t1\t2\tA .\tB .\n"), "mrpc")
    assert [(e.text_a, e.text_b, e.label) for e in mrpc] == [("A .", "B .", None)]
    # a header without 'index' first and without the label is not a test file
    with pytest.raises(DataFormatError, match=r"c\.tsv, line 1: header has no label column 'label' .*unknown column\(s\) \[\]"):
        read_glue_tsv(_write(tmp_path, "c.tsv", "sentence\n fine .\n"), "sst2")


# -- bytes ---------------------------------------------------------------------------------------
def test_nul_bytes_are_refused_with_line(tmp_path):
    path = _write(tmp_path, "n.csv", "mr,ref\n" + ROW + '"name[Zizzi]","Zizzi\x00 is here ."\n')
    with pytest.raises(DataFormatError, match=r"n\.csv, line 3: NUL byte in a text file"):
        read_e2e_csv(path)
    with pytest.raises(DataFormatError, match=r"w\.tokens, line 2: NUL byte"):
        read_wikitext_lines(_write(tmp_path, "w.tokens", "a\nb\x00\n"))


@pytest.mark.parametrize(
    ("name", "reader"),
    [("x.csv", read_e2e_csv), ("x.txt", read_e2e_lora), ("x.tsv", lambda p: read_glue_tsv(p, "sst2")),
     ("x.json", read_dart_json), ("x.tokens", read_wikitext_lines),
     ("c.csv", lambda p: read_classification_csv(p, text_columns=[1], label_column=0))],
)
def test_non_utf8_data_file_names_file_and_line(tmp_path, name, reader):
    path = _write(tmp_path, name, b"first line\nsecond \xe9t\xe9 line\n")
    with pytest.raises(DataFormatError, match=rf"{name.replace('.', r'[.]')}, line 2: not valid UTF-8 \(byte b'\\xe9' at offset 18\)"):
        reader(path)


def test_truncated_gzip_is_named(tmp_path):
    full = gzip.compress(("mr,ref\n" + ROW * 50).encode())
    path = _write(tmp_path, "t.csv.gz", full[: len(full) // 2])
    with pytest.raises(DataFormatError, match=r"t\.csv\.gz, line 1: not a complete gzip file"):
        read_e2e_csv(path)
    path = _write(tmp_path, "g.csv.gz", b"not gzip at all")
    with pytest.raises(DataFormatError, match=r"g\.csv\.gz, line 1: not a complete gzip file"):
        read_e2e_csv(path)
    assert len(read_e2e_csv(_write(tmp_path, "ok.csv.gz", full))) == 1  # 50 copies of one MR, grouped
