"""The GGUF -> safetensors cache: a GGUF file converted once into a plain float32 Hugging Face directory.

GGUF files are dequantised by ``transformers`` + ``gguf`` (slow: tens of seconds, mostly metadata
parsing, and the result is flagged as quantised so ``save_pretrained`` refuses it). :func:`convert_gguf`
therefore converts a GGUF file **once** into a plain float32 safetensors Hugging Face directory in a
cache and every later :func:`deltatune.models.load` reads that directory (well under a second). The
cache entry is keyed on the GGUF file's resolved path, size and modification time, is built in a
temporary directory beside its final place, verified (bit-identical weights and logits, identical
tokenisation) and moved into place with one atomic ``rename``; its marker file is written last, so an
interrupted conversion is never trusted later.

Cache location: ``cache_dir`` if given (entries go directly below it), else ``$DELTATUNE_CACHE/models``,
else ``$XDG_CACHE_HOME/deltatune/models``, else ``~/.cache/deltatune/models``; an entry's name is
:func:`gguf_cache_name`. transformers and safetensors are imported where they are used: ``import
deltatune`` reaches this package (through the GGUF exporter) and must stay light.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .._optional import require
from ..errors import CheckpointError, DeltaConfigError
from ..io_utils import atomic_write_text, fsync_dir
from ..validation import check_bool, check_type
from .helpers import chat_prompt
from .progress import library_progress
from .registry import NAME_RE, is_gguf_file

__all__ = [
    "CACHE_ENV_VAR",
    "CACHE_MARKER",
    "convert_gguf",
    "default_cache_dir",
    "ensure_gguf_cache",
    "gguf_cache_name",
    "resolve_cache_dir",
]

logger = logging.getLogger(__name__)

#: Environment variable naming deltatune's cache root (models live in its ``models`` sub-directory).
CACHE_ENV_VAR = "DELTATUNE_CACHE"
#: The marker file of a finished cache entry (written last; holds the cache key).
CACHE_MARKER = ".deltatune-cache.json"

_CACHE_FORMAT = 1
_STALE_TEMP_SECONDS = 24 * 3600
_VERIFY_TEXT = "The quick brown fox jumps over the lazy dog. 1234 + 5678 = 6912?"


def default_cache_dir() -> Path:
    """The models cache directory used when ``cache_dir`` is not given (see the module docstring)."""
    root = os.environ.get(CACHE_ENV_VAR)
    if root:
        return Path(root).expanduser() / "models"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "deltatune" / "models"


def resolve_cache_dir(cache_dir: Any) -> Path:
    """``cache_dir`` as a Path, or :func:`default_cache_dir` for ``None`` (checked: a path or None)."""
    if cache_dir is None:
        return default_cache_dir()
    check_type("cache_dir", cache_dir, (str, os.PathLike), "None or a path (str or os.PathLike)")
    return Path(cache_dir).expanduser()


def gguf_cache_name(gguf_path: Path, name: str | None = None) -> str:
    """The cache entry name of a GGUF file: ``name`` if given (a registered model's name), else the
    file's stem (unsafe characters replaced) plus 12 hex digits of the SHA-256 of its resolved path."""
    if name is not None:
        return name
    digest = hashlib.sha256(str(gguf_path.resolve()).encode("utf-8")).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", gguf_path.stem) or "model"
    return f"{stem}-{digest}"


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


def _read_marker(entry: Path) -> dict[str, Any] | None:
    try:
        return json.loads((entry / CACHE_MARKER).read_text(encoding="utf-8"))
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
    progress: bool = True,
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
        progress: show progress bars while converting (deltatune's and transformers'); ``False`` shows
            none.

    Returns:
        The cache entry's directory, loadable with ``from_pretrained`` or :func:`deltatune.models.load`.

    Raises:
        DeltaConfigError: bad arguments; CheckpointError: not a GGUF file, or the conversion does not
        reproduce the GGUF model bit for bit.
    """
    check_type("gguf_path", gguf_path, (str, os.PathLike), "a path (str or os.PathLike)")
    path = Path(gguf_path).expanduser()
    if not path.is_file():
        raise DeltaConfigError(f"gguf_path must be an existing .gguf file, got {str(path)!r}")
    if not is_gguf_file(path):
        raise CheckpointError(f"{str(path)!r} is not a GGUF file (its first bytes are not the GGUF magic)")
    if name is not None:
        check_type("name", name, str, "None or a str")
        if not NAME_RE.match(name):
            raise DeltaConfigError(
                f"name must be letters, digits, '.', '_' or '-' starting with a letter or digit, got {name!r}"
            )
    check_bool("force", force)
    check_bool("progress", progress)
    root = resolve_cache_dir(cache_dir)
    return ensure_gguf_cache(path, root, gguf_cache_name(path, name), force=force, progress=progress)


def ensure_gguf_cache(path: Path, root: Path, name: str, *, force: bool = False, progress: bool = True) -> Path:
    """The valid cache entry ``root / name`` of the GGUF file ``path``, converting it first if needed.

    Arguments are not checked (see :func:`convert_gguf`, which checks them); ``progress`` False
    silences every bar of the conversion.
    """
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
        with (
            library_progress(progress),
            tqdm(total=4, desc=f"deltatune: caching {path.name}", unit="step", disable=not progress) as bar,
        ):
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
        marker = {
            "key": key,
            "files": files,
            "transformers_version": importlib.metadata.version("transformers"),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "conversion_seconds": round(time.perf_counter() - t0, 3),
            "verification": {"max_abs_logit_diff": diff, "text": _VERIFY_TEXT},
        }
        _fsync_tree(tmp)
        atomic_write_text(tmp / CACHE_MARKER, json.dumps(marker, indent=2, sort_keys=True) + "\n")
        _install_entry(tmp, entry, key, force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return entry


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
