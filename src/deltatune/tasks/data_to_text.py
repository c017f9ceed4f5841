"""The data-to-text task (E2E, WebNLG, DART): train -> generate -> score -> report, and its steps.

This module owns the pipeline of a validated :class:`~deltatune.tasks.spec.Recipe`:

* :func:`prepare_data`: load and sample the splits (training, validation loss, decoded and scored);
* :func:`finetune`: load the model, apply the delta, train, save the delta (``model/`` for full
  fine-tuning);
* :func:`generate_predictions`: decode the eval split with the trained run;
* :func:`run_recipe`: all of it, scored by :func:`deltatune.tasks.evaluate.evaluate_run`;
* :func:`export_run_gguf`: a finished run as a GGUF file.

:func:`resolve_run_recipe` makes a run directory's own ``config.yaml`` the source of truth of the
steps that continue a run (``generate``, ``evaluate``): a differing recipe is an error naming the
differing fields, or, when asked for, an override recorded in the run's files.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._version import software_versions
from ..api import apply, merge, unmerge
from ..checkpoint import load_delta, save_delta
from ..data import (
    CausalLMCollator,
    DataToTextExample,
    build_causal_lm_features,
    build_generation_prompts,
    load_data_to_text,
    stratified_sample,
)
from ..device import resolve_device
from ..errors import CheckpointError, DeltaConfigError
from ..export_gguf import (
    ExportSpec,
    check_exportable,
    default_filename,
    export_gguf,
    source_gguf_of,
)
from ..freeze import trainable_summary
from ..generate import generate_text
from ..methods import get_method
from ..models import load
from ..preflight import check_applicable
from ..train import TrainConfig, Trainer
from ..train.logging import peak_memory_mb, reset_peak_memory
from ..validation import check_type
from .evaluate import evaluate_run
from .loader import load_recipe
from .rundir import (
    CATEGORIES_FILE,
    CONFIG_FILE,
    DELTA_DIR,
    GENERATION_INFO_FILE,
    MODEL_DIR,
    PREDICTIONS_FILE,
    REFERENCES_FILE,
    RUN_INFO_FILE,
    SOURCES_FILE,
    prepare_run_dir,
    rank,
    write_config,
    write_json,
    write_lines,
    write_references,
)
from .spec import Recipe

__all__ = [
    "CUDA_GRAPH_PAD_MULTIPLE",
    "RunData",
    "apply_delta",
    "export_run_gguf",
    "feature_kwargs",
    "finetune",
    "generate_outputs",
    "generate_predictions",
    "load_model",
    "prepare_data",
    "resolve_run_recipe",
    "run_recipe",
    "train_collator",
]

#: padding multiple of training batches when their steps are captured as CUDA graphs: sequences up to
#: 128 tokens then come in at most 8 shapes (Trainer.MAX_CUDA_GRAPHS)
CUDA_GRAPH_PAD_MULTIPLE = 16


# ================================================================================================
# data


@dataclass
class RunData:
    """The examples a run uses: training, validation-loss and evaluation (decoded and scored) inputs."""

    train: list[DataToTextExample]
    dev: list[DataToTextExample]
    eval: list[DataToTextExample]


def _subset(examples: list[Any], fraction: float, seed: int) -> list[Any]:
    return list(examples) if fraction >= 1.0 else stratified_sample(examples, fraction, seed=seed)


def prepare_data(recipe: Recipe, *, need_train: bool = True) -> RunData:
    """Load and sample the recipe's splits (see :class:`~deltatune.tasks.spec.DataSpec` and
    :class:`~deltatune.tasks.spec.EvalSpec`).

    Raises:
        DeltaConfigError: a split that comes out empty, or evaluation inputs without references.
    """
    d, ev = recipe.data, recipe.eval
    cache: dict[str, list[Any]] = {}

    def split_examples(split: str) -> list[Any]:
        if split not in cache:
            cache[split] = load_data_to_text(d.dataset, split, d.data_dir, d.format)  # type: ignore[arg-type]
        return cache[split]

    train: list[Any] = []
    dev: list[Any] = []
    if need_train:
        pool = split_examples(d.train_split)
        if d.dev_split is not None and d.dev_split == d.train_split:
            held = stratified_sample(pool, d.dev_holdout_fraction, seed=d.seed)
            held_ids = {id(e) for e in held}
            dev = _subset(held, d.dev_fraction, d.seed)
            pool = [e for e in pool if id(e) not in held_ids]
        elif d.dev_split is not None:
            dev = _subset(split_examples(d.dev_split), d.dev_fraction, d.seed)
        train = [e for e in _subset(pool, d.sample_fraction, d.seed) if e.references]
        if not train:
            raise DeltaConfigError(
                f"the training split {d.train_split!r} of {d.dataset} has no example with references after sampling "
                f"(data.sample_fraction={d.sample_fraction:g})"
            )
        dev = [e for e in dev if e.references]
    items = split_examples(ev.split)
    seed = ev.seed if ev.seed is not None else d.seed
    items = _subset(items, ev.sample_fraction, seed)
    if ev.max_examples is not None and len(items) > ev.max_examples:
        rng = random.Random(seed)
        keep = sorted(rng.sample(range(len(items)), ev.max_examples))
        items = [items[i] for i in keep]
    missing = sum(1 for e in items if not e.references)
    if missing:
        raise DeltaConfigError(
            f"eval.split={ev.split!r} of {d.dataset} has {missing} input(s) without references; it cannot be scored "
            f"(use a split with references, e.g. E2E testset_w_refs.csv)"
        )
    if not items:
        raise DeltaConfigError(f"eval.split={ev.split!r} of {d.dataset} holds no input")
    return RunData(train=train, dev=dev, eval=items)


def feature_kwargs(recipe: Recipe) -> dict[str, Any]:
    """The prompt-format arguments of :func:`deltatune.data.build_causal_lm_features` /
    :func:`~deltatune.data.build_generation_prompts` for ``recipe``."""
    d, m = recipe.data, recipe.model
    return {
        "prompt_template": d.prompt_template,
        "separator": d.separator,
        "add_bos": d.add_bos,
        "use_chat_template": m.chat_template,
        "system_prompt": m.system_prompt,
    }


# ================================================================================================
# model


def load_model(recipe: Recipe, progress: bool = True) -> tuple[Any, Any]:
    """The recipe's base model and tokenizer (after setting ``num_threads``); ``progress=False``: no bars."""
    if recipe.num_threads is not None:
        torch.set_num_threads(recipe.num_threads)
    return load(recipe.model.name_or_path, task="causal-lm", dtype=recipe.model.dtype, progress=progress)


