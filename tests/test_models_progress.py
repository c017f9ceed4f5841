"""``progress=False`` silences every bar of model loading: transformers' ``Loading weights``, its GGUF
dequantising bar and deltatune's GGUF-conversion bar; ``progress=True`` shows them. The GGUF file is a
tiny F32 Llama written by deltatune's exporter (no mocks: the real transformers GGUF path runs)."""

from __future__ import annotations

import re

import pytest
from transformers.utils import logging as hf_logging

import deltatune.models as dm
from deltatune.errors import DeltaConfigTypeError
from deltatune.export_gguf import export_gguf
from tests.gguf_fixtures import tiny_llama, write_tokenizer_gguf

pytest.importorskip("gguf")

#: What a tqdm bar leaves on stderr: "desc:  50%|█████     | 2/4 [...]".
BAR = re.compile(r"\d+%\|")


@pytest.fixture(scope="module")
def base_gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("progress")
    tok = write_tokenizer_gguf(root / "tokenizer.gguf")
    return export_gguf(tiny_llama(layers=1), root / "base.gguf", quant="f32", source_gguf=tok, progress=False)


def _bars(text: str) -> list[str]:
    return [line for line in re.split(r"[\r\n]", text) if BAR.search(line)]


def test_gguf_load_without_progress_prints_no_bar(base_gguf, tmp_path, capfd):
    capfd.readouterr()
    model, _ = dm.load(base_gguf, cache_dir=tmp_path / "cache", progress=False)  # converts, then loads
    assert model.config.num_hidden_layers == 1
    out, err = capfd.readouterr()
    assert _bars(out + err) == []
    dm.load(base_gguf, cache_dir=tmp_path / "cache", progress=False)  # from the cache
    out, err = capfd.readouterr()
    assert _bars(out + err) == []
    assert hf_logging.is_progress_bar_enabled()  # restored afterwards


def test_gguf_load_with_progress_shows_the_bars(base_gguf, tmp_path, capfd):
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    try:
        capfd.readouterr()
        dm.load(base_gguf, cache_dir=tmp_path / "cache", progress=True)
        err = capfd.readouterr().err
        bars = _bars(err)
        assert any(line.startswith("deltatune: caching base.gguf") for line in bars), err
        assert any("Loading weights" in line for line in bars), err
        assert any("de-quantizing GGUF tensors" in line for line in bars), err
        dm.load(base_gguf, cache_dir=tmp_path / "cache")  # from the cache: only transformers' bar
        bars = _bars(capfd.readouterr().err)
        assert bars and all("Loading weights" in line for line in bars)
    finally:
        if not was:
            hf_logging.disable_progress_bar()


def test_convert_gguf_without_progress(base_gguf, tmp_path, capfd):
    capfd.readouterr()
    entry = dm.convert_gguf(base_gguf, cache_dir=tmp_path / "cache", progress=False)
    assert (entry / dm.CACHE_MARKER).is_file()
    assert _bars("".join(capfd.readouterr())) == []


def test_progress_off_keeps_a_disabled_setting(base_gguf, tmp_path):
    hf_logging.disable_progress_bar()
    try:
        dm.load(base_gguf, cache_dir=tmp_path / "cache", progress=False)
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()


def test_progress_restored_after_an_error(tmp_path, monkeypatch):
    import deltatune.models.gguf_cache as gc

    def broken(path):
        raise RuntimeError("broken loader")

    monkeypatch.setattr(gc, "_load_gguf_tokenizer", broken)
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(RuntimeError, match="^broken loader$"):
        dm.load(gguf, cache_dir=tmp_path / "cache", progress=False)
    assert hf_logging.is_progress_bar_enabled()
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    assert getattr(gguf_utils.tqdm, "func", None) is None  # the GGUF loader's tqdm is the real one again


def test_progress_must_be_bool(base_gguf):
    with pytest.raises(DeltaConfigTypeError, match=r"^progress must be a bool, got 'no' \(str\)$"):
        dm.load(base_gguf, progress="no")
    with pytest.raises(DeltaConfigTypeError, match=r"^progress must be a bool, got 0 \(int\)$"):
        dm.convert_gguf(base_gguf, progress=0)
