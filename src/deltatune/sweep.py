"""Method comparison on one task: every method, the same budget, several seeds, one table.

``deltatune sweep configs/glue/sst2.yaml --methods full,lora,bitfit --seeds 1,2,3`` (or
:func:`main` / :func:`run_sweep`) trains each method on one task with the same budget and seeds;
only the learning rate and the method's own config differ (``methods.<name>.lr`` / ``.config`` /
``.train`` in the YAML). Two kinds of task are swept:

* **classification / regression** (GLUE, CSV): the YAML is a classification config (``model``:
  name_or_path, pooling ...; ``data``: dataset, data_dir, max_length, subsets ...; ``train``; see
  :mod:`deltatune.tasks.layout`) plus ``methods`` and a ``sweep`` section; the learning rate and method
  config default to :data:`~deltatune.tasks.classification.DEFAULT_LR` and
  :data:`~deltatune.tasks.classification.DEFAULT_METHOD_CONFIGS`; scored on the dev split;
* **data-to-text** (E2E, WebNLG, DART): the YAML is a recipe (``model``, ``delta``, ``data``, ``train``,
  ``generate``, ``eval``) plus ``methods`` and a ``sweep`` section; each run is the recipe with
  ``delta.method`` replaced (the recipe's own delta fields are kept for its own method,
  ``methods.<name>.config`` adds fields), ``train.seed`` set to the seed and its own run directory
  ``runs/<method>_seed<k>/``; the learning rate defaults to the recipe's ``train.lr``; scored on
  ``eval.split`` with ``eval.metrics``;
* **perplexity** (WikiText-2): the YAML is a perplexity config (``configs/wikitext_lora.yaml``) plus
  ``methods`` and a ``sweep`` section; each run has its own ``delta`` (as for recipes) and ``train.seed``;
  the table gives the tuned and the base perplexity (lower is better; full fine-tuning is not a
  perplexity method).

It writes, in ``output_dir``: ``runs/<method>_seed<k>.json`` (one result per run, or its error);
``results.md`` / ``results.csv`` (one row per method: trainable parameters and %, peak memory, time
per step, each score as mean ± std over the seeds, an error column: a failing method is reported
there and the sweep goes on) and ``results.png`` (see :mod:`deltatune.sweep_tables`). By default every
run is done in a fresh process, so the CPU peak resident memory is that run's own. ``--set`` overrides
use the one parser of :mod:`deltatune.tasks.overrides`. All three kinds share one layout: the run
sections of their task, ``methods: {NAME: {lr, config, train}}`` and ``sweep: {methods, seeds}``; each
run is the config with ``delta`` set to the method (its fields: the config's own ``delta`` for its own
method, plus ``methods.NAME.config``), ``train.seed`` to the seed and ``output_dir`` to
``<output_dir>/runs/<method>_seed<k>``. Old flat classification / perplexity files are mapped onto the
sections first (:func:`deltatune.tasks.layout.to_sections`).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing
import os
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .data import glue_task
from .errors import DeltaConfigError, DeltaError
from .io_utils import atomic_write_text
from .metrics import GLUE_TASK_METRICS
from .sweep_tables import MethodRow, SweepResult, aggregate, write_tables
from .tasks.classification import (
    CLASSIFICATION_SCHEMA,
    DEFAULT_LR,
    classification_config,
    run_classification,
    sweep_method_names,
)
from .tasks.data_to_text import run_recipe
from .tasks.layout import CLASSIFICATION, PERPLEXITY, to_sections
from .tasks.lm import PERPLEXITY_SCHEMA, load_perplexity_config, run_perplexity
from .tasks.loader import load_recipe, resolve_data_dir
from .tasks.overrides import RECIPE_SCHEMA, OverrideSchema, apply_overrides
from .tasks.rundir import GENERATION_INFO_FILE, RUN_INFO_FILE, read_json
from .tasks.spec import FULL, SECTIONS, check_config_kind, config_kind, read_yaml
from .validation import check_bool, check_int, check_known_keys, check_run_name, check_type

__all__ = [
    "SWEEP_KEYS",
    "MethodRow",
    "SweepResult",
    "SweepSpec",
    "aggregate",
    "load_sweep",
    "main",
    "run_sweep",
    "write_tables",
]

#: Keys of a sweep YAML besides the run sections of its task.
SWEEP_KEYS: tuple[str, ...] = ("name", "methods", "sweep")
_METHOD_OVERRIDE_KEYS = ("lr", "config", "train")
_BUDGET_KEYS = ("epochs", "max_steps", "batch_size", "grad_accum_steps")


def _sweep_schema(schema: OverrideSchema) -> OverrideSchema:
    """A task's ``--set`` schema with ``methods`` and ``sweep`` added."""
    return OverrideSchema(
        f"sweep {schema.what}",
        tuple(dict.fromkeys((*schema.keys, *SWEEP_KEYS))),
        tuple(dict.fromkeys((*schema.mapping_keys, "methods", "sweep"))),
        tuple(dict.fromkeys((*schema.fixed_sections, "sweep"))),
        schema.rewrite,
    )


