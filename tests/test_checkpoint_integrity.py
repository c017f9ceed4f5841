"""Delta checkpoints: the hash covers config + metadata + tensors, malformed files are named
CheckpointErrors, old (format 1) deltas still load, writes never land on a file or directory of the
wrong kind, and a save killed at any point leaves the previous delta (or a CheckpointError)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune import checkpoint as ck
from deltatune.checkpoint import _meta_digest
from tests.tiny_models import mlp

FIXTURES = Path(__file__).parent / "fixtures"
CFG = dt.LoraConfig(target_modules=["0", "2"], r=2, alpha=4, init="random")


def _model(fill: float | None = None) -> torch.nn.Module:
    model = dt.apply(mlp(), CFG)
    if fill is not None:
        with torch.no_grad():
            for i, (_, p) in enumerate(sorted((n, p) for n, p in model.named_parameters() if p.requires_grad)):
                p.fill_(fill + i / 16)
    return model


def _values(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in ck.delta_state_dict(model).items()}


def _rewrite(d: Path, change, *, rehash: bool = True) -> dict:
    meta = json.loads((d / "delta_config.json").read_text())
    change(meta)
    if rehash:
        meta["meta_sha256"] = _meta_digest(meta)
    (d / "delta_config.json").write_text(json.dumps(meta))
    return meta


# -- the hash covers config and metadata ---------------------------------------------------------
def test_edited_config_is_detected(tmp_path):
    d = dt.save_delta(_model(0.5), tmp_path / "d")
    _rewrite(d, lambda m: m["config"].__setitem__("alpha", 64.0), rehash=False)
    with pytest.raises(dt.CheckpointError, match=r"delta_config\.json' was changed after it was written: its meta_sha256"):
        dt.load_delta(mlp(), d)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m["tensors"]["0.lora_A.weight"].__setitem__("shape", [2, 15]),
         r"tensor '0\.lora_A\.weight' in '.*delta\.safetensors' is float32\[2, 16\], but delta_config\.json records float32\[2, 15\]"),
        (lambda m: m["tensors"]["0.lora_A.weight"].__setitem__("dtype", "float16"),
         r"tensor '0\.lora_A\.weight' .* is float32\[2, 16\], but delta_config\.json records float16\[2, 16\]"),
        (lambda m: m["tensors"].pop("0.lora_A.weight"),
         r"holds tensors \[.*'0\.lora_A\.weight'.*\] but delta_config\.json records \['0\.lora_B\.weight'"),
        (lambda m: m.pop("config"), r"delta_config\.json' has no 'config' field"),
        (lambda m: m.__setitem__("config", ["lora"]), r"field 'config' must be a JSON object, got list"),
        (lambda m: m.__setitem__("tensors", {"x": {"shape": "2"}}), r"tensors\['x'\] must be \{'shape': \[int, \.\.\.\], 'dtype': str\}"),
        (lambda m: m.__setitem__("format_version", 3), r"has format_version 3; this deltatune reads 1 and 2"),
        (lambda m: m.__setitem__("adapter_name", 5), r"field 'adapter_name' must be a string, got 5"),
        (lambda m: m["config"].__setitem__("r", "two"), r"invalid 'config': LoraConfig\.r must be a positive int, got 'two'"),
    ],
)
def test_consistent_but_wrong_metadata_is_a_named_error(tmp_path, change, message):
    d = dt.save_delta(_model(0.5), tmp_path / "d")
    _rewrite(d, change)
    fresh = mlp()
    with pytest.raises(dt.CheckpointError, match=message):
        dt.load_delta(fresh, d)
    assert dt.adapter_names(fresh) == []  # nothing applied


def test_malformed_config_files(tmp_path):
    d = dt.save_delta(_model(0.5), tmp_path / "d")
    cfg = d / "delta_config.json"
    cfg.write_text("[1, 2]")
    with pytest.raises(dt.CheckpointError, match=r"delta_config\.json' must hold a JSON object, got list"):
        dt.load_delta(mlp(), d)
    cfg.write_text('{"format": "deltatune.delta",\n "config": ')
    with pytest.raises(dt.CheckpointError, match=r"delta_config\.json', line 2, column 12: invalid JSON"):
        dt.load_delta(mlp(), d)
    cfg.write_bytes(b'{"format": "deltatune\xff"}')
    with pytest.raises(dt.CheckpointError, match=r"delta_config\.json '.*delta_config\.json', line 1: not valid UTF-8"):
        dt.load_delta(mlp(), d)


def test_truncated_tensor_file_with_matching_hash(tmp_path):
    d = dt.save_delta(_model(0.5), tmp_path / "d")
    w = d / "delta.safetensors"
    w.write_bytes(w.read_bytes()[:-7])
    import hashlib

    _rewrite(d, lambda m: m.__setitem__("sha256", hashlib.sha256(w.read_bytes()).hexdigest()))
    with pytest.raises(dt.CheckpointError, match=r"delta\.safetensors' is not a valid safetensors file"):
        dt.load_delta(mlp(), d)


def test_one_bit_flip_in_tensors_is_detected(tmp_path):
    d = dt.save_delta(_model(0.5), tmp_path / "d")
    w = d / "delta.safetensors"
    data = bytearray(w.read_bytes())
    data[-3] ^= 0x01
    w.write_bytes(bytes(data))
    with pytest.raises(dt.CheckpointError, match="the file is corrupt or was only partly written"):
        dt.load_delta(mlp(), d)


# -- backward compatibility --------------------------------------------------------------------
def test_format_1_delta_still_loads():
    """``fixtures/delta_v1_lora_mlp`` was written by deltatune before the config hash (format 1)."""
    d = FIXTURES / "delta_v1_lora_mlp"
    meta = json.loads((d / "delta_config.json").read_text())
    assert meta["format_version"] == 1 and "meta_sha256" not in meta
    model = dt.load_delta(mlp(), d)
    assert {k: v for k, v in ck.delta_state_dict(model).items()}.keys() == load_file(d / "delta.safetensors").keys()
    for k, v in load_file(d / "delta.safetensors").items():
        assert torch.equal(ck.delta_state_dict(model)[k], v)
    io = load_file(FIXTURES / "delta_v1_lora_mlp_io.safetensors")
    assert torch.equal(model(io["x"]), io["y"])


def test_new_deltas_are_format_2_and_round_trip(tmp_path):
    model = _model(0.25)
    d = dt.save_delta(model, tmp_path / "d")
    meta = json.loads((d / "delta_config.json").read_text())
    assert meta["format_version"] == 2 and meta["meta_sha256"] == _meta_digest(meta)
    loaded = dt.load_delta(mlp(), d)
    x = torch.randn(4, 16)
    assert torch.equal(loaded(x), model(x))


# -- where we write ----------------------------------------------------------------------------
def test_save_to_a_file_or_over_a_directory_is_refused(tmp_path):
    f = tmp_path / "f"
    f.write_text("mine")
    with pytest.raises(dt.CheckpointError, match=r"directory '.*f' exists and is not a directory"):
        dt.save_delta(_model(0.5), f)
    assert f.read_text() == "mine"
    d = tmp_path / "d"
    (d / "delta.safetensors").mkdir(parents=True)
    with pytest.raises(dt.CheckpointError, match=r"delta\.safetensors' exists and is not a regular file"):
        dt.save_delta(_model(0.5), d)
    assert sorted(p.name for p in d.iterdir()) == ["delta.safetensors"]
    with pytest.raises(dt.CheckpointError, match=r"directory '.*f' exists and is not a directory"):
        dt.export_peft(_model(0.5), f)
    (tmp_path / "p" / "adapter_config.json").mkdir(parents=True)
    with pytest.raises(dt.CheckpointError, match=r"adapter_config\.json' exists and is not a regular file"):
        dt.export_peft(_model(0.5), tmp_path / "p")
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["adapter_config.json"]


def test_next_save_cleans_only_our_temporaries(tmp_path):
    d = dt.save_delta(_model(0.5), tmp_path / "d")
    ours = [".delta.safetensors.a1b2c3d4.tmp", ".delta_config.json.zz_9xyz1.tmp", ".delta.safetensors.prev.0123abcd.tmp"]
    theirs = ["notes.txt", ".delta.safetensors.tmp", "delta.safetensors.x1.tmp", ".other.abc.tmp"]
    for name in ours + theirs:
        (d / name).write_text("x")
    dt.save_delta(_model(1.5), d)
    assert sorted(p.name for p in d.iterdir()) == sorted(["delta.safetensors", "delta_config.json", *theirs])
    assert torch.equal(_values(dt.load_delta(mlp(), d))["0.lora_A.weight"], _values(_model(1.5))["0.lora_A.weight"])


# -- crash safety ------------------------------------------------------------------------------
_HOOKED = ("replace", "rename", "link", "unlink", "fsync", "open", "close", "fchmod", "mkdir", "write")


def _save_killed_at(model: torch.nn.Module, d: Path, kill_at: int) -> bool:
    """Fork; the child runs ``save_delta`` and SIGKILLs itself at its ``kill_at``-th file-system call.
    Returns True when the child was killed (False: the save finished before that call)."""
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        try:
            count = [0]

            def hook(fn):
                def wrapped(*a, **k):
                    count[0] += 1
                    if count[0] == kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return fn(*a, **k)

                return wrapped

            for name in _HOOKED:
                setattr(os, name, hook(getattr(os, name)))
            dt.save_delta(model, d)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status)


def _loaded_or_error(d: Path) -> dict[str, torch.Tensor] | None:
    try:
        return _values(dt.load_delta(mlp(), d))
    except dt.CheckpointError:
        return None


def _same(a: dict[str, torch.Tensor] | None, b: dict[str, torch.Tensor]) -> bool:
    return a is not None and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fresh", [False, True], ids=["overwrite", "fresh"])
def test_save_killed_at_every_point_loads_old_or_new(tmp_path, fresh):
    old, new, after = _model(0.5), _model(2.5), _model(-1.0)
    v_old, v_new, v_after = _values(old), _values(new), _values(after)
    kill_at, killed, outcomes = 1, True, set()
    counts = {"old": 0, "new": 0, "CheckpointError": 0}
    while killed:
        d = tmp_path / f"d{kill_at}"
        if not fresh:
            dt.save_delta(old, d)
        killed = _save_killed_at(new, d, kill_at)
        got = _loaded_or_error(d) if d.is_dir() else None
        if fresh:
            assert got is None or _same(got, v_new), f"killed at call {kill_at}: wrong values loaded"
        else:
            assert _same(got, v_old) or _same(got, v_new), f"killed at call {kill_at}: neither the old nor the new delta"
        outcomes.add("none" if got is None else ("new" if _same(got, v_new) else "old"))
        if killed:
            counts["CheckpointError" if got is None else ("new" if _same(got, v_new) else "old")] += 1
        # the next save succeeds, cleans the killed save's temporaries and is what loads
        dt.save_delta(after, d)
        assert sorted(p.name for p in d.iterdir()) == ["delta.safetensors", "delta_config.json"]
        assert _same(_loaded_or_error(d), v_after)
        shutil.rmtree(d)
        kill_at += 1
    assert kill_at > 10  # the save really passed through many kill points
    print(f"{'fresh' if fresh else 'overwrite'}: {kill_at - 2} kill points, loads {counts}")
    assert outcomes == ({"none", "new"} if fresh else {"old", "new"})


def test_save_killed_at_random_times_loads_a_complete_delta(tmp_path):
    """A child overwrites the same directory in a loop (values ``k``, ``k+1``, ...); SIGKILL at a random
    moment; what loads is one of the deltas the child wrote, never a mix."""
    rng = random.Random(1234)
    d = tmp_path / "d"
    dt.save_delta(_model(0.0), d)
    valid = {k: _values(_model(float(k))) for k in range(400)}
    for trial in range(6):
        pid = os.fork()
        if pid == 0:
            try:
                for k in range(1, 400):
                    dt.save_delta(_model(float(k)), d)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.005, 0.06))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        got = _loaded_or_error(d)
        assert got is not None, f"trial {trial}: an interrupted overwrite left no loadable delta"
        assert any(_same(got, v) for v in valid.values()), f"trial {trial}: loaded values of no complete save"
