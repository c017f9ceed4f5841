"""Language modelling: WikiText-2 sliding-window perplexity before and after delta fine-tuning.

:func:`run_perplexity` measures the perplexity of the base model on a WikiText-2 split, fine-tunes
a delta method (LoRA by default) on packed blocks of a slice of the training text, and measures
the perplexity again with the same windows. :func:`load_perplexity_config` reads its YAML file
(``configs/wikitext_lora.yaml``: the sectioned layout of every task, ``model``, ``data``, ``eval``,
``delta``, ``train``, see :data:`deltatune.tasks.layout.PERPLEXITY`; old flat files are mapped onto it)
with the shared loader, ``--set`` overrides, ``--output-dir`` and ``--no-progress`` (the ``deltatune
perplexity`` command); a run directory that already holds a run is replaced only with ``overwrite=True``.
:class:`PerplexityConfig` holds the run's settings as flat fields (for Python).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..api import apply
from ..checkpoint import save_delta
from ..config import config_from_dict
from ..data import read_wikitext
from ..device import resolve_device
from ..errors import DeltaConfigError, DeltaConfigTypeError
from ..freeze import trainable_summary
from ..io_utils import atomic_write_text
from ..metrics import perplexity
from ..models import load
from ..train import TrainConfig, Trainer, set_seed
from ..validation import check_bool, check_choice, check_int, check_known_keys, check_type
from .layout import PERPLEXITY, flatten, legacy_override, to_sections
from .loader import resolve_data_dir
from .overrides import OverrideSchema, apply_overrides
from .rundir import DELTA_DIR, RESULT_FILE, prepare_run_dir, write_config
from .spec import check_config_kind, check_run_fields, plain, read_yaml

__all__ = [
    "PERPLEXITY_SCHEMA",
    "PerplexityConfig",
    "WIKITEXT_FILES",
    "load_perplexity_config",
    "pack_token_blocks",
    "run_perplexity",
    "wikitext_path",
]

#: WikiText-2 split -> file name inside ``<data_dir>/wikitext-2``.
WIKITEXT_FILES: dict[str, str] = {
    "train": "wiki.train.tokens",
    "valid": "wiki.valid.tokens",
    "test": "wiki.test.tokens",
}


def wikitext_path(data_dir: str | os.PathLike, split: str) -> str:
    """Path of a WikiText-2 split (``data_dir`` holds ``wikitext-2/`` or is that folder)."""
    check_choice("split", split, tuple(WIKITEXT_FILES))
    data_dir = os.fspath(data_dir)
    sub = os.path.join(data_dir, "wikitext-2")
    base = sub if os.path.isdir(sub) else data_dir
    return os.path.join(base, WIKITEXT_FILES[split])


@dataclasses.dataclass
class PerplexityConfig:
    """A perplexity run: base model, then a delta fine-tune, then the same evaluation. Flat fields (for
    Python); in a YAML file they sit in the sections of :data:`deltatune.tasks.layout.PERPLEXITY`
    (``eval_max_tokens`` is ``eval.max_tokens``, ``block_size`` is ``data.block_size``, ``seed`` is
    ``train.seed`` ...), read by :func:`load_perplexity_config`.

    Attributes:
        model: a registered name (``"smollm2-135m"``), an HF directory or a ``.gguf`` file.
        data_dir: the folder holding ``wikitext-2/``.
        eval_split: ``"valid"`` or ``"test"``.
        eval_max_tokens: score only the first N tokens of the split (``None`` = all).
        max_length: window length; ``stride``: distance between windows (<= ``max_length``).
        eval_batch_size: windows per forward pass.
        train_max_tokens: tokens of the start of ``wiki.train.tokens`` used for training.
        block_size: length of the packed training blocks (the last partial block is dropped).
        delta: the method config (a dict with ``method``; default LoRA r=8, alpha=16 on q/v).
        train: :class:`~deltatune.train.TrainConfig` fields (epochs or max_steps, batch_size, lr ...).
        seed, device, dtype, num_threads, progress; output_dir: ``result.json``, the training log and the
            trained delta (``delta/``); ``None`` writes nothing.
    """

    model: str = "smollm2-135m"
    data_dir: str = "../shared/data"
    eval_split: str = "valid"
    eval_max_tokens: int | None = None
    max_length: int = 256
    stride: int = 128
    eval_batch_size: int = 4
    train_max_tokens: int = 100_000
    block_size: int = 256
    delta: dict[str, Any] = dataclasses.field(
        default_factory=lambda: {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.05,
                                 "target_modules": ["q_proj", "v_proj"]}
    )
    train: dict[str, Any] = dataclasses.field(default_factory=dict)
    seed: int = 42
    device: str = "auto"
    dtype: str | None = None
    num_threads: int | None = None
    output_dir: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field and that the WikiText files exist; nothing is loaded."""
        n = "PerplexityConfig"
        check_type(f"{n}.model", self.model, (str, os.PathLike), "a registered model name or a path")
        self.model = os.fspath(self.model)
        check_type(f"{n}.data_dir", self.data_dir, (str, os.PathLike), "a directory path")
        self.data_dir = os.fspath(self.data_dir)
        check_choice(f"{n}.eval_split", self.eval_split, ("valid", "test"))
        for split in ("train", self.eval_split):
            path = wikitext_path(self.data_dir, split)
            if not os.path.isfile(path):
                raise DeltaConfigError(f"{n}.data_dir must hold wikitext-2/{WIKITEXT_FILES[split]}, got {self.data_dir!r} ({path} does not exist)")
        if self.eval_max_tokens is not None:
            check_int(f"{n}.eval_max_tokens", self.eval_max_tokens, minimum=2)
        check_int(f"{n}.max_length", self.max_length, minimum=2)
        check_int(f"{n}.stride", self.stride, minimum=1)
        if self.stride > self.max_length:
            raise DeltaConfigError(f"{n}.stride must be an int <= max_length ({self.max_length}), got {self.stride}")
        check_int(f"{n}.eval_batch_size", self.eval_batch_size, minimum=1)
        check_int(f"{n}.block_size", self.block_size, minimum=2)
        check_int(f"{n}.train_max_tokens", self.train_max_tokens, minimum=self.block_size)
        check_type(f"{n}.delta", self.delta, Mapping, "a method config dict with a 'method' key")
        check_type(f"{n}.train", self.train, Mapping, "a dict of TrainConfig fields")
        for key in ("seed", "output_dir", "device"):
            if key in self.train:
                raise DeltaConfigError(f"{n}.train must not set {key!r} (use the run's own field), got {self.train[key]!r}")
        check_run_fields(self)
        check_bool(f"{n}.progress", self.progress)
        config_from_dict(self.delta)
        self.train_config()

    def train_config(self) -> TrainConfig:
        """The validated :class:`~deltatune.train.TrainConfig`."""
        fields = {"tensorboard": False, "save_final": False, "lr": 1e-3, **dict(self.train)}
        fields.update(seed=self.seed, device=self.device, output_dir=self.output_dir)
        fields.setdefault("progress_bar", self.progress)
        return TrainConfig.from_dict(fields)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PerplexityConfig:
        """Build from a mapping; unknown keys raise ``DeltaConfigError`` listing the known ones."""
        if not isinstance(data, Mapping):
            raise DeltaConfigTypeError(f"PerplexityConfig needs a mapping, got {type(data).__name__}")
        check_known_keys("PerplexityConfig", data, [f.name for f in dataclasses.fields(cls)])
        return cls(**dict(data))

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> PerplexityConfig:
        """Read a YAML file; see :func:`load_perplexity_config`."""
        return load_perplexity_config(path)

    def to_sections(self) -> dict[str, Any]:
        """The run's settings in the sectioned layout (what ``config.yaml`` holds)."""
        flat = json.loads(json.dumps(dataclasses.asdict(self), default=str))
        flat.pop("progress")
        return plain(to_sections({**flat, "task": "perplexity"}, PERPLEXITY))


