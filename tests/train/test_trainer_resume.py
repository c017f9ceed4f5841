"""Checkpoints: bit-exact resume, atomicity, rotation, weights_only loading, mismatch errors."""

from __future__ import annotations

import os

import pytest
import torch
from _train_utils import lm_examples, tiny_llama, tiny_lm, trainable_state
from _train_utils import single_thread as _single_thread  # noqa: F401
from safetensors.torch import load_file

from deltatune.errors import CheckpointError
from deltatune.train import TrainConfig, Trainer, TrainerCallback, find_latest_checkpoint, list_checkpoints
from deltatune.train.resume import (
    capture_rng_state,
    cleanup_stale_checkpoints,
    load_trainable_params,
    restore_rng_state,
)


class Crash(Exception):
    pass


class CrashAt(TrainerCallback):
    """Raise after step ``k`` (after its checkpoint was written), like a killed job."""

    def __init__(self, k: int) -> None:
        self.k = k

    def on_step_end(self, trainer):
        if trainer.state.step == self.k:
            raise Crash(f"killed at step {self.k}")


def _cfg(out, **kw):
    base = {
        "lr": 2e-2,
        "batch_size": 2,
        "grad_accum_steps": 2,
        "max_steps": 7,  # 10 examples: 5 micro-batches per epoch -> 3 steps per epoch (2 + 2 + 1)
        "warmup_steps": 2,
        "scheduler": "cosine",
        "weight_decay": 0.1,
        "log_every": 1,
        "output_dir": str(out),
        "progress_bar": False,
        "tensorboard": False,
        "save_final": False,
    }
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("k", [3, 4])  # 3: at an epoch boundary; 4: one step into the second epoch
def test_resume_is_bit_exact_with_dropout(tmp_path, k):
    data = lm_examples(10, seed=21)

    straight = Trainer(tiny_llama(attention_dropout=0.3), _cfg(tmp_path / "a"), data)
    straight.train()
    expected = trainable_state(straight.model)
    expected_losses = [r["loss"] for r in straight.log_history]

    first = Trainer(tiny_llama(attention_dropout=0.3), _cfg(tmp_path / "b", save_every=k), data,
                    callbacks=[CrashAt(k)])
    with pytest.raises(Crash):
        first.train()
    assert find_latest_checkpoint(tmp_path / "b").name == f"checkpoint-{k}"

    # a fresh process would build the model from scratch: do the same (different RNG state too)
    torch.manual_seed(12345)
    resumed = Trainer(tiny_llama(attention_dropout=0.3), _cfg(tmp_path / "b", save_every=k), data)
    assert resumed.state.step == 0
    resumed.train(resume_from="latest")
    assert resumed.state.step == 7
    got = trainable_state(resumed.model)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert [r["loss"] for r in resumed.log_history] == expected_losses[k:]
    # dropout really is random here: the same run without the restored RNG diverges
    torch.manual_seed(999)
    unrestored = Trainer(tiny_llama(attention_dropout=0.3), _cfg(tmp_path / "c"), data)
    unrestored.load_checkpoint(tmp_path / "b" / f"checkpoint-{k}")
    torch.manual_seed(999)  # clobber the restored RNG
    unrestored.train()
    assert any(not torch.equal(p, expected[n]) for n, p in trainable_state(unrestored.model).items())


def test_checkpoint_contents_load_with_weights_only(tmp_path):
    data = lm_examples(10)
    tr = Trainer(tiny_lm(), _cfg(tmp_path, max_steps=2, save_every=2, log_every=10, shuffle=False), data)
    tr.train()
    ckpt = tmp_path / "checkpoint-2"
    assert sorted(os.listdir(ckpt)) == sorted(
        ["COMPLETE", "delta.safetensors", "optimizer.pt", "rng_state_rank0.pt", "trainer_state.json", "trainer_state.pt"]
    )
    delta = load_file(ckpt / "delta.safetensors")
    assert set(delta) == {n for n, p in tr.model.named_parameters() if p.requires_grad}
    assert "embed.weight" not in delta  # frozen base is not saved
    for n, p in tr.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(delta[n], p.detach())
    for f in ("optimizer.pt", "trainer_state.pt", "rng_state_rank0.pt"):
        torch.load(ckpt / f, weights_only=True)
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    assert (state["step"], state["epoch"], state["batches_in_epoch"]) == (2, 0, 4)
    # counters are exact at any step, not only at log steps: 2 steps x 2 micro-batches x 2 examples
    assert state["tokens"] == sum(len(d["input_ids"]) for d in data[:8])
    assert state["loss_tokens"] == sum(len(d["input_ids"]) - 1 for d in data[:8])


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = capture_rng_state(torch.device("cpu"))
    a = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    restore_rng_state(state, torch.device("cpu"))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == a