#: ``--set`` in a sweep: the run sections of its task (``data.max_train_examples=200``, ``train.lr=1e-3``,
#: ``eval.max_examples=50``) and ``methods.lora.lr=1e-3``, ``sweep.seeds=[1,2]``; old flat paths of
#: classification / perplexity files are mapped onto the sections.
_SCHEMAS = {
    "classification": _sweep_schema(CLASSIFICATION_SCHEMA),
    "data-to-text": _sweep_schema(RECIPE_SCHEMA),
    "perplexity": _sweep_schema(PERPLEXITY_SCHEMA),
}


def _delta(own: Mapping[str, Any], method: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    """A run's delta section: the config's own one (with ``fields`` added) for its own method, else
    ``fields`` with ``method``; ``{"method": "full"}`` for full fine-tuning."""
    if method == FULL:
        return {"method": FULL}
    if own.get("method") == method:
        return {**own, **fields}
    return {**fields, "method": method}


@dataclass
class SweepSpec:
    """A parsed sweep: the shared run fields, per-method overrides, methods, seeds, output folder and
    the kind of task (``"classification"``, ``"data-to-text"`` or ``"perplexity"``)."""

    name: str
    base: dict[str, Any]
    overrides: dict[str, dict[str, Any]]
    methods: list[str]
    seeds: list[int]
    output_dir: str
    kind: str = "classification"

    def run_config(self, method: str, seed: int) -> dict[str, Any]:
        """The config of one run, in the layout of its task: the shared sections with ``delta`` set to
        ``method``, ``train.seed`` to ``seed``, ``train.lr`` to the method's (``methods.NAME.lr``; for
        classification :data:`~deltatune.tasks.classification.DEFAULT_LR` when neither gives one) and its
        own ``output_dir``."""
        ov = self.overrides.get(method, {})
        train = {**dict(self.base.get("train") or {}), **dict(ov.get("train") or {})}
        if "lr" in ov:
            train["lr"] = ov["lr"]
        elif self.kind == "classification" and "lr" not in train:
            train["lr"] = DEFAULT_LR[method]
        cfg = {
            **copy.deepcopy(self.base),
            "delta": _delta(dict(self.base.get("delta") or {}), method, dict(ov.get("config") or {})),
            "train": {**train, "seed": seed},
            "output_dir": os.path.join(self.output_dir, "runs", f"{method}_seed{seed}"),
        }
        if self.kind == "data-to-text":
            cfg["name"] = f"{self.name}_{method}_seed{seed}"
        return cfg


def _parse_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in items):
        raise DeltaConfigError(f"--{what} must be a comma-separated list without empty entries, got {text!r}")
    return items


def _check_methods(methods: Sequence[str], where: str) -> list[str]:
    known = sweep_method_names()
    methods = list(methods)
    if not methods:
        raise DeltaConfigError(f"{where} must name at least one method, got []")
    for m in methods:
        if not isinstance(m, str) or m not in known:
            raise DeltaConfigError(f"{where}: unknown method {m!r}; known methods: {', '.join(known)}")
    dup = sorted({m for m in methods if methods.count(m) > 1})
    if dup:
        raise DeltaConfigError(f"{where} lists method(s) {dup} more than once")
    return methods


def _check_seeds(seeds: Sequence[Any], where: str) -> list[int]:
    seeds = list(seeds)
    if not seeds:
        raise DeltaConfigError(f"{where} must name at least one seed, got []")
    out = [check_int(f"{where}[{i}]", s, minimum=0) for i, s in enumerate(seeds)]
    if len(set(out)) != len(out):
        raise DeltaConfigError(f"{where} lists a seed more than once, got {out}")
    return out


