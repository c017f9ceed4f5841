"""Worker for test_trainer_fsdp.py: run under `python -m torch.distributed.run --nproc_per_node 2`.

One launch runs every FSDP case (process start-up and imports dominate the time):

* ``lora``:   tiny Llama + LoRA r=4 on q,v (deltatune.apply), checkpoints through save_delta/load_delta
* ``gc``:     the same with gradient checkpointing
* ``frozen``: tiny Llama, LoRA r=1 on one o_proj (lora_A has one row: rank 1's shard is empty)
              plus a trainable base weight inside an otherwise frozen block; default save_fn
* ``crash`` + ``resume``: ``lora`` killed after step K (a callback raises), resumed on a fresh model
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _train_utils import lm_examples, tiny_llama  # noqa: E402

import deltatune as dt  # noqa: E402
from deltatune.train import TrainConfig, Trainer, TrainerCallback  # noqa: E402

CRASH_STEP = 4  # 24 examples / (2 ranks x 2) = 6 micro-batches = 3 steps per epoch: step 4 is in epoch 2
TOTAL_STEPS = 6


class Crash(Exception):
    pass


class CrashAt(TrainerCallback):
    def __init__(self, k: int) -> None:
        self.k = k

    def on_step_end(self, trainer):
        if trainer.state.step == self.k:
            raise Crash(f"killed at step {self.k}")


def lora_model() -> torch.nn.Module:
    model = tiny_llama(seed=5)
    dt.apply(model, dt.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], init="random"))
    return model


def frozen_block_model() -> torch.nn.Module:
    model = tiny_llama(seed=6)
    dt.apply(model, dt.LoraConfig(r=1, alpha=2, target_modules=["model.layers.1.self_attn.o_proj"], init="random"))
    model.model.layers[0].mlp.down_proj.weight.requires_grad_(True)  # a base weight inside a frozen block
    return model


def config(out: str, batch_size: int, distributed: str, **kw) -> TrainConfig:
    base = dict(
        lr=1e-2,
        batch_size=batch_size,
        grad_accum_steps=2,
        epochs=2,
        warmup_steps=1,
        scheduler="cosine",
        max_grad_norm=0.05,  # small enough to clip every step
        weight_decay=0.01,
        log_every=1,
        eval_every=3,
        save_every=2,
        seed=3,
        device="cpu",
        distributed=distributed,
        output_dir=out,
        progress_bar=False,
        tensorboard=False,
    )
    base.update(kw)
    return TrainConfig(**base)


def datasets():
    return lm_examples(24, seed=8), lm_examples(5, seed=9)  # 5 eval examples: ranks hold 3 and 2


def delta_hooks():
    return {"save_fn": lambda m, d: dt.save_delta(m, d), "load_fn": lambda m, d: dt.load_delta(m, d)}


def local_shapes(model: torch.nn.Module) -> list[dict[str, list[int]]]:
    """Every rank's shard shapes of the trainable parameters (index = rank)."""
    mine = {n: list(p.to_local().shape) for n, p in model.named_parameters() if p.requires_grad}
    every: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, mine)
    return every


def main_cuda_bf16(out: Path) -> None:
    """GPU variant (2+ CUDA devices, NCCL): bf16 MixedPrecisionPolicy, LoRA run + delta export."""
    train, evals = datasets()
    cfg = config(str(out / "bf16"), 2, "fsdp", device="cuda", mixed_precision="bf16", save_every=0)
    with Trainer(lora_model(), cfg, train, eval_dataset=evals) as tr:
        layer = tr.model.model.layers[0]
        policy = layer._get_fsdp_state()._mp_policy
        assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32, policy
        summary = tr.train()
        tr.save_delta(out / "bf16_delta")
        if tr.dist.rank == 0:
            with open(out / "report.json", "w") as fh:
                json.dump({"bf16": summary, "backend": torch.distributed.get_backend()}, fh)


def main() -> None:
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    if len(sys.argv) > 2 and sys.argv[2] == "cuda-bf16":
        main_cuda_bf16(out)
        return
    train, evals = datasets()
    report: dict = {}

    first = Trainer(lora_model(), config(str(out / "lora"), 2, "fsdp"), train, eval_dataset=evals, **delta_hooks())
    rank, world = first.dist.rank, first.dist.world_size
    assert first.is_fsdp and first.fsdp_units == ["model.layers.0", "model.layers.1", ""], first.fsdp_units
    report["lora"] = first.train()
    first.save_delta(out / "lora_delta")
    report["local_shapes"] = local_shapes(first.model)

    with Trainer(lora_model(), config(str(out / "gc"), 2, "fsdp", gradient_checkpointing=True, save_every=0,
                                      save_final=False), train, eval_dataset=evals) as gc:
        layer = gc.model.model.layers[0]
        report["gc_enabled"] = bool(getattr(layer, "gradient_checkpointing", False))
        report["gc"] = gc.train()

    frozen = Trainer(frozen_block_model(), config(str(out / "frozen"), 2, "fsdp"), train, eval_dataset=evals)
    report["frozen"] = frozen.train()
    report["frozen_local_shapes"] = local_shapes(frozen.model)
    # load the last checkpoint into a fresh sharded model (uneven shards) and write it again
    reload = Trainer(frozen_block_model(), config(str(out / "frozen_reload"), 2, "fsdp"), train)
    reload.load_checkpoint(out / "frozen" / f"checkpoint-{TOTAL_STEPS}")
    reload.save_checkpoint()

    crashed = Trainer(lora_model(), config(str(out / "resume"), 2, "fsdp"), train, eval_dataset=evals,
                      callbacks=[CrashAt(CRASH_STEP)], **delta_hooks())
    try:
        crashed.train()
        raise AssertionError("the crash callback did not fire")
    except Crash:
        pass
    torch.manual_seed(1234 + rank)  # a new process would start from another RNG state
    resumed = Trainer(lora_model(), config(str(out / "resume"), 2, "fsdp"), train, eval_dataset=evals,
                      **delta_hooks())
    report["resume"] = resumed.train(resume_from="latest")
    report["resumed_from_step"] = CRASH_STEP

    if rank == 0:
        report["world_size"] = world
        report["backend"] = torch.distributed.get_backend()
        with open(out / "report.json", "w") as fh:
            json.dump(report, fh)
    first.close()  # it created the process group


if __name__ == "__main__":
    main()
