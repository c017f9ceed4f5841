"""Trainable-parameter table of every registered delta method on BERT-base and GPT-2 small shapes.

Models are built on the meta device (no memory, no weights), each method is applied with the
config listed in ``CONFIGS`` and the trainable parameters are counted; where an analytical formula
is known it is checked against the count. Methods whose module does not import, or whose config
fails on a model, are skipped with a note on stderr.

Usage::

    python benchmarks/param_table.py            # Markdown table on stdout
    python benchmarks/param_table.py --device cpu   # build real (random) weights instead of meta
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

# label -> (method name, config kwargs); labels keep several configs of one method apart.
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora r=8 (q,v)": ("lora", {"r": 8}),
    "lora r=4 (q,v)": ("lora", {"r": 4}),
    "adapter b=64 (houlsby)": ("adapter", {"bottleneck_size": 64}),
    "adapter b=64 (pfeiffer)": ("adapter", {"bottleneck_size": 64, "placement": "pfeiffer"}),
    "low_rank_adapter rf=32 k=1": ("low_rank_adapter", {"reduction_factor": 32, "low_rank_size": 1}),
    "bitfit (all biases)": ("bitfit", {}),
    "ia3 (k, v, ffn)": ("ia3", {}),
    "prefix (defaults)": ("prefix", {}),
    "ptuning_v2 (defaults)": ("ptuning_v2", {}),
}


def shapes() -> dict[str, Any]:
    """The two model shapes (transformers configs)."""
    from transformers import BertConfig, GPT2Config

    return {
        "BERT-base": BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                intermediate_size=3072, vocab_size=30522),
        "GPT-2 small": GPT2Config(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024),
    }


def _dims(cfg: Any) -> tuple[int, int, int]:
    h = cfg.hidden_size
    layers = cfg.num_hidden_layers
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * h
    return h, layers, inter


def _lora(cfg: Any, kw: dict[str, Any]) -> int:
    h, layers, _ = _dims(cfg)
    r = kw.get("r", 8)
    if cfg.model_type == "gpt2":  # c_attn (h -> 3h) as one layer
        return layers * r * (h + 3 * h)
    return layers * 2 * r * (h + h)  # query, value


def _adapter(cfg: Any, kw: dict[str, Any]) -> int:
    h, layers, _ = _dims(cfg)
    b = kw.get("bottleneck_size", 64)
    per_layer = 1 if kw.get("placement") == "pfeiffer" else 2
    return layers * per_layer * (2 * h * b + b + h)


def _low_rank(cfg: Any, kw: dict[str, Any]) -> int:
    h, layers, _ = _dims(cfg)
    rf, k = kw.get("reduction_factor", 32), kw.get("low_rank_size", 1)
    b = h // rf
    return layers * 2 * (2 * k * (h + b) + b + h)


def _bitfit(cfg: Any, kw: dict[str, Any]) -> int:
    h, layers, inter = _dims(cfg)
    if cfg.model_type == "gpt2":  # ln_1, c_attn, attn.c_proj, ln_2, c_fc, mlp.c_proj; ln_f
        return layers * (h + 3 * h + h + h + inter + h) + h
    # bert: embeddings LN; q, k, v, attn out, attn LN, intermediate, out, out LN; pooler
    return h + layers * (3 * h + h + h + inter + h + h) + h


def _ia3(cfg: Any, kw: dict[str, Any]) -> int:
    h, layers, inter = _dims(cfg)
    return layers * (2 * h + inter)  # k and v outputs, FFN intermediate


FORMULAS: dict[str, Callable[[Any, dict[str, Any]], int]] = {
    "lora": _lora,
    "adapter": _adapter,
    "low_rank_adapter": _low_rank,
    "bitfit": _bitfit,
    "ia3": _ia3,
}


def count(model_cfg: Any, method: str, kwargs: dict[str, Any], device: str) -> tuple[int, int]:
    """(trainable, base total) after applying ``method`` to a fresh model of ``model_cfg``."""
    from transformers import AutoModel

    from deltatune import api
    from deltatune.methods import get_method

    with torch.device(device):
        model: nn.Module = AutoModel.from_config(model_cfg)
    base_total = sum(p.numel() for p in model.parameters())
    config = get_method(method).config_cls(**kwargs)
    api.apply(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, base_total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="meta", choices=["meta", "cpu"])
    args = parser.parse_args(argv)
    from tqdm import tqdm

    from deltatune.methods import REGISTRY

    models = shapes()
    rows: list[str] = []
    mismatches = 0
    for label, (method, kwargs) in tqdm(list(CONFIGS.items()), desc="methods", file=sys.stderr):
        if method not in REGISTRY:
            print(f"skip {label}: {method!r} is not registered", file=sys.stderr)
            continue
        try:
            importlib.import_module(REGISTRY[method])
        except Exception as e:  # noqa: BLE001 - a method still being written is skipped, not fatal
            print(f"skip {label}: module {REGISTRY[method]} does not import ({type(e).__name__}: {e})", file=sys.stderr)
            continue
        cells = []
        for shape_name, cfg in models.items():
            try:
                trainable, total = count(cfg, method, kwargs, args.device)
            except Exception as e:  # noqa: BLE001
                print(f"skip {label} on {shape_name}: {type(e).__name__}: {e}", file=sys.stderr)
                cells.append("n/a")
                continue
            formula = FORMULAS.get(method)
            check = ""
            if formula is not None:
                expected = formula(cfg, kwargs)
                check = " ✓" if expected == trainable else f" ✗ (formula {expected:,})"
                mismatches += expected != trainable
            cells.append(f"{trainable:,} ({100 * trainable / total:.3f}%){check}")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    head = "| method (config) | " + " | ".join(f"{n} trainable (% of base)" for n in models) + " |"
    sep = "|---|" + "---|" * len(models)
    totals = []
    for cfg in models.values():
        from transformers import AutoModel

        with torch.device("meta"):
            totals.append(sum(p.numel() for p in AutoModel.from_config(cfg).parameters()))
    print(head)
    print(sep)
    print("\n".join(rows))
    print()
    print("Base parameters: " + ", ".join(f"{n} {t:,}" for n, t in zip(models, totals))
          + ". ✓: equals the analytical formula in benchmarks/param_table.py.")
    return 1 if mismatches else 0


if __name__ == "__main__":
    raise SystemExit(main())
