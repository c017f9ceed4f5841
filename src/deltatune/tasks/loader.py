"""Loading a data-to-text recipe: YAML file or mapping -> ``--set`` overrides -> a validated :class:`Recipe`.

:func:`load_recipe` is the one entry point. It reads the file with :func:`deltatune.tasks.spec.read_yaml`
(a file of another kind raises :class:`~deltatune.tasks.spec.WrongCommandError` naming the right
subcommand), applies ``--set`` overrides with :func:`deltatune.tasks.overrides.apply_overrides`, checks
every section's keys once (an unknown one raises :class:`~deltatune.errors.DeltaConfigError` listing the
known ones), builds the sections, and, with ``check_data``, checks what the run needs on this machine:
the model source, the data directory and split files, and Java for the Java-based metrics.

``data.data_dir`` (default ``../shared/data``; or ``$DELTATUNE_DATA_DIR`` when the recipe does not
set it) is resolved, when relative, against the current directory, then the recipe file's directory,
then that directory's parent (so ``configs/*.yaml`` of a checkout find ``<checkout>/../shared/data``).
The resolved absolute path goes into the run's ``config.yaml``.

Training on a split other than ``train`` (DART ships no train split) is refused unless
``data.allow_dev_training: true``; then, when the training split is also the validation split, a
stratified ``data.dev_holdout_fraction`` of it is held out for the validation loss and never trained
on. Training on the split that is decoded and scored (``eval.split``) is always refused.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..compat.pet_config import from_pet_config, is_pet_config
from ..config import DeltaConfig, config_from_dict
from ..data import data_to_text_path
from ..errors import DeltaConfigError, DeltaConfigTypeError, MissingPackageError
from ..export_gguf import ExportSpec
from ..generate import GenerationConfig
from ..methods import method_names
from ..metrics.e2e import JAVA_INSTALL_HINT
from ..models import list_models
from ..train import TrainConfig
from ..validation import check_int, check_run_name, check_type
from .overrides import apply_overrides
from .spec import (
    DATA_DIR_ENV_VAR,
    DEFAULT_DATA_DIR,
    FULL,
    SECTIONS,
    DataSpec,
    EvalSpec,
    ModelSpec,
    Recipe,
    check_config_kind,
    from_mapping,
    read_yaml,
    section_keys,
)

__all__ = ["JAVA_METRICS", "build_delta", "check_delta", "check_java", "load_recipe", "recipe_mapping", "resolve_data_dir"]

#: the metrics that need Java (pycocoevalcap's METEOR and PTB tokeniser jars)
JAVA_METRICS = ("METEOR", "ROUGE_L", "CIDEr")


def build_delta(delta: Any) -> tuple[dict[str, Any], DeltaConfig | None]:
    """Check the ``delta`` section and build its method config once (validated once): returns the config
    dict (``{"method": "full"}`` for full fine-tuning; a MindFormers ``pet_config`` is translated) and
    the config object (``None`` for full fine-tuning)."""
    if delta is None:
        raise DeltaConfigError(
            "recipe needs a 'delta' section with a 'method' key (a registered method, or 'full' for full fine-tuning)"
        )
    if not isinstance(delta, Mapping):
        raise DeltaConfigTypeError(f"recipe section 'delta' must be a mapping, got {delta!r} ({type(delta).__name__})")
    delta = dict(delta)
    method = delta.get("method")
    if method is None and is_pet_config(delta):  # a MindFormers pet_config in the delta section
        cfg = from_pet_config(delta)
        return cfg.to_dict(), cfg
    if method == FULL:
        extra = sorted(k for k in delta if k != "method")
        if extra:
            raise DeltaConfigError(f"delta.method 'full' (full fine-tuning) takes no other keys, got {extra}")
        return delta, None
    if method is None:
        raise DeltaConfigError(f"delta.method is required: one of {method_names() + [FULL]}; got keys {sorted(delta)}")
    if not isinstance(method, str) or method not in method_names():
        raise DeltaConfigError(f"delta.method must be one of {method_names() + [FULL]}, got {method!r}")
    cfg = config_from_dict(delta)
    return cfg.to_dict(), cfg


def check_delta(delta: Any) -> dict[str, Any]:
    """Check the ``delta`` section; returns the method config dict (see :func:`build_delta`)."""
    return build_delta(delta)[0]


def check_java(metrics: Sequence[str]) -> None:
    """Raise :class:`MissingPackageError` when ``metrics`` need Java and no ``java`` is on PATH."""
    need = [m for m in metrics if m in JAVA_METRICS]
    if need and shutil.which("java") is None:
        raise MissingPackageError(
            f"eval.metrics {need} need Java (the METEOR/PTB-tokeniser jars of pycocoevalcap), but no 'java' is on "
            f"PATH; install it ({JAVA_INSTALL_HINT}) or set eval.metrics: [BLEU, NIST]"
        )


def _section(raw: Mapping[str, Any], section: str) -> dict[str, Any]:
    """The raw mapping of a fixed-schema section, its keys checked (the one check of unknown keys)."""
    data = raw.get(section)
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise DeltaConfigTypeError(f"recipe section {section!r} must be a mapping, got {data!r} ({type(data).__name__})")
    known = section_keys(section) or []
    unknown = [k for k in data if k not in known]
    if unknown:
        raise DeltaConfigError(
            f"unknown key(s) {', '.join(repr(f'{section}.{k}') for k in unknown)} in recipe section {section!r}; "
            f"known keys: {', '.join(known)}"
        )
    return dict(data)


def recipe_mapping(
    source: str | os.PathLike | Mapping[str, Any], overrides: Sequence[str] = (), *, command: str = "run"
) -> tuple[dict[str, Any], Path | None, str]:
    """The raw recipe mapping of ``source`` with ``overrides`` applied, the recipe file's folder (``None``
    for a mapping) and the default run name. A file of another kind raises
    :class:`~deltatune.tasks.spec.WrongCommandError` naming the subcommand that takes it."""
    if isinstance(source, Mapping):
        raw, base, default_name = dict(source), None, "recipe"
    else:
        check_type("recipe", source, (str, os.PathLike), "a YAML file path or a mapping")
        path = Path(source)
        raw, base, default_name = read_yaml(path), path.resolve().parent, path.stem
    check_config_kind(raw, source, command, ("data-to-text",))
    return apply_overrides(raw, list(overrides)), base, default_name


def load_recipe(
    source: str | os.PathLike | Mapping[str, Any],
    overrides: Sequence[str] = (),
    *,
    output_dir: str | os.PathLike | None = None,
    check_data: bool = True,
    command: str = "run",
) -> Recipe:
    """Read, override and validate a recipe; nothing is loaded or written.

    Args:
        source: a YAML file or an already-parsed mapping.
        overrides: ``--set`` strings (see :func:`deltatune.tasks.overrides.apply_overrides`).
        output_dir: replaces the recipe's ``output_dir``.
        check_data: also check that the data directory and the split files exist (and the Java
            needed by the requested metrics).
        command: the subcommand reading it (named in the error for a file of another kind).

    Raises:
        WrongCommandError: ``source`` is a sweep or perplexity config.
        DeltaConfigError: any invalid or unknown key or value, a missing data file (DART train, for
            instance, with the way out spelled out), training on the evaluated split.
        MissingPackageError: metrics that need Java without Java.
        DataFormatError: invalid YAML.
    """
    raw, base, default_name = recipe_mapping(source, overrides, command=command)
    unknown = [k for k in raw if k not in SECTIONS]
    if unknown:
        raise DeltaConfigError(
            f"unknown recipe key(s) {', '.join(repr(k) for k in unknown)}; known keys: {', '.join(SECTIONS)}"
        )
    name = raw.get("name") or default_name
    check_run_name("name", name)
    num_threads = raw.get("num_threads")
    if num_threads is not None:
        check_int("num_threads", num_threads, minimum=1)
    model = from_mapping(ModelSpec, "model", raw.get("model"))
    delta, delta_obj = build_delta(raw.get("delta"))
    export = from_mapping(ExportSpec, "export", raw.get("export"))
    if export.gguf == "adapter" and delta["method"] != "lora":
        raise DeltaConfigError(
            f"export.gguf 'adapter' writes a llama.cpp LoRA adapter and needs delta.method 'lora', got "
            f"{delta['method']!r}; use export.gguf: merged"
        )
    data = from_mapping(DataSpec, "data", raw.get("data"))
    ev = from_mapping(EvalSpec, "eval", raw.get("eval"))
    if ev.seed is None:
        ev.seed = data.seed

    if isinstance(raw.get("train"), Mapping) and "output_dir" in raw["train"]:
        raise DeltaConfigError("train.output_dir is not used in a recipe: set the top-level output_dir instead")
    train_raw = _section(raw, "train")
    out = output_dir if output_dir is not None else raw.get("output_dir") or os.path.join("runs", name)
    check_type("output_dir", out, (str, os.PathLike), "a directory path")
    out = os.fspath(out)
    if not out:
        raise DeltaConfigError("output_dir must be a non-empty directory path, got ''")
    try:
        train = TrainConfig.from_dict({**train_raw, "output_dir": out})
    except DeltaConfigError as exc:
        raise type(exc)(f"recipe section 'train': {exc}") from None
    generate = GenerationConfig(**_section(raw, "generate"))

    if ev.split == data.train_split:
        raise DeltaConfigError(
            f"eval.split and data.train_split are both {ev.split!r}: the decoded and scored split must not be trained on"
        )
    if check_data:
        _check_model_source(model.name_or_path)
        data.data_dir = resolve_data_dir(data.data_dir, base)
        _check_splits(data, ev)
        check_java(ev.metrics)
    elif data.data_dir is None:
        data.data_dir = DEFAULT_DATA_DIR
    recipe = Recipe(
        name=name,
        output_dir=out,
        model=model,
        delta=delta,
        data=data,
        train=train,
        generate=generate,
        eval=ev,
        source=None if base is None else os.fspath(source),  # type: ignore[arg-type]
        num_threads=num_threads,
        export=export,
    )
    recipe.keep_delta_config(delta_obj)
    return recipe


def resolve_data_dir(value: str | None, base: Path | None) -> str:
    """The absolute data directory of `data.data_dir` (see the module docstring for the search order)."""
    chosen = value if value is not None else os.environ.get(DATA_DIR_ENV_VAR) or DEFAULT_DATA_DIR
    path = Path(chosen).expanduser()
    if path.is_absolute():
        candidates = [path]
    else:
        candidates = [Path.cwd() / path]
        if base is not None:
            candidates += [base / path, base.parent / path]
    for c in candidates:
        if c.is_dir():
            return os.fspath(c.resolve())
    raise DeltaConfigError(
        f"data.data_dir must be an existing directory, got {chosen!r} (looked in: "
        + ", ".join(os.fspath(c) for c in dict.fromkeys(candidates))
        + f"); set data.data_dir or ${DATA_DIR_ENV_VAR}"
    )


def _check_model_source(name_or_path: str) -> None:
    if name_or_path in list_models() or Path(name_or_path).expanduser().exists():
        return
    raise DeltaConfigError(
        f"model.name_or_path must be a registered model ({', '.join(list_models())}) or an existing Hugging Face "
        f"directory or .gguf file, got {name_or_path!r}"
    )


def _check_splits(data: DataSpec, ev: EvalSpec) -> None:
    wanted = [("data.train_split", data.train_split), ("eval.split", ev.split)]
    if data.dev_split is not None:
        wanted.append(("data.dev_split", data.dev_split))
    for key, split in wanted:
        try:
            data_to_text_path(data.dataset, split, data.data_dir, data.format)  # type: ignore[arg-type]
        except DeltaConfigError as exc:
            hint = ""
            if data.dataset == "dart" and split == "train":
                hint = (
                    "; DART v1.1.1 train is not shipped there. To fine-tune on DART anyway, train on its dev split "
                    "explicitly: data.train_split: dev and data.allow_dev_training: true (a stratified "
                    "data.dev_holdout_fraction of dev is then held out for the validation loss; test is scored)"
                )
            raise DeltaConfigError(f"{key}={split!r}: {exc}{hint}") from None
