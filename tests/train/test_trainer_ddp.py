"""DDP on CPU (gloo, 2 processes x batch b) equals one process with batch 2b."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _ddp_train_worker import config, datasets
from _train_utils import single_thread as _single_thread  # noqa: F401
from _train_utils import tiny_lm, trainable_state

from deltatune.train import Trainer, read_log

WORKER = Path(__file__).with_name("_ddp_train_worker.py")


@pytest.mark.slow
@pytest.mark.xdist_group("torchrun")  # one gloo job at a time: see .ci/run
def test_ddp_two_processes_equal_one_process_with_double_batch(tmp_path):
    accum = 2  # gradient accumulation under DDP: no_sync() micro-batches + global token weighting
    ddp_out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(ddp_out), str(accum)]
    proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    train, evals = datasets()
    single = Trainer(tiny_lm(), config(str(tmp_path / "single"), 4, "none", accum), train, eval_dataset=evals)
    summary = single.train()

    ddp_log = read_log(ddp_out)
    one_log = read_log(tmp_path / "single")
    assert [(r["split"], r["step"]) for r in ddp_log] == [(r["split"], r["step"]) for r in one_log]
    # 16 examples / (2 ranks * 2 * accum) x 2 epochs
    assert len([r for r in ddp_log if r["split"] == "train"]) == 8 // accum
    for a, b in zip(ddp_log, one_log, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-6)
        assert a["tokens"] == b["tokens"]
        if a["split"] == "train":
            assert a["lr"] == b["lr"]
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
            assert a["loss_tokens"] == b["loss_tokens"]

    expected = trainable_state(single.model)
    rank0 = torch.load(ddp_out / "weights_rank0.pt", weights_only=True)
    rank1 = torch.load(ddp_out / "weights_rank1.pt", weights_only=True)
    for name, w in expected.items():
        torch.testing.assert_close(rank0[name], w, rtol=0, atol=1e-6)
        assert torch.equal(rank0[name], rank1[name])

    ddp_summary = json.loads((ddp_out / "summary.json").read_text())
    assert ddp_summary["world_size"] == 2 and ddp_summary["backend"] == "gloo"
    assert ddp_summary["ddp_released"] is True
    assert ddp_summary["train_after_close"] == (
        "Trainer.train() after close(): this DDP trainer has released its process group")
    assert ddp_summary["tokens"] == summary["tokens"]
    assert ddp_summary["eval_loss"] == pytest.approx(summary["eval_loss"], rel=1e-6)
    # only rank 0 writes logs and checkpoints; every rank adds its own RNG state
    final = ddp_out / f"checkpoint-{8 // accum}"
    assert {"rng_state_rank0.pt", "rng_state_rank1.pt", "delta.safetensors", "COMPLETE"} <= set(os.listdir(final))
