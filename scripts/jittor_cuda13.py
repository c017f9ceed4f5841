#!/usr/bin/env python3
"""A patched copy of Jittor 1.3.11.0 that builds against CUDA 13, in a cache folder deltatune owns.

Jittor 1.3.11.0 compiles its C++/CUDA core on first import. Against CUDA 13 that build fails: its
sources use CUDA runtime API that CUDA 13 removed (see ``PATCHES``). This script never touches the
installed package. It copies the installed ``jittor`` and ``jittor_utils`` packages (located without
importing them: importing jittor starts the build) into
``~/.cache/deltatune/jittor-cuda13/<jittor version>/`` (``--dest`` to change), applies the listed source
patches there, and prints the environment lines that make Python import the copy::

    python scripts/jittor_cuda13.py            # build or reuse the copy, print the env lines
    eval "$(python scripts/jittor_cuda13.py --print-env)"

Every patch is an exact text replacement: its anchor must occur in the named file exactly ``count``
times, or nothing is written (all patches are applied to a fresh temporary copy which replaces the
cache folder only when every one applied). A finished copy carries ``deltatune-cuda13.json`` (the
version, the source folder and the patch names); a second run with the same source and patches
changes nothing. A Jittor other than ``JITTOR_VERSION``, or a missing anchor, is refused with
:class:`JittorPatchError` naming the file and what was expected.

The environment lines also turn off what Jittor would otherwise download on a CUDA machine (cutt,
cutlass, NCCL: ``use_cutt=0 use_cutlass=0 use_nccl=0``), oneDNN (``use_mkl=0``), and limit its CUDA
libraries to cuBLAS and cuRAND (``conv_opt=1``: no cuDNN, cuFFT, cuSPARSE, whose absence is fatal).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

try:
    from deltatune.errors import DeltaError
except ImportError:  # run from a checkout without deltatune installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from deltatune.errors import DeltaError

#: the only Jittor release the patches were written against
JITTOR_VERSION = "1.3.11.0"
MANIFEST = "deltatune-cuda13.json"
#: environment for a CUDA machine without network access (see the module docstring)
CUDA_ENV = {"use_mkl": "0", "use_cutt": "0", "use_cutlass": "0", "use_nccl": "0", "conv_opt": "1"}


class JittorPatchError(DeltaError):
    """The installed Jittor is not the release the CUDA 13 patches were made for, or a patch's anchor
    text is not in the file it names."""


@dataclass(frozen=True)
class Patch:
    """Replace ``anchor`` (which must occur exactly ``count`` times) by ``replacement`` in ``file``."""

    name: str
    file: str  # relative to the folder holding the ``jittor`` package
    anchor: str
    replacement: str
    count: int
    why: str


def _attr(attr: str, dev: str) -> str:
    """A C++14 expression reading one device attribute (the CUDA 13 replacement of a removed
    ``cudaDeviceProp`` field)."""
    return f"[&]{{ int v_ = 0; cudaDeviceGetAttribute(&v_, {attr}, {dev}); return v_; }}()"


_HELPER = "jittor/extern/cuda/inc/helper_cuda.h"
PATCHES: tuple[Patch, ...] = (
    Patch(
        "helper_cuda.computeMode.gpuDeviceInit", _HELPER,
        "if (deviceProp.computeMode == cudaComputeModeProhibited) {",
        f"if ({_attr('cudaDevAttrComputeMode', 'devID')} == cudaComputeModeProhibited) {{",
        1, "cudaDeviceProp::computeMode was removed in CUDA 13"),
    Patch(
        "helper_cuda.computeMode.gpuGetMaxGflopsDeviceId", _HELPER,
        "if (deviceProp.computeMode != cudaComputeModeProhibited) {",
        f"if ({_attr('cudaDevAttrComputeMode', 'current_device')} != cudaComputeModeProhibited) {{",
        1, "cudaDeviceProp::computeMode was removed in CUDA 13"),
    Patch(
        "helper_cuda.clockRate", _HELPER,
        "sm_per_multiproc * deviceProp.clockRate;",
        f"sm_per_multiproc * {_attr('cudaDevAttrClockRate', 'current_device')};",
        1, "cudaDeviceProp::clockRate was removed in CUDA 13"),
    Patch(
        "helper_cuda.computeMode.findIntegratedGPU", _HELPER,
        "(deviceProp.computeMode != cudaComputeModeProhibited)) {",
        f"({_attr('cudaDevAttrComputeMode', 'current_device')} != cudaComputeModeProhibited)) {{",
        1, "cudaDeviceProp::computeMode was removed in CUDA 13"),
    Patch(
        "compiler.nvcc_cxx17", "jittor/compiler.py",
        '        nvcc_flags = nvcc_flags.replace("-Wall", "")\n',
        '        nvcc_flags = nvcc_flags.replace("-Wall", "")\n'
        '        if nvcc_version >= [13, 0]:  # deltatune jittor_cuda13: CCCL 3 (cub, thrust, libcu++) needs C++17\n'
        '            nvcc_flags = nvcc_flags.replace("-std=c++14", "-std=c++17")\n',
        1, "CUDA 13's CCCL headers (cub, thrust) refuse to compile below C++17; Jittor passes -std=c++14 to nvcc"),
    Patch(
        "code_softmax.cub_Max", "jittor/other/code_softmax.py",
        "BlockReduce(temp_storage).Reduce(v1, cub::Max());",
        "BlockReduce(temp_storage).Reduce(v1, ::cuda::maximum<>());",
        1, "cub::Max was removed in CCCL 3 (CUDA 13); cuda::maximum replaces it (jt.nn.softmax on CUDA)"),
    Patch(
        "cub_where.CountingInputIterator", "jittor/extern/cuda/cub/ops/cub_where_op.cc",
        "cub::CountingInputIterator<To> counting_itr(0);",
        "thrust::counting_iterator<To> counting_itr(0);",
        1, "cub::CountingInputIterator was removed in CCCL 3 (CUDA 13); thrust::counting_iterator replaces it"),
    Patch(
        "cub_where.TransformInputIterator", "jittor/extern/cuda/cub/ops/cub_where_op.cc",
        "cub::TransformInputIterator<bool, NonZeroOp<Ti>, Ti*> itr(cond->ptr<Ti>(), NonZeroOp<Ti>());",
        "thrust::transform_iterator<NonZeroOp<Ti>, Ti*, bool> itr(cond->ptr<Ti>(), NonZeroOp<Ti>());",
        1, "cub::TransformInputIterator was removed in CCCL 3 (CUDA 13); thrust::transform_iterator replaces it"),
)


def default_dest(version: str = JITTOR_VERSION) -> Path:
    """``~/.cache/deltatune/jittor-cuda13/<version>`` (``$XDG_CACHE_HOME`` is honoured)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "deltatune" / "jittor-cuda13" / version


