"""Decoding speed per delta method against the base model (issue 18).

Each method is applied to a copy of the same random-init Llama-shaped model; mergeable methods (LoRA,
IA3) decode merged, as a user deploys them; Prefix-Tuning decodes with its prefix folded
(``dt.fold_prefix``); Adapter, the low-rank adapter and P-Tuning v2 decode as they train. Every
model generates the same prompts greedily for a fixed number of new tokens (no EOS), through
``deltatune.generate``. The base model is timed first and last, so the table shows the run-to-run noise.
With ``--interleave`` every model is built first and timed once per round, round after round, and each
keeps its fastest round: on a machine whose host timing drifts (decoding at small batch is bound by the
host launching kernels) the drift then hits every model alike.
Prints a table (tokens/s, time vs base), writes JSON and a PNG bar chart. With ``--count-ops`` it also
counts the aten operations one decode step dispatches (top-level ones, i.e. not called from inside
another aten op; torch.profiler, on any device): decoding at small batch is launch-bound on a GPU, so
this count is what a method adds to each decoded token.

    python benchmarks/bench_decode_methods.py --shape smollm2 --batch 8 --new-tokens 64 --out results/decode  # GPU
    python benchmarks/bench_decode_methods.py --shape smollm2 --batch 2 --new-tokens 16 --device cpu --dtype fp32
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
from pathlib import Path
from typing import Any

import torch
from bench_generate_merged import _time, add_decode_args, decode_setup  # _time: median s of `generate`
from bench_trainers import save_figure

import deltatune as dt

ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

#: name -> (config, how it is deployed: "merge", "fold" or "as-is")
METHODS: dict[str, tuple[Any, str]] = {
    "lora (merged)": (dt.LoraConfig(r=16, alpha=32, target_modules=ATTN_MLP, init="random"), "merge"),
    "lora (unmerged)": (dt.LoraConfig(r=16, alpha=32, target_modules=ATTN_MLP, init="random"), "as-is"),
    "ia3 (merged)": (dt.IA3Config(), "merge"),
    "adapter": (dt.AdapterConfig(), "as-is"),
    "low_rank_adapter": (dt.LowRankAdapterConfig(), "as-is"),
    "prefix (folded)": (dt.PrefixConfig(), "fold"),
    "ptuning_v2": (dt.PTuningV2Config(dropout=0.0), "as-is"),
}
#: methods whose decoding may cost at most this much of the base model's time (issue 18)
NON_MERGEABLE_BUDGET = 1.3


def deploy(base: torch.nn.Module, config: Any, how: str) -> torch.nn.Module:
    """A copy of ``base`` with ``config`` applied and deployed as ``how`` says."""
    model = copy.deepcopy(base)
    dt.apply(model, config)
    model.to(next(base.parameters()).dtype)
    if how == "merge":
        dt.merge(model)
    elif how == "fold":
        dt.fold_prefix(model)
    return model.eval()


def decode_step_ops(model: torch.nn.Module, prompts: list[list[int]], device: str) -> dict[str, int]:
    """aten operations dispatched by one decode step (one new token per sequence after the prompts, with the
    key/value cache), after one unprofiled step: ``{"top_level": n, "all": n}``."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.tensor(prompts, device=device)
    with torch.no_grad():
        for profiled in (False, True):
            out = model(input_ids=ids, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            with profile(activities=[ProfilerActivity.CPU]) if profiled else contextlib.nullcontext() as prof:
                model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    return {"top_level": len(top), "all": len(events)}


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    names = [r["model"] for r in rows]
    ax.barh(names, [r["tokens_per_s"] for r in rows], color=["grey" if r["model"].startswith("base") else "C0" for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("decoded tokens/s")
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)


def _deployed(base: torch.nn.Module, name: str, args: argparse.Namespace, prompts: list[list[int]], cfg: Any,
              ops: dict[str, Any]) -> torch.nn.Module:
    """Method ``name`` applied to a copy of ``base`` and deployed as a user would, warmed up once; its op
    count goes into ``ops`` with ``--count-ops``."""
    config, how = METHODS[name]
    torch.manual_seed(0)
    model = deploy(base, config, how)
    _time(model, prompts[:1], cfg, args.device, 1)  # warm-up (first-call allocations)
    if args.count_ops:
        ops[name] = decode_step_ops(model, prompts, args.device)
    return model


def _time_interleaved(base: torch.nn.Module, args: argparse.Namespace, prompts: list[list[int]], cfg: Any,
                      ops: dict[str, Any]) -> dict[str, float]:
    """Every model timed once per round, ``args.repeats`` rounds; each one's fastest round (seconds)."""
    models = {"base": base, **{n: _deployed(base, n, args, prompts, cfg, ops) for n in args.methods}}
    models["base (again)"] = base
    best = dict.fromkeys(models, float("inf"))
    for _ in range(args.repeats):
        for name, model in models.items():
            best[name] = min(best[name], _time(model, prompts, cfg, args.device, 1))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_decode_args(ap, repeats=3)
    ap.add_argument("--methods", nargs="*", default=list(METHODS), help=f"subset of {list(METHODS)}")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--out", default=None, help="directory for decode_methods.json and decode_methods.png")
    ap.add_argument("--count-ops", action="store_true", help="also count the aten ops of one decode step per model")
    ap.add_argument("--interleave", action="store_true",
                    help="build every model first, then time them in turn, round after round (base first and last "
                         "in each round), and keep each one's fastest round: host noise then hits all models alike")
    args = ap.parse_args()
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        ap.error(f"unknown --methods {unknown}; known: {list(METHODS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    base, prompts, cfg = decode_setup(args)
    _time(base, prompts, cfg, args.device, 1)  # warm-up (CUDA context, kernels, first-call allocations)
    ops = {"base": decode_step_ops(base, prompts, args.device)} if args.count_ops else {}
    if args.interleave:
        seconds = _time_interleaved(base, args, prompts, cfg, ops)
    else:
        seconds = {"base": _time(base, prompts, cfg, args.device, args.repeats)}
        for name in args.methods:
            model = _deployed(base, name, args, prompts, cfg, ops)
            seconds[name] = _time(model, prompts, cfg, args.device, args.repeats)
            del model
        seconds["base (again)"] = _time(base, prompts, cfg, args.device, args.repeats)
    ref = statistics.mean([seconds["base"], seconds["base (again)"]])
    n_tokens = args.batch * args.new_tokens
    rows = []
    for name, s in seconds.items():
        how = METHODS[name][1] if name in METHODS else "-"
        rows.append({"model": name, "deployed": how, "seconds": s, "tokens_per_s": n_tokens / s, "time_vs_base": s / ref})
        if name in ops:
            rows[-1]["ops_per_step"] = ops[name]
            rows[-1]["extra_ops_per_step"] = ops[name]["top_level"] - ops["base"]["top_level"]
    how_timed = f"fastest of {args.repeats} interleaved rounds" if args.interleave else f"median of {args.repeats}"
    head = (f"{args.shape} batch {args.batch} prompt {args.prompt_len} new {args.new_tokens} {args.dtype} "
            f"{args.device} threads {torch.get_num_threads()}, {how_timed}")
    print(head)
    extra = " aten ops per decode step (top-level / all) | top-level ops vs base |" if ops else ""
    print("| model | deployed | tokens/s | time vs base |" + extra)
    print("|---|---|---|---|" + ("---|---|" if ops else ""))
    for r in rows:
        cells = ""
        if "ops_per_step" in r:
            cells = f" {r['ops_per_step']['top_level']} / {r['ops_per_step']['all']} | {r['extra_ops_per_step']:+d} |"
        elif ops:
            cells = " | |"
        print(f"| {r['model']} | {r['deployed']} | {r['tokens_per_s']:.1f} | {r['time_vs_base']:.2f}x |{cells}")
    noise = abs(seconds["base (again)"] / seconds["base"] - 1)
    over = [r["model"] for r in rows if r["deployed"] == "as-is" and r["time_vs_base"] > NON_MERGEABLE_BUDGET]
    print(f"noise (base timed twice): {noise:.1%}; over the {NON_MERGEABLE_BUDGET}x budget: {over or 'none'}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "decode_methods.json").write_text(
            json.dumps({"args": vars(args), "rows": rows, "noise": noise, "over_budget": over}, indent=2)
        )
        plot(rows, out / "decode_methods.png", head)
        print(f"wrote {out / 'decode_methods.json'} and {out / 'decode_methods.png'}")


if __name__ == "__main__":
    main()
