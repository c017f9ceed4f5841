"""MindSpore side of the MindPet parity lane (runs in the MindSpore venv, never in the project's).

For every MindPet delta cell: build it (fp32), give it seeded weights and inputs, compute its output and
the gradients of sum(output * g) (g a seeded cotangent) with respect to the inputs and every trainable
parameter, and write all of it to <workdir>/<case>.npz. For freeze_delta: build a small network per mode,
call MindPet's freeze_delta and record how many parameters of each child train. deltatune_side.py reads
these files, rebuilds each case with deltatune's shells and compares.

Usage: python mindspore_side.py WORKDIR
"""

from __future__ import annotations

import sys
from pathlib import Path

# --- MindPet 1.0.4 on MindSpore 2.10: two bugs, patched here in the harness (the installed package is untouched)
import mindpet.delta.low_rank_adapter as _lra  # noqa: E402
import mindpet.delta.r_drop as _rdrop  # noqa: E402
import mindspore as ms
import mindspore.common.dtype as mstype
import numpy as np
from mindspore import Tensor, nn, ops

_lra_init = _lra.LowRankLinear.__init__


def _lra_init_with_cast(self, *args, **kwargs):
    # Bug 1: LowRankLinear.construct calls self.cast, which its __init__ never creates (MindSpore's old
    # nn.Cell provided one); give each instance a Cast primitive.
    _lra_init(self, *args, **kwargs)
    self.cast = ops.Cast()


_lra.LowRankLinear.__init__ = _lra_init_with_cast


def _rdrop_repeat(*items):
    # Bug 2: rdrop_repeat calls item.repeat(2, axis=0), numpy's signature; MindSpore 2.10's Tensor.repeat
    # is torch-like and has no axis. numpy's repeat along axis 0 is repeat_interleave.
    return tuple(ops.repeat_interleave(item, 2, 0) for item in items)


_rdrop.rdrop_repeat = _rdrop_repeat

from mindpet.delta import (  # noqa: E402
    AdapterDense,
    AdapterLayer,
    LoRADense,
    LowRankAdapterDense,
    LowRankAdapterLayer,
    RDropLoss,
)
from mindpet.delta.prefix_layer import PrefixLayer  # noqa: E402
from mindpet.delta.ptuning2 import PrefixEncoder  # noqa: E402
from mindpet.graph import freeze_delta  # noqa: E402

F32 = mstype.float32
ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")


def seeded(seed: int, shape, scale: float = 0.5) -> np.ndarray:
    return np.random.RandomState(seed).normal(0.0, scale, shape).astype(np.float32)


def set_weights(cell: nn.Cell, seed: int) -> dict[str, np.ndarray]:
    out = {}
    for i, (name, p) in enumerate(cell.parameters_and_names()):
        if not p.requires_grad:
            continue
        arr = seeded(seed + i, p.shape)
        p.set_data(Tensor(arr))
        out[name] = arr
    return out


def run_case(path: Path, cell: nn.Cell, forward, inputs: list[np.ndarray], grad_inputs: list[int], seed: int,
             extra: dict[str, np.ndarray] | None = None) -> None:
    cell.set_train(False)
    weights = set_weights(cell, seed)
    params = [p for _, p in cell.parameters_and_names() if p.requires_grad]
    names = [n for n, p in cell.parameters_and_names() if p.requires_grad]
    tensors = [Tensor(x) for x in inputs]
    out = forward(cell, *tensors)
    out_np = out.asnumpy()
    g = seeded(seed + 1000, out_np.shape, 1.0) if out_np.ndim else np.float32(1.0)

    def loss(*xs):
        return (forward(cell, *xs) * Tensor(g)).sum()

    fn = ms.value_and_grad(loss, grad_position=tuple(grad_inputs) if grad_inputs else None,
                           weights=params if params else None)
    _, grads = fn(*tensors)
    data = {"out": out_np, "g": np.asarray(g)}
    if grad_inputs and params:
        gx, gw = grads
    elif grad_inputs:
        gx, gw = grads, ()
    else:
        gx, gw = (), grads
    if grad_inputs and not isinstance(gx, tuple):
        gx = (gx,)
    for i, x in enumerate(inputs):
        data[f"x{i}"] = x
    for i, gi in zip(grad_inputs, gx):
        data[f"gx{i}"] = gi.asnumpy()
    for n, w in weights.items():
        data[f"w:{n}"] = w
    for n, gp in zip(names, gw):
        data[f"gw:{n}"] = gp.asnumpy()
    data.update(extra or {})
    np.savez(path, **data)


def dense_forward(cell, x):
    return cell(x)


def prefix_forward(cell, _x):
    tokens = cell.input_tokens
    return cell.mindpet_delta_prefixtuning_control_trans(cell.mindpet_delta_prefixtuning_wte(tokens))


def pt2_forward(cell, _x):
    return ops.stack(cell(2, F32), 0)


def rdrop_forward(cell, logits, labels):
    return cell(logits, labels, 4)


def repeat_forward(_cell, x):
    return _rdrop.rdrop_repeat(x)[0]


class _Empty(nn.Cell):
    def construct(self, x):
        return x


