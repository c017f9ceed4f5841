"""What users run: ``dt.Trainer`` + deltatune LoRA against ``transformers.Trainer`` + PEFT LoRA (issue 18).

Both train the same random-init Llama-shaped model (``bench_lora_vs_peft.SHAPES``) on the same synthetic
token sequences, in the same order (no shuffling), from the same LoRA weights (``lora_A`` drawn from a
generator seeded by the module's name, ``lora_B`` zero), with the same AdamW, linear schedule, clipping
and collate function. Each trainer runs in its own process (``--isolate``, the default), so peak memory
is each one's own: peak allocated GPU memory on CUDA, peak resident set (``ru_maxrss``) on CPU. Seconds
per step are timed from the end of the warm-up steps to the end of training (CUDA synchronised at both
ends only). The loss curves (the logged window means) must agree.

Default: the LoRA paper's E2E regime (batch 8, sequences of 40-130 tokens, r=4 on q_proj and v_proj).

    python benchmarks/bench_trainers.py --device cpu --dtype fp32 --steps 12 --warmup 2 --out results/trainers-cpu
    python benchmarks/bench_trainers.py --device cpu --steps 8 --warmup 2 --interleave   # speed on a shared machine
    python benchmarks/bench_trainers.py --steps 400 --out results/trainers-e2e                           # GPU, bf16
    python benchmarks/bench_trainers.py --batch 16 --min-len 1024 --max-len 1024 --r 16 --targets all \\
        --dropout 0.05 --steps 30 --out results/trainers-16x1024                                           # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import torch

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TRAINERS = ["deltatune", "hf_peft"]


def make_data(n: int, min_len: int, max_len: int, vocab: int, seed: int) -> list[dict[str, list[int]]]:
    """``n`` token sequences of uniform random length in ``[min_len, max_len]`` (ids >= 3)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g).tolist()
    return [{"input_ids": torch.randint(3, vocab, (length,), generator=g).tolist()} for length in lengths]


def set_lora_init(model: torch.nn.Module, prefix: str = "") -> int:
    """Overwrite every ``lora_A``/``lora_B`` weight (deltatune or PEFT naming) with values that depend only on
    the module's path without ``prefix``: A uniform in +-1/sqrt(in) from a generator seeded by the path, B zero.
    Returns how many adapters were set."""
    n = 0
    for name, p in model.named_parameters():
        if ".lora_A." not in name and ".lora_B." not in name:
            continue
        path = name[len(prefix):] if name.startswith(prefix) else name
        with torch.no_grad():
            if ".lora_A." in path:
                g = torch.Generator().manual_seed(zlib.crc32(path.split(".lora_A.")[0].encode()))
                bound = p.shape[1] ** -0.5
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)
                n += 1
            else:
                p.zero_()
    return n


