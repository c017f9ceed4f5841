"""deltatune side of the MindPet parity lane (runs with the project's python).

Reads the .npz files mindspore_side.py wrote (MindPet's weights, inputs, cotangents, outputs and
gradients), rebuilds every case with deltatune.compat.mindpet, loads the same weights, computes the
output and the gradients of sum(output * g), and prints a table. A row passes when
max|deltatune - MindPet| <= 1e-5 * max(1, max|MindPet|) for the output and for every gradient (fp32).
Exits 1 if any row fails (or a case is missing), else 0.

Usage: python deltatune_side.py WORKDIR
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from deltatune.compat import mindpet as mp

TOL = 1e-5
F32 = torch.float32

# MindPet parameter name -> deltatune shell parameter name (first match wins)
_RULES = [
    (r"^mindpet_delta_lora_a$", "dense.lora_A.default.weight"),
    (r"^mindpet_delta_lora_b$", "dense.lora_B.default.weight"),
    (r"low_rank_adapter_(down|up)_sampler\.mindpet_delta_low_rank_adapter_weight_(left|right)$",
     r"block.low_rank_adapter_\1.default.w_\2"),
    (r"low_rank_adapter_(down|up)_sampler\.bias$", r"block.low_rank_adapter_\1.default.bias"),
    (r"mindpet_delta_adapter_(down|up)_sampler\.(weight|bias)$", r"block.adapter_\1.default.\2"),
    (r"prefixtuning_wte\.embedding_table$", "prefix_encoder.embedding.weight"),
    (r"prefixtuning_control_trans\.(\d)\.(weight|bias)$", r"prefix_encoder.mlp.\1.\2"),
    (r"ptuning2_embedding\.embedding_table$", "ptuning_encoder.embedding.weight"),
    (r"ptuning2_dense_in\.(weight|bias)$", r"ptuning_encoder.mlp.0.\1"),
    (r"ptuning2_dense_out\.(weight|bias)$", r"ptuning_encoder.mlp.2.\1"),
]


def our_name(case: str, name: str) -> str:
    if name in ("weight", "bias"):
        return f"dense.base_layer.{name}" if case.startswith("LoRADense") else f"block.base_layer.linear.{name}"
    for pattern, repl in _RULES:
        if re.search(pattern, name):
            return re.sub(r".*?" + pattern if not pattern.startswith("^") else pattern, repl, name)
    raise KeyError(f"no deltatune name for MindPet parameter {name!r} of {case}")


def build(case: str) -> tuple[nn.Module, str]:
    """The deltatune shell for a case and how it is called."""
    kw = {"compute_dtype": F32}
    return {
        "LoRADense": (lambda: mp.LoRADense(8, 6, lora_rank=4, lora_alpha=8, lora_dropout=0.0, **kw), "x"),
        "LoRADense_gelu": (lambda: mp.LoRADense(8, 6, lora_rank=2, lora_alpha=3, lora_dropout=0.0, activation="gelu",
                                                **kw), "x"),
        "AdapterDense": (lambda: mp.AdapterDense(8, 6, bottleneck_size=4, **kw), "x"),
        "AdapterDense_relu": (lambda: mp.AdapterDense(8, 6, bottleneck_size=3, non_linearity="relu", activation="relu",
                                                      **kw), "x"),
        "AdapterLayer": (lambda: mp.AdapterLayer(8, 3, **kw), "x"),
        "LowRankAdapterDense": (lambda: mp.LowRankAdapterDense(8, 6, reduction_factor=3, low_rank_size=1, **kw), "x"),
        "LowRankAdapterLayer": (lambda: mp.LowRankAdapterLayer(8, 2, low_rank_size=2, **kw), "x"),
        "PrefixLayer": (lambda: mp.PrefixLayer(4, 2, 2, 10, 6, mid_dim=5, dropout_rate=0.0), "prefix"),
        "PrefixEncoder_ptuning2_proj": (lambda: mp.PrefixEncoder(3, 2, 2, 4, True, 5, 0.0), "pt2"),
        "PrefixEncoder_ptuning2_noproj": (lambda: mp.PrefixEncoder(3, 2, 2, 4, False, 5, 0.0), "pt2"),
        "RDropLoss_2pairs": (mp.RDropLoss, "rdrop"),
        "RDropLoss_4pairs": (mp.RDropLoss, "rdrop"),
        "RDropLoss_8pairs": (mp.RDropLoss, "rdrop"),
        "rdrop_repeat": (nn.Identity, "repeat"),
    }[case][0](), {
        "LoRADense": "x", "LoRADense_gelu": "x", "AdapterDense": "x", "AdapterDense_relu": "x", "AdapterLayer": "x",
        "LowRankAdapterDense": "x", "LowRankAdapterLayer": "x", "PrefixLayer": "prefix",
        "PrefixEncoder_ptuning2_proj": "pt2", "PrefixEncoder_ptuning2_noproj": "pt2", "RDropLoss_2pairs": "rdrop",
        "RDropLoss_4pairs": "rdrop", "RDropLoss_8pairs": "rdrop", "rdrop_repeat": "repeat",
    }[case]


def load_weights(case: str, model: nn.Module, data: dict[str, np.ndarray], key: str = "w:") -> dict[str, str]:
    params = dict(model.named_parameters())
    names = {}
    with torch.no_grad():
        for k, v in data.items():
            if k.startswith(key):
                ours = our_name(case, k[len(key):])
                params[ours].copy_(torch.from_numpy(np.array(v)))
                names[k[len(key):]] = ours
    return names


def forward(kind: str, model: nn.Module, inputs: list[torch.Tensor]) -> torch.Tensor:
    if kind == "x":
        return model(inputs[0])
    if kind == "prefix":
        return model()
    if kind == "pt2":
        return torch.stack(model(2, F32), 0)
    if kind == "rdrop":
        return model(inputs[0], inputs[1], 4)
    return mp.rdrop_repeat(inputs[0])[0]


def scaled_diff(ours: torch.Tensor, ref: np.ndarray) -> float:
    ref_t = torch.from_numpy(np.array(ref, dtype=np.float32))
    ours = ours.detach().to(F32).reshape(ref_t.shape)
    return float((ours - ref_t).abs().max() / max(1.0, float(ref_t.abs().max())))


def compare_case(case: str, data: dict[str, np.ndarray]) -> tuple[float, float]:
    model, kind = build(case)
    model.eval()
    names = load_weights(case, model, data)
    inputs = []
    i = 0
    while f"x{i}" in data:
        x = torch.from_numpy(np.array(data[f"x{i}"]))
        if x.is_floating_point():
            x.requires_grad_(True)
        else:
            x = x.long()
        inputs.append(x)
        i += 1
    out = forward(kind, model, inputs)
    d_out = scaled_diff(out, data["out"])
    g = torch.from_numpy(np.array(data["g"], dtype=np.float32))
    (out * g).sum().backward()
    d_grad = 0.0
    for k, v in data.items():
        if k.startswith("gx"):
            d_grad = max(d_grad, scaled_diff(inputs[int(k[2:])].grad, v))
        elif k.startswith("gw:"):
            p = dict(model.named_parameters())[names[k[3:]]]
            d_grad = max(d_grad, scaled_diff(p.grad, v))
    return d_out, d_grad


def prefix_init_time(data: dict[str, np.ndarray]) -> float:
    """MindPet's PrefixLayer computes past_key_reparam once in __init__: same from its init weights?"""
    model, _ = build("PrefixLayer")
    model.eval()
    load_weights("PrefixLayer", model, data, key="w0:")
    with torch.no_grad():
        return max(scaled_diff(model.past_key_reparam, data["past_key_reparam"]),
                   scaled_diff(model.past_value_reparam, data["past_value_reparam"]))


