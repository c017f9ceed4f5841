"""scripts/gpu_issue19.sh on CPU: argument errors, and (slow) a dry run of the phases with a tiny model,
the training stopped at its budget, packed, restored in a fresh run folder, resumed and finished."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.recipe_fixtures import make_tiny_model_dir, write_e2e_data

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_issue19.sh"
DRY = ("train.device=cpu train.mixed_precision=no train.max_steps=12 train.save_every=2 data.max_length=48 "
       "generate.num_beams=2 generate.max_new_tokens=4 train.eval_every=0 train.tensorboard=false")


def _run(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "DATA_DIR", "SMOLLM2_DIR", "RUNS")}
    env.update({"OUT": str(tmp_path / "out"), "DATA_DIR": str(tmp_path / "data"), "PY": sys.executable,
                "RUNS": str(tmp_path / "runs"), **extra})
    return env


def test_argument_errors(tmp_path):
    (tmp_path / "data" / "e2e").mkdir(parents=True)
    r = _run(["nonsense"], _env(tmp_path))
    assert r.returncode == 2 and "ERROR: unknown phase 'nonsense' (check, train:RUN" in r.stdout
    r = _run(["train:e2e_lorra"], _env(tmp_path))
    assert r.returncode == 2 and "ERROR: unknown run 'e2e_lorra'; known runs: e2e_lora e2e_full" in r.stdout
    r = _run(["train:e2e_lora"], _env(tmp_path, SMOLLM2_DIR=str(tmp_path)))
    assert r.returncode == 2 and f"SMOLLM2_DIR={tmp_path} holds no config.json" in r.stdout
    r = _run(["ckpt:e2e_full"], _env(tmp_path))
    assert r.returncode == 2 and "a full fine-tuning checkpoint (~1.6 GB) cannot come back" in r.stdout
    r = _run(["restore:e2e_lora=/nonexistent.tar.gz"], _env(tmp_path))
    assert r.returncode == 2 and "expected restore:RUN=TARBALL with an existing file" in r.stdout
    env = _env(tmp_path)
    del env["OUT"]
    r = _run(["check"], env)
    assert r.returncode != 0 and "set OUT" in r.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.slow
def test_dry_run_partial_resume_generate_bundle(tmp_path):
    model = make_tiny_model_dir(tmp_path / "model")
    write_e2e_data(tmp_path / "data")
    base = {"SMOLLM2_DIR": str(model), "CUDA_GRAPH": "false", "EXTRA_SETS": DRY}
    # call 1: a 1-second budget stops the training before it ends (the model load alone takes longer)
    env1 = _env(tmp_path, **base, TRAIN_BUDGET_S="1")
    r = _run(["train:e2e_lora_18pct"], env1)
    assert r.returncode == 0 and "train:e2e_lora_18pct: PARTIAL (budget reached)" in r.stdout, r.stdout + r.stderr
    assert not (tmp_path / "runs" / "e2e_lora_18pct" / "delta").exists()
    # call 1 again with time to reach a checkpoint but not the end is timing-dependent; instead train to
    # the end, then pack the newest checkpoint and resume a copy of it in a fresh run folder
    env1["TRAIN_BUDGET_S"] = "300"
    r = _run(["train:e2e_lora_18pct", "ckpt:e2e_lora_18pct"], env1)
    assert "train:e2e_lora_18pct: DONE" in r.stdout, r.stdout + r.stderr
    ckpt = tmp_path / "out" / "e2e_lora_18pct-ckpt.tar.gz"
    with tarfile.open(ckpt) as tf:
        names = tf.getnames()
    assert "checkpoint-12" in names and "train_log.jsonl" in names
    env2 = _env(tmp_path, **base, TRAIN_BUDGET_S="300", RUNS=str(tmp_path / "runs2"), OUT=str(tmp_path / "out2"))
    r = _run([f"restore:e2e_lora_18pct={ckpt}", "train:e2e_lora_18pct", "generate:e2e_lora_18pct",
              "bundle:e2e_lora_18pct"], env2)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming from" in r.stdout and "checkpoint-12" in r.stdout and "train:e2e_lora_18pct: DONE" in r.stdout
    with tarfile.open(tmp_path / "out2" / "e2e_lora_18pct.tar.gz") as tf:
        names = set(tf.getnames())
    assert {"predictions.txt", "references.txt", "categories.txt", "metrics.json", "delta"} <= names
    assert not any(n.startswith("checkpoint-") for n in names)
    assert sorted(os.listdir(tmp_path / "out2")) == ["e2e_lora_18pct.tar.gz", "gpu_issue19.log"]
