"""File helpers: atomic writing, hashing, and the one YAML parser every config file goes through."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import yaml

from .errors import CheckpointError, FileFormatError

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_output_dir",
    "file_sha256",
    "fsync_dir",
    "json_loads_strict",
    "load_json_file",
    "load_yaml_file",
    "read_text_file",
    "yaml_load",
]


@functools.cache
def _yaml_loader() -> Any:
    """A safe YAML loader (built once) that also reads ``1e-3`` / ``5E+2`` as floats (YAML 1.1 wants ``1.0e-3``)."""
    class _Loader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            """A mapping whose keys are unique: a repeated key is an error, never "the last one wins"."""
            if isinstance(node, yaml.MappingNode):
                seen: dict[Any, Any] = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=True)
                    try:
                        hash(key)
                    except TypeError:
                        continue  # the base class reports unhashable keys
                    if key in seen:
                        first = seen[key]
                        raise yaml.constructor.ConstructorError(
                            "while constructing a mapping",
                            node.start_mark,
                            f"duplicate key {key!r} (first on line {first.line + 1})",
                            key_node.start_mark,
                        )
                    seen[key] = key_node.start_mark
            return super().construct_mapping(node, deep=deep)

    _Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )
    return _Loader


def yaml_load(text: str) -> Any:
    """Parse YAML text safely, with ``1e-3``-style numbers as floats (recipes, sweeps, configs, ``--set``).

    A key repeated in one mapping is refused (``yaml.constructor.ConstructorError`` naming the key
    and both lines). Raises ``yaml.YAMLError`` for invalid YAML; callers turn it into their own
    error (or use :func:`load_yaml_file`, which names the file and line)."""
    return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory entry to disk (best effort; not all platforms allow it)."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Create ``path`` through ``write(file)`` on a temporary file in the same directory, fsync it and
    ``os.replace`` it into place (then fsync the directory).

    A crash or Ctrl-C leaves either the old file or the new one, never a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def check_output_dir(directory: str | os.PathLike, members: tuple[str, ...]) -> None:
    """Before anything is written: ``directory`` must be a directory (or not exist yet) and each of
    ``members`` inside it a regular file (or absent); :class:`~deltatune.errors.CheckpointError`
    naming the path otherwise."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"directory {str(directory)!r} exists and is not a directory; cannot write into it")
    for name in members:
        member = directory / name
        if member.exists() and not member.is_file():
            raise CheckpointError(f"{str(member)!r} exists and is not a regular file; refusing to write over it")


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def read_text_file(path: str | os.PathLike, what: str = "file") -> str:
    """The UTF-8 text of ``path``; invalid UTF-8 raises :class:`~deltatune.errors.FileFormatError`
    naming ``what``, the file, the line and the byte offset."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FileFormatError(
            f"{what} {os.fspath(path)!r}, line {_line_of(data, exc.start)}: not valid UTF-8 "
            f"(byte {data[exc.start:exc.start + 1]!r} at offset {exc.start})"
        ) from None


def load_yaml_file(path: str | os.PathLike, what: str = "YAML file") -> Any:
    """Parse a YAML file (see :func:`yaml_load`): bad UTF-8, invalid YAML or a duplicate key raise
    :class:`~deltatune.errors.FileFormatError` naming ``what``, the file, the line and the column."""
    text = read_text_file(path, what)
    try:
        return yaml_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "line 1"
        problem = getattr(exc, "problem", None) or str(exc)
        raise FileFormatError(f"{what} {os.fspath(path)!r}, {where}: invalid YAML ({problem})") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateJSONKey(key)
        out[key] = value
    return out


class _DuplicateJSONKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def json_loads_strict(text: str, source: str) -> Any:
    """``json.loads`` that refuses duplicate keys and names ``source`` and the line in a
    :class:`~deltatune.errors.FileFormatError`."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise FileFormatError(f"{source}, line {exc.lineno}, column {exc.colno}: invalid JSON ({exc.msg})") from None
    except _DuplicateJSONKey as exc:
        raise FileFormatError(f"{source}: duplicate key {exc.key!r} in a JSON object") from None


def load_json_file(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Parse a JSON file: bad UTF-8, invalid JSON or a duplicate key raise
    :class:`~deltatune.errors.FileFormatError` naming ``what``, the file and the line."""
    text = read_text_file(path, what)
    return json_loads_strict(text, f"{what} {os.fspath(path)!r}")
