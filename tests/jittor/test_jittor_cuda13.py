"""scripts/jittor_cuda13.py on CPU: the patched copy of the installed Jittor holds every replacement and
nothing else changed, a second run writes nothing, the installed package is never touched, and a wrong
version or a missing anchor is refused before anything is written. No CUDA is needed (nothing compiles)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deltatune.errors import DeltaError

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "jittor_cuda13.py"


def _load():
    spec = importlib.util.spec_from_file_location("jittor_cuda13", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["jittor_cuda13"] = mod
    spec.loader.exec_module(mod)
    return mod


jc = _load()


def _installed() -> Path:
    if importlib.util.find_spec("jittor") is None:
        pytest.skip("jittor is not installed (pip install jittor==1.3.11.0)")
    site = jc.find_installed()
    if jc.read_version(site) != jc.JITTOR_VERSION:
        pytest.skip(f"the installed jittor is not {jc.JITTOR_VERSION}")
    return site


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


def _fake_site(tmp_path: Path, version: str, helper_text: str | None = None) -> Path:
    """A minimal jittor/jittor_utils layout with the given version and (optionally) helper_cuda.h text."""
    site = tmp_path / "site"
    (site / "jittor").mkdir(parents=True)
    (site / "jittor_utils").mkdir()
    (site / "jittor" / "__init__.py").write_text(f"# x\n__version__ = '{version}'\n")
    (site / "jittor_utils" / "__init__.py").write_text("")
    if helper_text is not None:
        inc = site / "jittor" / "extern" / "cuda" / "inc"
        inc.mkdir(parents=True)
        (inc / "helper_cuda.h").write_text(helper_text)
    return site


def test_patched_copy_holds_every_replacement_and_nothing_else(tmp_path):
    site = _installed()
    before = {pkg: _tree_hashes(site / pkg) for pkg in ("jittor", "jittor_utils")}
    dest, changed = jc.build(site, tmp_path / "copy")
    assert changed and dest == tmp_path / "copy"
    # the installed package is untouched
    assert {pkg: _tree_hashes(site / pkg) for pkg in ("jittor", "jittor_utils")} == before
    patched_files = {p.file for p in jc.PATCHES}
    for p in jc.PATCHES:
        text = (dest / p.file).read_text()
        assert p.anchor not in text or p.anchor in p.replacement, p.name
        assert text.count(p.replacement) >= 1, p.name
        # exactly the anchors changed: undoing the replacements gives back the installed file
    for rel in patched_files:
        text = (dest / rel).read_text()
        for p in reversed([q for q in jc.PATCHES if q.file == rel]):
            text = text.replace(p.replacement, p.anchor)
        assert text == (site / rel).read_text(), rel
    after = {pkg: _tree_hashes(dest / pkg) for pkg in ("jittor", "jittor_utils")}
    for pkg in after:
        diff = {k for k in set(after[pkg]) | set(before[pkg]) if after[pkg].get(k) != before[pkg].get(k)}
        assert {f"{pkg}/{k}" for k in diff} == {f for f in patched_files if f.startswith(pkg + "/")}
    # the removed CUDA 13 fields are no longer read
    helper = (dest / "jittor/extern/cuda/inc/helper_cuda.h").read_text()
    assert "deviceProp.computeMode" not in helper and "deviceProp.clockRate" not in helper
    assert helper.count("cudaDevAttrComputeMode") == 3 and helper.count("cudaDevAttrClockRate") == 1


def test_second_run_changes_nothing(tmp_path):
    site = _installed()
    dest, changed = jc.build(site, tmp_path / "copy")
    assert changed
    stamp = {p: p.stat().st_mtime_ns for p in dest.rglob("*")}
    dest2, changed2 = jc.build(site, tmp_path / "copy")
    assert (dest2, changed2) == (dest, False)
    assert {p: p.stat().st_mtime_ns for p in dest.rglob("*")} == stamp


def test_a_copy_made_with_other_patches_is_rebuilt(tmp_path):
    site = _installed()
    dest, _ = jc.build(site, tmp_path / "copy", patches=jc.PATCHES[:1])
    assert "deviceProp.clockRate" in (dest / "jittor/extern/cuda/inc/helper_cuda.h").read_text()
    _, changed = jc.build(site, dest)
    assert changed
    assert "deviceProp.clockRate" not in (dest / "jittor/extern/cuda/inc/helper_cuda.h").read_text()


def test_wrong_version_is_refused_before_any_work(tmp_path):
    site = _fake_site(tmp_path, "1.3.10.0")
    with pytest.raises(jc.JittorPatchError) as e:
        jc.build(site, tmp_path / "copy")
    assert isinstance(e.value, DeltaError)
    assert str(e.value) == (f"{site / 'jittor' / '__init__.py'}: jittor __version__ is '1.3.10.0'; the CUDA 13 "
                            "patches were made for '1.3.11.0' only (pip install jittor==1.3.11.0)")
    assert not (tmp_path / "copy").exists()


def test_missing_anchor_is_refused_and_nothing_is_written(tmp_path):
    site = _fake_site(tmp_path, jc.JITTOR_VERSION, helper_text="// a helper_cuda.h without the anchors\n")
    with pytest.raises(jc.JittorPatchError) as e:
        jc.build(site, tmp_path / "copy")
    first = jc.PATCHES[0]
    # the path named is the temporary copy's (the anchors are checked there, before anything lands in dest)
    msg = str(e.value)
    assert msg.endswith(f"/jittor/extern/cuda/inc/helper_cuda.h: patch {first.name!r} expected its anchor text "
                        f"{first.anchor!r} 1 time(s), found 0")
    assert not (tmp_path / "copy").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["site"]  # the temporary build folder is gone too


def test_anchor_found_twice_is_refused(tmp_path):
    site = _installed()
    dup = jc.Patch("dup", "jittor/__init__.py", "import", "import", 1, "test")
    with pytest.raises(jc.JittorPatchError, match=r"jittor/__init__.py: patch 'dup' expected its anchor text "
                                                  r"'import' 1 time\(s\), found \d+"):
        jc.build(site, tmp_path / "copy", patches=(dup,))
    assert not (tmp_path / "copy").exists()


def test_cli_prints_env_lines_and_exits_2_on_refusal(tmp_path):
    site = _installed()
    r = subprocess.run([sys.executable, str(SCRIPT), "--source", str(site), "--dest", str(tmp_path / "c"),
                        "--print-env", "--nvcc", "/opt/cuda/bin/nvcc"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f'export PYTHONPATH="{tmp_path / "c"}${{PYTHONPATH:+:$PYTHONPATH}}"'
    assert lines[-1] == "export nvcc_path=/opt/cuda/bin/nvcc"
    assert {ln.split()[1] for ln in lines[1:-1]} == {f"{k}={v}" for k, v in jc.CUDA_ENV.items()}
    bad = _fake_site(tmp_path, "1.2.0")
    r = subprocess.run([sys.executable, str(SCRIPT), "--source", str(bad), "--dest", str(tmp_path / "d")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert "jittor __version__ is '1.2.0'" in r.stderr and not (tmp_path / "d").exists()


def test_the_copy_imports_as_jittor_from_its_own_folder(tmp_path):
    """Python picks the copy over the installed package with the printed PYTHONPATH (import only locates
    the package: ``importlib.util.find_spec`` does not run Jittor's build)."""
    site = _installed()
    dest, _ = jc.build(site, tmp_path / "copy")
    code = ("import importlib.util as u; s = u.find_spec('jittor'); t = u.find_spec('jittor_utils'); "
            "print(s.submodule_search_locations[0]); print(t.submodule_search_locations[0])")
    env = {"PYTHONPATH": str(dest), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(dest / "jittor"), str(dest / "jittor_utils")]
    shutil.rmtree(dest)


GPU_SCRIPT = REPO / "benchmarks" / "gpu_jittor_cuda13.sh"


def _read(path: Path) -> str | None:
    return path.read_text() if path.exists() else None


def test_gpu_script_reports_every_step_and_exits_cleanly_without_cuda(tmp_path):
    """benchmarks/gpu_jittor_cuda13.sh on a machine without nvcc: the patch step builds the copy, the
    import step fails with Jittor's own message in the summary, the steps that need it are skipped, and
    the script still exits 0 with the log written."""
    _installed()
    out, nvcc = tmp_path / "out", tmp_path / "no-cuda" / "bin" / "nvcc"
    real_config = Path.home() / ".cache" / "jittor" / "config.json"
    config_before = _read(real_config)
    keep = ("PATH", "LANG", "LC_ALL", "VIRTUAL_ENV", "TMPDIR")
    env = {k: v for k, v in os.environ.items() if k in keep}
    # HOME too: Jittor writes JITTOR_HOME into ~/.cache/jittor/config.json, which would point every later
    # Jittor run of this user at this test's deleted folder
    env.update({"OUT": str(out), "NVCC": str(nvcc), "PY": sys.executable, "BUDGET_S": "200",
                "JITTOR_CUDA13_DEST": str(tmp_path / "copy"), "JITTOR_HOME": str(tmp_path / "home"),
                "HOME": str(tmp_path / "home")})
    r = subprocess.run(["bash", str(GPU_SCRIPT)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = (out / "summary.txt").read_text()
    assert r.stdout == summary
    steps = [ln for ln in summary.splitlines() if ln.startswith("STEP ")]
    assert [ln.split(":")[0] for ln in steps] == ["STEP versions", "STEP patch", "STEP import", "STEP ops",
                                                 "STEP fwd-bwd", "STEP align"]
    assert steps[0].startswith("STEP versions: OK") and steps[1].startswith("STEP patch: OK")
    assert steps[2].startswith("STEP import: FAIL (exit 1 after")
    assert f'Run cmd failed: "{nvcc}" --version' in summary  # Jittor's own message, from the log
    assert steps[3:] == ["STEP ops: SKIP (import is FAIL)", "STEP fwd-bwd: SKIP (import is FAIL)",
                         "STEP align: SKIP (import is FAIL)"]
    assert summary.splitlines()[-1].endswith("versions=OK patch=OK import=FAIL ops=SKIP fwd-bwd=SKIP align=SKIP ")
    assert f'  export PYTHONPATH="{tmp_path / "copy"}${{PYTHONPATH:+:$PYTHONPATH}}"' in summary
    assert f"  export nvcc_path={nvcc}" in summary
    log = (out / "jittor_cuda13.log").read_text()
    assert "===== step import: exit 1 after" in log and "Traceback" in log
    assert _read(real_config) == config_before  # the user's Jittor config is left as it was
    assert (tmp_path / "copy" / jc.MANIFEST).is_file()
    assert sorted(p.name for p in out.iterdir()) == ["jittor_cuda13.log", "summary.txt"]