def _mapping_overrides(overrides: Mapping[str, Any]) -> list[tuple[list[str], Any]]:
    """Programmatic overrides as ``(key path, value)`` pairs: a key is a top-level key or a dotted path
    (``"data.max_train_examples"``); the key ``"train."`` holds single ``train`` keys to replace."""
    pairs: list[tuple[list[str], Any]] = []
    for key, value in overrides.items():
        if key == "train.":
            check_type("overrides['train.']", value, Mapping, "a mapping of TrainConfig fields")
            pairs += [(["train", str(k)], v) for k, v in value.items()]
        else:
            pairs.append((str(key).split("."), value))
    return pairs


def load_sweep(
    source: str | os.PathLike | Mapping[str, Any],
    *,
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    output_dir: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
) -> SweepSpec:
    """Read and validate a sweep YAML (or dict); every run config is checked before anything runs.

    ``methods`` / ``seeds`` / ``output_dir`` replace the YAML's ``sweep.methods`` / ``sweep.seeds`` /
    ``output_dir``. ``overrides`` is a list of ``--set`` strings (``train.max_steps=3``,
    ``data.max_train_examples=200``, ``methods.lora.lr=1e-3``), or a mapping of keys or dotted paths to
    values whose key ``"train."`` holds single ``train`` keys.

    Raises:
        WrongCommandError: ``source`` is a recipe without a ``sweep`` section or a perplexity config.
        DeltaConfigError: any invalid key or value, in the sweep or in one of its runs.
    """
    if isinstance(source, Mapping):
        raw, default_name, base_dir = dict(source), "sweep", None
    else:
        check_type("config", source, (str, os.PathLike), "a YAML path or a dict")
        path = Path(source)
        raw, default_name, base_dir = read_yaml(path, "sweep config"), path.stem, path.resolve().parent
    check_config_kind(raw, source, "sweep", ("classification", "data-to-text-sweep", "perplexity-sweep"))
    kind = {"data-to-text-sweep": "data-to-text", "perplexity-sweep": "perplexity"}.get(
        config_kind(raw) or "", "classification"
    )
    layout = {"classification": CLASSIFICATION, "perplexity": PERPLEXITY}.get(kind)
    if layout is not None:
        raw = to_sections(raw, layout)
    pairs = _mapping_overrides(overrides) if isinstance(overrides, Mapping) else list(overrides or [])
    raw = apply_overrides(raw, pairs, _SCHEMAS[kind])
    if kind == "data-to-text":
        check_known_keys("sweep", raw, [*SECTIONS, *SWEEP_KEYS])
    train = raw.get("train") or {}
    check_type("train", train, Mapping, "a mapping of TrainConfig fields")
    if "seed" in train:
        raise DeltaConfigError(
            f"a sweep must not set 'train.seed' (got {train['seed']!r}): the sweep sets it per run "
            f"(sweep.seeds / --seeds)"
        )
    data = raw.get("data") or {}
    check_type("data", data, Mapping, "a mapping (the config's data section)")
    if data.get("dataset") != "csv" or data.get("data_dir") is not None:  # found as a recipe's is
        raw["data"] = {**dict(data), "data_dir": resolve_data_dir(data.get("data_dir"), base_dir)}
    name = raw.pop("name", default_name)
    check_run_name("name", name)
    per_method = raw.pop("methods", None) or {}
    check_type("methods", per_method, Mapping, "a mapping method -> {lr, config, train}")
    sweep = raw.pop("sweep", None) or {}
    check_type("sweep", sweep, Mapping, "a mapping with 'methods' and 'seeds'")
    unknown = sorted(set(sweep) - {"methods", "seeds"})
    if unknown:
        raise DeltaConfigError(f"unknown sweep.* key(s) {unknown}; known keys: methods, seeds")
    out_dir = output_dir if output_dir is not None else raw.pop("output_dir", None)
    raw.pop("output_dir", None)
    if out_dir is None:
        out_dir = os.path.join("runs", "sweep", name)
    check_type("output_dir", out_dir, (str, os.PathLike), "a directory path")

    if methods is None:
        methods = _check_methods(sweep.get("methods") or sweep_method_names(), "sweep.methods")
    else:
        methods = _check_methods(methods, "--methods")
    if kind == "perplexity" and FULL in methods:
        raise DeltaConfigError(
            f"a perplexity sweep trains delta methods; {FULL!r} (full fine-tuning) is not one, got methods {methods}"
        )
    if seeds is None:
        seeds = _check_seeds(sweep.get("seeds") or [42], "sweep.seeds")
    else:
        seeds = _check_seeds(seeds, "--seeds")
    for m, ov in per_method.items():
        _check_methods([m], "methods")
        check_type(f"methods.{m}", ov, Mapping, "a mapping with lr, config, train")
        unknown = sorted(set(ov) - set(_METHOD_OVERRIDE_KEYS))
        if unknown:
            raise DeltaConfigError(
                f"unknown methods.{m} key(s) {unknown}; known keys: {', '.join(_METHOD_OVERRIDE_KEYS)}"
            )
        check_type(f"methods.{m}.train", ov.get("train") or {}, Mapping, "a dict of TrainConfig fields")
        budget = sorted(set(ov.get("train") or {}) & set(_BUDGET_KEYS))
        if budget:
            raise DeltaConfigError(
                f"methods.{m}.train must not change the shared budget ({', '.join(_BUDGET_KEYS)}), got {budget}"
            )
    spec = SweepSpec(
        name, raw, {m: dict(v) for m, v in per_method.items()}, list(methods), list(seeds), os.fspath(out_dir), kind
    )
    for m in spec.methods:  # validate every run before the first one starts
        cfg = spec.run_config(m, spec.seeds[0])
        if kind == "data-to-text":
            load_recipe(cfg, command="sweep")
        elif kind == "perplexity":
            load_perplexity_config(cfg)
        else:
            classification_config(cfg)
    return spec


