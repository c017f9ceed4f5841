"""Training throughput and peak memory: full fine-tuning vs PEFT LoRA vs deltatune LoRA.

Every mode trains the same random-init Llama-shaped model (same seed, same batch) with AdamW and
LoRA r=16 on q,k,v,o,gate,up,down; deltatune and PEFT start from identical adapter weights (the
deltatune adapter is exported and loaded into PEFT), and their loss curves over the timed steps
must agree within bf16 tolerance, so speed never comes from computing something else.

Prints a table of tokens/s, peak memory and ratios, and writes JSON (``--json``).

    python benchmarks/bench_lora_vs_peft.py --shape smollm2 --batch 16 --seq 1024        # GPU
    python benchmarks/bench_lora_vs_peft.py --shape smollm2 --batch 8 --seq 128 --device cpu
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

SHAPES = {
    # SmolLM2-135M (HuggingFaceTB/SmolLM2-135M config)
    "smollm2": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    ),
    # Llama-3.2-1B shape
    "llama1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    ),
    # a tiny shape for a CPU smoke run of this script
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# deltatune's training step on a GPU is captured in a CUDA graph (deltatune.train.CapturedStep, what the
# Trainer does); "_eager" runs it without. "_graph" captures a PEFT / full fine-tuning step the same way
# (not what PEFT users get from their trainers; shown to separate the two effects).
MODES = ["full", "peft", "peft_nodrop", "deltatune", "deltatune_nodrop"]
EXTRA_MODES = ["deltatune_eager", "deltatune_nodrop_eager", "peft_graph", "peft_nodrop_graph", "full_graph"]


def _graphed(mode: str, device: str) -> bool:
    if device != "cuda":
        return False
    return mode.endswith("_graph") or (mode.startswith("deltatune") and not mode.endswith("_eager"))


def _peft_ref(mode: str) -> str:
    return "peft_nodrop" if "nodrop" in mode else "peft"


def build_model(shape: str, dtype: torch.dtype, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPES[shape], attn_implementation="sdpa")
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype)


class RssPeak:
    """Peak resident set size of this process while active (CPU memory)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def __enter__(self):
        self.peak = self._rss()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())


