"""FSDP2 on CPU (gloo, 2 processes x batch b) equals one process with batch 2b; its checkpoints hold
the full delta tensors, load on one process, and resume exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _fsdp_train_worker import (
    CRASH_STEP,
    TOTAL_STEPS,
    config,
    datasets,
    delta_hooks,
    frozen_block_model,
    lora_model,
)
from _train_utils import single_thread as _single_thread  # noqa: F401
from _train_utils import tiny_llama, trainable_state
from safetensors.torch import load_file

import deltatune as dt
from deltatune.train import Trainer, read_log

WORKER = Path(__file__).with_name("_fsdp_train_worker.py")
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("torchrun")]  # one gloo job at a time: see .ci/run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 2-process FSDP runs (one torchrun launch) and the single-process references."""
    root = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(root / "fsdp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train, evals = datasets()
        single = {}
        for name, build, hooks in (("lora", lora_model, delta_hooks()), ("frozen", frozen_block_model, {})):
            tr = Trainer(build(), config(str(root / "single" / name), 4, "none"), train, eval_dataset=evals, **hooks)
            summary = tr.train()
            single[name] = (tr, summary)
    finally:
        torch.set_num_threads(n)
    report = json.loads((root / "fsdp" / "report.json").read_text())
    return {"root": root, "fsdp": root / "fsdp", "single": single, "report": report}


def _assert_logs_equal(fsdp_dir, single_dir):
    a_log, b_log = read_log(fsdp_dir), read_log(single_dir)
    assert [(r["split"], r["step"]) for r in a_log] == [(r["split"], r["step"]) for r in b_log]
    assert len([r for r in a_log if r["split"] == "train"]) == TOTAL_STEPS
    worst = 0.0
    for a, b in zip(a_log, b_log, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-5)
        worst = max(worst, abs(a["loss"] - b["loss"]))
        assert a["tokens"] == b["tokens"]
        if a["split"] == "train":
            assert a["lr"] == b["lr"]
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
            assert a["grad_norm"] > 0.05  # max_grad_norm=0.05: clipping was active at every step
            assert a["loss_tokens"] == b["loss_tokens"]
    return worst


def _assert_same_tensors(got: dict, want: dict, atol: float) -> float:
    assert got.keys() == want.keys()
    worst = 0.0
    for k, w in want.items():
        assert got[k].shape == w.shape and got[k].numel() > 0, k
        torch.testing.assert_close(got[k], w, rtol=0, atol=atol)
        worst = max(worst, float((got[k] - w).abs().max()))
    return worst


def test_fsdp_lora_equals_one_process_with_double_batch(runs):
    report = runs["report"]
    assert report["world_size"] == 2 and report["backend"] == "gloo"
    # the LoRA tensors really are sharded over the two ranks
    shapes0, shapes1 = report["local_shapes"]
    assert shapes0["model.layers.0.self_attn.q_proj.lora_A.default.weight"] == [2, 32]
    assert shapes1["model.layers.0.self_attn.q_proj.lora_A.default.weight"] == [2, 32]

    worst_loss = _assert_logs_equal(runs["fsdp"] / "lora", runs["root"] / "single" / "lora")
    tr, summary = runs["single"]["lora"]
    assert report["lora"]["eval_loss"] == pytest.approx(summary["eval_loss"], rel=1e-6)
    assert report["lora"]["tokens"] == summary["tokens"]
    # every checkpoint: the save_delta files equal the single process's, tensor by tensor
    for step in (2, 4, 6):
        got = load_file(runs["fsdp"] / "lora" / f"checkpoint-{step}" / "delta.safetensors")
        want = load_file(runs["root"] / "single" / "lora" / f"checkpoint-{step}" / "delta.safetensors")
        worst = _assert_same_tensors(got, want, atol=1e-6)
        meta = json.loads((runs["fsdp"] / "lora" / f"checkpoint-{step}" / "delta_config.json").read_text())
        assert {k: v["shape"] for k, v in meta["tensors"].items()} == {k: list(v.shape) for k, v in want.items()}
        # the optimizer state was gathered too: same layout and values as the single process
        o_got = torch.load(runs["fsdp"] / "lora" / f"checkpoint-{step}" / "optimizer.pt", weights_only=True)
        o_want = torch.load(runs["root"] / "single" / "lora" / f"checkpoint-{step}" / "optimizer.pt", weights_only=True)
        assert o_got["state"].keys() == o_want["state"].keys()
        for i in o_want["state"]:
            assert o_got["state"][i]["step"] == o_want["state"][i]["step"]
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(o_got["state"][i][key], o_want["state"][i][key], rtol=1e-4, atol=1e-7)
    print(f"lora: max |loss diff| {worst_loss:.2e}, max |delta diff| at the last step {worst:.2e}")


def test_fsdp_saved_delta_loads_on_one_process(runs):
    tr, _ = runs["single"]["lora"]
    fresh = tiny_llama(seed=5)
    dt.load_delta(fresh, runs["fsdp"] / "lora_delta")  # Trainer.save_delta: gathered, written by rank 0
    want = trainable_state(tr.model)
    got = trainable_state(fresh)
    worst = _assert_same_tensors(got, want, atol=1e-6)
    ids = torch.tensor([[3, 7, 11, 19, 5, 30]])
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, tr.model(input_ids=ids).logits, rtol=0, atol=1e-5)
    # the final checkpoint's delta directory loads the same way
    other = tiny_llama(seed=5)
    dt.load_delta(other, runs["fsdp"] / "lora" / f"checkpoint-{TOTAL_STEPS}")
    _assert_same_tensors(trainable_state(other), want, atol=1e-6)
    print(f"load_delta on one process: max |diff| {worst:.2e}")