# ------------------------------------------------------------------------------------------ running
def _run_data_to_text(cfg: dict[str, Any], progress: bool) -> dict[str, Any]:
    """One data-to-text run of a sweep: :func:`~deltatune.tasks.data_to_text.run_recipe`, summarised
    in the fields of a classification result."""
    recipe = load_recipe(cfg, command="sweep")
    m = run_recipe(recipe, overwrite=True, progress=progress)
    info = read_json(recipe.run_dir / RUN_INFO_FILE)
    gen = read_json(recipe.run_dir / GENERATION_INFO_FILE)
    steps = int(m.get("steps") or 0)
    device = str(gen.get("device", recipe.train.device))
    return {
        "task": recipe.data.dataset,
        "method": recipe.method,
        "seed": recipe.train.seed,
        "model": recipe.model.name_or_path,
        "metrics": {k: m[k] for k in recipe.eval.metrics if k in m},
        "trainable_params": m.get("trainable_params"),
        "total_params": m.get("total_params"),
        "trainable_percent": m.get("trainable_percent"),
        "peak_memory_mb": float(m.get("peak_memory_mb", math.nan)),
        "memory_kind": "cuda_allocated" if device.startswith("cuda") else "cpu_rss",
        "time_per_step_s": float(m["train_time_s"]) / steps if steps and "train_time_s" in m else math.nan,
        "steps": steps,
        "lr": recipe.train.lr,
        "batch_size": recipe.train.batch_size,
        "train_examples": info.get("train_examples"),
        "eval_examples": m.get("num_eval_inputs"),
        "eval_split": recipe.eval.split,
        "train_time_s": m.get("train_time_s"),
        "device": device,
        "run_dir": os.fspath(recipe.run_dir),
    }


def _run_perplexity(cfg: dict[str, Any], progress: bool) -> dict[str, Any]:
    """One perplexity run of a sweep: :func:`~deltatune.tasks.lm.run_perplexity`, summarised in the fields
    of a classification result (scores: the tuned and the base perplexity)."""
    pcfg = load_perplexity_config(cfg, progress=None if progress else False)
    r = run_perplexity(pcfg, overwrite=True)
    return {
        **{k: r[k] for k in ("model", "method", "trainable_params", "total_params", "trainable_percent",
                             "peak_memory_mb", "memory_kind", "steps", "lr", "batch_size", "device")},
        "task": "wikitext-2",
        "seed": pcfg.seed,
        "metrics": {"perplexity": r["tuned"]["perplexity"], "base_perplexity": r["base"]["perplexity"]},
        "time_per_step_s": math.nan if r["time_per_step_s"] is None else r["time_per_step_s"],
        "train_examples": r["train_blocks"],
        "eval_examples": r["eval_tokens"],
        "run_dir": pcfg.output_dir,
    }


