"""Fixtures shared by the recipe and CLI tests: a tiny random-init Llama saved as a Hugging Face
directory with an offline word-level tokenizer, small E2E CSV files, and a recipe writer."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import yaml

# (MR, [references]) in the official E2E CSV format
TRAIN = [
    ("name[The Eagle], eatType[pub], food[French]", ["The Eagle is a French pub .", "The Eagle pub serves French food ."]),
    ("name[The Mill], eatType[coffee shop], food[Italian]", ["The Mill is an Italian coffee shop ."]),
    ("name[Alimentum], eatType[restaurant], area[city centre]", ["Alimentum is a restaurant in the city centre ."]),
    ("name[The Punter], eatType[pub], priceRange[cheap]", ["The Punter is a cheap pub ."]),
    ("name[Zizzi], eatType[coffee shop], area[riverside]", ["Zizzi is a coffee shop by the riverside ."]),
    ("name[Cotto], eatType[restaurant], food[French]", ["Cotto is a French restaurant .", "Cotto serves French food ."]),
    ("name[Wildwood], food[Italian]", ["Wildwood serves Italian food ."]),
    ("name[The Wrestlers], eatType[pub], area[city centre]", ["The Wrestlers is a pub in the city centre ."]),
]
DEV = [
    ("name[Browns], eatType[pub], food[Italian]", ["Browns is an Italian pub ."]),
    ("name[Giraffe], eatType[restaurant], area[riverside]", ["Giraffe is a restaurant by the riverside ."]),
    ("name[The Phoenix], eatType[pub], area[riverside]", ["The Phoenix is a pub by the riverside ."]),
    ("name[Strada], eatType[restaurant], food[French]", ["Strada is a French restaurant ."]),
]
TEST = [
    ("name[Clowns], eatType[pub], food[French]", ["Clowns is a French pub .", "Clowns serves French food in a pub ."]),
    ("name[Loch Fyne], eatType[restaurant], area[city centre]", ["Loch Fyne is a restaurant in the city centre ."]),
    ("name[Aromi], eatType[coffee shop], priceRange[cheap]", ["Aromi is a cheap coffee shop ."]),
    ("name[Bibimbap], food[Italian]", ["Bibimbap serves Italian food .", "Bibimbap has Italian food ."]),
]

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def _words() -> list[str]:
    from deltatune.data import linearize_e2e_mr, parse_e2e_mr

    words: list[str] = ["||"]
    for rows in (TRAIN, DEV, TEST):
        for mr, refs in rows:
            words += linearize_e2e_mr(parse_e2e_mr(mr)).split()
            for r in refs:
                words += r.split()
    return list(dict.fromkeys(words))


def write_e2e_data(data_dir: Path) -> Path:
    """Write trainset.csv, devset.csv and testset_w_refs.csv under ``data_dir/e2e``; returns data_dir."""
    folder = data_dir / "e2e"
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("trainset.csv", TRAIN), ("devset.csv", DEV), ("testset_w_refs.csv", TEST)):
        with open(folder / name, "w", encoding="utf-8", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["mr", "ref"])
            for mr, refs in rows:
                for r in refs:
                    w.writerow([mr, r])
    return data_dir


def make_tiny_model_dir(path: Path) -> Path:
    """Save a tiny random-init Llama and a word-level tokenizer (built offline) into ``path``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for w in _words():
        vocab.setdefault(w, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(vocab), max_position_embeddings=128, bos_token_id=2, eos_token_id=3, pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def recipe_dict(model_dir: Path, data_dir: Path, output_dir: Path, **sections: Any) -> dict[str, Any]:
    """A fast recipe for the tiny model; ``sections`` update the sections (dicts are merged, except
    ``delta``, which is replaced)."""
    recipe: dict[str, Any] = {
        "name": "tiny",
        "output_dir": str(output_dir),
        "model": {"name_or_path": str(model_dir)},
        "delta": {"method": "lora", "r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]},
        "data": {"dataset": "e2e", "data_dir": str(data_dir), "max_length": 48},
        "train": {
            "lr": 1e-2, "max_steps": 6, "batch_size": 4, "log_every": 1, "eval_every": 3, "warmup_steps": 1,
            "device": "cpu", "tensorboard": False, "progress_bar": False, "label_smoothing": 0.1,
        },
        "generate": {"num_beams": 2, "max_new_tokens": 6, "no_repeat_ngram_size": 4, "length_penalty": 0.8},
        "eval": {"split": "test", "batch_size": 4, "metrics": ["BLEU", "NIST"]},
    }
    for key, value in sections.items():
        if key != "delta" and isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    return recipe


def write_recipe(path: Path, recipe: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


_CACHE: dict[str, tuple[Path, Path]] = {}


def tiny_assets() -> tuple[Path, Path]:
    """``(model_dir, data_dir)`` built once per test process (shared by the recipe and CLI tests)."""
    if "assets" not in _CACHE:
        import atexit
        import shutil
        import tempfile

        root = Path(tempfile.mkdtemp(prefix="deltatune-recipe-tests-"))
        atexit.register(shutil.rmtree, root, True)
        _CACHE["assets"] = (make_tiny_model_dir(root / "model"), write_e2e_data(root / "data"))
    return _CACHE["assets"]
