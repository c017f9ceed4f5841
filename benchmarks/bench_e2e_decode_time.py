"""How long decoding the whole E2E test set takes: beam search (the LoRA paper's decoding) on a few inputs.

Times the recipes' decoding (``configs/e2e_lora.yaml``'s ``generate`` section: 10 beams, length
penalty 0.8, no repeated 4-grams, at most 64 new tokens) of the first ``--inputs`` E2E test inputs
with SmolLM2-135M, one batch of ``--batch`` inputs at a time, and projects the time of all 630 test
inputs. The base model stands in for a trained one (a merged LoRA delta decodes at the base model's
speed); an untrained model does not stop where a trained one would, so the script also runs every
beam to the full 64 tokens (``--fixed-length``, EOS disabled: the upper bound) and prints the
number of decoding steps per input, so that a time can be scaled to the ~25 tokens of an E2E output.

    python benchmarks/bench_e2e_decode_time.py --inputs 4 --batch 1 --device cpu
    python benchmarks/bench_e2e_decode_time.py --inputs 64 --batch 16 --device cuda
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from deltatune.data import build_generation_prompts, load_data_to_text
from deltatune.generate import GenerationConfig, generate
from deltatune.models import load

E2E_TEST_INPUTS = 630


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="registered model name or Hugging Face directory")
    ap.add_argument("--data-dir", default="../shared/data", help="folder holding e2e/ (relative to the CWD)")
    ap.add_argument("--inputs", type=int, default=4, help="how many test inputs to decode (the first ones)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--beams", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--fixed-length", action="store_true", help="disable EOS: every beam runs --new-tokens steps")
    ap.add_argument("--json", help="write the measurements to this JSON file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load(args.model, task="causal-lm")
    model.to(args.device).eval()
    examples = load_data_to_text("e2e", "test", args.data_dir)
    prompts = build_generation_prompts(examples, tok, max_length=512)[: args.inputs]
    cfg = GenerationConfig(
        max_new_tokens=args.new_tokens, num_beams=args.beams, length_penalty=0.8, no_repeat_ngram_size=4,
        **({"eos_token_id": []} if args.fixed_length else {}),
    )
    ids = [p["input_ids"] for p in prompts]
    generate(model, tok, ids[:1], GenerationConfig(max_new_tokens=2), batch_size=1, device=args.device, progress=False)
    times, lengths = [], []
    for i in range(0, len(ids), args.batch):
        chunk = ids[i : i + args.batch]
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = generate(model, tok, chunk, cfg, batch_size=len(chunk), device=args.device, progress=False)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        lengths += [len(o) for o in out]
    total = sum(times)
    per_input = total / len(ids)
    res = {
        "model": args.model, "device": args.device, "threads": torch.get_num_threads(), "inputs": len(ids),
        "batch": args.batch, "beams": args.beams, "max_new_tokens": args.new_tokens, "fixed_length": args.fixed_length,
        "seconds_total": round(total, 3), "seconds_per_input": round(per_input, 3),
        "mean_new_tokens": round(sum(lengths) / len(lengths), 2),
        "projected_test_set_s": round(per_input * E2E_TEST_INPUTS, 1),
    }
    print(
        f"{args.model} on {args.device} ({res['threads']} threads): beam {args.beams}, batch {args.batch}, "
        f"{len(ids)} inputs, {res['mean_new_tokens']} new tokens per input (max {args.new_tokens})"
    )
    print(f"{per_input:.2f} s per input -> whole E2E test set ({E2E_TEST_INPUTS} inputs): {per_input * E2E_TEST_INPUTS / 60:.1f} min")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