def _device_of(args: argparse.Namespace) -> str:
    return args.device


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_one(args: argparse.Namespace, trainer: str, on_step: Any = None) -> dict[str, Any]:
    """Train with ``trainer`` in this process; returns its measurements. ``on_step(step)``, if given, is
    called at the end of every optimiser step (after the timing marks)."""
    from bench_lora_vs_peft import build_model

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    targets = ALL if args.targets == ["all"] else args.targets
    model = build_model(args.shape, dtype, device)
    data = make_data(args.batch * args.steps, args.min_len, args.max_len, model.config.vocab_size, args.seed)
    from deltatune.train import PadCollator

    # pad to multiples of 16 on both sides (few shapes for captured steps; the same batches for both)
    collate = PadCollator(pad_token_id=0, pad_to_multiple_of=16)
    mixed = "bf16" if args.dtype == "bf16" and device == "cuda" else "no"
    marks: dict[str, float] = {}

    def mark(step: int) -> None:
        if step == args.warmup:
            _sync(device)
            marks["t0"] = time.perf_counter()
            if device == "cuda":
                marks["mem0"] = torch.cuda.max_memory_allocated()
        if step == args.steps:
            _sync(device)
            marks["t1"] = time.perf_counter()
        if on_step is not None:
            on_step(step)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if trainer == "deltatune":
        import deltatune as dt

        dt.apply(model, dt.LoraConfig(r=args.r, alpha=2 * args.r, dropout=args.dropout, target_modules=targets))
        set_lora_init(model)
        cfg = dt.TrainConfig(
            lr=args.lr, batch_size=args.batch, max_steps=args.steps, log_every=args.log_every, shuffle=False,
            max_grad_norm=1.0, scheduler="linear", mixed_precision=mixed, device=device, tensorboard=False,
            progress_bar=False, save_final=False, seed=args.seed, cuda_graph=args.cuda_graph,
            fused_kernels=args.fused_kernels,
        )

        class Mark(dt.TrainerCallback):
            def on_step_end(self, tr: Any) -> None:
                mark(tr.state.step)

        tr = dt.Trainer(model, cfg, data, collate_fn=collate, callbacks=[Mark()])
        info = {"captured": tr.capture, "eager_reason": tr.eager_reason, "chunked_loss": tr.chunked_loss,
                "fused_kernels": tr.fused_kernels}
        tr.train()
        losses = [(r["step"], r["loss"]) for r in tr.log_history if r["split"] == "train"]
    else:
        import peft
        import transformers

        cfg = peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=args.dropout, target_modules=targets)
        model = peft.get_peft_model(model, cfg)
        set_lora_init(model, prefix="base_model.model.")
        targs = transformers.TrainingArguments(
            output_dir=os.path.join(args.tmp, "hf"), per_device_train_batch_size=args.batch, max_steps=args.steps,
            learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
            logging_steps=args.log_every, save_strategy="no", report_to=[], seed=args.seed, data_seed=args.seed,
            bf16=mixed == "bf16", use_cpu=device == "cpu", dataloader_num_workers=0, remove_unused_columns=False,
            disable_tqdm=True, optim="adamw_torch_fused" if device == "cuda" else "adamw_torch",
        )

        class Sequential(transformers.Trainer):
            def _get_train_sampler(self, *a: Any, **k: Any) -> Any:  # the data in order, as deltatune's
                return torch.utils.data.SequentialSampler(self.train_dataset)

        class Mark(transformers.TrainerCallback):
            def on_step_end(self, a: Any, state: Any, control: Any, **k: Any) -> None:
                mark(state.global_step)

        tr = Sequential(model=model, args=targs, train_dataset=data, data_collator=collate, callbacks=[Mark()])
        info = {}
        tr.train()
        losses = [(r["step"], r["loss"]) for r in tr.state.log_history if "loss" in r and "step" in r]
    steps_timed = args.steps - args.warmup
    out = {
        "trainer": trainer,
        "s_per_step": (marks["t1"] - marks["t0"]) / steps_timed,
        "losses": losses,
        **info,
    }
    if device == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["device_name"] = torch.cuda.get_device_name()
    else:
        out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        out["rss_before_training_gib"] = rss_before / 2**20
    out["tokens_per_step"] = sum(len(d["input_ids"]) for d in data) / args.steps
    return out


class _Baton:
    """Lets one of several threads run at a time; ``step_times[name]`` gets each step's seconds (from
    getting the baton to handing it on at the step's end) and ``cpu_times[name]`` the process's CPU seconds
    (all threads; only one trainer runs at a time) over the same span."""

    def __init__(self, order: list[str]) -> None:
        self.cond = threading.Condition()
        self.order, self.turn, self.done = order, order[0], set()
        self.step_times: dict[str, list[float]] = {n: [] for n in order}
        self.cpu_times: dict[str, list[float]] = {n: [] for n in order}
        self.t0: dict[str, tuple[float, float]] = {}

    def wait(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == name)
        self.t0[name] = (time.perf_counter(), time.process_time())

    def pass_on(self, name: str, finished: bool = False) -> None:
        with self.cond:
            if finished:
                self.done.add(name)
            live = [n for n in self.order if n not in self.done]
            if live:
                i = self.order.index(name)
                self.turn = next(n for n in self.order[i + 1:] + self.order[:i + 1] if n in live)
            self.cond.notify_all()

    def step_end(self, name: str) -> None:
        self.step_times[name].append(time.perf_counter() - self.t0[name][0])
        self.cpu_times[name].append(time.process_time() - self.t0[name][1])
        self.pass_on(name)
        self.wait(name)


