"""Worker for test_trainer_ddp.py: run under `python -m torch.distributed.run --nproc_per_node 2`."""

from __future__ import annotations

import json
import os
import sys
import weakref

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _train_utils import lm_examples, tiny_lm, trainable_state  # noqa: E402

from deltatune.errors import DeltaError  # noqa: E402
from deltatune.train import TrainConfig, Trainer  # noqa: E402


def config(out: str, batch_size: int, distributed: str, grad_accum_steps: int) -> TrainConfig:
    return TrainConfig(
        lr=1e-2,
        batch_size=batch_size,
        grad_accum_steps=grad_accum_steps,
        epochs=2,
        warmup_steps=1,
        max_grad_norm=0.5,
        weight_decay=0.01,
        log_every=1,
        eval_every=2,
        save_every=2,
        seed=3,
        distributed=distributed,
        output_dir=out,
        progress_bar=False,
        tensorboard=False,
    )


def datasets():
    return lm_examples(16, seed=8), lm_examples(5, seed=9)


def main() -> None:
    torch.set_num_threads(1)
    out, accum = sys.argv[1], int(sys.argv[2])
    train, evals = datasets()
    with Trainer(tiny_lm(), config(out, 2, "ddp", accum), train, eval_dataset=evals) as tr:
        assert tr._ddp is not None
        ddp_ref = weakref.ref(tr._ddp)
        summary = tr.train()
        rank = tr.dist.rank
        torch.save(trainable_state(tr.model), os.path.join(out, f"weights_rank{rank}.pt"))
        backend = torch.distributed.get_backend()
    # close() frees the DDP wrapper (and its reducer) before the process group goes: a reducer left
    # to free the group later can deadlock the exit against a Gloo worker thread
    released = ddp_ref() is None
    try:
        tr.train()
        after_close = "no error"
    except DeltaError as e:
        after_close = str(e)
    if rank == 0:
        with open(os.path.join(out, "summary.json"), "w") as fh:
            json.dump({**summary, "world_size": tr.dist.world_size, "backend": backend,
                       "ddp_released": released, "train_after_close": after_close}, fh)


if __name__ == "__main__":
    main()