def test_fsdp_gradient_checkpointing_gives_the_same_losses(runs):
    assert runs["report"]["gc_enabled"] is True
    plain, gc = read_log(runs["fsdp"] / "lora"), read_log(runs["fsdp"] / "gc")
    assert [(r["split"], r["step"]) for r in plain] == [(r["split"], r["step"]) for r in gc]
    for a, b in zip(plain, gc, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)
        if a["split"] == "train":
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


def test_fsdp_trainable_weight_inside_frozen_block_and_empty_shards(runs):
    shapes0, shapes1 = runs["report"]["frozen_local_shapes"]
    a_name = "model.layers.1.self_attn.o_proj.lora_A.default.weight"
    assert shapes0[a_name] == [1, 32] and shapes1[a_name] == [0, 32]  # r=1: rank 1 holds an empty shard
    assert shapes0["model.layers.0.mlp.down_proj.weight"] == [16, 64]
    _assert_logs_equal(runs["fsdp"] / "frozen", runs["root"] / "single" / "frozen")
    tr, summary = runs["single"]["frozen"]
    assert runs["report"]["frozen"]["eval_loss"] == pytest.approx(summary["eval_loss"], rel=1e-6)
    for step in (2, 4, 6):
        got = load_file(runs["fsdp"] / "frozen" / f"checkpoint-{step}" / "delta.safetensors")
        want = load_file(runs["root"] / "single" / "frozen" / f"checkpoint-{step}" / "delta.safetensors")
        _assert_same_tensors(got, want, atol=1e-6)
        assert got[a_name].shape == (1, 32)
    _assert_same_tensors(got, trainable_state(tr.model), atol=1e-6)
    # loaded into a fresh sharded model (rank 1's lora_A shard is empty) and saved again: unchanged
    again = runs["fsdp"] / "frozen_reload" / f"checkpoint-{TOTAL_STEPS}"
    assert _assert_same_tensors(load_file(again / "delta.safetensors"), got, atol=0.0) == 0.0
    o_a = torch.load(again / "optimizer.pt", weights_only=True)
    o_b = torch.load(runs["fsdp"] / "frozen" / f"checkpoint-{TOTAL_STEPS}" / "optimizer.pt", weights_only=True)
    assert o_a["state"].keys() == o_b["state"].keys()
    for i in o_b["state"]:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(o_a["state"][i][key], o_b["state"][i][key])


def test_fsdp_resume_equals_uninterrupted_fsdp_run(runs):
    fsdp = runs["fsdp"]
    assert runs["report"]["resume"]["steps"] == TOTAL_STEPS
    straight = load_file(fsdp / "lora" / f"checkpoint-{TOTAL_STEPS}" / "delta.safetensors")
    resumed = load_file(fsdp / "resume" / f"checkpoint-{TOTAL_STEPS}" / "delta.safetensors")
    worst = _assert_same_tensors(resumed, straight, atol=0.0)
    assert worst == 0.0
    o_a = torch.load(fsdp / "lora" / f"checkpoint-{TOTAL_STEPS}" / "optimizer.pt", weights_only=True)
    o_b = torch.load(fsdp / "resume" / f"checkpoint-{TOTAL_STEPS}" / "optimizer.pt", weights_only=True)
    for i in o_a["state"]:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(o_a["state"][i][key], o_b["state"][i][key])
    # the resumed run logged the steps after the crash with the uninterrupted run's losses
    full = {(r["split"], r["step"]): r["loss"] for r in read_log(fsdp / "lora")}
    after = [r for r in read_log(fsdp / "resume") if r["step"] > CRASH_STEP]
    assert after and all(r["loss"] == full[(r["split"], r["step"])] for r in after)


def test_fsdp_checkpoints_never_hold_empty_tensors(runs):
    files = sorted(runs["fsdp"].rglob("delta.safetensors"))
    assert len(files) >= 10
    for f in files:
        for name, t in load_file(f).items():
            assert t.numel() > 0 and all(s > 0 for s in t.shape), (f, name, tuple(t.shape))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_fsdp_bf16_on_two_gpus_close_to_fp32(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(tmp_path), "cuda-bf16"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["backend"] == "nccl" and report["bf16"]["steps"] == TOTAL_STEPS
    train, evals = datasets()
    ref = Trainer(lora_model(), config(str(tmp_path / "fp32"), 4, "none"), train, eval_dataset=evals)
    ref_summary = ref.train()
    assert report["bf16"]["eval_loss"] == pytest.approx(ref_summary["eval_loss"], rel=2e-2)
    fresh = tiny_llama(seed=5)
    dt.load_delta(fresh, tmp_path / "bf16_delta")
    init = trainable_state(lora_model())
    got = trainable_state(fresh)
    assert got.keys() == init.keys()
    for k, v in got.items():
        assert v.dtype == torch.float32 and v.shape == init[k].shape  # full fp32 master weights were saved
        assert not torch.equal(v, init[k])  # and they were trained
