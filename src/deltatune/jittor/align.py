"""``deltatune align CONFIG``: one recipe trained in PyTorch and in Jittor, compared step by step.

Both frameworks start from identical weights: the base model's safetensors and the LoRA matrices of
the PyTorch adapter (the recipe's seed initialises them; they are saved to ``init_delta/`` and loaded
into the Jittor model). They see identical batches in identical order (the Trainer's
``EpochBatchSampler`` order, collated by the recipe's collator), the same learning-rate schedule,
loss, clipping and AdamW update. After training, each decodes the same evaluation sample with the
recipe's beam search and is scored by the same scorer.

Modes:

* ``exact``: float32, every dropout off (LoRA dropout and the base model's): the runs must agree
  step by step. Goals: relative loss difference <= 1e-4 at every one of the first 100 steps; the
  trained LoRA matrices within 1e-3 (max |difference| / max |PyTorch value|, per matrix); the
  Jittor-trained delta loaded into PyTorch gives logits within 1e-4 of Jittor's.
* ``seed``: the recipe as written (dropout on), each framework with its own random numbers. Goals:
  average-loss curves (mean over each ``log_every`` window) within 0.02 nats at every logged step
  after warm-up; BLEU within 1.0 point, METEOR and ROUGE-L within 0.02.

Run directory (``output_dir`` of the recipe, or ``--output-dir``)::

    config.yaml            the resolved recipe (mode-adjusted)
    init_delta/            the shared initial LoRA weights (deltatune delta format)
    log_torch.jsonl        per-step log of PyTorch: step, loss, avg_loss, lr, grad_norm, step_time_s
    log_jittor.jsonl       the same for Jittor, plus the validation rows (split "eval": loss, ppl)
    torch/  jittor/        each framework's run: train_log.jsonl, train_summary.json, delta/,
                           predictions.txt, references.txt, metrics.json, report.md, plots
    align.png              loss, average loss, validation loss / perplexity, learning rate of both,
                           and the per-step loss difference
    align_scores.md        the score table (BLEU, NIST, METEOR, ROUGE-L, CIDEr, time per step, peak memory)
    align_summary.json     every measured difference, the scores and the verdicts
    verdict.txt            one PASS/FAIL line per tolerance of the mode
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DeltaConfigError
from . import require_jittor

__all__ = ["ALIGN_MODES", "TOLERANCES", "align", "check_align_recipe", "resolve_model_dir"]

ALIGN_MODES = ("exact", "seed")
#: the goals of each mode (see the module docstring)
TOLERANCES = {
    "exact": {"loss_rel": 1e-4, "loss_steps": 100, "weights_rel": 1e-3, "crossover_logits": 1e-4},
    "seed": {"avg_loss_nats": 0.02, "bleu_points": 1.0, "meteor": 0.02, "rouge_l": 0.02},
}
_SUBDIRS = ("torch", "jittor", "init_delta")
_FILES = ("log_torch.jsonl", "log_jittor.jsonl", "align.png", "align_scores.md", "align_summary.json", "verdict.txt")


def resolve_model_dir(name_or_path: str) -> Path | None:
    """The Hugging Face directory the PyTorch loader reads for ``name_or_path`` (a registered model's
    cache entry, or the directory itself); ``None`` when a GGUF model is not converted yet."""
    from .. import models

    src = models.resolve_source(name_or_path, "causal-lm")
    if src.kind == "hf":
        return src.path
    entry = models.default_cache_dir() / models.gguf_cache_name(src.path, src.cache_name)
    return entry if (entry / "config.json").is_file() else None


def check_align_recipe(recipe: Any, mode: str) -> Path | None:
    """Every check ``align`` makes before any work; returns the model directory (None: GGUF not converted yet).

    Raises:
        DeltaConfigError: an unknown mode, a method other than LoRA, an architecture the Jittor side does
            not implement, gradient accumulation, non-float32 weights or mixed precision in ``exact`` mode,
            a sampling decoder.
        MissingPackageError: jittor is not installed.
    """
    from .lora import check_lora_config
    from .models import check_architecture

    if mode not in ALIGN_MODES:
        raise DeltaConfigError(f"align mode must be one of {', '.join(ALIGN_MODES)}, got {mode!r}")
    require_jittor()
    if recipe.is_full:
        raise DeltaConfigError("the Jittor side implements the delta method 'lora' only, got delta.method 'full'")
    check_lora_config(recipe.delta_config())
    if recipe.train.grad_accum_steps != 1:
        raise DeltaConfigError(f"align needs train.grad_accum_steps: 1, got {recipe.train.grad_accum_steps}")
    if recipe.train.distributed != "none":
        raise DeltaConfigError(f"align runs in one process: train.distributed must be 'none', got {recipe.train.distributed!r}")
    if recipe.generate.do_sample:
        raise DeltaConfigError("align decodes deterministically: generate.do_sample must be false, got true")
    if mode == "exact" and recipe.model.dtype not in (None, "float32"):
        raise DeltaConfigError(f"align --mode exact needs float32 weights: model.dtype must be null or float32, got {recipe.model.dtype!r}")
    model_dir = resolve_model_dir(recipe.model.name_or_path)
    if model_dir is not None:
        check_architecture(model_dir)
    return model_dir


def _mode_recipe(recipe: Any, mode: str) -> Any:
    """The recipe as run by align: per-step logging; in ``exact`` mode no dropout and no mixed precision."""
    train = dataclasses.replace(recipe.train, log_every=1, save_every=0, save_final=False, tensorboard=False)
    delta = dict(recipe.delta)
    if mode == "exact":
        train = dataclasses.replace(train, mixed_precision="no")
        delta["dropout"] = 0.0
    return dataclasses.replace(recipe, train=train, delta=delta)


def _prepare_dir(run_dir: Path, overwrite: bool) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise DeltaConfigError(f"output_dir must be a directory, got the file {os.fspath(run_dir)!r}")
    if (run_dir / "align_summary.json").exists() or (run_dir / "log_torch.jsonl").exists():
        if not overwrite:
            raise DeltaConfigError(
                f"output_dir {os.fspath(run_dir)!r} already holds an alignment run; pass --overwrite to replace it "
                f"or choose another --output-dir"
            )
        for name in _FILES:
            (run_dir / name).unlink(missing_ok=True)
        for sub in _SUBDIRS:
            shutil.rmtree(run_dir / sub, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)


def _jittor_device() -> str:
    """``jittor-cuda`` when Jittor runs its operators on CUDA (its ``use_cuda`` flag), else ``jittor-cpu``."""
    return "jittor-cuda" if require_jittor().flags.use_cuda else "jittor-cpu"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _window_avg(rows: list[dict[str, Any]], every: int) -> None:
    """Set ``avg_loss`` on the last row of each ``every``-step window (and the last row) to the window mean."""
    for i, row in enumerate(rows):
        if (i + 1) % every == 0 or i + 1 == len(rows):
            start = (i // every) * every
            win = [r["loss"] for r in rows[start : i + 1]]
            row["avg_loss"] = float(sum(win) / len(win))


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    from ..io_utils import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _train_torch(recipe: Any, mode: str, model: Any, tok: Any, feats: Any, dev_feats: Any, out: Path, progress: bool) -> dict[str, Any]:
    import torch

    from ..tasks.data_to_text import train_collator
    from ..train import Trainer

    if mode == "exact":
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    cfg = dataclasses.replace(recipe.train, output_dir=os.fspath(out), progress_bar=recipe.train.progress_bar and progress)
    collator = train_collator(int(tok.pad_token_id), cfg)
    t0 = time.perf_counter()
    with Trainer(model, cfg, feats, eval_dataset=dev_feats, collate_fn=collator) as trainer:
        plan = {"total_steps": trainer.total_steps, "warmup_steps": trainer.warmup_steps,
                "batches_per_epoch": trainer.batches_per_epoch}
        summary = trainer.train()
        history = list(trainer.log_history)
        trainer.save_delta(out / "delta")
    rows, evals, prev = [], [], 0.0
    for rec in history:
        if rec.get("split") == "train":
            el = float(rec["elapsed"])
            rows.append({"split": "train", "step": rec["step"], "loss": rec["loss"], "lr": rec["lr"],
                         "grad_norm": rec.get("grad_norm"), "step_time_s": el - prev})
            prev = el
        elif rec.get("split") == "eval":
            evals.append({"split": "eval", "step": rec["step"], "loss": rec["loss"], "ppl": rec["ppl"]})
    _window_avg(rows, recipe_log_every(recipe))
    return {"rows": rows, "evals": evals, "summary": summary, "plan": plan, "collator": collator,
            "wall_s": time.perf_counter() - t0, "peak_rss_mb": _peak_rss_mb()}


def recipe_log_every(recipe: Any) -> int:
    """The averaging window of ``avg_loss``: the recipe's original ``log_every`` (align logs every step)."""
    return int(getattr(recipe, "_align_log_every", recipe.train.log_every))


