"""Agreement of GGUF exports run in llama.cpp with the PyTorch model they came from (SmolLM2-135M).

The base (the bundled SmolLM2-135M-Instruct Q4_1 GGUF, dequantised) gets a LoRA adapter trained for a
few steps on WikiText-2 train; then it is exported (``EXPORTS``: merged F32, F16, Q8_0, Q4_1, with the
output matrix at the default type or another one, a LoRA adapter F32, and the plain base F16 and F32),
and llama.cpp (llama-cpp-python) runs them:

* max |logit difference| of llama.cpp's merged F16 vs the PyTorch merged model on a few prompts, and
  whether greedy decoding gives the same tokens for ``--greedy`` steps;
* base F16 + adapter (``lora_path``) vs merged F16;
* the error budget: each rounding alone (PyTorch with F16 weights, with F16 weights and F16 matrix
  product inputs; llama.cpp's F32 file with its default F16 and with an F32 KV cache; F16 files with
  the output matrix F16 or F32; base + adapter vs merged at F32), greedy tokens of every file vs F16's,
  and F16's margin between its top two tokens where Q8_0 first decodes otherwise;
* perplexity over the first ``--ppl-tokens`` tokens of WikiText-2 test, in windows of ``--window``,
  of PyTorch and of each llama.cpp file.

Writes ``OUT/gguf_llama_cpp.json`` and ``OUT/gguf_llama_cpp.png`` (perplexity per format) and prints
the table::

    python benchmarks/bench_gguf_llama_cpp.py --out results/gguf-cpu
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import deltatune as dt
from deltatune import gguf_check as gc

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colours are",
]


#: (label, export_gguf arguments) of the files written after training
EXPORTS = [
    ("merged F32", {"quant": "f32"}),
    ("merged F16", {"quant": "f16"}),
    ("merged F16, output F32", {"quant": "f16", "output_quant": "f32"}),
    ("merged Q8_0", {"quant": "q8_0"}),
    ("merged Q8_0, output F16", {"quant": "q8_0", "output_quant": "f16"}),
    ("merged Q8_0, output F32", {"quant": "q8_0", "output_quant": "f32"}),
    ("merged Q4_1", {"quant": "q4_1"}),
    ("merged Q4_1, output Q4_1", {"quant": "q4_1", "output_quant": "q4_1"}),
    ("adapter F32", {"kind": "adapter"}),
]


def _wikitext(split: str) -> str:
    root = Path(os.environ.get("DELTATUNE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    path = root / "wikitext-2" / f"wiki.{split}.tokens"
    if not path.is_file():
        path = Path("/work/shared/data/wikitext-2") / f"wiki.{split}.tokens"
    return path.read_text(encoding="utf-8")


def _train(model, tokenizer, steps: int, seq: int) -> list[float]:
    ids = tokenizer(_wikitext("train")[:200_000])["input_ids"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    losses = []
    for step in range(steps):
        start = step * seq * 2
        batch = torch.tensor([ids[start + i * seq : start + (i + 1) * seq] for i in range(2)])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
        print(f"  train step {step + 1}/{steps}: loss {losses[-1]:.3f}", flush=True)
    model.eval()
    return losses


def _cpp(path: Path, lora: Path | None = None, kv_cache: str = "f16"):
    return gc.llama_cpp_model(path, lora=lora, n_ctx=512, kv_cache=kv_cache)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/gguf-cpu", help="directory for the JSON and PNG results")
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--greedy", type=int, default=32)
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    args = ap.parse_args()

    from deltatune.models import load

    torch.manual_seed(0)
    model, tokenizer = load("smollm2-135m")
    work = Path(tempfile.mkdtemp(prefix="deltatune-gguf-bench-"))
    try:
        res = _measure(args, model, tokenizer, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _write(args, res)


def _maxdiff(a: list[np.ndarray], b: list[np.ndarray]) -> list[float]:
    return [round(float(np.abs(x - y).max()), 5) for x, y in zip(a, b)]


def _first_diff(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def _measure(args: argparse.Namespace, model, tokenizer, work: Path) -> dict:
    files: dict[str, Path] = {}
    t0 = time.perf_counter()
    files["base F16"] = dt.export_gguf(model, work / "base-f16.gguf", quant="f16", progress=False)
    files["base F32"] = dt.export_gguf(model, work / "base-f32.gguf", quant="f32", progress=False)
    dt.apply(model, dt.LoraConfig(r=8, alpha=16, target_modules=TARGETS))
    print(f"training LoRA for {args.train_steps} steps on WikiText-2 train")
    losses = _train(model, tokenizer, args.train_steps, args.seq)
    export_times = {}
    for label, kw in EXPORTS:
        t = time.perf_counter()
        files[label] = dt.export_gguf(model, work / f"{label.replace(' ', '-')}.gguf", progress=False, **kw)
        export_times[label] = round(time.perf_counter() - t, 2)
    merged = dt.merge_and_unload(model)
    print(f"exports written in {time.perf_counter() - t0:.1f} s: {export_times}")

    res: dict = {"train_losses": losses, "export_seconds": export_times,
                 "file_mib": {k: round(v.stat().st_size / 2**20, 1) for k, v in files.items()}}
    f16 = _cpp(files["merged F16"])
    lora = _cpp(files["base F16"], files["adapter F32"])
    q8 = _cpp(files["merged Q8_0"])
    ids_of = [tokenizer(p)["input_ids"] for p in PROMPTS]
    ref = [gc.torch_logits(merged, ids) for ids in ids_of]
    cpp_f16 = [gc.llama_cpp_logits(f16, ids) for ids in ids_of]
    greedy = {"PyTorch": [gc.torch_greedy(merged, ids, args.greedy) for ids in ids_of],
              "merged F16": [gc.llama_cpp_greedy(f16, ids, args.greedy) for ids in ids_of],
              "merged Q8_0": [gc.llama_cpp_greedy(q8, ids, args.greedy) for ids in ids_of]}
    prompts = []
    for i, (p, ids) in enumerate(zip(PROMPTS, ids_of)):
        row = {"prompt": p, "tokenizer_equal": f16.tokenize(p.encode(), add_bos=False, special=True) == ids}
        row["max_abs_logit_diff_f16_vs_torch"] = float(np.abs(cpp_f16[i] - ref[i]).max())
        row["max_abs_logit_diff_lora_vs_merged_f16"] = float(np.abs(gc.llama_cpp_logits(lora, ids) - cpp_f16[i]).max())
        row["greedy_equal_f16_vs_torch"] = greedy["merged F16"][i] == greedy["PyTorch"][i]
        row["greedy_equal_q8_0_vs_f16"] = greedy["merged Q8_0"][i] == greedy["merged F16"][i]
        row["greedy_text"] = tokenizer.decode(greedy["merged F16"][i])
        prompts.append(row)
        print(json.dumps(row, ensure_ascii=False), flush=True)
    res["prompts"] = prompts
    res["error_budget"] = _error_budget(args, files, merged, ids_of, ref, cpp_f16, greedy)

    ids = tokenizer(_wikitext("test"))["input_ids"][: args.ppl_tokens]
    ppl = {"PyTorch merged (f32)": gc.perplexity(lambda c: gc.torch_logits(merged, c), ids, args.window)}
    for label in ("merged F32", "merged F16", "merged F16, output F32", "merged Q8_0", "merged Q8_0, output F16",
                  "merged Q4_1", "merged Q4_1, output Q4_1"):
        llm = f16 if label == "merged F16" else q8 if label == "merged Q8_0" else _cpp(files[label])
        ppl[f"llama.cpp {label}"] = gc.perplexity(lambda c, llm=llm: gc.llama_cpp_logits(llm, c), ids, args.window)
        print(f"perplexity llama.cpp {label}: {ppl[f'llama.cpp {label}']:.4f}", flush=True)
    ppl["llama.cpp base F16 + adapter"] = gc.perplexity(lambda c: gc.llama_cpp_logits(lora, c), ids, args.window)
    res["perplexity"] = {k: round(v, 4) for k, v in ppl.items()}
    res["ppl_tokens"], res["window"] = len(ids), args.window
    res["q8_0_vs_f16_ppl_ratio"] = ppl["llama.cpp merged Q8_0"] / ppl["llama.cpp merged F16"]
    res["q8_0_output_f16_vs_f16_ppl_ratio"] = ppl["llama.cpp merged Q8_0, output F16"] / ppl["llama.cpp merged F16"]
    return res


def _error_budget(args, files, merged, ids_of, ref, cpp_f16, greedy) -> dict:
    """Where the differences come from: each source of rounding alone, max |logit diff| per prompt."""
    out: dict = {"max_abs_logit_diff_vs_torch": {}, "max_abs_logit_diff_adapter": {}, "greedy": {}}
    vs = out["max_abs_logit_diff_vs_torch"]
    with gc.f16_matmuls(merged, activations=False):
        weights16 = [gc.torch_logits(merged, i) for i in ids_of]
        # the F16 weights' values in an F32 file: llama.cpp then computes at F32 on F16-valued weights
        f16_values = dt.export_gguf(merged, files["merged F16"].parent / "merged-f16-values.f32.gguf", quant="f32",
                                    progress=False)
    vs["PyTorch, weights rounded to F16"] = _maxdiff(weights16, ref)
    with gc.f16_matmuls(merged):
        emulated = [gc.torch_logits(merged, i) for i in ids_of]
    vs["PyTorch, F16 weights and F16 matmul inputs"] = _maxdiff(emulated, ref)
    cpp = {}
    for label, kv in (("merged F32", "f16"), ("merged F32", "f32"), ("merged F16", "f16"), ("merged F16", "f32"),
                      ("merged F16, output F32", "f16"), ("merged F16, output F32", "f32")):
        llm = _cpp(files[label], kv_cache=kv)
        cpp[label, kv] = [gc.llama_cpp_logits(llm, i) for i in ids_of]
        vs[f"llama.cpp {label}, KV cache {kv.upper()}"] = _maxdiff(cpp[label, kv], ref)
        print(f"{label}, KV cache {kv}: {vs[f'llama.cpp {label}, KV cache {kv.upper()}']}", flush=True)
    values16 = [gc.llama_cpp_logits(_cpp(f16_values, kv_cache="f32"), i) for i in ids_of]
    out["llama_cpp_f32_file_of_f16_values_kv_f32_vs_pytorch_f16_weights"] = _maxdiff(values16, weights16)
    # what llama.cpp's F16 products add to F16 weights: the F16 file vs the F32 file of the same values
    out["llama_cpp_f16_file_vs_f32_file_of_same_values_kv_f32"] = _maxdiff(cpp["merged F16", "f32"], values16)
    out["pytorch_f16_matmuls_vs_f16_weights_only"] = _maxdiff(emulated, weights16)
    # the emulation against the file it emulates (llama.cpp's F16 cache is not emulated: F32 cache here)
    out["max_abs_logit_diff_f16_matmuls_vs_llama_cpp_f16_kv_f32"] = _maxdiff(emulated, cpp["merged F16", "f32"])
    out["same_at_first_position"] = _maxdiff([e[:1] for e in emulated], [c[:1] for c in cpp["merged F16", "f32"]])
    ad = out["max_abs_logit_diff_adapter"]
    for base, kv in (("F16", "f16"), ("F32", "f16"), ("F32", "f32")):
        llm = _cpp(files[f"base {base}"], files["adapter F32"], kv_cache=kv)
        logits = [gc.llama_cpp_logits(llm, i) for i in ids_of]
        other = cpp_f16 if (base, kv) == ("F16", "f16") else cpp[f"merged {base}", kv]
        ad[f"base {base} + adapter vs merged {base}, KV cache {kv.upper()}"] = _maxdiff(logits, other)
        ad[f"base {base} + adapter vs PyTorch, KV cache {kv.upper()}"] = _maxdiff(logits, ref)
        print(f"base {base} + adapter, KV cache {kv}: {ad[f'base {base} + adapter vs merged {base}, KV cache {kv.upper()}']}")
    g = out["greedy"]
    for label in ("merged F32", "merged F16, output F32", "merged Q8_0, output F16", "merged Q8_0, output F32"):
        llm = _cpp(files[label])
        greedy[label] = [gc.llama_cpp_greedy(llm, i, args.greedy) for i in ids_of]
    for label, toks in greedy.items():
        g[label] = {"equal_to_f16": [t == f for t, f in zip(toks, greedy["merged F16"])],
                    "first_step_differing_from_f16": [_first_diff(t, f) for t, f in zip(toks, greedy["merged F16"])]}
    # the margin llama.cpp F16 had between its top two tokens where Q8_0 first chose otherwise
    margins = []
    f16 = _cpp(files["merged F16"])
    for ids, f, q in zip(ids_of, greedy["merged F16"], greedy["merged Q8_0"]):
        step = _first_diff(q, f)
        if step is None:
            margins.append(None)
            continue
        top = np.sort(gc.llama_cpp_logits(f16, ids + f[:step])[-1])
        margins.append(round(float(top[-1] - top[-2]), 4))
    g["f16_top2_margin_where_q8_0_differs"] = margins
    return out


def _write(args: argparse.Namespace, res: dict) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gguf_llama_cpp.json").write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    names = list(res["perplexity"])
    ax.barh(names, [res["perplexity"][n] for n in names], color="tab:blue")
    for i, n in enumerate(names):
        ax.text(res["perplexity"][n], i, f" {res['perplexity'][n]:.3f}", va="center", fontsize=8)
    ax.set_xlabel(f"perplexity, WikiText-2 test, first {res['ppl_tokens']} tokens (windows of {args.window})")
    ax.set_title("SmolLM2-135M + LoRA: PyTorch vs GGUF exports in llama.cpp", fontsize=9)
    ax.set_xlim(0, max(res["perplexity"].values()) * 1.25)
    fig.tight_layout()
    fig.savefig(out / "gguf_llama_cpp.png", dpi=120)

    print("\nformat                          perplexity")
    for k, v in res["perplexity"].items():
        print(f"{k:<40}{v:>10.4f}")
    print(f"Q8_0 / F16 perplexity ratio: {res['q8_0_vs_f16_ppl_ratio']:.5f} "
          f"(Q8_0 with output F16: {res['q8_0_output_f16_vs_f16_ppl_ratio']:.5f})")
    print(json.dumps(res["error_budget"], indent=1))
    worst = max(r["max_abs_logit_diff_f16_vs_torch"] for r in res["prompts"])
    worst_lora = max(r["max_abs_logit_diff_lora_vs_merged_f16"] for r in res["prompts"])
    print(f"max |logit diff| llama.cpp F16 vs PyTorch: {worst:.4g}; base+adapter vs merged F16: {worst_lora:.4g}")
    print(f"results: {out / 'gguf_llama_cpp.json'}, {out / 'gguf_llama_cpp.png'}")


if __name__ == "__main__":
    main()