def run_interleaved(args: argparse.Namespace) -> dict[str, Any]:
    """Both trainers in this process, one optimiser step of each in turn (one thread each, only one running
    at a time), every step timed: on a machine shared with other jobs, a step of each trainer sees about
    the same load, so the per-step ratios are far less noisy than two runs one after the other. Returns the
    step times and the median over the timed steps of the paired ratio (PEFT's step / deltatune's)."""
    baton = _Baton(list(TRAINERS))
    results: dict[str, Any] = {}
    errors: list[BaseException] = []

    def work(name: str) -> None:
        baton.wait(name)
        try:
            results[name] = run_one(args, name, on_step=lambda step: baton.step_end(name))
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)
        finally:
            baton.pass_on(name, finished=True)

    threads = [threading.Thread(target=work, args=(n,)) for n in TRAINERS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    ours, theirs = baton.step_times["deltatune"], baton.step_times["hf_peft"]
    timed = range(args.warmup, min(len(ours), len(theirs)))
    ratios = [theirs[i] / ours[i] for i in timed]
    cpu_ours, cpu_theirs = baton.cpu_times["deltatune"], baton.cpu_times["hf_peft"]
    cpu_ratios = [cpu_theirs[i] / cpu_ours[i] for i in timed]
    return {
        "step_s": baton.step_times,
        "step_cpu_s": baton.cpu_times,
        "paired_cpu_ratios": cpu_ratios,
        "median_cpu_speedup": statistics.median(cpu_ratios),
        "sum_cpu_speedup": sum(cpu_theirs[i] for i in timed) / sum(cpu_ours[i] for i in timed),
        "paired_ratios": ratios,
        "median_speedup_steps_per_s": statistics.median(ratios),
        "sum_speedup_steps_per_s": sum(theirs[i] for i in timed) / sum(ours[i] for i in timed),
        "losses": {n: results[n]["losses"] for n in TRAINERS},
    }


def compare(results: dict[str, dict[str, Any]], device: str) -> dict[str, Any]:
    """Ratios deltatune / PEFT and the loss-curve agreement."""
    ours, theirs = results["deltatune"], results["hf_peft"]
    mem_key = "peak_gib" if device == "cuda" else "peak_rss_gib"
    a, b = dict(ours["losses"]), dict(theirs["losses"])
    common = sorted(set(a) & set(b))
    rel = [abs(a[s] - b[s]) / max(abs(b[s]), 1e-12) for s in common]
    return {
        "speedup_steps_per_s": theirs["s_per_step"] / ours["s_per_step"],
        "memory_ratio": ours[mem_key] / theirs[mem_key],
        "loss_steps_compared": len(common),
        "loss_max_rel_diff": max(rel) if rel else None,
    }


def plot(results: dict[str, dict[str, Any]], cmp: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        steps, losses = zip(*r["losses"]) if r["losses"] else ((), ())
        ax1.plot(steps, losses, marker=".", label=f"{name}")
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss (logged window mean)")
    ax1.legend()
    ax1.set_title(f"loss curves (max rel. diff {cmp['loss_max_rel_diff']:.2e})", fontsize=9)
    names = list(results)
    ax2.bar(names, [1.0 / results[n]["s_per_step"] for n in names], color=["C0", "C1"])
    ax2.set_ylabel("steps/s")
    ax2.set_title(f"deltatune {cmp['speedup_steps_per_s']:.2f}x steps/s, {cmp['memory_ratio']:.2f}x memory", fontsize=9)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def save_figure(fig: Any, path: Path) -> None:
    """Lay out, write (PNG, 120 dpi) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_run_args(ap: argparse.ArgumentParser) -> None:
    """The options that say what is trained (model shape, batch, sequence lengths, LoRA rank, targets, dropout);
    the LoRA paper's E2E regime by default. Shared with ``profile_trainer_step.py``."""
    ap.add_argument("--shape", default="smollm2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--min-len", type=int, default=40)
    ap.add_argument("--max-len", type=int, default=130)
    ap.add_argument("--r", type=int, default=4)
    ap.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"], help="module names, or 'all'")
    ap.add_argument("--dropout", type=float, default=0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(ap)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5, help="steps before the timing starts")
    ap.add_argument("--log-every", type=int, default=None, help="default 1 on CPU, 10 on CUDA")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cuda-graph", default="auto", help="deltatune TrainConfig.cuda_graph: auto, true or false")
    ap.add_argument("--fused-kernels", default="auto", help="deltatune TrainConfig.fused_kernels")
    ap.add_argument("--trainers", nargs="+", default=TRAINERS, choices=TRAINERS)
    ap.add_argument("--no-isolate", action="store_true", help="run both in this process (peak memory is shared)")
    ap.add_argument("--interleave", action="store_true",
                    help="both in this process, one step of each in turn, every step timed (speed only)")
    ap.add_argument("--out", default=None, help="directory for trainers.json and trainers.png")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default="/tmp/bench_trainers", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.log_every = args.log_every or (10 if args.device == "cuda" else 1)
    args.cuda_graph = {"true": True, "false": False}.get(str(args.cuda_graph).lower(), args.cuda_graph)
    if not 0 <= args.warmup < args.steps:
        ap.error(f"--warmup must be in [0, --steps), got {args.warmup} with --steps {args.steps}")
    if args.child:
        print("RESULT " + json.dumps(run_one(args, args.child)), flush=True)
        return
    if args.interleave:
        load_start = os.getloadavg()
        rec = run_interleaved(args)
        rec["loadavg"] = {"start": load_start, "end": os.getloadavg()}
        a, b = dict(rec["losses"]["deltatune"]), dict(rec["losses"]["hf_peft"])
        rel = [abs(a[k] - b[k]) / max(abs(b[k]), 1e-12) for k in sorted(set(a) & set(b))]
        rec["loss_max_rel_diff"] = max(rel) if rel else None
        print(f"interleaved, threads {torch.get_num_threads()}, load average {rec['loadavg']}")
        for name, times in rec["step_s"].items():
            print(f"{name} s/step: " + " ".join(f"{t:.3f}" for t in times))
            print(f"{name} CPU s/step: " + " ".join(f"{t:.3f}" for t in rec["step_cpu_s"][name]))
        print(f"deltatune vs transformers.Trainer + PEFT, steps {args.warmup + 1}-{args.steps}: median paired "
              f"{rec['median_speedup_steps_per_s']:.3f}x steps/s (ratios "
              + " ".join(f"{r:.3f}" for r in rec["paired_ratios"])
              + f"), total time {rec['sum_speedup_steps_per_s']:.3f}x; CPU seconds per step: median paired "
              f"{rec['median_cpu_speedup']:.3f}x, total {rec['sum_cpu_speedup']:.3f}x; loss curves max relative "
              f"difference {rec['loss_max_rel_diff']:.2e}")
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "trainers_interleaved.json").write_text(json.dumps({"args": vars(args), **rec}, indent=2))
            print(f"wrote {out / 'trainers_interleaved.json'}")
        return
    results: dict[str, dict[str, Any]] = {}
    load_start = os.getloadavg()  # the CPU numbers depend on what else runs on the machine: recorded
    for name in args.trainers:
        if args.no_isolate:
            results[name] = run_one(args, name)
            continue
        cmd = [sys.executable, __file__, *sys.argv[1:], "--child", name]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit(f"{name} failed (exit {proc.returncode})")
        results[name] = json.loads(line[-1][len("RESULT "):])
    load = {"start": load_start, "end": os.getloadavg()}
    title = (f"{args.shape}, batch {args.batch}, {args.min_len}-{args.max_len} tokens, r={args.r} on "
             f"{','.join(args.targets)}, dropout {args.dropout}, {args.dtype}, {args.device}, {args.steps} steps "
             f"({args.warmup} warm-up), threads {torch.get_num_threads()}")
    print(title)
    print(f"load average (1/5/15 min) at the start: {load['start']}, at the end: {load['end']}")
    mem = "peak GiB" if args.device == "cuda" else "peak RSS GiB"
    key = "peak_gib" if args.device == "cuda" else "peak_rss_gib"
    added = "" if args.device == "cuda" else " RSS added by training GiB |"
    print(f"| trainer | s/step | steps/s | tokens/s | {mem} |{added} notes |")
    print("|---|---|---|---|---|---|" + ("---|" if added else ""))
    for name, r in results.items():
        notes = ", ".join(f"{k}={r[k]}" for k in ("captured", "chunked_loss", "fused_kernels") if k in r)
        extra = f" {r[key] - r['rss_before_training_gib']:.3f} |" if added else ""
        print(f"| {name} | {r['s_per_step']:.4f} | {1 / r['s_per_step']:.2f} | "
              f"{r['tokens_per_step'] / r['s_per_step']:.0f} | {r[key]:.3f} |{extra} {notes} |")
    cmp = None
    if set(results) == set(TRAINERS):
        cmp = compare(results, args.device)
        print(f"deltatune vs transformers.Trainer + PEFT: {cmp['speedup_steps_per_s']:.2f}x steps/s, "
              f"{cmp['memory_ratio']:.2f}x {mem}; loss curves over {cmp['loss_steps_compared']} logged steps: "
              f"max relative difference {cmp['loss_max_rel_diff']:.2e}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        record = {"args": vars(args), "results": results, "compare": cmp, "loadavg": load}
        (out / "trainers.json").write_text(json.dumps(record, indent=2))
        if cmp is not None:
            plot(results, cmp, out / "trainers.png", title)
        print(f"wrote {out / 'trainers.json'}" + (f" and {out / 'trainers.png'}" if cmp else ""))


if __name__ == "__main__":
    main()