def _train_jittor(
    recipe: Any, mode: str, jmodel: Any, feats: Any, dev_feats: Any, plan: dict[str, Any], collator: Any,
    out: Path, progress: bool,
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from ..train.distributed import EpochBatchSampler
    from ..train.schedules import lr_factor
    from .lora import save_delta, set_mode, trainable
    from .train import AdamW, evaluate, train_step

    jt = require_jittor()
    c = recipe.train
    jt.set_global_seed(c.seed)
    params = list(trainable(jmodel).values())
    opt = AdamW(params, lr=c.lr, betas=tuple(c.adam_betas), eps=c.adam_eps, weight_decay=c.weight_decay,
                bias_correction=c.bias_correction)
    clip = c.max_grad_norm if c.max_grad_norm else None
    total, warmup = plan["total_steps"], plan["warmup_steps"]
    eval_bs = c.eval_batch_size or c.batch_size
    set_mode(jmodel, True, dropout=(mode == "seed"))
    rows: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    step, epoch = 0, 0
    t_start = time.perf_counter()
    bar = tqdm(total=total, desc="train (jittor)", disable=not (progress and c.progress_bar), dynamic_ncols=True)
    try:
        while step < total:
            sampler = EpochBatchSampler(len(feats), c.batch_size, seed=c.seed, epoch=epoch, shuffle=c.shuffle)
            for idx in sampler:
                if step >= total:
                    break
                batch = collator([feats[i] for i in idx])
                opt.lr = c.lr * lr_factor(c.scheduler, step, warmup, total)
                t0 = time.perf_counter()
                res = train_step(jmodel, params, opt, batch, c.label_smoothing, clip)
                dt = time.perf_counter() - t0
                step += 1
                rows.append({"split": "train", "step": step, "loss": res["loss_sum"] / max(res["n"], 1), "lr": opt.lr,
                             "grad_norm": res["grad_norm"], "step_time_s": dt})
                bar.update(1)
                bar.set_postfix(loss=f"{rows[-1]['loss']:.4f}", refresh=False)
                if dev_feats is not None and c.eval_every and step % c.eval_every == 0:
                    m = evaluate(jmodel, dev_feats, collator, eval_bs)
                    evals.append({"split": "eval", "step": step, "loss": m["eval_loss"], "ppl": m["eval_ppl"]})
                if step % 20 == 0:
                    jt.gc()
            epoch += 1
    finally:
        bar.close()
    if dev_feats is not None and (not evals or evals[-1]["step"] != step):
        m = evaluate(jmodel, dev_feats, collator, eval_bs)
        evals.append({"split": "eval", "step": step, "loss": m["eval_loss"], "ppl": m["eval_ppl"]})
    set_mode(jmodel, False)
    wall = time.perf_counter() - t_start
    _window_avg(rows, recipe_log_every(recipe))
    save_delta(jmodel, out / "delta")
    # the Trainer's file formats, so that deltatune's report and plots read the Jittor run too
    elapsed, log = 0.0, []
    for r in rows:
        elapsed += r["step_time_s"]
        log.append({"split": "train", "step": r["step"], "loss": r["loss"], "lr": r["lr"], "grad_norm": r["grad_norm"],
                    "elapsed": round(elapsed, 4)})
    log += [{"split": "eval", "step": e["step"], "loss": e["loss"], "ppl": e["ppl"]} for e in evals]
    log.sort(key=lambda r: (r["step"], r["split"] == "eval"))
    _write_jsonl(out / "train_log.jsonl", log)
    summary = {"steps": step, "train_loss": float(np.mean([r["loss"] for r in rows])) if rows else None,
               "final_loss": rows[-1]["loss"] if rows else None, "wall_time_s": round(wall, 4),
               "peak_mem_mb": round(_peak_rss_mb(), 2)}
    if evals:
        summary.update({"eval_loss": evals[-1]["loss"], "eval_ppl": evals[-1]["ppl"]})
    from ..tasks.rundir import write_json as _write_json

    _write_json(out / "train_summary.json", summary)
    return {"rows": rows, "evals": evals, "summary": summary, "wall_s": wall, "peak_rss_mb": _peak_rss_mb()}


def _decode_jittor(recipe: Any, jmodel: Any, tok: Any, torch_model: Any, examples: list[Any], out: Path, progress: bool) -> dict[str, Any]:
    from ..data import build_generation_prompts
    from ..generate import _resolve_special_ids
    from ..tasks.data_to_text import feature_kwargs as _feature_kwargs
    from ..tasks.rundir import (
        GENERATION_INFO_FILE,
        PREDICTIONS_FILE,
        REFERENCES_FILE,
        SOURCES_FILE,
        write_references,
    )
    from ..tasks.rundir import write_json as _write_json
    from ..tasks.rundir import write_lines as _write_lines
    from .generate import generate

    prompts = build_generation_prompts(examples, tok, max_length=recipe.data.max_length, **_feature_kwargs(recipe))
    eos, pad = _resolve_special_ids(recipe.generate, tok, torch_model)
    t0 = time.perf_counter()
    ids = generate(jmodel, [p["input_ids"] for p in prompts], recipe.generate, eos_token_id=eos, pad_token_id=pad,
                   batch_size=recipe.eval.batch_size, progress=progress)
    gen_time = time.perf_counter() - t0
    preds = [" ".join(tok.decode(i, skip_special_tokens=True).split()) for i in ids]
    _write_lines(out / PREDICTIONS_FILE, preds)
    write_references(out / REFERENCES_FILE, [p["references"] for p in prompts])
    _write_lines(out / SOURCES_FILE, [p["source"] for p in prompts])
    info = {"split": recipe.eval.split, "num_inputs": len(prompts), "num_references": sum(len(p["references"]) for p in prompts),
            "generate_time_s": round(gen_time, 4), "generate_peak_memory_mb": round(_peak_rss_mb(), 2),
            "device": _jittor_device(), "merged": False, "empty_predictions": sum(1 for p in preds if not p)}
    _write_json(out / GENERATION_INFO_FILE, info)
    return {"ids": ids, "info": info}


def lora_rel_diff(ref: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """align's weight measure, per matrix and element: ``|other - ref| / max|ref|`` (float64; a zero
    matrix divides by 1)."""
    return {k: np.abs(other[k].astype(np.float64) - r) / (float(np.abs(r).max()) or 1.0) for k, r in ref.items()}


def _lora_weight_diff(torch_dir: Path, jittor_dir: Path) -> tuple[float, float]:
    """(max over matrices of max|J - T| / max|T|, max over matrices of ||J - T||_F / ||T||_F)."""
    from safetensors.numpy import load_file

    a = load_file(os.fspath(torch_dir / "delta.safetensors"))
    b = load_file(os.fspath(jittor_dir / "delta.safetensors"))
    worst = max((float(r.max()) for r in lora_rel_diff(a, b).values()), default=0.0)
    worst_fro = max((float(np.linalg.norm(b[k] - ta)) / (float(np.linalg.norm(ta)) or 1.0) for k, ta in a.items()),
                    default=0.0)
    return worst, worst_fro


def _crossover(recipe: Any, jmodel: Any, jittor_delta: Path, batch: dict[str, Any]) -> float:
    """Max |logit difference| between Jittor and a fresh PyTorch model with the Jittor delta loaded."""
    import torch

    from ..checkpoint import load_delta
    from ..tasks.data_to_text import load_model as _load_model

    model, _ = _load_model(recipe)
    load_delta(model, jittor_delta)
    model.eval()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        tl = model(input_ids=ids, attention_mask=mask).logits.float().numpy()
    from .models import to_np

    jl, _ = jmodel(ids.numpy(), attention_mask=mask.numpy())
    jl = to_np(jl)
    valid = mask.numpy().astype(bool)
    return float(np.abs(tl - jl)[valid].max())


def _plot(torch_res: dict[str, Any], jit_res: dict[str, Any], path: Path, every: int) -> Path:
    from ..report import _figure, _save_png

    fig, axes = _figure(ncols=5)
    tr, jr = torch_res["rows"], jit_res["rows"]
    s = [r["step"] for r in tr]
    ax = axes[0]
    ax.plot(s, [r["loss"] for r in tr], label="PyTorch", lw=1.2)
    ax.plot([r["step"] for r in jr], [r["loss"] for r in jr], "--", label="Jittor", lw=1.2)
    ax.set_title("training loss (per step)")
    ax = axes[1]
    for res, style, name in ((tr, "o-", "PyTorch"), (jr, "x--", "Jittor")):
        pts = [(r["step"], r["avg_loss"]) for r in res if "avg_loss" in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name, ms=3)
    ax.set_title(f"average loss (window {every})")
    ax = axes[2]
    for res, style, name in ((torch_res, "o-", "PyTorch"), (jit_res, "x--", "Jittor")):
        ev = res["evals"]
        if ev:
            ax.plot([e["step"] for e in ev], [e["loss"] for e in ev], style, label=f"{name} val loss", ms=4)
    ax2 = ax.twinx()
    for res, style, name in ((torch_res, "s:", "PyTorch"), (jit_res, "+:", "Jittor")):
        ev = res["evals"]
        if ev:
            ax2.plot([e["step"] for e in ev], [e["ppl"] for e in ev], style, label=f"{name} val ppl", ms=4, alpha=0.6)
    ax2.set_ylabel("perplexity")
    ax.set_title("validation loss / perplexity")
    ax = axes[3]
    ax.plot(s, [r["lr"] for r in tr], label="PyTorch")
    ax.plot([r["step"] for r in jr], [r["lr"] for r in jr], "--", label="Jittor")
    ax.set_title("learning rate")
    ax = axes[4]
    n = min(len(tr), len(jr))
    ax.plot(s[:n], [jr[i]["loss"] - tr[i]["loss"] for i in range(n)], lw=1.0)
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set_title("loss difference (Jittor - PyTorch)")
    for a in axes:
        a.set_xlabel("step")
        if a is not axes[4]:
            a.legend(fontsize=7)
    return _save_png(fig, path)


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if math.isfinite(v) else str(v)
    return str(v)


def _score_table(t_scores: dict[str, Any], j_scores: dict[str, Any], t_step: float, j_step: float,
                 t_mem: float, j_mem: float) -> str:
    names = [m for m in ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr") if m in t_scores or m in j_scores]
    head = "| framework | " + " | ".join(names) + " | time/step (s) | peak RSS (MiB) |"
    sep = "|" + "---|" * (len(names) + 3)
    rows = [
        "| PyTorch | " + " | ".join(_fmt(t_scores.get(m)) for m in names) + f" | {t_step:.4f} | {t_mem:.0f} |",
        "| Jittor | " + " | ".join(_fmt(j_scores.get(m)) for m in names) + f" | {j_step:.4f} | {j_mem:.0f} |",
    ]
    return "\n".join([head, sep, *rows])


def _median_step(rows: list[dict[str, Any]]) -> float:
    """Median time per step, leaving out the first two steps (Jittor compiles its operators there)."""
    ts = [r["step_time_s"] for r in rows[2:]] or [r["step_time_s"] for r in rows]
    return float(np.median(ts)) if ts else float("nan")


def align(recipe: Any, mode: str = "exact", *, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run ``recipe`` in PyTorch and Jittor and compare them (see the module docstring); returns the summary."""
    from ..checkpoint import save_delta as torch_save_delta
    from ..data import build_causal_lm_features
    from ..tasks.data_to_text import apply_delta as _apply_delta
    from ..tasks.data_to_text import feature_kwargs as _feature_kwargs
    from ..tasks.data_to_text import generate_outputs as _generate
    from ..tasks.data_to_text import load_model as _load_model
    from ..tasks.data_to_text import prepare_data
    from ..tasks.evaluate import evaluate_run
    from ..tasks.rundir import write_json as _write_json
    from .lora import load_delta
    from .models import check_architecture, load_pretrained

    model_dir = check_align_recipe(recipe, mode)
    log_every = recipe.train.log_every
    recipe = _mode_recipe(recipe, mode)
    object.__setattr__(recipe, "_align_log_every", log_every)
    data = prepare_data(recipe)
    run_dir = recipe.run_dir
    _prepare_dir(run_dir, overwrite)
    from ..io_utils import atomic_write_text
    from ..tasks.rundir import write_config

    write_config(run_dir, recipe.to_dict())
    t_dir, j_dir = run_dir / "torch", run_dir / "jittor"
    t_dir.mkdir(exist_ok=True)
    j_dir.mkdir(exist_ok=True)

    # ---- shared inputs
    model, tok = _load_model(recipe)
    if model_dir is None:
        model_dir = resolve_model_dir(recipe.model.name_or_path)
        if model_dir is None:
            raise DeltaConfigError(f"no Hugging Face directory found for {recipe.model.name_or_path!r} after loading it")
        check_architecture(model_dir)
    kw = _feature_kwargs(recipe)
    d = recipe.data
    feats = build_causal_lm_features(data.train, tok, max_length=d.max_length, target_prefix=d.target_prefix,
                                     expand_references=d.expand_references, **kw)
    dev_feats = (build_causal_lm_features(data.dev, tok, max_length=d.max_length, target_prefix=d.target_prefix, **kw)
                 if data.dev else None)
    _apply_delta(recipe, model)
    torch_save_delta(model, run_dir / "init_delta")

    # ---- PyTorch
    print(f"align: PyTorch training ({recipe.name}, mode {mode})", file=sys.stderr)
    t_res = _train_torch(recipe, mode, model, tok, feats, dev_feats, t_dir, progress)
    _write_json(t_dir / "run_info.json", {"method": "lora", "model": recipe.model.name_or_path, "dataset": d.dataset,
                                          "train_features": len(feats)})
    _generate(recipe, model, tok, data.eval, t_dir, progress)
    t_scores = evaluate_run(recipe, run_dir=t_dir)

    # ---- Jittor
    print("align: Jittor training", file=sys.stderr)
    jmodel = load_pretrained(model_dir)
    load_delta(jmodel, run_dir / "init_delta")
    j_res = _train_jittor(recipe, mode, jmodel, feats, dev_feats, t_res["plan"], t_res["collator"], j_dir, progress)
    _write_json(j_dir / "run_info.json", {"method": "lora", "model": recipe.model.name_or_path, "dataset": d.dataset,
                                          "train_features": len(feats)})
    _decode_jittor(recipe, jmodel, tok, model, data.eval, j_dir, progress)
    j_scores = evaluate_run(recipe, run_dir=j_dir)

    # ---- comparisons
    tr, jr = t_res["rows"], j_res["rows"]
    n = min(len(tr), len(jr))
    rel = [abs(jr[i]["loss"] - tr[i]["loss"]) / max(abs(tr[i]["loss"]), 1e-12) for i in range(n)]
    tol = TOLERANCES
    n100 = min(n, tol["exact"]["loss_steps"])
    warm = t_res["plan"]["warmup_steps"]
    avg_diffs = [abs(jr[i]["avg_loss"] - tr[i]["avg_loss"]) for i in range(n)
                 if "avg_loss" in tr[i] and "avg_loss" in jr[i] and tr[i]["step"] > warm]
    weights_rel, weights_fro = _lora_weight_diff(t_dir / "delta", j_dir / "delta")
    probe = t_res["collator"]([feats[i] for i in range(min(len(feats), recipe.train.batch_size))])
    cross = _crossover(recipe, jmodel, j_dir / "delta", probe)
    t_step, j_step = _median_step(tr), _median_step(jr)

    def pts(v: Any) -> float | None:
        return None if v is None else 100.0 * float(v)

    bleu_diff = (abs(pts(t_scores.get("BLEU")) - pts(j_scores.get("BLEU")))
                 if t_scores.get("BLEU") is not None and j_scores.get("BLEU") is not None else None)

    def diff(key: str) -> float | None:
        a, b = t_scores.get(key), j_scores.get(key)
        return None if a is None or b is None else abs(float(a) - float(b))

    measured = {
        "max_rel_loss_diff_first_steps": max(rel[:n100]) if n100 else None,
        "loss_steps_compared": n100,
        "max_rel_loss_diff_all_steps": max(rel) if rel else None,
        "max_avg_loss_diff_after_warmup": max(avg_diffs) if avg_diffs else None,
        "max_rel_lora_weight_diff": weights_rel,
        "max_frobenius_rel_lora_weight_diff": weights_fro,
        "crossover_max_abs_logit_diff": cross,
        "bleu_diff_points": bleu_diff,
        "meteor_diff": diff("METEOR"),
        "rouge_l_diff": diff("ROUGE_L"),
        "torch_time_per_step_s": t_step,
        "jittor_time_per_step_s": j_step,
        "jittor_over_torch_time": j_step / t_step if t_step > 0 else None,
    }
    verdicts = _verdicts(mode, measured)
    summary = {"mode": mode, "recipe": recipe.name, "model": recipe.model.name_or_path, "steps": n,
               "warmup_steps": warm, "measured": measured, "tolerances": tol[mode], "verdicts": verdicts,
               "scores": {"torch": t_scores, "jittor": j_scores},
               "wall_s": {"torch_train": t_res["wall_s"], "jittor_train": j_res["wall_s"]},
               "peak_rss_mb": {"torch": t_res["peak_rss_mb"], "jittor": j_res["peak_rss_mb"]}}
    _write_jsonl(run_dir / "log_torch.jsonl", tr + t_res["evals"])
    _write_jsonl(run_dir / "log_jittor.jsonl", jr + j_res["evals"])
    _plot(t_res, j_res, run_dir / "align.png", log_every)
    table = _score_table(t_scores, j_scores, t_step, j_step, t_res["peak_rss_mb"], j_res["peak_rss_mb"])
    atomic_write_text(run_dir / "align_scores.md", table + "\n\n" + "\n".join(verdicts) + "\n")
    atomic_write_text(run_dir / "verdict.txt", "\n".join(verdicts) + "\n")
    _write_json(run_dir / "align_summary.json", summary)
    summary["table"] = table
    return summary


def _verdicts(mode: str, m: dict[str, Any]) -> list[str]:
    def line(ok: bool | None, text: str) -> str:
        return f"{'PASS' if ok else ('FAIL' if ok is not None else 'N/A ')} {text}"

    def le(v: Any, lim: float) -> bool | None:
        return None if v is None else bool(v <= lim)

    out = []
    if mode == "exact":
        t = TOLERANCES["exact"]
        v = m["max_rel_loss_diff_first_steps"]
        out.append(line(le(v, t["loss_rel"]), f"loss: max relative difference over the first {m['loss_steps_compared']} steps "
                                               f"= {_fmt(v, 3) if v is None else f'{v:.3e}'} (goal <= {t['loss_rel']:g})"))
        v = m["max_rel_lora_weight_diff"]
        out.append(line(le(v, t["weights_rel"]), f"weights: max relative LoRA weight difference after training = {v:.3e} "
                                                   f"(goal <= {t['weights_rel']:g})"))
        v = m["crossover_max_abs_logit_diff"]
        out.append(line(le(v, t["crossover_logits"]), f"crossover: Jittor-trained delta in PyTorch, max |logit difference| = "
                                                        f"{v:.3e} (goal <= {t['crossover_logits']:g})"))
    else:
        t = TOLERANCES["seed"]
        v = m["max_avg_loss_diff_after_warmup"]
        out.append(line(le(v, t["avg_loss_nats"]), f"average loss: max difference after warm-up = {_fmt(v)} nats "
                                                    f"(goal <= {t['avg_loss_nats']:g})"))
        for key, name, lim in (("bleu_diff_points", "BLEU (points)", t["bleu_points"]), ("meteor_diff", "METEOR", t["meteor"]),
                               ("rouge_l_diff", "ROUGE-L", t["rouge_l"])):
            out.append(line(le(m[key], lim), f"{name}: difference = {_fmt(m[key])} (goal <= {lim:g})"))
    if mode == "exact":
        out.append(f"INFO weights: max relative Frobenius difference of the LoRA matrices = "
                   f"{m['max_frobenius_rel_lora_weight_diff']:.3e} (Adam moves near-zero-gradient entries by ~lr "
                   f"whatever their rounding noise, which the element-wise measure above counts in full)")
    r = m["jittor_over_torch_time"]
    out.append(f"INFO time per step: PyTorch {m['torch_time_per_step_s']:.4f} s, Jittor {m['jittor_time_per_step_s']:.4f} s "
               f"(Jittor/PyTorch = {_fmt(r, 2)}x)")
    return out