def _check_placement(recipe: Recipe) -> None:
    """Checks of the training placement that need the machine (run before any work)."""
    recipe.train.check_cuda_graph_device()
    if recipe.is_full and recipe.train.distributed == "fsdp":
        raise DeltaConfigError(
            "train.distributed must be 'none' or 'ddp' for full fine-tuning recipes (method: full), got 'fsdp'; "
            "FSDP recipes train a delta method"
        )


def apply_delta(recipe: Recipe, model: Any) -> None:
    """Apply the recipe's delta to ``model`` (full fine-tuning: make every parameter trainable)."""
    config = recipe.delta_config()
    if config is None:
        model.requires_grad_(True)
        return
    # the adapter's initial weights depend on the seed alone (identical on every rank, and the same
    # under torchrun as in one process), not on whatever consumed random numbers before
    torch.manual_seed(recipe.train.seed)
    apply(model, config)


def _save_final(model: Any, tokenizer: Any, run_dir: Path) -> Path:
    """Save a fully fine-tuned model and its tokenizer as ``model/`` (the previous one replaced by one rename)."""
    final = run_dir / MODEL_DIR
    tmp = run_dir / f".tmp-{MODEL_DIR}-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        old = run_dir / f".tmp-{MODEL_DIR}-old-{uuid.uuid4().hex[:8]}"
        if final.exists():  # move the previous model aside (one rename) instead of deleting it first
            os.rename(final, old)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return final


def train_collator(pad_token_id: int, train: TrainConfig) -> CausalLMCollator:
    """The collate function of a recipe's training batches (``train``: its
    :class:`~deltatune.train.TrainConfig`): dynamic padding, rounded up to :data:`CUDA_GRAPH_PAD_MULTIPLE`
    when the steps may be captured as CUDA graphs (``train.may_capture()``: ``cuda_graph`` true, or ``"auto"``
    on a CUDA device; few batch shapes)."""
    return CausalLMCollator(
        pad_token_id=pad_token_id, pad_to_multiple_of=CUDA_GRAPH_PAD_MULTIPLE if train.may_capture() else None
    )


def _save_delta_fn(m: Any, directory: Path) -> None:
    save_delta(m, directory)


def _load_delta_fn(m: Any, directory: Path) -> None:
    load_delta(m, directory)


