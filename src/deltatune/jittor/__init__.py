"""Jittor as a second framework: Llama and GPT-2 with LoRA, training, beam search and delta exchange.

Optional extra ``deltatune[jittor]`` (``pip install jittor==1.3.11.0``). Nothing else in deltatune
imports jittor; :func:`require_jittor` imports it on first use. Jittor reads two environment
variables on import: ``use_mkl`` (it tries to download oneDNN when MKL is on) and ``nvcc_path``
(it looks for CUDA). When they are unset, :func:`require_jittor` sets ``use_mkl=0`` and
``nvcc_path=""`` so that Jittor runs on the CPU offline, and says so once on stderr. Set them
yourself (``nvcc_path=/usr/local/cuda/bin/nvcc``) to try Jittor's CUDA build; against CUDA 13, Jittor
1.3.11 needs the patched copy that ``scripts/jittor_cuda13.py`` makes (README, "Alignment: PyTorch and
Jittor"), and ``use_cuda=2`` in the environment puts every Jittor operator on the GPU.

Modules: :mod:`.models` (the networks and safetensors loading), :mod:`.lora` (LoRA layers and the
delta format), :mod:`.train` (AdamW, schedule, loss, one training step, evaluation),
:mod:`.generate` (beam search) and :mod:`.align` (``deltatune align``).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from ..errors import MissingPackageError

__all__ = ["JITTOR_INSTALL", "JITTOR_VERSION", "require_jittor"]

#: the Jittor release this package was tested with
JITTOR_VERSION = "1.3.11.0"
#: the exact install line printed when jittor is missing
JITTOR_INSTALL = f"pip install jittor=={JITTOR_VERSION}"
_ENV_DEFAULTS = {"use_mkl": "0", "nvcc_path": ""}
_STATE: dict[str, Any] = {"module": None, "told": False}


def require_jittor() -> Any:
    """Import and return the ``jittor`` module (CPU, offline defaults; see the module docstring).

    Raises:
        MissingPackageError: jittor is not installed; the message holds the exact ``pip install`` line.
    """
    if _STATE["module"] is not None:
        return _STATE["module"]
    import importlib.util

    if importlib.util.find_spec("jittor") is None:
        raise MissingPackageError(
            f"the Jittor side of deltatune needs the 'jittor' package, which is not installed; install it with "
            f"`{JITTOR_INSTALL}` (or `pip install deltatune[jittor]`)"
        )
    unset = {k: v for k, v in _ENV_DEFAULTS.items() if k not in os.environ}
    if unset:
        os.environ.update(unset)
        if not _STATE["told"]:
            _STATE["told"] = True
            print(
                "deltatune.jittor: set " + ", ".join(f"{k}={v!r}" for k, v in unset.items())
                + " (Jittor on the CPU, offline: no oneDNN download, no CUDA search); set them yourself to change this",
                file=sys.stderr,
            )
    import signal

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGCHLD, signal.SIGINT)}
    import jittor

    # Jittor's C++ core installs handlers that end the whole process when any child process dies
    # from a signal (the METEOR scorer's Java process is killed on close) and on Ctrl-C; give
    # Python's handlers back
    for sig, handler in saved.items():
        if handler is not None:
            try:
                signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
    jittor.flags.log_silent = 1
    _STATE["module"] = jittor
    return jittor