def main(workdir: str) -> None:
    out = Path(workdir)
    x3 = seeded(1, (2, 3, 8), 1.0)
    cases = [
        ("LoRADense", LoRADense(8, 6, lora_rank=4, lora_alpha=8, lora_dropout=0.0, compute_dtype=F32), dense_forward, [x3]),
        ("LoRADense_gelu", LoRADense(8, 6, lora_rank=2, lora_alpha=3, lora_dropout=0.0, compute_dtype=F32,
                                     activation="gelu"), dense_forward, [x3]),
        ("AdapterDense", AdapterDense(8, 6, bottleneck_size=4, compute_dtype=F32), dense_forward, [x3]),
        ("AdapterDense_relu", AdapterDense(8, 6, bottleneck_size=3, non_linearity="relu", activation="relu",
                                           compute_dtype=F32), dense_forward, [x3]),
        ("AdapterLayer", AdapterLayer(8, 3, compute_dtype=F32), dense_forward, [x3]),
        ("LowRankAdapterDense", LowRankAdapterDense(8, 6, reduction_factor=3, low_rank_size=1, compute_dtype=F32),
         dense_forward, [x3]),
        ("LowRankAdapterLayer", LowRankAdapterLayer(8, 2, low_rank_size=2, compute_dtype=F32), dense_forward, [x3]),
    ]
    for i, (name, cell, fwd, inputs) in enumerate(cases):
        run_case(out / f"{name}.npz", cell, fwd, inputs, [0], seed=100 * (i + 1))
    # PrefixLayer: MindPet computes past_key_reparam once in __init__; record it with the weights it was made
    # from (dropout 0), and the MLP output and its gradients with the seeded weights
    prefix = PrefixLayer(4, 2, 2, 10, 6, mid_dim=5, dropout_rate=0.0)
    init_w = {f"w0:{n}": p.asnumpy() for n, p in prefix.parameters_and_names() if p.requires_grad}
    init_w["past_key_reparam"] = prefix.past_key_reparam.asnumpy()
    init_w["past_value_reparam"] = prefix.past_value_reparam.asnumpy()
    run_case(out / "PrefixLayer.npz", prefix, prefix_forward, [np.zeros(1, np.float32)], [], seed=900, extra=init_w)
    for j, proj in enumerate((True, False)):
        enc = PrefixEncoder(3, 2, 2, 4, proj, 5, 0.0)
        run_case(out / f"PrefixEncoder_ptuning2_{'proj' if proj else 'noproj'}.npz", enc, pt2_forward,
                 [np.zeros(1, np.float32)], [], seed=1000 + j)
    for pairs in (2, 4, 8):
        logits = seeded(50 + pairs, (2 * pairs, 5), 2.0)
        labels = np.random.RandomState(pairs).randint(0, 5, (pairs,)).astype(np.int32)
        labels2 = _rdrop.rdrop_repeat(Tensor(labels))[0].asnumpy()
        run_case(out / f"RDropLoss_{pairs}pairs.npz", RDropLoss(), rdrop_forward, [logits, labels2], [0], seed=70)
    run_case(out / "rdrop_repeat.npz", _Empty(), repeat_forward, [seeded(3, (3, 4), 1.0)], [0], seed=80)
    # freeze_delta: per mode, which children train (numbers of parameters)
    for mode in ("lora", "adapter", "low_rank_adapter", "prefixtuning", "ptuning2", "bitfit"):
        net = _freeze_net(mode)
        freeze_delta(net, mode, exclude=["*head*"] if mode != "bitfit" else None)
        counts = {}
        for name, p in net.parameters_and_names():
            child = name.split(".")[0]
            counts.setdefault(child, 0)
            if p.requires_grad:
                counts[child] += int(np.prod(p.shape))
        np.savez(out / f"freeze_delta_{mode}.npz", **{f"count:{k}": np.int64(v) for k, v in counts.items()})
    print(f"[mindpet-parity] MindSpore {ms.__version__}: wrote {len(list(out.glob('*.npz')))} cases to {out}")


class _FreezeNet(nn.Cell):
    def __init__(self, delta: nn.Cell | None) -> None:
        super().__init__()
        self.body = nn.Dense(8, 8)
        self.delta = delta if delta is not None else nn.Dense(8, 8)
        self.head = nn.Dense(8, 3)

    def construct(self, x):
        return self.head(self.body(x))


def _freeze_net(mode: str) -> nn.Cell:
    delta = {
        "lora": lambda: LoRADense(8, 8, lora_rank=2, lora_alpha=4, compute_dtype=F32),
        "adapter": lambda: AdapterDense(8, 8, bottleneck_size=3, compute_dtype=F32),
        "low_rank_adapter": lambda: LowRankAdapterDense(8, 8, reduction_factor=2, compute_dtype=F32),
        "prefixtuning": lambda: PrefixLayer(4, 2, 2, 10, 6, mid_dim=5, dropout_rate=0.0),
        "ptuning2": lambda: PrefixEncoder(3, 2, 2, 4, True, 5, 0.0),
        "bitfit": lambda: None,
    }[mode]()
    return _FreezeNet(delta)


if __name__ == "__main__":
    main(sys.argv[1])
