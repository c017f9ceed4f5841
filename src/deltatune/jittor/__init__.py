"""Jittor as a second framework: Llama and GPT-2 with LoRA, training, beam search and delta exchange.

Optional extra ``deltatune[jittor]`` (``pip install jittor==1.3.11.0``). Nothing else in deltatune
imports jittor; :func:`require_jittor` imports it on first use. Jittor reads two environment
variables on import: ``use_mkl`` (it tries to download oneDNN when MKL is on) and ``nvcc_path``
(it looks for CUDA). When they are unset, :func:`require_jittor` sets ``nvcc_path=""`` and, where the
system has oneDNN (Debian's ``libdnnl-dev``: ``dnnl.hpp`` and ``libdnnl.so.2``), ``use_mkl=1`` with Jittor's
oneDNN folder (``~/.cache/jittor/mkl/dnnl_lnx_2.2.0_cpu_gomp``, made only where it does not exist) pointing
at the system's headers and library, so nothing is downloaded and Jittor's CPU matmuls run in oneDNN
(about 20x faster than its own loops); elsewhere ``use_mkl=0``. So Jittor runs on the CPU offline; it
says what it set once on stderr. Set them
yourself (``nvcc_path=/usr/local/cuda/bin/nvcc``) to try Jittor's CUDA build; against CUDA 13, Jittor
1.3.11 needs the patched copy that ``scripts/jittor_cuda13.py`` makes (README, "Alignment: PyTorch and
Jittor"), and ``use_cuda=2`` in the environment puts every Jittor operator on the GPU.

Modules: :mod:`.models` (the networks and safetensors loading), :mod:`.lora` (LoRA layers and the
delta format), :mod:`.train` (AdamW, schedule, loss, one training step, evaluation),
:mod:`.generate` (beam search) and :mod:`.align` (``deltatune align``).
"""

from __future__ import annotations

import ctypes.util
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import MissingPackageError

__all__ = ["JITTOR_INSTALL", "JITTOR_VERSION", "ONEDNN_DIR", "jittor_home", "prepare_onednn", "require_jittor",
           "system_onednn"]

#: the Jittor release this package was tested with
JITTOR_VERSION = "1.3.11.0"
#: the exact install line printed when jittor is missing
JITTOR_INSTALL = f"pip install jittor=={JITTOR_VERSION}"
_STATE: dict[str, Any] = {"module": None, "told": False}
#: the folder name Jittor 1.3.11's oneDNN installer looks for under ``<Jittor home>/.cache/jittor/mkl``
ONEDNN_DIR = "dnnl_lnx_2.2.0_cpu_gomp"
_INCLUDE_DIRS = (Path("/usr/include"), Path("/usr/local/include"))


def system_onednn() -> tuple[Path, Path] | None:
    """``(include folder, libdnnl shared library)`` of a oneDNN 2 installed on the system, or None."""
    include = next((d for d in _INCLUDE_DIRS if (d / "dnnl.hpp").is_file()), None)
    name = ctypes.util.find_library("dnnl")
    if include is None or not name or not name.startswith("libdnnl.so.2"):
        return None
    lib = next((Path(d) / name for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib",
                                         "/usr/local/lib") if (Path(d) / name).exists()), None)
    return (include, lib) if lib is not None else None


def jittor_home() -> Path:
    """Jittor's home folder: ``JITTOR_HOME``, else the one in ``~/.cache/jittor/config.json``, else ``~``."""
    if os.environ.get("JITTOR_HOME"):
        return Path(os.environ["JITTOR_HOME"])
    config = Path.home() / ".cache" / "jittor" / "config.json"
    try:
        return Path(json.loads(config.read_text()).get("JITTOR_HOME") or Path.home())
    except (OSError, ValueError, AttributeError):
        return Path.home()


def prepare_onednn(home: Path | None = None) -> Path | None:
    """Point Jittor's oneDNN folder at the system's oneDNN (``include`` and ``lib/libmkldnn.so`` as links),
    making only what is missing and never changing what is there; returns the folder when it then holds
    ``include/dnnl.hpp`` and the library (Jittor's own install counts), else None (no system oneDNN, or the
    folder holds something unusable)."""
    found = system_onednn()
    if found is None:
        return None
    include, lib = found
    folder = (home or jittor_home()) / ".cache" / "jittor" / "mkl" / ONEDNN_DIR
    so = folder / "lib" / "libmkldnn.so"
    if so.exists() and not so.is_symlink():
        return folder  # a real oneDNN install of Jittor's: use it
    (folder / "lib").mkdir(parents=True, exist_ok=True)
    for link, target in ((folder / "include", include), (so, lib)):
        if not link.exists() and not link.is_symlink():  # (an existing link or folder is left as it is)
            link.symlink_to(target)
    return folder if (folder / "include" / "dnnl.hpp").is_file() and so.exists() else None


def _env_defaults() -> dict[str, str]:
    """``nvcc_path=""`` and ``use_mkl`` 1 (system oneDNN prepared) or 0, for those not set by the user."""
    out = {}
    if "nvcc_path" not in os.environ:
        out["nvcc_path"] = ""
    if "use_mkl" not in os.environ:
        out["use_mkl"] = "1" if prepare_onednn() is not None else "0"
    return out


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
    unset = _env_defaults()
    if unset:
        os.environ.update(unset)
        if not _STATE["told"]:
            _STATE["told"] = True
            how = ("the system's oneDNN for matmuls" if unset.get("use_mkl") == "1"
                   else "no oneDNN download" if "use_mkl" in unset else "")
            print(
                "deltatune.jittor: set " + ", ".join(f"{k}={v!r}" for k, v in unset.items())
                + f" (Jittor on the CPU, offline: {', '.join(filter(None, (how, 'no CUDA search')))}); "
                "set them yourself to change this",
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