def _run_config(kind: str, cfg: dict[str, Any], progress: bool) -> dict[str, Any]:
    if kind == "classification":
        return run_classification({**cfg, "progress": bool(cfg.get("progress", True)) and progress}, overwrite=True)
    if kind == "perplexity":
        return _run_perplexity(cfg, progress)
    return _run_data_to_text(cfg, progress)


def _child(kind: str, cfg: dict[str, Any], result_path: str, progress: bool) -> None:
    """Entry point of an isolated run (a spawned process): writes ``{"result": ...}`` or ``{"error": ...}``."""
    try:
        payload: dict[str, Any] = {"result": _run_config(kind, cfg, progress)}
    except Exception as exc:  # reported in the table, not raised
        payload = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    atomic_write_text(result_path, json.dumps(payload, default=str) + "\n")


def _run_one(
    kind: str, cfg: dict[str, Any], isolate: bool, tmp_path: Path, progress: bool = True
) -> dict[str, Any]:
    if not isolate:
        try:
            return {"result": _run_config(kind, cfg, progress)}
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    if tmp_path.exists():
        tmp_path.unlink()
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_child, args=(kind, cfg, str(tmp_path), progress), daemon=False)
    proc.start()
    try:
        proc.join()
    except BaseException:
        proc.terminate()
        proc.join()
        raise
    if not tmp_path.is_file():
        return {"error": f"the run's process exited with code {proc.exitcode} without a result"}
    payload = json.loads(tmp_path.read_text(encoding="utf-8"))
    tmp_path.unlink()
    return payload


def _budget_notes(spec: SweepSpec, runs: Sequence[Mapping[str, Any]], split: str) -> list[str]:
    ok = [r["result"] for r in runs if "result" in r]
    base = spec.base
    train = dict(base.get("train") or {})
    budget = ", ".join(f"{k}={v}" for k, v in train.items() if k not in ("lr", "seed", "device"))
    model = base.get("model") or {}
    data = base.get("data") or {}
    if spec.kind == "perplexity":
        ev = base.get("eval") or {}
        first = (
            f"WikiText-2 `{ev.get('split', 'valid')}`, model `{model.get('name_or_path', 'smollm2-135m')}`, windows of "
            f"{ev.get('max_length', 256)} with stride {ev.get('stride', 128)} (train examples: packed blocks; "
            f"eval examples: tokens)"
        )
    elif spec.kind == "data-to-text":
        first = (
            f"Dataset `{data.get('dataset', 'e2e')}`, model `{model.get('name_or_path', 'smollm2-135m')}`, "
            f"sample_fraction {data.get('sample_fraction', 1.0)}"
        )
    else:
        first = (
            f"Task `{data['dataset']}`, model `{model.get('name_or_path', 'minilm-l6')}`, pooling "
            f"`{model.get('pooling', 'auto')}`, max_length {data.get('max_length', 128)}"
        )
    notes = [f"{first}; budget: {budget or 'TrainConfig defaults'}; seeds {spec.seeds}."]
    if ok:
        r0 = ok[0]
        mem = "GPU max allocated" if r0["memory_kind"] == "cuda_allocated" else "CPU peak RSS of the run's process"
        notes.append(
            f"Train examples {r0['train_examples']}, {split} examples {r0['eval_examples']}, {r0['steps']} optimiser "
            f"steps per run, device {r0['device']}; peak memory = {mem}. Scores in [0, 1] shown in %, "
            f"mean ± std over seeds."
        )
        lrs = {r["method"]: r["result"]["lr"] for r in runs if "result" in r}
        notes.append("Learning rates: " + ", ".join(f"{m} {lr:g}" for m, lr in lrs.items()) + ".")
    return notes


def _task_metrics(spec: SweepSpec) -> tuple[str, list[str], str]:
    """(task name, score names, scored split) of a sweep."""
    cfg = spec.run_config(spec.methods[0], spec.seeds[0])
    if spec.kind == "perplexity":
        return "wikitext-2", ["perplexity", "base_perplexity"], load_perplexity_config(cfg).eval_split
    if spec.kind == "data-to-text":
        recipe = load_recipe(cfg, command="sweep", check_data=False)
        return recipe.data.dataset, list(recipe.eval.metrics), recipe.eval.split
    task_cfg = classification_config(cfg)
    if task_cfg.task == "csv":
        return "csv", ["accuracy"], "dev"
    task_name = glue_task(task_cfg.task).name
    return task_name, list(GLUE_TASK_METRICS[task_name]), "dev"


