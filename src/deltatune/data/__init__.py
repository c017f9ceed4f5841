"""Datasets for delta fine-tuning: readers, sampling, tokenisation and collation.

Data-to-text (E2E, WebNLG 2017, DART, as in the LoRA paper):
:func:`load_data_to_text` and the per-format readers return :class:`DataToTextExample` s;
:func:`build_causal_lm_features` / :func:`build_generation_prompts` tokenise them and
:class:`CausalLMCollator` / :func:`pack_features` batch them.

Understanding tasks: :func:`load_glue`, :func:`read_classification_csv`, :func:`read_wikitext` and
:class:`ClassificationCollator`.
"""

from .base import DataToTextExample, TextPairExample
from .collate import CausalLMCollator, ClassificationCollator, pack_features
from .dart import dart_source_family, read_dart_json, read_dart_xml
from .e2e import (
    E2E_KEY_RENAMES,
    E2E_UNKNOWN_CATEGORY,
    linearize_e2e_mr,
    parse_e2e_mr,
    read_e2e_csv,
    read_e2e_lora,
)
from .features import IGNORE_INDEX, build_causal_lm_features, build_generation_prompts
from .glue import GLUE_TASKS, GlueTaskInfo, glue_task, load_glue, read_glue_tsv
from .loaders import DATA_TO_TEXT_DATASETS, DATA_TO_TEXT_FILES, data_to_text_path, load_data_to_text
from .sampling import stratified_sample
from .text import read_classification_csv, read_wikitext, read_wikitext_lines
from .webnlg import WEBNLG_SEEN_CATEGORIES, linearize_triples, read_webnlg_json, read_webnlg_xml

__all__ = [
    "DATA_TO_TEXT_DATASETS",
    "DATA_TO_TEXT_FILES",
    "E2E_KEY_RENAMES",
    "E2E_UNKNOWN_CATEGORY",
    "GLUE_TASKS",
    "IGNORE_INDEX",
    "WEBNLG_SEEN_CATEGORIES",
    "CausalLMCollator",
    "ClassificationCollator",
    "DataToTextExample",
    "GlueTaskInfo",
    "TextPairExample",
    "build_causal_lm_features",
    "build_generation_prompts",
    "dart_source_family",
    "data_to_text_path",
    "glue_task",
    "linearize_e2e_mr",
    "linearize_triples",
    "load_data_to_text",
    "load_glue",
    "pack_features",
    "parse_e2e_mr",
    "read_classification_csv",
    "read_dart_json",
    "read_dart_xml",
    "read_e2e_csv",
    "read_e2e_lora",
    "read_glue_tsv",
    "read_webnlg_json",
    "read_webnlg_xml",
    "read_wikitext",
    "read_wikitext_lines",
    "stratified_sample",
]
