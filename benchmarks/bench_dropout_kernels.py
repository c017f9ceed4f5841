"""The LoRA dropout kernels alone (``kernels/dropout_triton.py``) on the step benchmark's shapes, CUDA only.

For each shape ``(N tokens, K input features, R rank)`` it times the three A-side operations of one LoRA
module's step, ``xa = drop(x) @ A^T`` (forward), ``dA = dxa^T @ drop(x)`` and ``dx += drop'(dxa @ A)``
(backward):

* ``cublas``: no dropout, cuBLAS (what the step costs without dropout: the floor);
* ``native``: ``torch.native_dropout`` then cuBLAS, the dropped copy and the mask kept (the unfused path);
* ``triton bits/rounds``: the fused kernels for each mask setting (``DELTATUNE_DROPOUT_BITS``/``_ROUNDS``);
* with ``--sweep``, every tile in a small grid for each kernel (the mask setting given by ``--sweep-rng``),
  and the tiles with the least time summed over the shapes, printed as a ``DELTATUNE_DROPOUT_TILES`` value
  (and written to ``--tiles-out``) for the step benchmark to run with.

Times are medians of ``triton.testing.do_bench`` (ms). Prints a table; ``--json`` writes every number.

    python bench_dropout_kernels.py --sweep --json out.json --tiles-out tiles.env
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from deltatune.kernels import dropout_triton as T  # noqa: E402
from deltatune.kernels.common import mm_in  # noqa: E402

SHAPES = {  # name: (N, K, R)
    "llama1b-h2048": (16384, 2048, 16),
    "llama1b-h8192": (16384, 8192, 16),
    "smollm2-h576": (16384, 576, 16),
    "smollm2-h1536": (16384, 1536, 16),
}
RNGS = [T.RngSetting(24, 10), T.RngSetting(16, 10), T.RngSetting(16, 7)]
GRID = [T.Tile(r, c, w) for r, c, w in itertools.product((32, 64, 128), (64, 128), (4, 8))]


def _bench(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))


def _tensors(n: int, k: int, r: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(0)
    return {
        "x": torch.randn(n, k, device="cuda", generator=g).to(dtype),
        "A": (torch.randn(r, k, device="cuda", generator=g) * 0.02).to(dtype),
        "dxa": torch.randn(n, r, device="cuda", generator=g).to(dtype),
        "dx": torch.randn(n, k, device="cuda", generator=g).to(dtype),
        "seed": T.draw_seed(torch.device("cuda")),
    }


def time_cublas(t: dict[str, torch.Tensor]) -> dict[str, float]:
    x, A, dxa, dx = t["x"], t["A"], t["dxa"], t["dx"]
    return {
        "xa": _bench(lambda: torch.nn.functional.linear(x, A)),
        "da": _bench(lambda: mm_in(torch.float32, dxa.t(), x)),
        "dx": _bench(lambda: dx.addmm_(dxa, A)),
    }


def time_native(t: dict[str, torch.Tensor], p: float) -> dict[str, float]:
    x, A, dxa, dx = t["x"], t["A"], t["dxa"], t["dx"]
    xd, mask = torch.native_dropout(x, p, True)
    return {
        "xa": _bench(lambda: torch.nn.functional.linear(torch.native_dropout(x, p, True)[0], A)),
        "da": _bench(lambda: mm_in(torch.float32, dxa.t(), xd)),
        "dx": _bench(lambda: dx.add_(torch.ops.aten.native_dropout_backward(dxa @ A, mask, 1.0 / (1.0 - p)))),
    }


def time_triton(t: dict[str, torch.Tensor], p: float, rng: T.RngSetting) -> dict[str, float]:
    x, A, dxa, dx, seed = t["x"], t["A"], t["dxa"], t["dx"], t["seed"]
    return {
        "xa": _bench(lambda: T.dropped_xa(x, A, seed, p, rng)),
        "da": _bench(lambda: T.dropped_grad_A(dxa, x, seed, p, rng)),
        "dx": _bench(lambda: T.add_dropped_grad_x(dx, dxa, A, seed, p, rng)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated of {', '.join(SHAPES)}")
    ap.add_argument("--p", type=float, default=0.05)
    ap.add_argument("--sweep", action="store_true", help="time every tile of the grid for each kernel")
    ap.add_argument("--sweep-shapes", default="llama1b-h2048,llama1b-h8192")
    ap.add_argument("--sweep-rng", default="16,7", help="BITS,ROUNDS of the mask during the sweep")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--tiles-out", type=Path, help="write DELTATUNE_DROPOUT_TILES=... of the best tiles here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or not T.TRITON_DROPOUT:
        print("bench_dropout_kernels: needs CUDA and triton; nothing measured")
        return 0
    dtype = torch.bfloat16
    result: dict[str, object] = {"device": torch.cuda.get_device_name(), "p": args.p, "shapes": {}}
    print(f"{'shape':<15} {'variant':<16} {'xa ms':>8} {'dA ms':>8} {'dx ms':>8} {'sum':>8} {'vs cublas':>9}")
    for name in args.shapes.split(","):
        n, k, r = SHAPES[name]
        t = _tensors(n, k, r, dtype)
        rows = {"cublas": time_cublas(t), "native": time_native(t, args.p)}
        for rng in RNGS:
            rows[f"triton {rng.bits}/{rng.rounds}"] = time_triton(t, args.p, rng)
        floor = sum(rows["cublas"].values())
        for variant, ms in rows.items():
            tot = sum(ms.values())
            print(f"{name:<15} {variant:<16} {ms['xa']:8.4f} {ms['da']:8.4f} {ms['dx']:8.4f} {tot:8.4f} {tot / floor:9.3f}")
        result["shapes"][name] = rows  # type: ignore[index]
        del t
    if args.sweep:
        bits, rounds = (int(v) for v in args.sweep_rng.split(","))
        rng = T.RngSetting(bits, rounds)
        shapes = args.sweep_shapes.split(",")
        data = {s: _tensors(*SHAPES[s], dtype) for s in shapes}
        calls = {  # kernel: what one call of it takes from a shape's tensors
            "xa": lambda d: T.dropped_xa(d["x"], d["A"], d["seed"], args.p, rng),
            "da": lambda d: T.dropped_grad_A(d["dxa"], d["x"], d["seed"], args.p, rng),
            "dx": lambda d: T.add_dropped_grad_x(d["dx"], d["dxa"], d["A"], d["seed"], args.p, rng),
        }
        sweep: dict[str, dict[str, float]] = {}
        best: dict[str, T.Tile] = {}
        default = dict(T.TILES)
        for kern, call in calls.items():
            sweep[kern] = {}
            for tile in GRID:
                T.TILES = {**default, kern: tile}
                total = 0.0
                for s in shapes:
                    total += _bench(lambda d=data[s], call=call: call(d))
                sweep[kern][f"{tile.rows}x{tile.cols}x{tile.warps}"] = total
            T.TILES = default
            label = min(sweep[kern], key=sweep[kern].get)
            best[kern] = T.Tile(*(int(v) for v in label.split("x")))
            now = sweep[kern]["64x64x4"]
            print(f"sweep {kern}: best {label} {sweep[kern][label]:.4f} ms vs 64x64x4 {now:.4f} ms "
                  f"(summed over {', '.join(shapes)}; mask {bits} bits, {rounds} rounds)")
        value = ",".join(f"{kern}={t.rows}x{t.cols}x{t.warps}" for kern, t in best.items())
        print(f"DELTATUNE_DROPOUT_TILES={value}")
        result["sweep"] = {"rng": [bits, rounds], "shapes": shapes, "ms": sweep, "best": value}
        if args.tiles_out:
            args.tiles_out.write_text(f"DELTATUNE_DROPOUT_TILES={value}\n")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