class _FreezeNet(nn.Module):
    def __init__(self, delta: nn.Module) -> None:
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.delta = delta
        self.head = nn.Linear(8, 3)


def freeze_counts(mode: str) -> dict[str, int]:
    delta = {
        "lora": lambda: mp.LoRADense(8, 8, lora_rank=2, lora_alpha=4, compute_dtype=F32),
        "adapter": lambda: mp.AdapterDense(8, 8, bottleneck_size=3, compute_dtype=F32),
        "low_rank_adapter": lambda: mp.LowRankAdapterDense(8, 8, reduction_factor=2, compute_dtype=F32),
        "prefixtuning": lambda: mp.PrefixLayer(4, 2, 2, 10, 6, mid_dim=5, dropout_rate=0.0),
        "ptuning2": lambda: mp.PrefixEncoder(3, 2, 2, 4, True, 5, 0.0),
        "bitfit": lambda: nn.Linear(8, 8),
    }[mode]()
    net = _FreezeNet(delta)
    mp.freeze_delta(net, mode, exclude=["*head*"] if mode != "bitfit" else None)
    counts: dict[str, int] = {}
    for name, p in net.named_parameters():
        child = name.split(".")[0]
        counts[child] = counts.get(child, 0) + (p.numel() if p.requires_grad else 0)
    return counts


