"""The public surface: every name in ``deltatune.__all__`` is bound, and ``from deltatune import *`` works."""

from __future__ import annotations

import subprocess
import sys

import pytest

import deltatune


def test_every_name_in_all_is_bound():
    unbound = [n for n in deltatune.__all__ if not hasattr(deltatune, n)]
    assert unbound == []
    assert len(set(deltatune.__all__)) == len(deltatune.__all__)


def test_star_import_binds_all_names():
    ns: dict[str, object] = {}
    exec("from deltatune import *", ns)  # noqa: S102 - the statement under test
    assert sorted(n for n in deltatune.__all__ if n not in ns) == []
    assert ns["run_recipe"] is deltatune.tasks.data_to_text.run_recipe
    assert ns["ClassificationConfig"] is deltatune.tasks.classification.ClassificationConfig


def test_unknown_attribute_is_attribute_error():
    with pytest.raises(AttributeError, match=r"^module 'deltatune' has no attribute 'no_such_name'$"):
        deltatune.no_such_name  # noqa: B018


def test_plain_import_leaves_the_pipeline_layer_and_transformers_unloaded():
    """``import deltatune`` stays light: the pipelines, and transformers (more than a second to import on its
    own), load on first use."""
    names = ("deltatune.recipes", "deltatune.tasks", "deltatune.sweep", "deltatune.report", "transformers")
    code = f"import sys, deltatune; print(sorted(m for m in {names!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
