"""Where the Jittor and PyTorch forward passes of an ``align`` recipe part: per-layer differences (issue 17).

Loads the recipe's model and LoRA exactly as ``deltatune align`` does (the PyTorch model from
:func:`deltatune.models.load`, its seeded LoRA saved and loaded into the Jittor model built from the same
safetensors), takes the first training batch of the recipe (the batch of align's step 1) and runs one
forward and one backward in both frameworks in float32. Prints, for every layer, the max absolute and max
relative (max |J - T| / max |T|) difference of each intermediate (input RMSNorm, q and v projections,
attention output, o_proj, post-attention RMSNorm, MLP, the layer's output), then the final norm, the
logits, the label-smoothed loss and the LoRA gradients.

With ``--fp64`` a float64 copy of the PyTorch model is the reference: each framework's own error is
printed next to the difference between them (``T err``, ``J err``: max |x - x64| / max |x64|), so a
difference that grows because one side is less exact shows as that side's error. ``--ops`` checks
single operations on PyTorch's own float32 inputs of one layer (RMSNorm, rotary, softmax attention,
SwiGLU, a frozen linear, the loss), so a formula or precision difference shows without propagation.
``--deltas RUN_DIR`` (an ``align --mode exact`` run of the same recipe) counts the trained LoRA entries
that differ by more than 1e-3 of their matrix's max, A and B apart, with their step-1 gradients;
``--torch-floor`` trains the recipe in PyTorch three times (float32 SDPA, float32 eager attention,
float64) and compares those LoRA weights by the same measure: the floor two correct runs reach.

    PYTHONPATH=$PWD/src python benchmarks/jittor_layer_diff.py configs/align_e2e_cpu.yaml \\
        --set data.data_dir=/work/shared/data --fp64 --ops [--deltas runs/align-exact]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from deltatune.checkpoint import delta_parameter_names, delta_state_dict, save_delta
from deltatune.data import build_causal_lm_features
from deltatune.jittor import models as jm
from deltatune.jittor import require_jittor
from deltatune.jittor.align import _mode_recipe, _train_torch, lora_rel_diff, resolve_model_dir
from deltatune.jittor.lora import load_delta, set_mode, trainable
from deltatune.jittor.models import load_pretrained, to_jt, to_np
from deltatune.jittor.train import logits_loss_sum
from deltatune.tasks.data_to_text import apply_delta, feature_kwargs, load_model, prepare_data, train_collator
from deltatune.tasks.loader import load_recipe
from deltatune.train.distributed import EpochBatchSampler
from deltatune.train.losses import lm_loss_sum
from deltatune.train.losses import logits_loss_sum as t_logits_loss_sum

#: per layer: (name printed, module whose output (or "<" its input) PyTorch records); Jittor records the
#: same names (``JtLlama.capture``)
STAGES = (("input_layernorm", "input_layernorm"), ("self_attn.q_proj", "self_attn.q_proj"),
          ("self_attn.v_proj", "self_attn.v_proj"), ("self_attn.attn", "<self_attn.o_proj"),
          ("self_attn.o_proj", "self_attn.o_proj"), ("post_attention_layernorm", "post_attention_layernorm"),
          ("mlp", "mlp"), ("", ""))


def _rel(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, float]:
    """(max |a - b|, max |a - b| / max |b|) over the real tokens (``mask``: (B, T) bool on the first axes)."""
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    ref = np.abs(b.astype(np.float64))
    if mask is not None:
        d, ref = d[mask], ref[mask]
    scale = float(ref.max()) or 1.0
    return float(d.max()), float(d.max()) / scale


def torch_pass(model: torch.nn.Module, batch: dict[str, torch.Tensor], label_smoothing: float) -> dict[str, Any]:
    """Forward (hooks record the intermediates), the Trainer's loss, backward: values and LoRA gradients."""
    acts: dict[str, np.ndarray] = {}
    hooks = []
    mods = dict(model.named_modules())

    def keep(key: str, value: Any) -> None:
        value = value[0] if isinstance(value, tuple) else value
        acts[key] = value.detach().double().numpy()

    for i in range(model.config.num_hidden_layers):
        p = f"model.layers.{i}"
        for name, where in STAGES:
            key = f"{p}.{name}" if name else p
            mod = mods[f"{p}.{where.lstrip('<')}" if where else p]
            if where.startswith("<"):
                hooks.append(mod.register_forward_pre_hook(lambda _m, inp, key=key: keep(key, inp)))
            else:
                hooks.append(mod.register_forward_hook(lambda _m, _i, out, key=key: keep(key, out)))
    hooks.append(mods["model.norm"].register_forward_hook(lambda _m, _i, out: keep("model.norm", out)))
    model.zero_grad(set_to_none=True)
    try:
        total, n = lm_loss_sum(model, batch, label_smoothing=label_smoothing)
        (total / n).backward()
        with torch.no_grad():
            acts["logits"] = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double().numpy()
    finally:
        for h in hooks:
            h.remove()
    names = delta_parameter_names(model, "default")
    params = dict(model.named_parameters())
    grads = {k: params[v].grad.double().numpy() for k, v in names.items() if params[v].grad is not None}
    return {"acts": acts, "loss": float(total) / int(n), "grads": grads}