def _train(recipe: Recipe, model: Any, tokenizer: Any, data: RunData, run_dir: Path, progress: bool) -> dict[str, Any]:
    """Tokenise, apply the delta, train, save the final delta (or model); returns the summary."""
    kw = feature_kwargs(recipe)
    d = recipe.data
    feats = build_causal_lm_features(
        data.train, tokenizer, max_length=d.max_length, target_prefix=d.target_prefix,
        expand_references=d.expand_references, progress=progress, **kw,
    )
    dev_feats = (
        build_causal_lm_features(data.dev, tokenizer, max_length=d.max_length, target_prefix=d.target_prefix,
                                 progress=progress, **kw)
        if data.dev
        else None
    )
    apply_delta(recipe, model)
    s = trainable_summary(model)
    info = {
        "trainable_params": s.trainable,
        "total_params": s.total,
        "trainable_percent": s.percent,
        "method": recipe.method,
        "model": recipe.model.name_or_path,
        "dataset": d.dataset,
        "train_examples": len(data.train),
        "train_features": len(feats),
        "dev_examples": len(data.dev),
        "versions": software_versions(),
    }
    if rank() == 0:
        write_json(run_dir / RUN_INFO_FILE, info)
    save_fn, load_fn = (None, None) if recipe.is_full else (_save_delta_fn, _load_delta_fn)
    train_cfg = dataclasses.replace(recipe.train, progress_bar=recipe.train.progress_bar and progress)
    collator = train_collator(int(tokenizer.pad_token_id), train_cfg)
    with Trainer(
        model, train_cfg, feats, eval_dataset=dev_feats, collate_fn=collator, save_fn=save_fn, load_fn=load_fn
    ) as trainer:
        summary = trainer.train()
        sharded = bool(trainer.is_fsdp)
        if not recipe.is_full:
            trainer.save_delta(run_dir / DELTA_DIR)  # collective under FSDP; rank 0 writes
        elif trainer.is_main:
            _save_final(model, tokenizer, run_dir)
    return {**summary, **info, "sharded": sharded}


def _load_trained(recipe: Recipe, checkpoint: str | os.PathLike | None, progress: bool = True) -> tuple[Any, Any]:
    """The base model with the run's trained delta (or the fully fine-tuned model) loaded."""
    run_dir = recipe.run_dir
    if recipe.is_full:
        path = Path(checkpoint) if checkpoint is not None else run_dir / MODEL_DIR
        if not (path / "config.json").is_file():
            raise CheckpointError(
                f"no fully fine-tuned model at {os.fspath(path)!r}; run `deltatune finetune` first (or pass --checkpoint)"
            )
        if recipe.num_threads is not None:
            torch.set_num_threads(recipe.num_threads)
        return load(path, task="causal-lm", dtype=recipe.model.dtype, progress=progress)
    path = Path(checkpoint) if checkpoint is not None else run_dir / DELTA_DIR
    if not path.is_dir():
        raise CheckpointError(
            f"no delta checkpoint at {os.fspath(path)!r}; run `deltatune finetune` first (or pass --checkpoint)"
        )
    model, tok = load_model(recipe, progress)
    load_delta(model, path)
    return model, tok