#: ``--set`` in a perplexity config: ``eval.max_tokens=512``, ``data.data_dir=...``, ``train.lr=1e-3``,
#: ``delta.r=16``; old flat paths (``eval_max_tokens=512``, ``seed=3``) are mapped onto the sections.
PERPLEXITY_SCHEMA = OverrideSchema(
    "perplexity config",
    (*PERPLEXITY.top, *PERPLEXITY.sections),
    tuple(PERPLEXITY.sections),
    ("model", "data", "eval", "train"),
    lambda parts, value: legacy_override(parts, value, PERPLEXITY),
)


def load_perplexity_config(
    source: str | os.PathLike | Mapping[str, Any],
    overrides: Sequence[str] = (),
    *,
    output_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
) -> PerplexityConfig:
    """Read a perplexity YAML file (or mapping) in the sectioned layout (an old flat one is mapped by
    :func:`deltatune.tasks.layout.to_sections`), apply ``--set`` overrides (see
    :func:`deltatune.tasks.overrides.apply_overrides`), then ``output_dir`` / ``progress`` when given.

    Raises:
        WrongCommandError: the file ``source`` is a recipe or a sweep config (the message names its subcommand).
        DeltaConfigError: unknown or invalid keys or values, ``task`` other than ``perplexity``.
    """
    base = None
    if isinstance(source, Mapping):
        data = dict(source)
    else:
        check_type("config", source, (str, os.PathLike), "a YAML file path or a mapping")
        data = read_yaml(source, "perplexity config")
        check_config_kind(data, source, "perplexity", ("perplexity",))
        base = Path(source).resolve().parent
    data = apply_overrides(to_sections(data, PERPLEXITY), list(overrides), PERPLEXITY_SCHEMA)
    if base is not None:  # a file: data.data_dir is found as a recipe's is (cwd, the file's folder, its parent)
        section = data.get("data") or {}
        check_type("data", section, Mapping, "a mapping (the config's data section)")
        data["data"] = {**section, "data_dir": resolve_data_dir(section.get("data_dir"), base)}
    if output_dir is not None:
        data["output_dir"] = os.fspath(output_dir)
    if progress is not None:
        data["progress"] = progress
        if not progress and isinstance(data.get("train"), Mapping):
            data["train"] = {**data["train"], "progress_bar": False}
    return PerplexityConfig.from_dict(flatten(data, PERPLEXITY))


