"""Host-side overhead per training step: full fine-tuning vs PEFT LoRA vs deltatune LoRA.

The SmolLM2-135M layer count (30) with hidden size 64, one sequence of 8 tokens, on the CPU with one
thread: the arithmetic is negligible, so the step time is the Python, dispatch and autograd
bookkeeping that also bounds the GPU step of small models (see the README, "Speed"). Prints the
median ms/step of each mode.

    python benchmarks/bench_host_overhead.py
    python benchmarks/bench_host_overhead.py --modes peft_nodrop,deltatune_nodrop --no-fused-ce
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_lora_vs_peft as B  # noqa: E402

B.SHAPES["skinny"] = dict(
    B.SHAPES["smollm2"], hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=256,
)


def step_time(mode: str, steps: int, fused_ce: bool) -> float:
    """Median seconds per optimiser step of ``mode`` (one of ``bench_lora_vs_peft.MODES``)."""
    import deltatune as dt

    model = B.build_model("skinny", torch.float32, "cpu")
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    if mode != "full":
        dropout = 0.0 if mode.endswith("nodrop") else 0.05
        dt.apply(model, dt.LoraConfig(r=16, alpha=32, dropout=dropout, target_modules=B.TARGETS))
        if mode.startswith("peft"):
            import peft

            tmp = tempfile.mkdtemp()
            dt.export_peft(model, tmp)
            model = peft.PeftModel.from_pretrained(B.build_model("skinny", torch.float32, "cpu"), tmp, is_trainable=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    if mode.startswith("deltatune") and fused_ce:
        from deltatune.train import lm_loss_sum  # the Trainer's default loss (chunked head)

        def loss_fn():
            total, n = lm_loss_sum(model, {"input_ids": ids, "labels": ids}, check_labels=False)
            return total / n
    else:

        def loss_fn():
            return model(input_ids=ids, labels=ids).loss

    def step() -> None:
        loss_fn().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default=",".join(B.MODES))
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--no-fused-ce", action="store_true", help="deltatune modes use the HF loss too")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| mode | ms / step |\n|---|---|")
    for mode in args.modes.split(","):
        if mode not in B.MODES:
            raise SystemExit(f"--modes: unknown mode {mode!r}; known: {', '.join(B.MODES)}")
        print(f"| {mode} | {1000 * step_time(mode, args.steps, not args.no_fused_ce):.1f} |", flush=True)


if __name__ == "__main__":
    main()
