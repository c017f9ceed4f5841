"""Optional packages: the core imports none of them, and a missing one is a MissingPackageError with the
exact install line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import deltatune as dt
from deltatune._optional import OPTIONAL_PACKAGES, install_hint, is_available, require

CORE_SMOKE = Path(__file__).with_name("core_smoke.py")


def test_core_path_imports_no_optional_package():
    """import deltatune, apply LoRA, train a step, save and load a delta: no optional package is imported."""
    out = subprocess.run([sys.executable, str(CORE_SMOKE)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_require_returns_module():
    sacrebleu = pytest.importorskip("sacrebleu")
    assert require("sacrebleu", "BLEU") is sacrebleu
    assert is_available("sacrebleu")


@pytest.mark.parametrize("module", sorted(OPTIONAL_PACKAGES))
def test_require_missing_names_package_and_install_line(monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    dist, extra = OPTIONAL_PACKAGES[module]
    with pytest.raises(dt.MissingPackageError) as err:
        require(module, "the thing")
    msg = str(err.value)
    assert msg == (
        f"the thing need(s) the package {dist!r}, which is not installed; install it with: "
        f"pip install 'deltatune[{extra}]' (or: pip install {dist})"
    )
    assert isinstance(err.value, ImportError)
    assert not is_available(module)


def test_install_hint_of_submodule():
    assert install_hint("matplotlib.figure") == "pip install 'deltatune[eval]' (or: pip install matplotlib)"


def test_require_rejects_non_optional_name():
    with pytest.raises(KeyError, match="'os' is not an optional package of deltatune"):
        require("os", "x")


def test_plot_without_matplotlib_is_named_error(monkeypatch, tmp_path):
    from deltatune import report

    (tmp_path / "train_log.jsonl").write_text('{"split": "train", "step": 1, "loss": 1.0, "lr": 0.1}\n')
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(dt.MissingPackageError, match=r"plots need\(s\) the package 'matplotlib'.*deltatune\[eval\]"):
        report.plot_run(tmp_path)


def test_bleu_without_sacrebleu_is_named_error(monkeypatch):
    from deltatune.metrics import e2e

    e2e._tokenizer13a.cache_clear()
    monkeypatch.setitem(sys.modules, "sacrebleu.tokenizers.tokenizer_13a", None)
    try:
        with pytest.raises(dt.MissingPackageError, match=r"BLEU and NIST need\(s\) the package 'sacrebleu'"):
            e2e.mteval_tokenize("a b")
    finally:
        e2e._tokenizer13a.cache_clear()


def test_pearson_without_scipy_is_named_error(monkeypatch):
    from deltatune.metrics import glue

    monkeypatch.setitem(sys.modules, "scipy.stats", None)
    with pytest.raises(dt.MissingPackageError, match=r"the pearson metric need\(s\) the package 'scipy'"):
        glue.pearson([1.0, 2.0, 3.0], [1.0, 2.0, 4.0])
