"""How ``deltatune.jittor`` sets Jittor's environment (no jittor needed: runs everywhere)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import deltatune.jittor as dj


@pytest.fixture
def fake_onednn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A system oneDNN under ``tmp_path/sys``: ``include/dnnl.hpp`` and ``lib/libdnnl.so.2``."""
    inc, lib = tmp_path / "sys" / "include", tmp_path / "sys" / "lib" / "libdnnl.so.2"
    inc.mkdir(parents=True)
    lib.parent.mkdir(parents=True)
    (inc / "dnnl.hpp").write_text("// header\n")
    lib.write_bytes(b"\x7fELF")
    monkeypatch.setattr(dj, "system_onednn", lambda: (inc, lib))
    return inc, lib


def test_prepare_links_jittors_folder_to_the_system_onednn(tmp_path: Path, fake_onednn: tuple[Path, Path]) -> None:
    inc, lib = fake_onednn
    home = tmp_path / "home"
    folder = dj.prepare_onednn(home)
    assert folder == home / ".cache" / "jittor" / "mkl" / dj.ONEDNN_DIR
    assert os.readlink(folder / "include") == str(inc) and os.readlink(folder / "lib" / "libmkldnn.so") == str(lib)
    before = sorted((p.name, os.readlink(p)) for p in folder.rglob("*") if p.is_symlink())
    assert dj.prepare_onednn(home) == folder  # a second call changes nothing
    assert sorted((p.name, os.readlink(p)) for p in folder.rglob("*") if p.is_symlink()) == before


def test_prepare_leaves_an_existing_install_as_it_is(tmp_path: Path, fake_onednn: tuple[Path, Path]) -> None:
    folder = tmp_path / "home" / ".cache" / "jittor" / "mkl" / dj.ONEDNN_DIR
    (folder / "include").mkdir(parents=True)
    (folder / "include" / "dnnl.hpp").write_text("// Jittor's own\n")
    (folder / "lib").mkdir()
    (folder / "lib" / "libmkldnn.so").write_bytes(b"own")
    assert dj.prepare_onednn(tmp_path / "home") == folder
    assert (folder / "lib" / "libmkldnn.so").read_bytes() == b"own" and not (folder / "include").is_symlink()


def test_no_system_onednn_means_use_mkl_0_and_nothing_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dj, "system_onednn", lambda: None)
    monkeypatch.setenv("JITTOR_HOME", str(tmp_path))
    monkeypatch.delenv("use_mkl", raising=False)
    monkeypatch.delenv("nvcc_path", raising=False)
    assert dj.prepare_onednn() is None
    assert dj._env_defaults() == {"nvcc_path": "", "use_mkl": "0"}
    assert list(tmp_path.iterdir()) == []


def test_env_defaults_use_the_system_onednn_and_respect_the_users_settings(
    tmp_path: Path, fake_onednn: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JITTOR_HOME", str(tmp_path / "h"))
    monkeypatch.delenv("use_mkl", raising=False)
    monkeypatch.delenv("nvcc_path", raising=False)
    assert dj._env_defaults() == {"nvcc_path": "", "use_mkl": "1"}
    assert (tmp_path / "h" / ".cache" / "jittor" / "mkl" / dj.ONEDNN_DIR / "lib" / "libmkldnn.so").is_symlink()
    monkeypatch.setenv("use_mkl", "0")
    monkeypatch.setenv("nvcc_path", "/usr/local/cuda/bin/nvcc")
    assert dj._env_defaults() == {}


def test_jittor_home_follows_the_environment_and_jittors_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JITTOR_HOME", str(tmp_path / "a"))
    assert dj.jittor_home() == tmp_path / "a"
    monkeypatch.delenv("JITTOR_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".cache" / "jittor").mkdir(parents=True)
    assert dj.jittor_home() == tmp_path
    (tmp_path / ".cache" / "jittor" / "config.json").write_text('{"JITTOR_HOME": "/elsewhere"}')
    assert dj.jittor_home() == Path("/elsewhere")