def find_installed() -> Path:
    """The folder that holds the installed ``jittor`` package (found without importing it)."""
    spec = importlib.util.find_spec("jittor")
    if spec is None or not spec.submodule_search_locations:
        raise JittorPatchError("jittor is not installed: expected the package 'jittor' "
                               f"(pip install jittor=={JITTOR_VERSION}) to find its sources")
    return Path(list(spec.submodule_search_locations)[0]).resolve().parent


def read_version(site: Path) -> str:
    """The ``__version__`` written in ``site/jittor/__init__.py`` (read as text, not imported)."""
    init = site / "jittor" / "__init__.py"
    if not init.is_file():
        raise JittorPatchError(f"{init}: not found; expected the jittor package's __init__.py under {site}")
    m = re.search(r"""^__version__\s*=\s*['"]([^'"]+)['"]""", init.read_text(encoding="utf-8"), re.M)
    if m is None:
        raise JittorPatchError(f"{init}: no __version__ line; expected __version__ = '{JITTOR_VERSION}'")
    return m.group(1)


def check_source(site: Path) -> None:
    """Refuse a Jittor other than :data:`JITTOR_VERSION` or one without ``jittor_utils`` beside it."""
    version = read_version(site)
    if version != JITTOR_VERSION:
        raise JittorPatchError(
            f"{site / 'jittor' / '__init__.py'}: jittor __version__ is {version!r}; the CUDA 13 patches were "
            f"made for {JITTOR_VERSION!r} only (pip install jittor=={JITTOR_VERSION})")
    if not (site / "jittor_utils" / "__init__.py").is_file():
        raise JittorPatchError(f"{site / 'jittor_utils'}: not found; expected the jittor_utils package beside jittor")