def generate_outputs(
    recipe: Recipe, model: Any, tokenizer: Any, examples: list[Any], run_dir: Path, progress: bool,
    extra_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Decode ``examples`` and write predictions, references, sources, categories and
    ``generation_info.json`` (with ``extra_info`` added) into ``run_dir``; returns the generation info."""
    device = resolve_device(recipe.train.device, field="train.device")
    model.to(device)
    merged = False
    if recipe.eval.merge and not recipe.is_full and get_method(recipe.method).mergeable:
        merge(model)
        merged = True
    prompts = build_generation_prompts(examples, tokenizer, max_length=recipe.data.max_length, progress=progress,
                                       **feature_kwargs(recipe))
    reset_peak_memory(device)
    t0 = time.perf_counter()
    texts = generate_text(
        model, tokenizer, [p["input_ids"] for p in prompts], recipe.generate,
        batch_size=recipe.eval.batch_size, device=device, progress=progress,
    )
    gen_time = time.perf_counter() - t0
    if merged:
        unmerge(model)
    preds = [" ".join(t.split()) for t in texts]
    write_lines(run_dir / PREDICTIONS_FILE, preds)
    write_references(run_dir / REFERENCES_FILE, [p["references"] for p in prompts])
    write_lines(run_dir / SOURCES_FILE, [p["source"] for p in prompts])
    write_lines(run_dir / CATEGORIES_FILE, [str(examples[p["example_index"]].category) for p in prompts])
    info = {
        "split": recipe.eval.split,
        "num_inputs": len(prompts),
        "num_references": sum(len(p["references"]) for p in prompts),
        "generate_time_s": round(gen_time, 4),
        "generate_peak_memory_mb": round(peak_memory_mb(device), 2),
        "device": str(device),
        "merged": merged,
        "empty_predictions": sum(1 for p in preds if not p),
        **(extra_info or {}),
    }
    write_json(run_dir / GENERATION_INFO_FILE, info)
    return info


# ================================================================================================
# the run directory as the source of truth


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: data}


#: fields a continuing step may give differently without contradicting the run: where the run directory
#: and the data folder are (their spelling depends on the machine and the CWD), how many threads and how
#: large a decoding batch it uses, and the training settings (``train.*``: generate and evaluate read
#: none of them but ``train.device``, where to decode)
_EXECUTION_FIELDS = ("output_dir", "data.data_dir", "num_threads", "eval.batch_size")
_EXECUTION_PREFIXES = ("train.",)


def _compared(field: str) -> bool:
    return field not in _EXECUTION_FIELDS and not field.startswith(_EXECUTION_PREFIXES)


def resolve_run_recipe(recipe: Recipe, *, override_run_config: bool = False) -> tuple[Recipe, dict[str, Any]]:
    """The recipe a step that continues the run in ``recipe.run_dir`` (generate, evaluate) must use.

    When the run directory holds ``config.yaml`` (written by ``run`` / ``finetune``), that file is the
    run's settings: a ``recipe`` that differs from it in any field that generate or evaluate read
    (``name``, ``model.*``, ``delta.*``, ``data.*``, ``generate.*``, ``eval.*``, ``export.*``; not the
    locations ``output_dir`` / ``data.data_dir``, nor ``num_threads``, ``eval.batch_size`` and the
    training settings ``train.*``) raises :class:`~deltatune.errors.DeltaConfigError` naming each
    differing field with both values, unless ``override_run_config``; then ``recipe`` is used and the
    differences are returned (``{field: {"run": value, "given": value}}``) to be recorded. Without
    ``config.yaml``, ``recipe`` is used as it is.
    """
    path = recipe.run_dir / CONFIG_FILE
    if not path.is_file():
        return recipe, {}
    run = load_recipe(path, output_dir=recipe.output_dir, check_data=False, command="evaluate")
    mine, theirs = _flatten(recipe.to_dict()), _flatten(run.to_dict())
    diff = {
        k: {"run": theirs.get(k), "given": mine.get(k)}
        for k in sorted(set(mine) | set(theirs))
        if _compared(k) and mine.get(k) != theirs.get(k)
    }
    if not diff:
        return recipe, {}
    if override_run_config:
        return recipe, diff
    listed = "; ".join(f"{k}: run {v['run']!r}, given {v['given']!r}" for k, v in diff.items())
    raise DeltaConfigError(
        f"the recipe differs from the run's own {os.fspath(path)} in {len(diff)} field(s): {listed}. The run "
        f"directory's config.yaml is the source of truth of its settings: repeat the run's --set flags, leave out "
        f"the recipe, or pass --override-run-config to use the given values (recorded in metrics.json and report.md)"
    )


# ================================================================================================
# the steps and the pipeline


def _start_run_dir(recipe: Recipe, overwrite: bool) -> Path:
    """Rank 0 prepares the run directory and writes the resolved config; other ranks only use it."""
    if rank() != 0:
        return recipe.run_dir
    run_dir = prepare_run_dir(recipe.run_dir, overwrite=overwrite, resuming=recipe.train.resume_from is not None)
    write_config(run_dir, recipe.to_dict())
    return run_dir


def finetune(recipe: Recipe, *, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Step 1 alone: load the model, apply the delta, train, save checkpoints and the final delta.

    Writes ``config.yaml``, ``run_info.json``, the Trainer's logs, checkpoints and
    ``train_summary.json``, and ``delta/`` (``model/`` for full fine-tuning). Returns the training
    summary merged with the trainable-parameter counts.
    """
    check_type("recipe", recipe, Recipe, "a Recipe (see load_recipe)")
    _check_placement(recipe)
    check_applicable(recipe.method, recipe.delta, recipe.model.name_or_path)  # before data and weights
    data = prepare_data(recipe)
    run_dir = _start_run_dir(recipe, overwrite)
    model, tok = load_model(recipe, progress)
    return _train(recipe, model, tok, data, run_dir, progress)


def generate_predictions(
    recipe: Recipe,
    *,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = True,
    run_config_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Step 2 alone: decode ``eval.split`` with the trained run (``delta/``, ``model/`` or ``checkpoint``).

    Writes ``predictions.txt``, ``references.txt``, ``sources.txt``, ``categories.txt`` and
    ``generation_info.json`` into the run directory; returns the generation info.
    ``run_config_overrides`` (from :func:`resolve_run_recipe`) is recorded in ``generation_info.json``.
    """
    check_type("recipe", recipe, Recipe, "a Recipe (see load_recipe)")
    data = prepare_data(recipe, need_train=False)
    run_dir = recipe.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    model, tok = _load_trained(recipe, checkpoint, progress)
    extra = {"run_config_overrides": run_config_overrides} if run_config_overrides else None
    return generate_outputs(recipe, model, tok, data.eval, run_dir, progress, extra)


def run_recipe(recipe: Recipe, *, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run the whole pipeline: train -> generate -> decode -> score -> report.

    Every check runs before any work (:func:`~deltatune.tasks.loader.load_recipe` validated the recipe;
    the data is loaded and sampled before the model). Returns the content of ``metrics.json``; see
    :mod:`deltatune.tasks.rundir` for the files written.
    """
    check_type("recipe", recipe, Recipe, "a Recipe (see load_recipe)")
    _check_placement(recipe)
    check_applicable(recipe.method, recipe.delta, recipe.model.name_or_path)  # before data and weights
    t0 = time.perf_counter()
    data = prepare_data(recipe)
    run_dir = _start_run_dir(recipe, overwrite)
    model, tok = load_model(recipe, progress)
    export = recipe.export if recipe.export is not None and recipe.export.gguf else None
    if export is not None:  # before training: the architecture and the tokenizer source must fit
        check_exportable(model, export.gguf, source_gguf_of(recipe.model.name_or_path), tok)
    summary = _train(recipe, model, tok, data, run_dir, progress)
    if rank() != 0:  # under torchrun, rank 0 alone decodes and scores
        return {}
    if summary.get("sharded"):  # the FSDP-sharded model cannot run on one rank: reload the saved delta
        model, tok = _load_trained(recipe, None, progress)
    if export is not None:
        _export(recipe, model, tok, export, None, progress)
    generate_outputs(recipe, model, tok, data.eval, run_dir, progress)
    return evaluate_run(recipe, run_dir=run_dir, started_at=t0)


def _export(recipe: Recipe, model: Any, tok: Any, spec: ExportSpec, path: Any, progress: bool) -> Path:
    kind, quant = spec.gguf, spec.quant  # ExportSpec has filled in the default quant
    assert kind is not None and quant is not None
    out = Path(path) if path is not None else recipe.run_dir / default_filename(kind, quant)
    if kind == "adapter":
        return export_gguf(model, out, kind=kind, quant=quant, progress=progress)
    source = source_gguf_of(recipe.model.name_or_path)
    return export_gguf(model, out, kind=kind, quant=quant, source_gguf=source,
                       tokenizer=tok if source is None else None, progress=progress, output_quant=spec.output_quant)


def export_run_gguf(
    recipe: Recipe,
    kind: str,
    quant: str | None = None,
    *,
    path: str | os.PathLike | None = None,
    progress: bool = True,
    output_quant: str | None = None,
) -> Path:
    """Export a finished run as GGUF (see :func:`deltatune.export_gguf.export_gguf`): the base model with
    the run's delta (``delta/``, or ``model/`` for full fine-tuning) loaded, written to ``path`` (default:
    ``RUN_DIR/model.<quant>.gguf`` or ``RUN_DIR/adapter.<quant>.gguf``). The tokenizer of a merged file
    comes from the base model's GGUF file, or else from its Hugging Face tokenizer."""
    check_type("recipe", recipe, Recipe, "a Recipe (see load_recipe)")
    spec = ExportSpec(gguf=kind, quant=quant, output_quant=output_quant)
    if kind == "adapter" and recipe.method != "lora":
        raise DeltaConfigError(
            f"kind 'adapter' writes a llama.cpp LoRA adapter and needs a LoRA run, but this run's delta.method is "
            f"{recipe.method!r}; use kind 'merged'"
        )
    model, tok = _load_trained(recipe, None, progress)
    return _export(recipe, model, tok, spec, path, progress)
