"""``load_data_to_text``: one entry point for the E2E, WebNLG 2017 and DART files of the shared data folder.

Layout expected under ``data_dir`` (the layout of ``/work/shared/data``)::

    e2e/trainset.csv  devset.csv  testset_w_refs.csv          (fmt "csv", the default)
    e2e/lora_train.txt  lora_valid.txt  lora_test.txt          (fmt "lora")
    webnlg2017/lora_train.json(.gz)  lora_dev.json  lora_test.json   (fmt "json", the default)
    webnlg2017/xml/train/  xml/dev/  xml/test/testdata_with_lex.xml   (fmt "xml")
    dart/dart-v1.1.1-full-{train,dev,test}.json / .xml          (fmt "auto": JSON if present, else XML)
"""

from __future__ import annotations

import os

from ..errors import DeltaConfigError
from ..validation import check_choice, check_type
from .base import DataToTextExample
from .dart import read_dart_json, read_dart_xml
from .e2e import read_e2e_csv, read_e2e_lora
from .webnlg import read_webnlg_json, read_webnlg_xml

__all__ = ["DATA_TO_TEXT_DATASETS", "DATA_TO_TEXT_FILES", "data_to_text_path", "load_data_to_text"]

DATA_TO_TEXT_DATASETS = ("e2e", "webnlg", "dart")
_SPLITS = ("train", "dev", "test")

#: dataset → (folder, {fmt: {split: [candidate relative paths, first existing wins]}}); the first fmt is "auto".
DATA_TO_TEXT_FILES: dict[str, tuple[str, dict[str, dict[str, list[str]]]]] = {
    "e2e": (
        "e2e",
        {
            "csv": {
                "train": ["trainset.csv"],
                "dev": ["devset.csv"],
                "test": ["testset_w_refs.csv"],
            },
            "lora": {
                "train": ["lora_train.txt"],
                "dev": ["lora_valid.txt"],
                "test": ["lora_test.txt"],
            },
        },
    ),
    "webnlg": (
        "webnlg2017",
        {
            "json": {
                "train": ["lora_train.json", "lora_train.json.gz"],
                "dev": ["lora_dev.json", "lora_dev.json.gz"],
                "test": ["lora_test.json", "lora_test.json.gz"],
            },
            "xml": {
                "train": ["xml/train"],
                "dev": ["xml/dev"],
                "test": ["xml/test/testdata_with_lex.xml"],
            },
        },
    ),
    "dart": (
        "dart",
        {
            "json": {s: [f"dart-v1.1.1-full-{s}.json", f"dart-v1.1.1-full-{s}.json.gz"] for s in _SPLITS},
            "xml": {s: [f"dart-v1.1.1-full-{s}.xml"] for s in _SPLITS},
        },
    ),
}

_READERS = {
    ("e2e", "csv"): read_e2e_csv,
    ("e2e", "lora"): read_e2e_lora,
    ("webnlg", "json"): read_webnlg_json,
    ("webnlg", "xml"): read_webnlg_xml,
    ("dart", "json"): read_dart_json,
    ("dart", "xml"): read_dart_xml,
}


def _first_existing(base: str, candidates: list[str]) -> str | None:
    for rel in candidates:
        p = os.path.join(base, rel)
        if os.path.exists(p):
            return p
    return None


def data_to_text_path(dataset: str, split: str, data_dir: str, fmt: str = "auto") -> tuple[str, str]:
    """Resolve ``(path, fmt)`` of a data-to-text split (see :func:`load_data_to_text` for the arguments).

    Raises:
        DeltaConfigError: bad dataset/split/fmt, or no file for the split; the message names the paths
            looked for and the splits that do exist for that dataset in ``data_dir``.
    """
    check_choice("dataset", dataset, DATA_TO_TEXT_DATASETS)
    check_choice("split", split, _SPLITS)
    check_type("data_dir", data_dir, (str, os.PathLike), "a path (str or os.PathLike)")
    folder, formats = DATA_TO_TEXT_FILES[dataset]
    check_choice("fmt", fmt, ("auto", *formats))
    base = os.path.join(os.fspath(data_dir), folder)
    tried: list[str] = []
    order = list(formats) if fmt == "auto" else [fmt]
    if fmt == "auto" and dataset != "dart":
        order = order[:1]  # E2E: official CSV; WebNLG: LoRA JSON. DART falls back from JSON to XML.
    for f in order:
        found = _first_existing(base, formats[f][split])
        if found is not None:
            return found, f
        tried.extend(os.path.join(base, rel) for rel in formats[f][split])
    available = [
        s for s in _SPLITS if any(_first_existing(base, formats[f][s]) is not None for f in order)
    ]
    fmt_txt = "" if fmt == "auto" else f" in format {fmt!r}"
    avail_txt = ", ".join(available) if available else "none"
    raise DeltaConfigError(
        f"{dataset} split {split!r}{fmt_txt} not found: looked for {', '.join(tried)}; "
        f"splits available under {base}: {avail_txt} (the {split} file is not shipped there)"
    )


def load_data_to_text(dataset: str, split: str, data_dir: str, fmt: str = "auto") -> list[DataToTextExample]:
    """Load a data-to-text split from the shared data folder.

    Args:
        dataset: ``"e2e"``, ``"webnlg"`` or ``"dart"``.
        split: ``"train"``, ``"dev"`` or ``"test"`` (E2E ``dev`` is ``devset.csv`` / ``lora_valid.txt``;
            E2E ``test`` is ``testset_w_refs.csv``; WebNLG XML ``test`` is ``testdata_with_lex.xml``).
        data_dir: the folder holding ``e2e/``, ``webnlg2017/`` and ``dart/`` (e.g. ``/work/shared/data``).
        fmt: ``"auto"`` (E2E: ``csv``; WebNLG: ``json``; DART: ``json`` if present, else ``xml``),
            or ``"csv"``/``"lora"`` (E2E), ``"json"``/``"xml"`` (WebNLG, DART).

    Returns:
        The examples, references grouped per identical source.

    Raises:
        DeltaConfigError: invalid arguments or a missing file (e.g. DART train, which is not shipped:
            the message lists the splits that exist).
        DataFormatError: a malformed file.
    """
    path, used = data_to_text_path(dataset, split, data_dir, fmt)
    return _READERS[(dataset, used)](path)