class BrokenSave:
    """A save_fn that writes part of its file and then fails (at the second call)."""

    def __init__(self, exc: BaseException) -> None:
        self.calls = 0
        self.exc = exc

    def __call__(self, model, directory):
        self.calls += 1
        if self.calls == 2:
            (directory / "delta.safetensors").write_bytes(b"\x00" * 10)
            raise self.exc
        from deltatune.train import save_trainable_params

        save_trainable_params(model, directory)


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_crash_mid_save_leaves_no_checkpoint_dir(tmp_path, exc):
    tr = Trainer(tiny_lm(), _cfg(tmp_path, max_steps=6, save_every=2), lm_examples(10), save_fn=BrokenSave(exc))
    with pytest.raises(type(exc)):
        tr.train()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["checkpoint-2"]
    assert find_latest_checkpoint(tmp_path).name == "checkpoint-2"


def _leave_crash_debris(root):
    """What a SIGKILL during a save or a rotation could leave behind (names deltatune creates)."""
    (root / ".tmp-checkpoint-4-deadbeef").mkdir()
    (root / ".tmp-checkpoint-4-deadbeef" / "optimizer.pt").write_bytes(b"partial")
    (root / ".tmp-checkpoint-removed-checkpoint-1-cafef00d").mkdir()


def test_hard_crash_leftovers_are_ignored_and_cleaned(tmp_path):
    tr = Trainer(tiny_lm(), _cfg(tmp_path, max_steps=2, save_every=2), lm_examples(10))
    tr.train()
    _leave_crash_debris(tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2"]
    assert find_latest_checkpoint(tmp_path).name == "checkpoint-2"
    removed = cleanup_stale_checkpoints(tmp_path)
    assert sorted(p.name for p in removed) == [".tmp-checkpoint-4-deadbeef", ".tmp-checkpoint-removed-checkpoint-1-cafef00d"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["checkpoint-2"]
    # a restarted run resumes from the newest complete checkpoint and clears the debris
    _leave_crash_debris(tmp_path)
    again = Trainer(tiny_lm(), _cfg(tmp_path, max_steps=3, save_every=2), lm_examples(10))
    again.train(resume_from="latest")
    assert [r["step"] for r in again.log_history] == [3]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["checkpoint-2"]
    (tmp_path / "notmine").mkdir()
    with pytest.raises(CheckpointError, match="must be 'latest' or a complete checkpoint"):
        again.train(resume_from=tmp_path / "notmine")


def test_keep_last_checkpoints_and_final_save(tmp_path):
    tr = Trainer(tiny_lm(), _cfg(tmp_path, max_steps=5, save_every=2, keep_last_checkpoints=2, save_final=True),
                 lm_examples(10))
    tr.train()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-5"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    # resuming a finished run trains nothing and does not rewrite its last checkpoint
    mtime = (tmp_path / "checkpoint-5" / "COMPLETE").stat().st_mtime_ns
    again = Trainer(tiny_lm(), _cfg(tmp_path, max_steps=5, save_final=True), lm_examples(10))
    assert again.train(resume_from="latest")["steps"] == 5
    assert again.log_history == []
    assert (tmp_path / "checkpoint-5" / "COMPLETE").stat().st_mtime_ns == mtime


def test_resume_latest_without_checkpoint_starts_fresh(tmp_path):
    tr = Trainer(tiny_lm(), _cfg(tmp_path, max_steps=2, resume_from="latest"), lm_examples(10))
    assert tr.train()["steps"] == 2


def test_resume_mismatch_errors(tmp_path):
    Trainer(tiny_lm(), _cfg(tmp_path, max_steps=2, save_every=2), lm_examples(10)).train()
    ckpt = tmp_path / "checkpoint-2"
    with pytest.raises(CheckpointError, match=r"cannot resume exactly .* batch_size: checkpoint 2, now 3"):
        Trainer(tiny_lm(), _cfg(tmp_path, batch_size=3), lm_examples(10)).load_checkpoint(ckpt)
    other = tiny_lm()
    other.head.bias.requires_grad_(False)
    with pytest.raises(CheckpointError, match="trainable parameters of the model differ"):
        Trainer(other, _cfg(tmp_path), lm_examples(10)).load_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match=r"missing \[\], unexpected \['head.bias'\]"):
        load_trainable_params(other, ckpt)
    with pytest.raises(CheckpointError, match="must be 'latest' or a complete checkpoint"):
        Trainer(tiny_lm(), _cfg(tmp_path), lm_examples(10)).train(resume_from=tmp_path / "nope")


def test_custom_save_and_load_hooks(tmp_path):
    calls = []

    def save_fn(model, directory):
        calls.append(("save", directory.name.startswith(".tmp-checkpoint-")))
        torch.save({"head.weight": model.head.weight.detach().clone()}, directory / "mine.pt")

    def load_fn(model, directory):
        calls.append(("load", directory.name))
        with torch.no_grad():
            model.head.weight.copy_(torch.load(directory / "mine.pt", weights_only=True)["head.weight"])

    a = Trainer(tiny_lm(), _cfg(tmp_path, max_steps=2, save_every=2), lm_examples(10), save_fn=save_fn)
    a.train()
    b = Trainer(tiny_lm(seed=5), _cfg(tmp_path, max_steps=2), lm_examples(10), load_fn=load_fn)
    b.load_checkpoint(tmp_path / "checkpoint-2")
    assert calls == [("save", True), ("load", "checkpoint-2")]
    assert torch.equal(b.model.head.weight, a.model.head.weight)
    assert b.state.step == 2