def run_sweep(
    spec: SweepSpec | str | os.PathLike | Mapping[str, Any],
    *,
    isolate: bool = True,
    progress: bool = True,
) -> SweepResult:
    """Run every (method, seed) of ``spec`` and write the per-run JSON and the tables.

    A run that raises is recorded with its error (in its JSON and the table's error column); the
    sweep continues with the next run. ``isolate`` runs each in a fresh process (spawn).
    """
    if not isinstance(spec, SweepSpec):
        spec = load_sweep(spec)
    check_bool("isolate", isolate)
    check_bool("progress", progress)
    task_name, metrics, split = _task_metrics(spec)
    out = Path(spec.output_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    jobs = [(m, s) for m in spec.methods for s in spec.seeds]
    title = f"{spec.name}: method comparison on {task_name}"
    bar = tqdm(jobs, desc=f"sweep {spec.name}", unit="run", disable=not progress, dynamic_ncols=True)
    for m, s in bar:
        bar.set_postfix(method=m, seed=s, refresh=True)
        cfg = spec.run_config(m, s)
        t0 = time.perf_counter()
        payload = _run_one(spec.kind, cfg, isolate, out / "runs" / f".{m}_seed{s}.child.json", progress)
        record = {"method": m, "seed": s, "config": cfg, "wall_time_s": time.perf_counter() - t0, **payload}
        atomic_write_text(out / "runs" / f"{m}_seed{s}.json", json.dumps(record, indent=2, default=str) + "\n")
        runs.append(record)
        if "error" in payload:
            tqdm.write(f"sweep: {m} seed {s} failed: {payload['error']}", file=sys.stderr)
        # the tables are rewritten after every run: an interrupted sweep keeps a table of what finished
        result = SweepResult(task_name, metrics, aggregate(runs, spec.methods, metrics), runs, split=split)
        result.files = write_tables(result, out, title=title, notes=_budget_notes(spec, runs, split))
    bar.close()
    return result


# ------------------------------------------------------------------------------------------ CLI
def build_parser(prog: str = "deltatune sweep") -> argparse.ArgumentParser:
    """The argument parser of ``deltatune sweep``."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Compare fine-tuning methods on one task with the same budget and seeds; "
        "writes results.md, results.csv, results.png and per-run JSON.",
    )
    p.add_argument("config", help="sweep YAML (e.g. configs/glue/sst2.yaml, or a recipe with a 'sweep' section)")
    p.add_argument("--methods", help="comma-separated methods (default: the YAML's sweep.methods, else all)")
    p.add_argument("--seeds", help="comma-separated seeds (default: the YAML's sweep.seeds, else 42)")
    p.add_argument("--output-dir", help="where the tables and runs go (default: the YAML's output_dir)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a key of the YAML, e.g. --set train.epochs=2 --set data.max_train_examples=20000 "
        "--set methods.lora.lr=1e-3 (values are YAML)",
    )
    p.add_argument("--device", help="override the run device ('cpu', 'cuda', 'auto')")
    p.add_argument("--num-threads", type=int, help="torch threads per run (CPU)")
    p.add_argument("--no-isolate", action="store_true", help="run in this process (faster start; CPU peak memory is cumulative)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    """``deltatune sweep`` entry point; returns the exit status (0 ok, 1 some run failed, 2 bad arguments)."""
    args = build_parser().parse_args(argv)
    try:
        methods = _parse_list(args.methods, "methods") if args.methods is not None else None
        seeds = None
        if args.seeds is not None:
            items = _parse_list(args.seeds, "seeds")
            try:
                seeds = [int(s) for s in items]
            except ValueError:
                raise DeltaConfigError(f"--seeds must be comma-separated ints, got {args.seeds!r}") from None
        overrides = list(args.overrides)
        if args.device is not None:
            overrides.append(f"train.device={args.device}")
        if args.num_threads is not None:
            overrides.append(f"num_threads={args.num_threads}")
        spec = load_sweep(args.config, methods=methods, seeds=seeds, output_dir=args.output_dir, overrides=overrides)
        result = run_sweep(spec, isolate=not args.no_isolate, progress=not args.no_progress)
    except DeltaError as exc:
        print(f"deltatune sweep: error: {exc}", file=sys.stderr)
        return 2
    print(result.files["md"].read_text(encoding="utf-8"))
    for kind, path in result.files.items():
        print(f"{kind}: {path}")
    return 1 if any(r.error for r in result.rows) else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