def apply_patches(root: Path, patches: tuple[Patch, ...] = PATCHES) -> list[str]:
    """Apply ``patches`` to the copy under ``root`` in memory, check every anchor, then write the files.

    Raises:
        JittorPatchError: a patched file is missing or an anchor does not occur exactly ``count`` times.
    """
    texts: dict[str, str] = {}
    for p in patches:
        path = root / p.file
        if p.file not in texts:
            if not path.is_file():
                raise JittorPatchError(f"{path}: not found; patch {p.name!r} expected this file")
            texts[p.file] = path.read_text(encoding="utf-8")
        n = texts[p.file].count(p.anchor)
        if n != p.count:
            raise JittorPatchError(
                f"{path}: patch {p.name!r} expected its anchor text {p.anchor!r} {p.count} time(s), found {n}")
        texts[p.file] = texts[p.file].replace(p.anchor, p.replacement)
    for rel, text in texts.items():
        (root / rel).write_text(text, encoding="utf-8")
    return [p.name for p in patches]


def _manifest(site: Path, patches: tuple[Patch, ...]) -> dict:
    key = hashlib.sha256(json.dumps([p.__dict__ for p in patches], sort_keys=True).encode()).hexdigest()[:16]
    return {"jittor_version": JITTOR_VERSION, "source": str(site), "patches": [p.name for p in patches],
            "patch_key": key}


def build(site: Path | None = None, dest: Path | None = None, patches: tuple[Patch, ...] = PATCHES) -> tuple[Path, bool]:
    """Make (or reuse) the patched copy; returns ``(dest, changed)``.

    Raises:
        JittorPatchError: wrong Jittor version, or a patch that does not apply (nothing is written then).
    """
    site = Path(site).resolve() if site is not None else find_installed()
    check_source(site)
    dest = Path(dest) if dest is not None else default_dest()
    want = _manifest(site, patches)
    mpath = dest / MANIFEST
    if mpath.is_file():
        try:
            have = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            have = None
        if have == want:
            return dest, False
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=dest.parent))
    try:
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        for pkg in ("jittor", "jittor_utils"):
            shutil.copytree(site / pkg, tmp / pkg, ignore=ignore, symlinks=True)
        apply_patches(tmp, patches)
        (tmp / MANIFEST).write_text(json.dumps(want, indent=1) + "\n", encoding="utf-8")
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dest, True


def env_lines(dest: Path, nvcc: str = "/usr/local/cuda/bin/nvcc") -> list[str]:
    """Shell lines that make Python import the patched copy and let Jittor build for CUDA offline."""
    lines = [f'export PYTHONPATH="{dest}${{PYTHONPATH:+:$PYTHONPATH}}"']
    lines += [f"export {k}={v}" for k, v in CUDA_ENV.items()]
    lines.append(f"export nvcc_path={nvcc}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path, help="folder holding the jittor package (default: the installed one)")
    ap.add_argument("--dest", type=Path, help=f"where the patched copy goes (default: {default_dest()})")
    ap.add_argument("--nvcc", default="/usr/local/cuda/bin/nvcc", help="nvcc_path in the printed env lines")
    ap.add_argument("--print-env", action="store_true", help="print only the env lines (for eval)")
    ap.add_argument("--list", action="store_true", help="list the patches and exit")
    args = ap.parse_args(argv)
    if args.list:
        for p in PATCHES:
            print(f"{p.name}: {p.file}: {p.why}")
        return 0
    try:
        dest, changed = build(args.source, args.dest)
    except JittorPatchError as e:
        print(f"jittor_cuda13: {e}", file=sys.stderr)
        return 2
    if not args.print_env:
        print(f"{'patched' if changed else 'up to date'}: {dest} ({len(PATCHES)} patches)", file=sys.stderr)
    print("\n".join(env_lines(dest, args.nvcc)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