def pack_token_blocks(ids: list[int], block_size: int) -> list[dict[str, list[int]]]:
    """Cut a token stream into consecutive full blocks (``input_ids`` = ``labels``); the rest is dropped."""
    check_int("block_size", block_size, minimum=2)
    n = len(ids) // block_size
    if n == 0:
        raise DeltaConfigError(f"the training text has {len(ids)} tokens, fewer than one block of {block_size}")
    return [
        {"input_ids": ids[i * block_size : (i + 1) * block_size], "labels": ids[i * block_size : (i + 1) * block_size]}
        for i in range(n)
    ]


def _tokens(tokenizer: Any, text: str) -> list[int]:
    """The token ids of a whole text; windows cut it later, so the tokenizer's length warning is off."""
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def run_perplexity(cfg: PerplexityConfig | Mapping[str, Any], *, overwrite: bool = False) -> dict[str, Any]:
    """Perplexity of the base model, a delta fine-tune on WikiText-2 train, perplexity again.

    Returns ``{"base": {"perplexity", "nll", "tokens"}, "tuned": {...}, "method", "trainable_params",
    "trainable_percent", "train_blocks", "steps", "train_loss", "time_per_step_s", "peak_memory_mb",
    "eval_split", "max_length", "stride", "eval_tokens", "base_eval_time_s", "tuned_eval_time_s"}``.
    With ``output_dir``, ``result.json``, the training log and ``delta/`` are written there; a directory
    that already holds a run (``result.json`` or ``train_log.jsonl``) raises ``DeltaConfigError`` before
    any work unless ``overwrite``.
    """
    if isinstance(cfg, Mapping):
        cfg = load_perplexity_config(cfg)
    check_type("cfg", cfg, PerplexityConfig, "a PerplexityConfig or a dict")
    cfg.validate()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    tcfg = cfg.train_config()
    tcfg.check_cuda_graph_device()  # before the model is loaded
    if cfg.output_dir is not None:
        out = prepare_run_dir(cfg.output_dir, overwrite=overwrite, resumable=False)
        write_config(out, cfg.to_sections())
    set_seed(cfg.seed)
    model, tokenizer = load(cfg.model, task="causal-lm", dtype=cfg.dtype, progress=cfg.progress)
    device = resolve_device(cfg.device, field="device")
    model.to(device)

    eval_ids = _tokens(tokenizer, read_wikitext(wikitext_path(cfg.data_dir, cfg.eval_split)))
    if cfg.eval_max_tokens is not None:
        eval_ids = eval_ids[: cfg.eval_max_tokens]
    eval_tensor = torch.tensor(eval_ids, dtype=torch.long)
    ppl_kw = {"max_length": cfg.max_length, "stride": cfg.stride, "batch_size": cfg.eval_batch_size,
              "progress": cfg.progress}
    t0 = time.perf_counter()
    base = perplexity(model, eval_tensor, **ppl_kw)
    base_time = time.perf_counter() - t0

    # ~4-5 characters per token in WikiText: read a generous prefix, tokenise, cut to the budget
    train_text = read_wikitext(wikitext_path(cfg.data_dir, "train"))
    train_ids = _tokens(tokenizer, train_text[: cfg.train_max_tokens * 8])[: cfg.train_max_tokens]
    blocks = pack_token_blocks(train_ids, cfg.block_size)

    apply(model, dict(cfg.delta))
    summ = trainable_summary(model)
    trainer = Trainer(model, tcfg, blocks)
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    t0 = time.perf_counter()
    tuned = perplexity(trainer.model, eval_tensor.to(trainer.device), **ppl_kw)
    tuned_time = time.perf_counter() - t0
    steps = int(summary["steps"])
    result = {
        "model": cfg.model,
        "method": cfg.delta["method"],
        "delta": dict(cfg.delta),
        "base": base,
        "tuned": tuned,
        "eval_split": cfg.eval_split,
        "eval_tokens": len(eval_ids),
        "max_length": cfg.max_length,
        "stride": cfg.stride,
        "train_tokens": len(train_ids),
        "train_blocks": len(blocks),
        "block_size": cfg.block_size,
        "steps": steps,
        "lr": tcfg.lr,
        "batch_size": tcfg.batch_size,
        "train_loss": summary.get("train_loss"),
        "trainable_params": int(summ.trainable),
        "total_params": int(summ.total),
        "trainable_percent": 100.0 * summ.trainable / summ.total,
        "time_per_step_s": float(summary["wall_time_s"]) / steps if steps else None,
        "peak_memory_mb": float(summary["peak_mem_mb"]),
        "memory_kind": "cuda_allocated" if trainer.device.type == "cuda" else "cpu_rss",
        "base_eval_time_s": base_time,
        "tuned_eval_time_s": tuned_time,
        "device": str(trainer.device),
        "delta_dir": None,
    }
    if cfg.output_dir is not None:
        out = Path(cfg.output_dir)
        save_delta(trainer.model, out / DELTA_DIR)
        result["delta_dir"] = str(out / DELTA_DIR)
        atomic_write_text(out / RESULT_FILE, json.dumps(result, indent=2) + "\n")
    return result
