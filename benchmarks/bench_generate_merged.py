"""Generation latency: base model vs LoRA (unmerged) vs LoRA merged into the weights.

Merging folds the adapters into the base weights, so a merged model should decode exactly as fast
as the base model (ratio within run-to-run noise, which the script prints by timing the base twice).

    python benchmarks/bench_generate_merged.py --shape smollm2 --batch 8 --new-tokens 64          # GPU
    python benchmarks/bench_generate_merged.py --shape smollm2 --batch 2 --new-tokens 16 --device cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import deltatune as dt
from deltatune.generate import GenerationConfig, generate

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _time(model, prompts, cfg, device, repeats) -> float:
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        generate(model, None, prompts, cfg, batch_size=len(prompts), device=device, progress=False)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def add_decode_args(ap: argparse.ArgumentParser, repeats: int) -> None:
    """The options shared by the decoding benchmarks (model shape, batch, lengths, repeats, device, dtype)."""
    ap.add_argument("--shape", default="smollm2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")


def decode_setup(args: argparse.Namespace) -> tuple[torch.nn.Module, list[list[int]], GenerationConfig]:
    """The base model (eval mode), the random prompts and the fixed-length greedy decoding settings of
    ``args`` (:func:`add_decode_args`); one warm-up call has run."""
    from bench_lora_vs_peft import build_model  # same model shapes as the training benchmark

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    model = build_model(args.shape, dtype, args.device).eval()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, model.config.vocab_size, (args.batch, args.prompt_len), generator=g).tolist()
    cfg = GenerationConfig(max_new_tokens=args.new_tokens, eos_token_id=[])  # fixed length: same work
    _time(model, prompts[:1], cfg, args.device, 1)  # warm-up
    return model, prompts, cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_decode_args(ap, repeats=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    model, prompts, cfg = decode_setup(args)
    res = {"base": _time(model, prompts, cfg, args.device, args.repeats)}
    dt.apply(model, dt.LoraConfig(r=16, alpha=32, target_modules=TARGETS, init="random"))
    res["lora_unmerged"] = _time(model, prompts, cfg, args.device, args.repeats)
    dt.merge(model)
    res["lora_merged"] = _time(model, prompts, cfg, args.device, args.repeats)
    dt.unload(model)  # the plain base model again (unmerged): its second timing shows the noise
    res["base_again"] = _time(model, prompts, cfg, args.device, args.repeats)
    base = res["base"]
    print(f"{args.shape} batch {args.batch} prompt {args.prompt_len} new {args.new_tokens} {args.dtype} {args.device}")
    print("| model | median s | vs base |")
    print("|---|---|---|")
    for k, v in res.items():
        print(f"| {k} | {v:.3f} | {v / base:.3f}x |")
    print(f"noise (base timed twice): {abs(res['base_again'] / base - 1):.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "seconds": res}, f, indent=2)


if __name__ == "__main__":
    main()
