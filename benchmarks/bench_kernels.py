"""Micro-benchmark of deltatune's fast-path kernels (CPU or GPU).

1. ``lora_linear`` vs the naive PEFT-style composition ``base(x) + lora_B(lora_A(dropout(x))) * s``:
   forward+backward time and bytes kept for the backward (unique storages, parameters excluded), with
   and without dropout, adapters in the activation dtype and in fp32 (PEFT upcasts ``x`` to them);
   plus the "recompute xa in backward" variant, to justify saving the (N, r) product.
2. ``linear_cross_entropy`` vs ``F.cross_entropy(hidden @ W.T)``: time and peak memory of
   forward+backward. On CUDA the peak is ``torch.cuda.max_memory_allocated``; on CPU each variant runs in a
   fresh subprocess and the peak is the growth of the process's max RSS.

Usage::

    python benchmarks/bench_kernels.py                       # CPU defaults
    python benchmarks/bench_kernels.py --device cuda --dtype bfloat16 --tokens 8192 --features 4096
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from deltatune.kernels import linear_cross_entropy, lora_linear
from deltatune.kernels.lora_autograd import run_lora

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _clock(device: str) -> float:
    # On CPU the process CPU time (all intra-op threads) is far less sensitive to other processes on a
    # shared machine than wall time; on CUDA the wall time after a synchronize is what counts.
    return time.perf_counter() if device.startswith("cuda") else time.process_time()


def _time(fn, device: str, repeats: int) -> float:
    return _time_many({"f": fn}, device, repeats)["f"]


def _time_many(fns: dict, device: str, repeats: int) -> dict:
    """Best-of-``repeats`` time of each function, the variants interleaved round by round."""
    for fn in fns.values():
        fn()  # warm-up
    _sync(device)
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = _clock(device)
            fn()
            _sync(device)
            best[name] = min(best[name], _clock(device) - t0)
    return best


def _saved_bytes(fn, exclude: set[int]) -> int:
    storages: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in exclude:
            storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


def bench_lora(args: argparse.Namespace) -> list[dict]:
    dev, dt = args.device, DTYPES[args.dtype]
    n, d, r = args.tokens, args.features, args.rank
    torch.manual_seed(0)
    W = torch.randn(d, d, device=dev, dtype=dt) / d**0.5
    x0 = torch.randn(n, d, device=dev, dtype=dt)
    rows = []
    for adapter_dtype in (dt, torch.float32) if dt != torch.float32 else (dt,):
        A = (torch.randn(r, d, device=dev, dtype=adapter_dtype) / d**0.5).requires_grad_()
        B = torch.randn(d, r, device=dev, dtype=adapter_dtype).requires_grad_()
        params = {t.untyped_storage().data_ptr() for t in (W, A, B)}
        for p in (0.0, 0.05):
            x = x0.clone().requires_grad_()

            def naive(x=x, A=A, B=B, p=p):
                xa = F.dropout(x.to(A.dtype), p, True) if p else x.to(A.dtype)
                return F.linear(x, W) + (F.linear(F.linear(xa, A), B) * 2.0).to(x.dtype)

            def ours(x=x, A=A, B=B, p=p):
                return lora_linear(x, W, None, A, B, 2.0, p, True)

            def ours_recompute(x=x, A=A, B=B, p=p):
                return run_lora(x, A, [W], [None], [B], ((0, 0, d, 0, r),), [2.0], p, True, None, False, True)[0]

            def step(f, x=x, A=A, B=B):
                y = f()
                y.backward(torch.ones_like(y))
                x.grad = None
                A.grad = None
                B.grad = None

            t = _time_many(
                {
                    "naive": lambda f=naive: step(f),
                    "ours": lambda f=ours: step(f),
                    "recompute": lambda f=ours_recompute: step(f),
                },
                dev,
                args.repeats,
            )
            row = {
                "adapters": str(adapter_dtype).replace("torch.", ""),
                "dropout": p,
                "naive_ms": 1e3 * t["naive"],
                "ours_ms": 1e3 * t["ours"],
                "ours_recompute_xa_ms": 1e3 * t["recompute"],
                "naive_saved_MiB": _saved_bytes(naive, params) / 2**20,
                "ours_saved_MiB": _saved_bytes(ours, params) / 2**20,
            }
            row["saved_ratio"] = row["ours_saved_MiB"] / row["naive_saved_MiB"]
            row["speedup"] = row["naive_ms"] / row["ours_ms"]
            rows.append(row)
    return rows


def _ce_inputs(args: argparse.Namespace):
    torch.manual_seed(0)
    dev, dt = args.device, DTYPES[args.dtype]
    hid = torch.randn(args.ce_tokens, args.ce_hidden, device=dev, dtype=dt, requires_grad=True)
    w = (torch.randn(args.vocab, args.ce_hidden, device=dev, dtype=dt) / args.ce_hidden**0.5).requires_grad_(
        args.ce_weight_grad
    )
    labels = torch.randint(0, args.vocab, (args.ce_tokens,), device=dev)
    labels[::7] = -100
    return hid, w, labels


def _ce_step(kind: str, hid, w, labels, chunk) -> None:
    if kind == "ours":
        loss = linear_cross_entropy(hid, w, labels, chunk_size=chunk)
    else:
        loss = F.cross_entropy((hid @ w.t()).float(), labels)
    loss.backward()


def ce_worker(args: argparse.Namespace) -> None:
    """Run one CE variant once in this (fresh) process and print its peak memory growth as JSON."""
    hid, w, labels = _ce_inputs(args)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _ce_step(args.ce_worker, hid, w, labels, args.chunk)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        _ce_step(args.ce_worker, hid, w, labels, args.chunk)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    t = _time(lambda: _ce_step(args.ce_worker, hid, w, labels, args.chunk), args.device, args.repeats)
    print(json.dumps({"peak_MiB": peak / 2**20, "ms": 1e3 * t}))


def bench_ce(args: argparse.Namespace) -> dict:
    out = {}
    for kind in ("ref", "ours"):
        cmd = [sys.executable, __file__, "--ce-worker", kind] + _passthrough(args)
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[kind] = json.loads(res.stdout.strip().splitlines()[-1])
    logits_mib = args.ce_tokens * args.vocab * 4 / 2**20
    return {
        "tokens": args.ce_tokens,
        "vocab": args.vocab,
        "fp32_logits_MiB": logits_mib,
        "ref_peak_MiB": out["ref"]["peak_MiB"],
        "ours_peak_MiB": out["ours"]["peak_MiB"],
        "ref_ms": out["ref"]["ms"],
        "ours_ms": out["ours"]["ms"],
    }


def _passthrough(args: argparse.Namespace) -> list[str]:
    items = [
        "--device", args.device, "--dtype", args.dtype, "--repeats", str(args.repeats),
        "--ce-tokens", str(args.ce_tokens), "--ce-hidden", str(args.ce_hidden), "--vocab", str(args.vocab),
    ]  # fmt: skip
    if args.chunk is not None:
        items += ["--chunk", str(args.chunk)]
    if args.ce_weight_grad:
        items.append("--ce-weight-grad")
    return items


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--tokens", type=int, default=2048, help="rows of x for lora_linear")
    ap.add_argument("--features", type=int, default=1024, help="in = out features for lora_linear")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ce-tokens", type=int, default=2048)
    ap.add_argument("--ce-hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--chunk", type=int, default=None)
    ap.add_argument("--ce-weight-grad", action="store_true", help="train the output projection too")
    ap.add_argument("--ce-worker", choices=["ours", "ref"], help=argparse.SUPPRESS)
    ap.add_argument("--skip-ce", action="store_true")
    ap.add_argument("--skip-lora", action="store_true")
    args = ap.parse_args(argv)
    if args.ce_worker:
        ce_worker(args)
        return
    print(
        f"torch {torch.__version__}, device {args.device}, dtype {args.dtype}, threads {torch.get_num_threads()}"
    )
    clock = "wall time" if args.device.startswith("cuda") else "process CPU time (all threads)"
    print(f"times: best of {args.repeats}, {clock}")
    if not args.skip_lora:
        print(
            f"\nlora_linear: N={args.tokens} tokens, in=out={args.features}, r={args.rank}, fwd+bwd, best of {args.repeats}"
        )
        hdr = f"{'adapters':>9} {'drop':>5} {'naive ms':>9} {'ours ms':>8} {'recomp ms':>9} {'speedup':>7} {'naive MiB':>9} {'ours MiB':>8} {'ratio':>6}"
        print(hdr)
        for r in bench_lora(args):
            print(
                f"{r['adapters']:>9} {r['dropout']:>5.2f} {r['naive_ms']:>9.2f} {r['ours_ms']:>8.2f} "
                f"{r['ours_recompute_xa_ms']:>9.2f} {r['speedup']:>7.2f} {r['naive_saved_MiB']:>9.2f} "
                f"{r['ours_saved_MiB']:>8.2f} {r['saved_ratio']:>6.3f}"
            )
    if not args.skip_ce:
        c = bench_ce(args)
        print(
            f"\nlinear_cross_entropy: N={c['tokens']}, H={args.ce_hidden}, V={c['vocab']} "
            f"(fp32 logits alone = {c['fp32_logits_MiB']:.0f} MiB), weight trainable={args.ce_weight_grad}"
        )
        print(f"  F.cross_entropy(hidden @ W.T): peak {c['ref_peak_MiB']:8.1f} MiB  {c['ref_ms']:8.1f} ms")
        print(f"  linear_cross_entropy        : peak {c['ours_peak_MiB']:8.1f} MiB  {c['ours_ms']:8.1f} ms")


if __name__ == "__main__":
    main()
