"""The ``deltatune`` command line.

::

    deltatune run CONFIG [--set KEY=VALUE ...] [--output-dir DIR] [--overwrite]
    deltatune finetune CONFIG [--set ...] [--output-dir DIR] [--overwrite]
    deltatune generate [CONFIG] [--set ...] [--output-dir DIR] [--checkpoint PATH] [--override-run-config]
    deltatune evaluate [CONFIG] [--set ...] [--output-dir DIR] [--predictions FILE] [--references FILE]
                       [--override-run-config]
    deltatune compare RUN_DIR RUN_DIR ... --out DIR
    deltatune export-gguf RUN_DIR --kind adapter|merged [--quant Q] [--output-quant Q] [--out FILE]
    deltatune align CONFIG [--mode exact|seed] [--set ...] [--output-dir DIR] [--overwrite]
    deltatune sweep CONFIG [--methods ...] [--seeds ...] [--set ...] [--output-dir DIR]
    deltatune perplexity CONFIG [--set ...] [--output-dir DIR] [--overwrite] [--no-progress]
    deltatune methods
    deltatune info [MODEL] [--model MODEL] [--config FILE] [--method NAME] [--task TASK] [--set ...] [--per-module]

Every error deltatune raises on purpose (:class:`~deltatune.errors.DeltaError`) is printed as one
``deltatune: error: ...`` line on stderr and exits with status 2, without a traceback (``--debug``
shows it); a YAML file given to the wrong subcommand names the right one. ``generate`` and ``evaluate``
continue a run: its directory's ``config.yaml`` is the source of truth of its settings (a differing
recipe is refused, or used with ``--override-run-config`` and recorded). ``python -m deltatune`` runs
the same program. The subcommands import their modules when they run (start-up time).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._version import __version__
from .errors import DeltaError

__all__ = ["build_parser", "main"]

EXIT_USAGE = 2


def _add_recipe_args(p: argparse.ArgumentParser, *, config_optional: bool = False, scored_files: bool = False) -> None:
    if config_optional:
        p.add_argument(
            "config", nargs="?",
            help="recipe YAML file (optional when --output-dir holds the run's config.yaml"
            + (", or with --predictions and --references)" if scored_files else ")"),
        )
    else:
        p.add_argument("config", help="recipe YAML file (see configs/)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a recipe value, e.g. --set train.lr=1e-3 --set eval.max_examples=50 (values are YAML)",
    )
    p.add_argument("--output-dir", help="run directory (replaces the recipe's output_dir)")


def _add_override_run_config(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--override-run-config", action="store_true",
        help="use the given recipe where it differs from the run directory's config.yaml (the differences are "
        "recorded in metrics.json and report.md); without it a difference is an error",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``deltatune`` command."""
    parser = argparse.ArgumentParser(
        prog="deltatune",
        description="Parameter-efficient (delta) fine-tuning: train, decode, score and compare data-to-text runs.",
    )
    parser.add_argument("--version", action="version", version=f"deltatune {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of deltatune errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("run", help="train, generate, score and report (the whole recipe)")
    _add_recipe_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in the output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("finetune", help="train only: logs, checkpoints and the final delta")
    _add_recipe_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in the output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("generate", help="decode the recipe's eval split with a trained run")
    _add_recipe_args(p, config_optional=True)
    p.add_argument("--checkpoint", help="delta directory (or full model directory) to use instead of the run's")
    _add_override_run_config(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("evaluate", help="score a predictions file against references; write metrics.json and report.md")
    _add_recipe_args(p, config_optional=True, scored_files=True)
    p.add_argument("--predictions", help="predictions file, one output per line (default: RUN_DIR/predictions.txt)")
    p.add_argument("--references", help="references file, groups separated by blank lines (default: RUN_DIR/references.txt)")
    p.add_argument("--metrics", nargs="+", metavar="METRIC", help="BLEU NIST METEOR ROUGE_L CIDEr (default: the recipe's)")
    _add_override_run_config(p)

    p = sub.add_parser("compare", help="overlay the loss curves of runs and tabulate their metrics")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories")
    p.add_argument("--out", required=True, help="directory for compare.md, compare.csv and compare.png")

    p = sub.add_parser(
        "export-gguf", help="write a finished run as a GGUF file for llama.cpp (merged model or LoRA adapter)"
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory (holds config.yaml and delta/ or model/)")
    p.add_argument("--kind", required=True, choices=("adapter", "merged"),
                   help="adapter: a LoRA adapter for llama.cpp's --lora; merged: the base with the delta merged")
    p.add_argument("--quant", help="merged: f32 f16 q8_0 q4_0 q4_1 (default f16); adapter: f32 f16 (default f32)")
    p.add_argument("--output-quant", help="merged: the output matrix's type (token_embd when tied): f32 f16 q8_0 q4_0 "
                   "q4_1 (default q8_0 in 4-bit files, else --quant)")
    p.add_argument("--out", help="output file (default: RUN_DIR/model.QUANT.gguf or RUN_DIR/adapter.QUANT.gguf)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("align", help="train one LoRA recipe in PyTorch and in Jittor and compare them (needs jittor)")
    _add_recipe_args(p)
    p.add_argument("--mode", choices=("exact", "seed"), default="exact",
                   help="exact: fp32, dropout off, step-by-step check; seed: the recipe as written, own random numbers")
    p.add_argument("--overwrite", action="store_true", help="replace an existing alignment run in the output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    sub.add_parser("methods", help="list the registered delta methods")

    p = sub.add_parser(
        "sweep", add_help=False,
        help="run several methods on one task with the same budget and seeds; write one comparison table",
    )
    p.add_argument("sweep_args", nargs=argparse.REMAINDER, help="CONFIG [--methods ...] [--seeds ...] (see `deltatune sweep --help`)")

    p = sub.add_parser("perplexity", help="sliding-window perplexity before and after tuning (e.g. WikiText-2)")
    p.add_argument("config", help="perplexity config YAML (see configs/wikitext_lora.yaml)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set eval.max_tokens=512 --set train.lr=1e-3 --set delta.r=16",
    )
    p.add_argument("--output-dir", help="run directory: config.yaml, result.json, the training log, delta/ "
                   "(replaces output_dir)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in the output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser(
        "info", help="trainable-parameter summary of a model after applying a delta config (or each method of a sweep)"
    )
    p.add_argument("model", nargs="?", help="registered model name, Hugging Face directory or .gguf file "
                   "(default: the model the --config names)")
    p.add_argument("--model", dest="model_option", metavar="MODEL", help="the same as the MODEL argument")
    p.add_argument("--config", help="a method config (YAML/JSON with 'method'), a recipe (its 'delta' section), a "
                   "perplexity config or a classification / sweep config (each of its methods)")
    p.add_argument("--method", help="with a sweep config: summarise this method only")
    p.add_argument("--task", help="what models.load builds: causal-lm, base or sequence-classification "
                   "(default: the config's pipeline, else the model's own kind)")
    p.add_argument("--num-labels", type=int, help="classes of the head with --task sequence-classification (default 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (loading the weights)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a method-config field, e.g. --set r=16 (every method shown) or, in a sweep config, "
        "--set methods.lora.config.r=16; or a key of the config, e.g. --set model.pooling=cls",
    )
    p.add_argument("--per-module", action="store_true", help="list every module with trainable parameters")
    return parser


# ------------------------------------------------------------------------------------------------
# commands


def _recipe(args: argparse.Namespace, *, check_data: bool = True) -> Any:
    from .tasks.loader import load_recipe

    return load_recipe(args.config, args.overrides, output_dir=args.output_dir, check_data=check_data, command=args.command)


def _continued_recipe(args: argparse.Namespace, *, check_data: bool) -> tuple[Any, dict[str, Any]]:
    """The recipe of a step that continues a run (generate, evaluate) and the recorded overrides: the
    given recipe checked against the run directory's config.yaml, or that file when no recipe is given
    (``(None, {})`` when there is neither)."""
    from .errors import DeltaConfigError
    from .tasks.data_to_text import resolve_run_recipe
    from .tasks.loader import load_recipe
    from .tasks.rundir import CONFIG_FILE

    source = args.config
    if source is None:
        run_config = Path(args.output_dir) / CONFIG_FILE if args.output_dir is not None else None
        if run_config is None or not run_config.is_file():
            if args.command == "evaluate":
                return None, {}
            where = f"; {os.fspath(run_config)} does not exist" if run_config is not None else ""
            raise DeltaConfigError(f"{args.command} needs a CONFIG or an --output-dir holding a run's {CONFIG_FILE}{where}")
        source = run_config
    recipe = load_recipe(source, args.overrides, output_dir=args.output_dir, check_data=check_data, command=args.command)
    return resolve_run_recipe(recipe, override_run_config=args.override_run_config)


def _print_scores(metrics: dict[str, Any], run_dir: Path) -> None:
    from .tasks.evaluate import format_scores

    print(f"\nscores ({run_dir}):")
    print(format_scores(metrics))
    print(f"report: {run_dir / 'report.md'}")


def _cmd_run(args: argparse.Namespace) -> int:
    from .tasks.data_to_text import run_recipe

    recipe = _recipe(args)
    metrics = run_recipe(recipe, overwrite=args.overwrite, progress=not args.no_progress)
    if metrics:  # empty on ranks > 0 under torchrun
        _print_scores(metrics, recipe.run_dir)
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from .tasks.data_to_text import finetune

    recipe = _recipe(args)
    summary = finetune(recipe, overwrite=args.overwrite, progress=not args.no_progress)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports
        return 0
    print(
        f"trained {summary.get('steps')} steps in {summary.get('wall_time_s', 0.0):.1f} s; "
        f"trainable {summary.get('trainable_params', 0):,} / {summary.get('total_params', 0):,} "
        f"({summary.get('trainable_percent', 0.0):.4f}%); run directory: {recipe.run_dir}"
    )
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from .tasks.data_to_text import generate_predictions
    from .tasks.rundir import PREDICTIONS_FILE

    recipe, overrides = _continued_recipe(args, check_data=True)
    info = generate_predictions(
        recipe, checkpoint=args.checkpoint, progress=not args.no_progress, run_config_overrides=overrides
    )
    print(
        f"decoded {info['num_inputs']} inputs of {info['split']!r} in {info['generate_time_s']:.1f} s: "
        f"{recipe.run_dir / PREDICTIONS_FILE}"
    )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .errors import DeltaConfigError
    from .tasks.evaluate import evaluate_run

    recipe, overrides = _continued_recipe(args, check_data=False)
    if recipe is None and (args.predictions is None or args.references is None):
        raise DeltaConfigError(
            "evaluate needs a CONFIG, an --output-dir holding a run's config.yaml, or both --predictions and --references"
        )
    metrics = evaluate_run(
        recipe,
        predictions=args.predictions,
        references=args.references,
        run_dir=args.output_dir if recipe is None else None,
        metrics=args.metrics,
        run_config_overrides=overrides,
    )
    run_dir = recipe.run_dir if recipe is not None else Path(args.output_dir or Path(args.predictions).resolve().parent)
    _print_scores(metrics, run_dir)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .report import compare_runs

    md, png = compare_runs(args.runs, args.out)
    print(md.read_text(encoding="utf-8"))
    print(f"written: {md}, {md.with_suffix('.csv')}, {png}")
    return 0


def _cmd_export_gguf(args: argparse.Namespace) -> int:
    from .errors import DeltaConfigError
    from .tasks.data_to_text import export_run_gguf
    from .tasks.loader import load_recipe
    from .tasks.rundir import CONFIG_FILE

    run_dir = Path(args.run_dir)
    config = run_dir / CONFIG_FILE
    if not config.is_file():
        raise DeltaConfigError(f"RUN_DIR must be a run directory holding {CONFIG_FILE}, got {args.run_dir!r} (no {config})")
    recipe = load_recipe(config, output_dir=run_dir, check_data=False, command="export-gguf")
    out = export_run_gguf(recipe, args.kind, args.quant, path=args.out, progress=not args.no_progress,
                          output_quant=args.output_quant)
    print(f"written: {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from .methods import get_method, method_names

    rows = []
    for name in method_names():
        m = get_method(name)
        doc = (m.config_cls.__doc__ or "").strip().splitlines()
        fields = [f.name for f in dataclasses.fields(m.config_cls)]
        rows.append((name, m.config_cls.__name__, "yes" if m.mergeable else "no", doc[0] if doc else "", fields))
    rows.append(("full", "-", "-", "full fine-tuning (delta: {method: full}; in sweeps: full)", []))
    w = max(len(r[0]) for r in rows)
    wc = max(len(r[1]) for r in rows)
    print(f"{'method':<{w}}  {'config':<{wc}}  mergeable  description")
    for name, cls, merge, doc, _ in rows:
        print(f"{name:<{w}}  {cls:<{wc}}  {merge:<9}  {doc}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import copy

    from .api import apply
    from .config import config_from_dict
    from .errors import DeltaConfigError
    from .freeze import trainable_summary
    from .models import TASKS, load, model_info
    from .preflight import check_applicable, natural_task
    from .tasks.heads import build_classifier
    from .tasks.setups import InfoSetup, config_setups
    from .validation import check_choice

    if args.model is not None and args.model_option is not None and args.model != args.model_option:
        raise DeltaConfigError(f"give the model once: MODEL is {args.model!r} but --model is {args.model_option!r}")
    name = args.model_option if args.model_option is not None else args.model
    if args.config is None:
        for flag, value in (("--set", args.overrides), ("--method", args.method)):
            if value:
                raise DeltaConfigError(f"{flag} needs --config (the method config it refers to)")
        setups: list[InfoSetup] = []
    else:
        setups = config_setups(args.config, args.overrides, args.method)
    if name is None:
        named = [s.model for s in setups if s.model is not None]
        if not named:
            raise DeltaConfigError(
                "info needs a MODEL (a registered name, a Hugging Face directory or a .gguf file) as an argument or "
                "--model, or a --config that names one"
            )
        name = named[0]
    if args.task is not None:
        check_choice("--task", args.task, TASKS)
    classifier = setups[0] if setups and setups[0].num_labels is not None else None
    fixed = next((s.task for s in setups if s.task is not None), None)
    if classifier is not None and args.task is not None:
        raise DeltaConfigError(
            f"--task does not apply to the classification config {args.config!r}: its pipeline puts a "
            f"{classifier.pooling!r}-pooling head on the base model"
        )
    if fixed is not None and args.task is not None and args.task != fixed:
        raise DeltaConfigError(f"--task {args.task!r} does not fit {args.config!r}: its pipeline loads the model as {fixed!r}")
    task = fixed or args.task or natural_task(name)
    num_labels = None
    if classifier is None and task == "sequence-classification":
        num_labels = args.num_labels if args.num_labels is not None else 2
    elif classifier is None and args.num_labels is not None:
        raise DeltaConfigError(f"--num-labels is only used with --task sequence-classification, got task {task!r}")

    for s in setups:  # refuse a method the model cannot take before any weight is loaded
        if classifier is not None:
            check_applicable(s.method, s.config, name, task="base", added_modules=("classifier", "score"))
        else:
            check_applicable(s.method, s.config, name, task=task)
    heads: list[str] = []
    if classifier is not None:
        bundle = build_classifier(name, classifier.num_labels, pooling=classifier.pooling or "auto",
                                  dropout=classifier.head_dropout, dtype=classifier.dtype,
                                  progress=not args.no_progress)
        model, heads = bundle.model, list(bundle.head_modules)
        how = f"{bundle.pooling} pooling + head {heads} for {classifier.num_labels} label(s)"
    else:
        model, _ = load(name, task=task, num_labels=num_labels, dtype=next((s.dtype for s in setups if s.dtype), None),
                        progress=not args.no_progress)
        how = f"task {task}" + (f", {num_labels} labels" if num_labels is not None else "")
    info = model_info(model)
    print(
        f"{name}: {info['architecture']} ({info['model_type']}; {how}), {info['num_layers']} layers, hidden "
        f"{info['hidden_size']}, vocab {info['vocab_size']}, {info['num_parameters']:,} parameters, {info['dtype']}"
    )
    if not setups:
        print("no delta config given (--config): the base model, every parameter trainable")
        setups = [InfoSetup("-", "none", None)]
    for i, s in enumerate(setups):
        m = copy.deepcopy(model) if i < len(setups) - 1 else model
        if len(setups) > 1:
            print(f"\n[{s.label}]")
        if s.config is not None:
            config = s.config
            if heads and getattr(config, "modules_to_save", None) is None:  # as the classification pipeline does
                config = config_from_dict({**config.to_dict(), "modules_to_save": heads})
            apply(m, config)
            print(f"applied {config.method}: {config}")
        elif s.method == "full":
            m.requires_grad_(True)
            print("full fine-tuning: every parameter is trainable")
        summary = trainable_summary(m)
        if args.per_module:
            print(summary)
        else:
            print(
                f"trainable params: {summary.trainable:,} || all params: {summary.total:,} || "
                f"trainable%: {summary.percent:.4f}"
            )
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import main as sweep_main

    return sweep_main(args.sweep_args)


def _cmd_perplexity(args: argparse.Namespace) -> int:
    from .tasks.lm import load_perplexity_config, run_perplexity

    cfg = load_perplexity_config(
        args.config, args.overrides, output_dir=args.output_dir, progress=False if args.no_progress else None
    )
    result = run_perplexity(cfg, overwrite=args.overwrite)
    print(f"perplexity base {result['base']['perplexity']:.3f} -> tuned {result['tuned']['perplexity']:.3f} "
          f"({result['trainable_percent']:.3f}% of the parameters trained)")
    return 0


def _cmd_align(args: argparse.Namespace) -> int:
    from .jittor.align import align  # lazy: jittor is an optional extra

    summary = align(_recipe(args), args.mode, overwrite=args.overwrite, progress=not args.no_progress)
    print(summary["table"])
    print("\n".join(summary["verdicts"]))
    return 0


_COMMANDS = {
    "align": _cmd_align,
    "sweep": _cmd_sweep,
    "perplexity": _cmd_perplexity,
    "run": _cmd_run,
    "finetune": _cmd_finetune,
    "generate": _cmd_generate,
    "evaluate": _cmd_evaluate,
    "compare": _cmd_compare,
    "export-gguf": _cmd_export_gguf,
    "methods": _cmd_methods,
    "info": _cmd_info,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``deltatune`` command line; returns the exit status (0 ok, 2 usage or deltatune error,
    130 interrupted)."""
    argv = list(argv) if argv is not None else sys.argv[1:]
    if argv[:1] == ["sweep"]:  # the sweep has its own parser (options, --help); hand it everything
        from .sweep import main as sweep_main

        return sweep_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except DeltaError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"deltatune: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("deltatune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
