"""`torchrun --nproc_per_node 2 -m deltatune run ...` on CPU (gloo): the whole recipe runs with the
base sharded (FSDP2) or replicated (DDP), rank 0 alone decodes and scores, and the saved delta equals
the one a single process trains with the doubled batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.recipe_fixtures import recipe_dict, tiny_assets, write_recipe

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("torchrun")]  # one gloo job at a time: see .ci/run


def _run(args: list[str], cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    # stdin from /dev/null: under pytest-xdist the inherited stdin is the worker's channel
    return subprocess.run(args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=480)


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_torchrun_recipe_matches_single_process(mode, tmp_path):
    model_dir, data_dir = tiny_assets()
    common = {"generate": {"num_beams": 1, "max_new_tokens": 4}}
    dist_cfg = write_recipe(tmp_path / "dist.yaml", recipe_dict(
        model_dir, data_dir, tmp_path / "dist", train={"batch_size": 2, "max_steps": 4, "distributed": mode,
                                                      "eval_every": 2}, **common))
    single_cfg = write_recipe(tmp_path / "single.yaml", recipe_dict(
        model_dir, data_dir, tmp_path / "single", train={"batch_size": 4, "max_steps": 4, "eval_every": 2}, **common))
    dist = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 "-m", "deltatune", "run", str(dist_cfg), "--no-progress"], tmp_path)
    assert dist.returncode == 0, dist.stderr[-4000:]
    assert dist.stdout.count("scores (") == 1, "rank 0 alone prints the scores"
    single = _run([sys.executable, "-m", "deltatune", "run", str(single_cfg), "--no-progress"], tmp_path)
    assert single.returncode == 0, single.stderr[-4000:]
    a = load_file(str(tmp_path / "dist" / "delta" / "delta.safetensors"))
    b = load_file(str(tmp_path / "single" / "delta" / "delta.safetensors"))
    assert a.keys() == b.keys() and a
    for key in a:
        assert a[key].numel() > 0
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)
    metrics = json.loads((tmp_path / "dist" / "metrics.json").read_text())
    assert {"BLEU", "NIST", "trainable_params"} <= set(metrics)
