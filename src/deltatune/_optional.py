"""Optional packages: which extra brings each one, and the one error raised when it is missing.

The core install (``pip install deltatune``) needs only torch, transformers, safetensors, PyYAML,
tqdm, rich and NumPy: ``import deltatune`` and the delta methods import nothing else. Evaluation,
reports and plots need the ``eval`` extra; reading GGUF files needs the ``gguf`` extra; ``all``
brings both. :func:`require` imports an optional module or raises :class:`MissingPackageError`
with the exact ``pip install`` line. This module imports only :mod:`deltatune.errors`.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from .errors import MissingPackageError

__all__ = ["OPTIONAL_PACKAGES", "install_hint", "is_available", "require"]

#: import name -> (distribution name on PyPI, the deltatune extra that installs it)
OPTIONAL_PACKAGES: dict[str, tuple[str, str]] = {
    "matplotlib": ("matplotlib", "eval"),
    "sacrebleu": ("sacrebleu", "eval"),
    "pycocoevalcap": ("pycocoevalcap", "eval"),
    "scipy": ("scipy", "eval"),
    "tensorboard": ("tensorboard", "eval"),
    "gguf": ("gguf", "gguf"),
}


def _top(module: str) -> str:
    return module.split(".", 1)[0]


def install_hint(module: str) -> str:
    """The exact command that installs the extra bringing ``module`` (e.g. ``pip install 'deltatune[eval]'``)."""
    dist, extra = OPTIONAL_PACKAGES[_top(module)]
    return f"pip install 'deltatune[{extra}]' (or: pip install {dist})"


def is_available(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module set to None in sys.modules
        return False


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` (a name listed in :data:`OPTIONAL_PACKAGES`, or a submodule of one) and return it.

    Args:
        module: the import name, e.g. ``"matplotlib.figure"``.
        purpose: what needs it, for the message, e.g. ``"plots"`` or ``"BLEU and NIST"``.

    Raises:
        MissingPackageError: the package is not installed; the message names it, what needs it and
            the exact ``pip install`` command.
    """
    top = _top(module)
    if top not in OPTIONAL_PACKAGES:
        raise KeyError(f"{module!r} is not an optional package of deltatune")  # a programming error
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        dist, _ = OPTIONAL_PACKAGES[top]
        raise MissingPackageError(
            f"{purpose} need(s) the package {dist!r}, which is not installed; install it with: {install_hint(module)}"
        ) from exc