def jittor_pass(jmodel: Any, batch: dict[str, torch.Tensor], label_smoothing: float) -> dict[str, Any]:
    """The same on the Jittor model (its ``capture`` records the intermediates)."""
    jt = require_jittor()
    jmodel.capture = {}
    ids, mask, labels = (batch[k].numpy() for k in ("input_ids", "attention_mask", "labels"))
    logits, _ = jmodel(ids, attention_mask=mask)
    total, n = logits_loss_sum(logits, labels, label_smoothing)
    params = trainable(jmodel)
    grads = jt.grad(total / float(n), list(params.values()))
    acts = {}
    for k, v in jmodel.capture.items():
        a = to_np(v).astype(np.float64)
        if k.endswith(("q_proj", "v_proj")):  # (B, H, T, d) -> (B, T, H * d), as the linear's output
            a = a.transpose(0, 2, 1, 3).reshape(a.shape[0], a.shape[2], -1)
        acts[k] = a
    acts["logits"] = to_np(logits).astype(np.float64)
    jmodel.capture = None
    return {"acts": acts, "loss": float(total.item()) / n, "grads": {k: to_np(g).astype(np.float64) for k, g in zip(params, grads)}}


def op_checks(tmodel: torch.nn.Module, t64: torch.nn.Module | None, jmodel: Any, batch: dict[str, torch.Tensor],
              layer: int, label_smoothing: float) -> list[tuple[str, float, float | None, float | None]]:
    """Single operations on PyTorch's float32 inputs of ``layer``: (op, rel J-T, rel T-64, rel J-64)."""

    jt = require_jittor()
    lay = tmodel.model.layers[layer]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows = []
    with torch.no_grad():
        out = tmodel(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        x = out.hidden_states[layer]
    x64 = x.double()
    lay64 = t64.model.layers[layer] if t64 is not None else None

    def row(name: str, j: np.ndarray, t: torch.Tensor, r64: torch.Tensor | None) -> None:
        t_np = t.detach().double().numpy()
        e = (_rel(t_np, r64.detach().numpy())[1], _rel(j, r64.detach().numpy())[1]) if r64 is not None else (None, None)
        rows.append((name, _rel(j, t_np)[1], *e))

    with torch.no_grad():
        norm = lay.input_layernorm
        h = norm(x)
        j = to_np(jm._rms_norm(to_jt(x.numpy()), to_jt(norm.weight.numpy()), jmodel.eps))
        row("RMSNorm", j, h, lay64.input_layernorm(x64) if lay64 is not None else None)
        pos = torch.arange(x.shape[1])[None].expand(x.shape[0], -1)
        cos, sin = tmodel.model.rotary_emb(x, pos)
        jc, js = jmodel._rope(pos.numpy())
        row("rotary cos", to_np(jc)[:, 0], cos, None)
        row("rotary sin", to_np(js)[:, 0], sin, None)
        q = lay.self_attn.q_proj(h).view(x.shape[0], x.shape[1], -1, jmodel.head_dim).transpose(1, 2)
        qr, _ = apply_rotary_pos_emb(q, q, cos, sin)
        jq = to_np(jmodel._rotate(to_jt(q.numpy()), jc, js))
        q64, _ = apply_rotary_pos_emb(q.double(), q.double(), cos.double(), sin.double())
        row("rotary q (PyTorch cos/sin in fp64 as reference)", jq, qr, q64)
        # attention on the same (rotated) q, k, v
        k = lay.self_attn.k_proj(h).view(x.shape[0], x.shape[1], -1, jmodel.head_dim).transpose(1, 2)
        v = lay.self_attn.v_proj(h).view(x.shape[0], x.shape[1], -1, jmodel.head_dim).transpose(1, 2)
        _, kr = apply_rotary_pos_emb(q, k, cos, sin)
        rep = jmodel.n_heads // jmodel.n_kv
        kr, v = kr.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        bias = jm._attention_bias(mask.numpy(), x.shape[1])
        ja = to_np(jm._attend(to_jt(qr.numpy()), to_jt(kr.numpy()), to_jt(v.numpy()), to_jt(bias), jmodel.head_dim**-0.5, 0.0, False))
        tbias = torch.from_numpy(bias)
        ta = torch.nn.functional.scaled_dot_product_attention(qr, kr, v, attn_mask=tbias, scale=jmodel.head_dim**-0.5)
        a64 = torch.softmax(qr.double() @ kr.double().transpose(2, 3) * jmodel.head_dim**-0.5 + tbias.double(), -1) @ v.double()
        real = mask.numpy().astype(bool)
        ja_m, ta_m, a64_m = (z.transpose(0, 2, 1, 3)[real] for z in (ja, ta.numpy(), a64.numpy()))
        rows.append(("attention softmax(q k^T s + mask) v (real tokens)", _rel(ja_m, ta_m)[1], _rel(ta_m, a64_m)[1], _rel(ja_m, a64_m)[1]))
        h2 = lay.post_attention_layernorm(x)
        g, u = lay.mlp.gate_proj(h2), lay.mlp.up_proj(h2)
        jg, ju = to_jt(g.numpy()), to_jt(u.numpy())
        js_ = to_np(jg * jt.sigmoid(jg) * ju)
        ts_ = lay.mlp.act_fn(g) * u
        row("SwiGLU silu(g) * u", js_, ts_, torch.nn.functional.silu(g.double()) * u.double())
        lin = jmodel.linears[f"model.layers.{layer}.mlp.down_proj"]
        jd = to_np(lin(to_jt(ts_.numpy())))
        row("linear down_proj (K = intermediate)", jd, lay.mlp.down_proj(ts_), ts_.double() @ lay.mlp.down_proj.weight.double().T)
        hid = out.hidden_states[-1]
        tl = tmodel.lm_head(hid)
        jl = to_np(jt.nn.matmul_transpose(to_jt(hid.numpy()), jmodel.lm_head))
        row("lm head (tied embedding)", jl, tl, hid.double() @ tmodel.lm_head.weight.double().T)
        labels = batch["labels"]
        total, n = logits_loss_sum(to_jt(tl.numpy()), labels.numpy(), label_smoothing)
        tt, tn = t_logits_loss_sum(tl, labels, label_smoothing=label_smoothing)
        t64l = torch.nn.functional.cross_entropy(tl.double()[:, :-1].reshape(-1, tl.shape[-1]), labels[:, 1:].reshape(-1),
                                                 ignore_index=-100, label_smoothing=label_smoothing, reduction="sum")
        jv, tv, v64 = float(total.item()) / n, float(tt) / int(tn), float(t64l) / int(tn)
        rows.append(("loss (label-smoothed log-softmax) on the same logits", abs(jv - tv) / abs(tv), abs(tv - v64) / abs(v64),
                     abs(jv - v64) / abs(v64)))
    return rows


def delta_distribution(run_dir: Path, t_grads: dict[str, np.ndarray], j_grads: dict[str, np.ndarray],
                       tol: float = 1e-3) -> dict[str, Any]:
    """Which trained LoRA entries of an align run differ by more than ``tol`` of their matrix's max |PyTorch
    value|: counts for A and B, their step-1 gradients (relative to the matrix's largest step-1 gradient)
    and how many of them had step-1 gradients of opposite sign in the two frameworks."""
    t = load_file(str(run_dir / "torch" / "delta" / "delta.safetensors"))
    j = load_file(str(run_dir / "jittor" / "delta" / "delta.safetensors"))
    out: dict[str, Any] = {}
    worst: list[tuple[float, str, int, float, bool, float, float]] = []
    for kind in ("A", "B"):
        keys = [k for k in t if f"lora_{kind}." in k]
        n_all = n_bad = n_flip = 0
        g_bad: list[np.ndarray] = []
        g_all: list[np.ndarray] = []
        rel = lora_rel_diff({k: t[k] for k in keys}, j)
        for k in keys:
            d = rel[k]
            g = t_grads[k]
            gmax = float(np.abs(g).max())
            rel_g = np.abs(g) / gmax if gmax > 0 else np.zeros_like(g)
            flip = np.sign(g) != np.sign(j_grads[k])
            bad = d > tol
            n_all += d.size
            n_bad += int(bad.sum())
            n_flip += int((bad & flip).sum())
            g_bad.append(rel_g[bad])
            g_all.append(rel_g.ravel())
            for i in np.argsort(d.ravel())[-3:]:
                worst.append((float(d.ravel()[i]), k, int(i), float(g.ravel()[i]), bool(flip.ravel()[i]),
                              float(j_grads[k].ravel()[i]), gmax))
        gb, ga = np.concatenate(g_bad), np.concatenate(g_all)
        out[kind] = {"entries": n_all, "over_tol": n_bad, "over_tol_step1_sign_differs": n_flip,
                     "step1_rel_grad_over_tol_median": float(np.median(gb)) if gb.size else None,
                     "step1_rel_grad_over_tol_max": float(gb.max()) if gb.size else None,
                     "step1_rel_grad_all_median": float(np.median(ga)),
                     "step1_grad_zero": int((ga == 0).sum())}
    worst.sort(reverse=True)
    out["worst"] = [{"rel_diff": w[0], "key": w[1], "index": w[2], "step1_grad": w[3], "step1_sign_differs": w[4],
                     "step1_grad_jittor": w[5], "step1_grad_matrix_max": w[6]} for w in worst[:8]]
    return out


def torch_floor(recipe: Any, run_dir: Path | None) -> list[dict[str, Any]]:
    """The recipe trained by align's PyTorch side three times: float32 with SDPA attention, float32 with eager
    attention, float64; the LoRA weights of each pair (and of ``run_dir``'s Jittor delta) compared with
    align's measure. How far apart two PyTorch runs that differ only in rounding end up."""
    object.__setattr__(recipe, "_align_log_every", recipe.train.log_every)
    data = prepare_data(recipe)
    runs: dict[str, tuple[dict[str, np.ndarray], list[float]]] = {}
    for variant in ("fp32-sdpa", "fp32-eager", "fp64"):
        model, tok = load_model(recipe, progress=False)
        d = recipe.data
        feats = build_causal_lm_features(data.train, tok, max_length=d.max_length, target_prefix=d.target_prefix,
                                         expand_references=d.expand_references, **feature_kwargs(recipe))
        if variant == "fp32-eager":
            model.set_attn_implementation("eager")
        apply_delta(recipe, model)
        if variant == "fp64":
            model.double()
        with tempfile.TemporaryDirectory() as tmp:
            res = _train_torch(recipe, "exact", model, tok, feats, None, Path(tmp), False)
        runs[variant] = ({k: v.double().numpy() for k, v in delta_state_dict(model).items()}, [r["loss"] for r in res["rows"]])
    if run_dir is not None:
        runs["jittor (--deltas)"] = ({k: v.astype(np.float64) for k, v in
                                     load_file(str(run_dir / "jittor" / "delta" / "delta.safetensors")).items()}, [])
    out = []
    names = list(runs)
    for i, a_name in enumerate(names):
        for b_name in names[i + 1:]:
            a, b = runs[a_name][0], runs[b_name][0]
            rel = lora_rel_diff(a, b)
            la, lb = runs[a_name][1], runs[b_name][1]
            out.append({"a": a_name, "b": b_name, "max_rel_weight_diff": max(float(r.max()) for r in rel.values()),
                        "over_1e-3_A": sum(int((r > 1e-3).sum()) for k, r in rel.items() if "lora_A" in k),
                        "over_1e-3_B": sum(int((r > 1e-3).sum()) for k, r in rel.items() if "lora_B" in k),
                        "max_rel_loss_diff": max((abs(x - y) / abs(x) for x, y in zip(la, lb)), default=None)})
    return out


def _fmt(v: float | None) -> str:
    return "       -" if v is None else f"{v:8.2e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="an align recipe (e.g. configs/align_e2e_cpu.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override KEY=VALUE")
    ap.add_argument("--fp64", action="store_true", help="also run PyTorch in float64 as the reference")
    ap.add_argument("--ops", action="store_true", help="check single operations on PyTorch's inputs of --op-layer")
    ap.add_argument("--op-layer", type=int, default=0)
    ap.add_argument("--random-b", type=float, default=0.0,
                    help="set the LoRA B matrices to N(0, this^2) (0: align's zero init; then A's gradients are 0)")
    ap.add_argument("--deltas", help="an align run directory: how its trained LoRA entries that differ by more than "
                                     "1e-3 of their matrix's max are distributed (A/B, step-1 gradients)")
    ap.add_argument("--torch-floor", action="store_true",
                    help="also train the recipe in PyTorch fp32 (SDPA), fp32 (eager) and fp64 and compare their LoRA "
                         "weights pairwise (and with --deltas' Jittor delta) by align's measure")
    ap.add_argument("--json", help="write every number to this JSON file")
    args = ap.parse_args()

    recipe = _mode_recipe(load_recipe(args.config, args.overrides, command="align"), "exact")
    if recipe.num_threads is not None:
        torch.set_num_threads(recipe.num_threads)
    data = prepare_data(recipe)
    model, tok = load_model(recipe, progress=False)
    d = recipe.data
    feats = build_causal_lm_features(data.train, tok, max_length=d.max_length, target_prefix=d.target_prefix,
                                     expand_references=d.expand_references, **feature_kwargs(recipe))
    apply_delta(recipe, model)
    if args.random_b:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * args.random_b)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    c = recipe.train
    idx = next(iter(EpochBatchSampler(len(feats), c.batch_size, seed=c.seed, epoch=0, shuffle=c.shuffle)))
    batch = train_collator(int(tok.pad_token_id), c)([feats[i] for i in idx])
    real = batch["attention_mask"].numpy().astype(bool)
    print(f"batch {tuple(batch['input_ids'].shape)} ({int(real.sum())} real tokens); attention "
          f"{model.config._attn_implementation}; torch {torch.__version__}", file=sys.stderr)
    model.train()
    t = torch_pass(model, batch, c.label_smoothing)
    t64 = None
    m64 = None
    if args.fp64:
        m64 = copy.deepcopy(model).double()
        t64 = torch_pass(m64, batch, c.label_smoothing)
    with tempfile.TemporaryDirectory() as tmp:
        save_delta(model, Path(tmp) / "init")
        jmodel = load_pretrained(resolve_model_dir(recipe.model.name_or_path))
        load_delta(jmodel, Path(tmp) / "init")
    set_mode(jmodel, True, dropout=False)
    j = jittor_pass(jmodel, batch, c.label_smoothing)

    report: dict[str, Any] = {"acts": {}, "grads": {}}
    head = f"{'value':<44} {'max|J-T|':>9} {'rel J-T':>9}" + (f" {'T err':>9} {'J err':>9}" if t64 else "")
    print(head)
    keys = [k for k in j["acts"] if k in t["acts"]]
    for k in keys:
        m = real if j["acts"][k].shape[:2] == real.shape else None
        ab, rel = _rel(j["acts"][k], t["acts"][k], m)
        line = f"{k:<44} {ab:9.2e} {rel:9.2e}"
        entry = {"abs": ab, "rel": rel}
        if t64:
            te, je = _rel(t["acts"][k], t64["acts"][k], m)[1], _rel(j["acts"][k], t64["acts"][k], m)[1]
            line += f" {te:9.2e} {je:9.2e}"
            entry.update({"torch_err": te, "jittor_err": je})
        report["acts"][k] = entry
        print(line)
    lt, lj = t["loss"], j["loss"]
    line = f"{'loss (label-smoothed, step-1 objective)':<44} {abs(lj - lt):9.2e} {abs(lj - lt) / abs(lt):9.2e}"
    report["loss"] = {"torch": lt, "jittor": lj, "rel": abs(lj - lt) / abs(lt)}
    if t64:
        l64 = t64["loss"]
        line += f" {abs(lt - l64) / abs(l64):9.2e} {abs(lj - l64) / abs(l64):9.2e}"
        report["loss"]["fp64"] = l64
    print(line)
    worst: dict[str, list[float]] = {"A": [0.0, 0.0, 0.0], "B": [0.0, 0.0, 0.0]}
    for k, gt in t["grads"].items():
        gj = j["grads"][k]
        kind = "A" if "lora_A" in k else "B"
        rel = _rel(gj, gt)[1] if np.abs(gt).max() > 0 else float(np.abs(gj).max())
        errs = [rel]
        if t64:
            g64 = t64["grads"][k]
            errs += ([_rel(gt, g64)[1], _rel(gj, g64)[1]] if np.abs(g64).max() > 0 else [0.0, 0.0])
        report["grads"][k] = errs
        worst[kind] = [max(a, b) for a, b in zip(worst[kind], errs + [0.0] * (3 - len(errs)))]
    for kind, w in worst.items():
        line = f"{'LoRA ' + kind + ' gradients (worst matrix, rel)':<44} {'':>9} {w[0]:9.2e}"
        if t64:
            line += f" {w[1]:9.2e} {w[2]:9.2e}"
        print(line)
    # Adam's first update of an entry is ~lr * sign(gradient): entries whose gradient signs differ move apart
    pairs = [("J vs T", j["grads"], t["grads"])]
    if t64:
        pairs += [("T vs fp64", t["grads"], t64["grads"]), ("J vs fp64", j["grads"], t64["grads"])]
    flips = {}
    for name, ga, gb in pairs:
        n = sum(int((np.sign(ga[k]) != np.sign(gb[k])).sum()) for k in gb if np.abs(gb[k]).max() > 0)
        total = sum(gb[k].size for k in gb if np.abs(gb[k]).max() > 0)
        flips[name] = {"opposite_sign": n, "entries": total}
    report["grad_sign_flips"] = flips
    print("LoRA gradient entries of opposite sign (nonzero matrices): "
          + ", ".join(f"{k} {v['opposite_sign']} of {v['entries']}" for k, v in flips.items()))
    if args.ops:
        print(f"\nsingle operations on PyTorch's float32 inputs of layer {args.op_layer}")
        print(f"{'op':<56} {'rel J-T':>9} {'T err':>9} {'J err':>9}")
        report["ops"] = []
        for name, a, b, c_ in op_checks(model, m64, jmodel, batch, args.op_layer, c.label_smoothing):
            print(f"{name:<56} {_fmt(a)} {_fmt(b)} {_fmt(c_)}")
            report["ops"].append({"op": name, "rel": a, "torch_err": b, "jittor_err": c_})
    if args.deltas:
        dist = delta_distribution(Path(args.deltas), t["grads"], j["grads"])
        report["deltas"] = dist
        print(f"\ntrained LoRA entries of {args.deltas} with |J - T| > 1e-3 * max|T| of their matrix")
        for kind in ("A", "B"):
            r = dist[kind]
            print(f"  {kind}: {r['over_tol']} of {r['entries']} entries ({r['over_tol_step1_sign_differs']} with step-1 "
                  f"gradients of opposite sign); their step-1 |grad| / matrix max: median "
                  f"{_fmt(r['step1_rel_grad_over_tol_median'])}, max {_fmt(r['step1_rel_grad_over_tol_max'])} "
                  f"(all entries: median {r['step1_rel_grad_all_median']:.2e}, {r['step1_grad_zero']} exactly 0)")
        for w in dist["worst"]:
            print(f"  {w['rel_diff']:.3e}  {w['key']}[{w['index']}]  step-1 grad PyTorch {w['step1_grad']:+.3e}, "
                  f"Jittor {w['step1_grad_jittor']:+.3e} (matrix max |grad| {w['step1_grad_matrix_max']:.3e})")
    if args.torch_floor:
        print("\nLoRA weights after training, PyTorch runs that differ only in rounding (align's measure)")
        report["torch_floor"] = torch_floor(recipe, Path(args.deltas) if args.deltas else None)
        for r in report["torch_floor"]:
            loss = f", max rel loss diff {r['max_rel_loss_diff']:.2e}" if r["max_rel_loss_diff"] is not None else ""
            print(f"  {r['a']} vs {r['b']}: max rel weight diff {r['max_rel_weight_diff']:.3e}; entries > 1e-3 of "
                  f"their matrix's max: A {r['over_1e-3_A']}, B {r['over_1e-3_B']}{loss}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
