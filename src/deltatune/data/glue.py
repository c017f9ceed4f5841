"""GLUE readers for the ``glue/<TASK>/{train,dev,test}.tsv`` layout (CoLA, SST-2, MRPC, STS-B, RTE, WNLI).

Files are read with ``csv.QUOTE_NONE`` (STS-B and MRPC contain stray quote characters), tab-separated,
UTF-8 with an optional byte-order mark (the MRPC files start with one). Every row must have as many fields
as the header. CoLA train/dev have no header (columns: source, label, original label, sentence); CoLA test
has ``index, sentence``. GLUE test files hide the labels: their examples have ``label=None``.

Labels: CoLA, SST-2, MRPC (``Quality``), WNLI: ``0``/``1`` ints; RTE: ``entailment`` → 0,
``not_entailment`` → 1; STS-B: the ``score`` as a float (regression).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

from ..errors import DeltaConfigError
from ..validation import check_type
from .base import TextPairExample, _check_input_file, _fail, _open_text

__all__ = ["GLUE_TASKS", "GlueTaskInfo", "glue_task", "load_glue", "read_glue_tsv"]


@dataclass(frozen=True)
class GlueTaskInfo:
    """Static description of a GLUE task.

    Attributes:
        name: canonical name (``"cola"``, ``"sst2"``, ``"mrpc"``, ``"stsb"``, ``"rte"``, ``"wnli"``).
        folder: folder name in the GLUE layout (``"CoLA"``, ``"SST-2"``, ...).
        num_labels: number of classes (1 for the STS-B regression).
        is_regression: ``True`` for STS-B.
        text_columns: header names of the text column(s) (one for single-sentence tasks, two for pairs).
        label_column: header name of the label column.
        label_names: class names in id order (RTE's strings are mapped through these).
        metrics: the metrics GLUE reports for the task.
    """

    name: str
    folder: str
    num_labels: int
    is_regression: bool
    text_columns: tuple[str, ...]
    label_column: str
    label_names: tuple[str, ...] | None
    metrics: tuple[str, ...]

    @property
    def is_pair(self) -> bool:
        """Whether the task classifies sentence pairs."""
        return len(self.text_columns) == 2


#: Metadata of the supported GLUE tasks, by canonical name.
GLUE_TASKS: dict[str, GlueTaskInfo] = {
    t.name: t
    for t in (
        GlueTaskInfo("cola", "CoLA", 2, False, ("sentence",), "label", ("unacceptable", "acceptable"), ("matthews_corrcoef",)),
        GlueTaskInfo("sst2", "SST-2", 2, False, ("sentence",), "label", ("negative", "positive"), ("accuracy",)),
        GlueTaskInfo(
            "mrpc", "MRPC", 2, False, ("#1 String", "#2 String"), "Quality", ("not_equivalent", "equivalent"),
            ("accuracy", "f1"),
        ),
        GlueTaskInfo("stsb", "STS-B", 1, True, ("sentence1", "sentence2"), "score", None, ("pearson", "spearman")),
        GlueTaskInfo(
            "rte", "RTE", 2, False, ("sentence1", "sentence2"), "label", ("entailment", "not_entailment"), ("accuracy",)
        ),
        GlueTaskInfo(
            "wnli", "WNLI", 2, False, ("sentence1", "sentence2"), "label", ("not_entailment", "entailment"), ("accuracy",)
        ),
    )
}
_SPLITS = ("train", "dev", "test")
#: Columns a GLUE test file may have besides the text columns (it has no label column).
_TEST_ONLY_COLUMNS = frozenset({"index", "#1 ID", "#2 ID", "genre", "filename", "year", "old_index", "source1", "source2"})


def glue_task(task: str) -> GlueTaskInfo:
    """Look a task up by canonical name or folder spelling (case, ``-`` and ``_`` ignored: ``"SST-2"``, ``"sts_b"``)."""
    check_type("task", task, str, "a GLUE task name")
    key = task.lower().replace("-", "").replace("_", "")
    if key not in GLUE_TASKS:
        raise DeltaConfigError(
            f"task must be one of {', '.join(repr(k) for k in GLUE_TASKS)} (or the folder spellings "
            f"{', '.join(repr(t.folder) for t in GLUE_TASKS.values())}), got {task!r}"
        )
    return GLUE_TASKS[key]


def _parse_label(info: GlueTaskInfo, raw: str, path: str, lineno: int) -> int | float:
    raw = raw.strip()
    if info.is_regression:
        try:
            return float(raw)
        except ValueError:
            raise _fail(path, f"line {lineno}", f"label must be a number for {info.name}, got {raw!r}") from None
    if info.name == "rte":
        if raw not in info.label_names:  # type: ignore[operator]
            raise _fail(path, f"line {lineno}", f"label must be 'entailment' or 'not_entailment', got {raw!r}")
        return info.label_names.index(raw)  # type: ignore[union-attr]
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 0 <= value < info.num_labels:
        raise _fail(path, f"line {lineno}", f"label must be an int in [0, {info.num_labels - 1}], got {raw!r}")
    return value


def read_glue_tsv(path: str, task: str) -> list[TextPairExample]:
    """Read one GLUE ``.tsv`` file of ``task`` (train, dev or test; the layout is recognised from the header).

    Raises:
        DataFormatError: a missing header, a row with the wrong number of fields, an empty text or a bad
            label; the message names the file and the line.
    """
    info = glue_task(task)
    path = _check_input_file("path", path)
    out: list[TextPairExample] = []
    with _open_text(path) as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        rows = iter(reader)
        first = next(rows, None)
        if first is None:
            raise _fail(path, "line 1", f"empty file (expected a {info.folder} header or rows)")
        first = [c.lstrip("\ufeff") for c in first]
        if info.name == "cola" and first[:1] != ["index"]:
            # headerless train/dev: source, label, original label, sentence
            header = None
            width, text_idx, label_idx = 4, [3], 1
            pending = [(1, first)]
        else:
            header = first
            missing = [c for c in info.text_columns if c not in header]
            if missing:
                raise _fail(
                    path, "line 1", f"expected a {info.folder} header with column(s) {missing!r}, got {header!r}"
                )
            width = len(header)
            text_idx = [header.index(c) for c in info.text_columns]
            label_idx = header.index(info.label_column) if info.label_column in header else None
            if label_idx is None:
                # only a test file (first column 'index', no unknown column) may lack the label column
                unknown = [c for c in header if c not in _TEST_ONLY_COLUMNS and c not in info.text_columns]
                if header[:1] != ["index"] or unknown:
                    raise _fail(
                        path, "line 1",
                        f"header has no label column {info.label_column!r} and is not a test-file header "
                        f"('index' first); unknown column(s) {unknown!r} in {header!r}",
                    )
            pending = []

        def rows_with_lines():
            yield from pending
            for row in rows:
                yield reader.line_num, row

        for lineno, row in rows_with_lines():
            if not row:
                continue
            if len(row) != width:
                raise _fail(path, f"line {lineno}", f"expected {width} tab-separated fields, got {len(row)}")
            texts = [row[i] for i in text_idx]
            for name, t in zip(info.text_columns, texts):
                if not t.strip():
                    raise _fail(path, f"line {lineno}", f"empty text in column {name!r}")
            label = None if label_idx is None else _parse_label(info, row[label_idx], path, lineno)
            out.append(TextPairExample(texts[0], texts[1] if len(texts) == 2 else None, label))
    if not out:
        raise _fail(path, "line 2", "no examples after the header")
    return out


def load_glue(task: str, split: str, data_dir: str) -> list[TextPairExample]:
    """Load ``<data_dir>/glue/<Folder>/<split>.tsv`` (``data_dir`` may also be the ``glue`` folder itself).

    Args:
        task: ``"cola"``, ``"sst2"``, ``"mrpc"``, ``"stsb"``, ``"rte"``, ``"wnli"`` or a folder spelling.
        split: ``"train"``, ``"dev"`` or ``"test"`` (test labels are hidden: ``label=None``).
        data_dir: e.g. ``/work/shared/data``.

    Raises:
        DeltaConfigError: unknown task/split or a missing file (the message lists the splits present).
    """
    info = glue_task(task)
    if split not in _SPLITS:
        raise DeltaConfigError(f"split must be one of 'train', 'dev', 'test', got {split!r}")
    check_type("data_dir", data_dir, (str, os.PathLike), "a path (str or os.PathLike)")
    data_dir = os.fspath(data_dir)
    base = os.path.join(data_dir, "glue") if os.path.isdir(os.path.join(data_dir, "glue")) else data_dir
    folder = os.path.join(base, info.folder)
    path = os.path.join(folder, f"{split}.tsv")
    if not os.path.isfile(path):
        present = [s for s in _SPLITS if os.path.isfile(os.path.join(folder, f"{s}.tsv"))]
        raise DeltaConfigError(
            f"GLUE {info.folder} split {split!r} not found: {path} does not exist; "
            f"splits present in {folder}: {', '.join(present) if present else 'none'}"
        )
    return read_glue_tsv(path, info.name)
