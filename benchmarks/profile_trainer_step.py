"""Where a ``dt.Trainer`` step spends its device time: the operator table of a few steps (issue 18).

Builds the run ``bench_trainers.py`` times (same model, data, LoRA and TrainConfig; the LoRA paper's E2E
regime by default), trains eagerly (``cuda_graph: false``: a captured step shows only the graph launch)
and records ``--profile-steps`` steps after ``--warmup`` with ``torch.profiler``. Prints the top operators
by device time and the number of kernels per step (a captured step runs the same kernels; at small batches
their count, not their size, sets the step time), and writes the table to ``--out``.

    python benchmarks/profile_trainer_step.py --out results/prof-e2e.txt                     # GPU, bf16
    python benchmarks/profile_trainer_step.py --batch 16 --min-len 1024 --max-len 1024 --r 16 --targets all --dropout 0.05
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from bench_lora_vs_peft import build_model
from bench_trainers import ALL, add_run_args, make_data, set_lora_init

import deltatune as dt
from deltatune.train import PadCollator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(ap)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--fused-kernels", default="auto")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", type=int, default=40)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = build_model(args.shape, dtype, args.device)
    steps = args.warmup + args.profile_steps
    data = make_data(args.batch * steps, args.min_len, args.max_len, model.config.vocab_size, 0)
    targets = ALL if args.targets == ["all"] else args.targets
    dt.apply(model, dt.LoraConfig(r=args.r, alpha=2 * args.r, dropout=args.dropout, target_modules=targets))
    set_lora_init(model)
    cfg = dt.TrainConfig(
        lr=2e-4, batch_size=args.batch, max_steps=steps, shuffle=False, max_grad_norm=1.0, scheduler="linear",
        mixed_precision="bf16" if args.device == "cuda" else "no", device=args.device, tensorboard=False,
        progress_bar=False, save_final=False, seed=0, cuda_graph=False, fused_kernels=args.fused_kernels,
        log_every=10**9,
    )
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    prof = torch.profiler.profile(activities=activities)

    class Window(dt.TrainerCallback):
        def on_step_end(self, tr: Any) -> None:
            if tr.state.step == args.warmup:
                if args.device == "cuda":
                    torch.cuda.synchronize()
                prof.start()
            if tr.state.step == steps:
                if args.device == "cuda":
                    torch.cuda.synchronize()
                prof.stop()

    trainer = dt.Trainer(model, cfg, data, collate_fn=PadCollator(pad_token_id=0, pad_to_multiple_of=16),
                         callbacks=[Window()])
    trainer.train()
    events = prof.key_averages()
    key = "self_device_time_total" if args.device == "cuda" else "self_cpu_time_total"
    table = events.table(sort_by=key, row_limit=args.rows, max_name_column_width=70)
    kernels = [e for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    dev_us = sum(e.device_time for e in kernels) if kernels else 0.0
    lines = [
        f"{args.shape} batch {args.batch} len {args.min_len}-{args.max_len} r={args.r} targets={targets} "
        f"dropout={args.dropout} fused_kernels={args.fused_kernels} ({args.profile_steps} steps profiled)",
        f"kernels per step: {len(kernels) / args.profile_steps:.0f}; device time per step: "
        f"{dev_us / args.profile_steps / 1000:.2f} ms",
        table,
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
