"""Shared helpers for the task and sweep tests: tiny HF model directories and GLUE/CSV/WikiText fixtures."""

from __future__ import annotations

import random
from pathlib import Path

import torch
import yaml

WORDS = (
    "the a movie film was is good great bad awful fun boring plot actors story loved hated it this "
    "not very really quite one two three man woman said says cat dog sat on mat"
).split()


def write_bert_tokenizer(out: Path) -> None:
    """A tiny WordPiece BERT tokenizer (whole words only) saved into ``out``."""
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, ".", ","]
    out.mkdir(parents=True, exist_ok=True)
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tok.save_pretrained(str(out))


def tiny_bert_dir(root: Path) -> Path:
    """A random-init 2-layer BERT (hidden 32) with its tokenizer, saved as an HF directory."""
    from transformers import BertConfig, BertModel

    out = root / "tiny-bert"
    if (out / "config.json").is_file():
        return out
    write_bert_tokenizer(out)
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, pad_token_id=0)
    BertModel(cfg).save_pretrained(str(out))
    return out


def tiny_llama_dir(root: Path) -> Path:
    """A random-init 2-layer Llama causal LM with the tiny tokenizer (pad id 0), saved as an HF directory."""
    from transformers import LlamaForCausalLM

    from tests.tiny_models import llama_config

    out = root / "tiny-llama"
    if (out / "config.json").is_file():
        return out
    write_bert_tokenizer(out)
    torch.manual_seed(0)
    cfg = llama_config(vocab_size=64, max_position_embeddings=128, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    return out


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_glue(root: Path, task: str, n_train: int = 24, n_dev: int = 12, seed: int = 0) -> Path:
    """Write ``root/glue/<Folder>/{train,dev}.tsv`` in the official layout; returns ``root``."""
    rng = random.Random(seed)
    folder = {"sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B", "cola": "CoLA", "rte": "RTE"}[task]
    d = root / "glue" / folder
    d.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        lines = []
        if task == "sst2":
            lines.append("sentence\tlabel")
            lines += [f"{_sentence(rng, rng.randint(3, 8))}\t{i % 2}" for i in range(n)]
        elif task == "cola":
            lines += [f"src\t{i % 2}\t*\t{_sentence(rng, rng.randint(3, 8))}" for i in range(n)]
        elif task == "mrpc":
            lines.append("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String")
            lines += [f"{i % 2}\t{i}\t{i + 1}\t{_sentence(rng, 5)}\t{_sentence(rng, 6)}" for i in range(n)]
        elif task == "stsb":
            lines.append("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore")
            lines += [
                f"{i}\tmain\tf\t2012\t{i}\ts\ts\t{_sentence(rng, 5)}\t{_sentence(rng, 4)}\t{rng.uniform(0, 5):.3f}"
                for i in range(n)
            ]
        elif task == "rte":
            lines.append("index\tsentence1\tsentence2\tlabel")
            labels = ("entailment", "not_entailment")
            lines += [f"{i}\t{_sentence(rng, 7)}\t{_sentence(rng, 4)}\t{labels[i % 2]}" for i in range(n)]
        (d / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def write_ag_news(root: Path, n_train: int = 24, n_dev: int = 12, seed: int = 0) -> tuple[Path, Path]:
    """AG-News-style CSVs (no header; class 1-4, "title", "description")."""
    rng = random.Random(seed)
    paths = []
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = [f'"{i % 4 + 1}","{_sentence(rng, 3)}","{_sentence(rng, 6)}"' for i in range(n)]
        p = root / f"ag_{split}.csv"
        p.write_text("\n".join(rows) + "\n", encoding="utf-8")
        paths.append(p)
    return paths[0], paths[1]


def write_wikitext(root: Path, seed: int = 0) -> Path:
    """``root/wikitext-2/wiki.{train,valid,test}.tokens`` in the tokenised WikiText layout."""
    rng = random.Random(seed)
    d = root / "wikitext-2"
    d.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 40), ("valid", 12), ("test", 12)):
        lines = [""]
        for i in range(n):
            if i % 5 == 0:
                lines += [f" = {_sentence(rng, 2)} = ", ""]
            lines.append(" " + _sentence(rng, rng.randint(8, 16)) + " . ")
        (d / f"wiki.{split}.tokens").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def write_yaml(path: Path, data: dict) -> Path:
    """Write ``data`` as a YAML file (a sweep or task config) and return its path."""
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path
