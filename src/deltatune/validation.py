"""Argument checks shared by every config and constructor.

Each check raises :class:`~deltatune.errors.DeltaConfigError` (value out of range) or
:class:`~deltatune.errors.DeltaConfigTypeError` (wrong type) with a message of the form
``"<name> must be <expected>, got <value>"``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

from .errors import DeltaConfigError, DeltaConfigTypeError

__all__ = [
    "check_bool",
    "check_choice",
    "check_float",
    "check_int",
    "check_known_keys",
    "check_optional_int_list",
    "check_path_exists",
    "check_positive_int",
    "check_run_name",
    "check_str_list",
    "check_type",
]


def _fmt(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def check_type(name: str, value: Any, types: type | tuple[type, ...], expected: str) -> Any:
    """Raise ``DeltaConfigTypeError`` unless ``value`` is an instance of ``types`` (bools are not ints)."""
    ok = isinstance(value, types)
    if ok and isinstance(value, bool):
        allowed = types if isinstance(types, tuple) else (types,)
        ok = bool in allowed
    if not ok:
        raise DeltaConfigTypeError(f"{name} must be {expected}, got {_fmt(value)} ({type(value).__name__})")
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` must be a bool."""
    return check_type(name, value, bool, "a bool")


def check_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` must be an int (not a bool) within ``[minimum, maximum]``."""
    if minimum is not None and maximum is not None:
        expected = f"an int in [{minimum}, {maximum}]"
    elif minimum is not None:
        expected = "a positive int" if minimum == 1 else f"an int >= {minimum}"
    elif maximum is not None:
        expected = f"an int <= {maximum}"
    else:
        expected = "an int"
    check_type(name, value, int, expected)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise DeltaConfigError(f"{name} must be {expected}, got {_fmt(value)}")
    return value


def check_known_keys(what: str, keys: Iterable[Any], known: Sequence[str]) -> None:
    """Raise ``DeltaConfigError`` naming every key of ``keys`` not in ``known`` and listing the known ones:
    ``unknown <what> key(s) 'a', 'b'; known keys: x, y``."""
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise DeltaConfigError(
            f"unknown {what} key(s) {', '.join(map(repr, unknown))}; known keys: {', '.join(known)}"
        )


def check_positive_int(name: str, value: Any) -> int:
    """``value`` must be an int >= 1."""
    return check_int(name, value, minimum=1)


def check_float(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """``value`` must be a finite real number (int or float, not bool) within the given interval."""
    if low is not None or high is not None:
        lb = "(-inf" if low is None else ("[" if low_inclusive else "(") + f"{low:g}"
        ub = "inf)" if high is None else f"{high:g}" + ("]" if high_inclusive else ")")
        if low == 0 and high is None and not low_inclusive:
            expected = "a number > 0"
        elif low == 0 and high is None:
            expected = "a number >= 0"
        else:
            expected = f"a number in {lb}, {ub}"
    else:
        expected = "a finite number"
    check_type(name, value, (int, float), expected)
    value = float(value)
    bad = not math.isfinite(value)
    if low is not None:
        bad = bad or (value < low if low_inclusive else value <= low)
    if high is not None:
        bad = bad or (value > high if high_inclusive else value >= high)
    if bad:
        raise DeltaConfigError(f"{name} must be {expected}, got {_fmt(value)}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value`` must be one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise DeltaConfigError(f"{name} must be one of {listed}, got {_fmt(value)}")
    return value


def check_str_list(name: str, value: Any, *, allow_empty: bool = False, allow_none: bool = False) -> list[str] | None:
    """``value`` must be a str or a list/tuple of str; returns a list (a str becomes ``[value]``)."""
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        items = [value]
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = list(value)
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise DeltaConfigTypeError(
                    f"{name}[{i}] must be a str, got {_fmt(item)} ({type(item).__name__})"
                )
    else:
        raise DeltaConfigTypeError(
            f"{name} must be a str or a list of str, got {_fmt(value)} ({type(value).__name__})"
        )
    if not allow_empty and (not items or any(not s for s in items)):
        raise DeltaConfigError(f"{name} must be a non-empty str or a non-empty list of non-empty str, got {_fmt(value)}")
    return items


def check_optional_int_list(name: str, value: Any, *, minimum: int = 0) -> list[int] | None:
    """``value`` must be None, an int, or a list of ints >= ``minimum``; returns a list or None."""
    if value is None:
        return None
    items: Sequence[Any] = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(items, (list, tuple)):
        raise DeltaConfigTypeError(f"{name} must be an int or a list of int, got {_fmt(value)} ({type(value).__name__})")
    return [check_int(f"{name}[{i}]", v, minimum=minimum) for i, v in enumerate(items)]


def check_run_name(name: str, value: Any) -> str:
    """``value`` must be a str usable as one directory name: no ``/``, ``\\``, ``..`` or NUL, not ``.``."""
    check_type(name, value, str, "a str")
    if any(sep in value for sep in ("/", "\\", "\0")) or ".." in value or value.strip(".") == "":
        raise DeltaConfigError(
            f"{name} must be a plain run name (it names the directory under the output root), without '/', '\\' "
            f"or '..', got {_fmt(value)}"
        )
    return value


def check_path_exists(name: str, value: Any, *, kind: str = "path") -> str:
    """``value`` must be a str/PathLike naming an existing file or directory (``kind``: path, file, dir)."""
    check_type(name, value, (str, os.PathLike), "a path (str or os.PathLike)")
    path = os.fspath(value)
    exists = {"path": os.path.exists, "file": os.path.isfile, "dir": os.path.isdir}[kind](path)
    if not exists:
        what = {"path": "an existing path", "file": "an existing file", "dir": "an existing directory"}[kind]
        raise DeltaConfigError(f"{name} must be {what}, got {_fmt(path)}")
    return path