def run_mode(mode: str, args) -> dict:
    import deltatune as dt

    device = args.device
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    dropout = 0.0 if "nodrop" in mode else args.dropout
    graphed = _graphed(mode, device)
    model = build_model(args.shape, dtype, device)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g).to(device)
    labels = ids.clone()
    if mode.startswith(("deltatune", "peft")):
        cfg = dt.LoraConfig(r=args.rank, alpha=2 * args.rank, dropout=dropout, target_modules=TARGETS)
        dt.apply(model, cfg)
        with torch.no_grad():  # a non-zero B so both implementations do real work from step 0
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 1e-3, generator=None)
        if mode.startswith("peft"):
            import peft

            tmp = tempfile.mkdtemp()
            dt.export_peft(model, tmp)
            base = build_model(args.shape, dtype, device)
            model = peft.PeftModel.from_pretrained(base, tmp, is_trainable=True)
    if args.grad_ckpt:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False  # training: no KV cache (every mode)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if graphed:
        opt = torch.optim.AdamW(params, lr=args.lr, fused=True, capturable=True)
    else:
        opt = torch.optim.AdamW(params, lr=args.lr, fused=(device == "cuda"))

    compiled = args.compile and mode.startswith("deltatune")
    if compiled:
        from deltatune.train import compile_blocks

        compile_blocks(model)
    if mode.startswith("deltatune") and args.fused != "none":
        from deltatune.train import fuse_llama

        fuse_llama(model, args.fused)
    if mode.startswith("deltatune") and not args.no_fused_ce and compiled:
        from deltatune.kernels.cross_entropy import causal_lm_loss

        ce = torch.compile(causal_lm_loss, dynamic=False)

        def loss_fn(b):
            hidden = model.model(input_ids=b["ids"]).last_hidden_state
            return ce(hidden, model.lm_head.weight, b["labels"], chunk_size=args.ce_chunk)
    elif mode.startswith("deltatune") and not args.no_fused_ce:
        from deltatune.train import lm_loss_sum  # the Trainer's default loss (chunked head)

        def loss_fn(b):
            total, n = lm_loss_sum(model, {"input_ids": b["ids"], "labels": b["labels"]}, check_labels=False,
                                   chunk_size=args.ce_chunk)
            return total / n
    else:

        def loss_fn(b):
            return model(input_ids=b["ids"], labels=b["labels"]).loss

    batch = {"ids": ids, "labels": labels}

    def train_step(b) -> torch.Tensor:
        loss = loss_fn(b)
        loss.backward()
        opt.step()
        return loss.detach()

    if graphed:
        from deltatune.train import CapturedStep

        # the capture call is the last warm-up step, so every mode times the same optimiser steps
        captured = CapturedStep(train_step, opt, warmup=max(1, args.warmup - 1))

        def step() -> torch.Tensor:
            return captured(batch)

    else:

        def step() -> torch.Tensor:
            loss = train_step(batch)
            opt.zero_grad(set_to_none=True)
            return loss

    if device == "cuda":  # peak memory over warm-up (and a graphed mode's capture) and timed steps
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t_warm = time.perf_counter()
    for _ in range(max(args.warmup, 2 if graphed else 0)):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t_warm
    times, losses = [], []
    if device == "cuda":
        for _ in range(args.steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            losses.append(step())
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        peak = torch.cuda.max_memory_allocated()
        reserved = torch.cuda.max_memory_reserved()
    else:
        with RssPeak() as rss:
            for _ in range(args.steps):
                t0 = time.perf_counter()
                losses.append(step())
                times.append(time.perf_counter() - t0)
        peak = rss.peak
        reserved = peak
    med = statistics.median(times)
    trainable = sum(p.numel() for p in params)
    if args.profile and not graphed:
        _profile(step, args, mode)
    return {
        "mode": mode,
        "tokens_per_s": args.batch * args.seq / med,
        "step_s": med,
        "peak_bytes": peak,
        "losses": [float(x) for x in losses],
        "trainable_params": trainable,
        "peak_reserved_bytes": reserved,
        "warmup_s": warmup_s,
        "cuda_graph": graphed,
        "compiled": compiled,
        "fused": args.fused if mode.startswith("deltatune") else "none",
    }


def _profile(step, args, mode: str) -> None:
    """Write the top operators of two profiled steps (by device time) to ``args.profile``."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(2):
            step()
        if args.device == "cuda":
            torch.cuda.synchronize()
    os.makedirs(args.profile, exist_ok=True)
    key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=40)
    with open(os.path.join(args.profile, f"profile_{args.shape}_{mode}.txt"), "w") as f:
        f.write(table)
    events = prof.key_averages()
    dev = sum(getattr(e, "self_device_time_total", 0) or 0 for e in events) / 2 / 1e3
    n_ops = sum(e.count for e in events if not e.key.startswith(("cuda", "cudaLaunch"))) / 2
    print(f"PROFILE {mode}: device time per step {dev:.1f} ms, operator calls per step {n_ops:.0f}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated; also {','.join(EXTRA_MODES)}")
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--no-fused-ce", action="store_true", help="deltatune modes use the HF loss too")
    ap.add_argument("--ce-chunk", type=int, default=None, help="rows per chunk of the fused loss")
    ap.add_argument("--compile", action="store_true",
                    help="deltatune modes: torch.compile each transformer block and the loss (compile_blocks)")
    ap.add_argument("--fused", choices=["none", "liger", "torch"], default="none",
                    help="deltatune modes: fuse RMSNorm/RoPE/SwiGLU with deltatune.train.fuse_llama")
    ap.add_argument("--profile", help="write per-mode operator profiles (eager modes) to this directory")
    ap.add_argument("--isolate", action="store_true", help="each mode in a fresh subprocess (default on CPU)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()
    if args.one:
        try:
            res = run_mode(args.one, args)
        except torch.OutOfMemoryError:
            res = {"mode": args.one, "oom": True}
        print("RESULT " + json.dumps(res))
        return
    modes = args.modes.split(",")
    isolate = args.isolate or args.device == "cpu"
    results = []
    for mode in modes:
        print(f"== {mode}", file=sys.stderr, flush=True)
        if isolate:
            cmd = [sys.executable, __file__, "--one", mode] + [a for a in sys.argv[1:] if a != "--isolate"]
            out = subprocess.run(cmd, capture_output=True, text=True)
            for ln in out.stderr.splitlines():
                if ln.startswith("PROFILE "):
                    print(ln, file=sys.stderr)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if not line:
                print(out.stderr[-3000:], file=sys.stderr)
                results.append({"mode": mode, "error": out.returncode})
                continue
            results.append(json.loads(line[-1][7:]))
        else:
            try:
                results.append(run_mode(mode, args))
            except torch.OutOfMemoryError:
                results.append({"mode": mode, "oom": True})
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
    report(results, args)


def report(results: list[dict], args) -> None:
    by = {r["mode"]: r for r in results}
    gib = 2**30
    print(
        f"\n{args.shape} {args.batch}x{args.seq} {args.dtype} {args.device} r={args.rank} dropout={args.dropout}"
    )
    print("| mode | tokens/s | peak GiB | vs full tok/s | vs full mem | vs PEFT tok/s | vs PEFT mem |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if "tokens_per_s" not in r:
            print(f"| {r['mode']} | {'OOM' if r.get('oom') else 'error'} | | | | | |")
            continue
        row = [r["mode"], f"{r['tokens_per_s']:,.0f}", f"{r['peak_bytes'] / gib:.2f}"]
        for ref in ("full", _peft_ref(r["mode"])):
            b = by.get(ref)
            if b and "tokens_per_s" in b and ref != r["mode"]:
                row += [
                    f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}x",
                    f"{r['peak_bytes'] / b['peak_bytes']:.2f}x",
                ]
            else:
                row += ["", ""]
        print("| " + " | ".join(row) + " |")
    checks = {}
    for ours in [m for m in by if m.startswith("deltatune")]:
        theirs = _peft_ref(ours)
        a, b = by.get(ours, {}), by.get(theirs, {})
        if "losses" in a and "losses" in b:
            la, lb = torch.tensor(a["losses"]), torch.tensor(b["losses"])
            rel = ((la - lb).abs() / lb.abs()).max().item()
            tol = 2e-2 if args.dtype == "bf16" else 1e-4
            checks[f"{ours}~{theirs}"] = {"max_rel_loss_diff": rel, "tolerance": tol, "ok": rel <= tol}
            print(
                f"loss curves {ours} vs {theirs}: max relative difference {rel:.2e} (tolerance {tol:g}) "
                f"{'OK' if rel <= tol else 'MISMATCH'}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "checks": checks}, f, indent=2)


if __name__ == "__main__":
    main()