def main(workdir: str) -> int:
    work = Path(workdir)
    rows: list[tuple[str, str, str, bool]] = []
    cases = ["LoRADense", "LoRADense_gelu", "AdapterDense", "AdapterDense_relu", "AdapterLayer", "LowRankAdapterDense",
             "LowRankAdapterLayer", "PrefixLayer", "PrefixEncoder_ptuning2_proj", "PrefixEncoder_ptuning2_noproj",
             "RDropLoss_2pairs", "RDropLoss_4pairs", "RDropLoss_8pairs", "rdrop_repeat"]
    for case in cases:
        path = work / f"{case}.npz"
        if not path.is_file():
            rows.append((case, "missing", "missing", False))
            continue
        data = dict(np.load(path))
        d_out, d_grad = compare_case(case, data)
        rows.append((case, f"{d_out:.1e}", f"{d_grad:.1e}", d_out <= TOL and d_grad <= TOL))
        if case == "PrefixLayer":
            d0 = prefix_init_time(data)
            rows.append(("PrefixLayer past_key/value_reparam (MindPet's init-time)", f"{d0:.1e}", "-", d0 <= TOL))
    for mode in mp.DELTA_LIST:
        path = work / f"freeze_delta_{mode}.npz"
        if not path.is_file():
            rows.append((f"freeze_delta {mode}", "missing", "-", False))
            continue
        want = {k.split(":", 1)[1]: int(v) for k, v in np.load(path).items()}
        got = freeze_counts(mode)
        ok = got == want
        rows.append((f"freeze_delta {mode!r} (trainable per child)",
                     ", ".join(f"{k} {got.get(k)}/{want[k]}" for k in sorted(want)), "-", ok))
    w = max(len(r[0]) for r in rows)
    w1 = max(len("max abs Δ output"), *(len(r[1]) for r in rows))
    print(f"| {'MindPet cell':<{w}} | {'max abs Δ output':<{w1}} | max abs Δ gradient | within 1e-5 |")
    print(f"|{'-' * (w + 2)}|{'-' * (w1 + 2)}|--------------------|-------------|")
    for name, a, b, ok in rows:
        print(f"| {name:<{w}} | {a:<{w1}} | {b:<18} | {'yes' if ok else 'NO':<11} |")
    failed = [r[0] for r in rows if not r[3]]
    print(f"[mindpet-parity] {len(rows) - len(failed)}/{len(rows)} rows within 1e-5 (Δ scaled by max(1, max|MindPet|))")
    if failed:
        print(f"[mindpet-parity] FAILED: {failed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
