"""A first run on a fresh machine: SmolLM2-135M + LoRA on a small batch of real E2E data.

``python -m deltatune.quickstart [--data-dir ../shared/data] [--steps 20]`` loads the bundled
model, applies LoRA (r=4, alpha=32 on q/v as in the LoRA paper), trains a few AdamW steps on a
fixed batch of E2E training examples, prints the loss at each step and the trainable-parameter
table, and checks that the base weights did not change.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import deltatune as dt
from deltatune.data import CausalLMCollator, build_causal_lm_features, load_data_to_text
from deltatune.models import load as load_model


def default_data_dir() -> Path:
    """``../shared/data`` seen from the working directory, else beside the repository checkout."""
    for root in (Path.cwd().parent, Path(__file__).resolve().parents[3]):
        if (root / "shared" / "data").is_dir():
            return root / "shared" / "data"
    return Path.cwd().parent / "shared" / "data"


def main(argv: list[str] | None = None) -> dict:
    """Run the quick start; returns the first and last loss."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", default=str(default_data_dir()))
    ap.add_argument("--examples", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--lr", type=float, default=2e-3)
    args = ap.parse_args(argv)
    t0 = time.time()
    torch.manual_seed(0)
    model, tok = load_model(args.model)
    print(f"loaded {args.model} in {time.time() - t0:.1f}s")
    examples = load_data_to_text("e2e", "train", args.data_dir)[: args.examples]
    feats = build_causal_lm_features(examples, tok, max_length=64, expand_references=False)
    batch = CausalLMCollator(pad_token_id=tok.pad_token_id)(feats)
    dt.apply(model, dt.LoraConfig(r=4, alpha=32, dropout=0.1, target_modules=["q_proj", "v_proj"]))
    dt.trainable_summary(model).print(max_rows=8)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    losses = []
    for step in range(args.steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        print(f"step {step + 1:3d}  loss {losses[-1]:.4f}")
    unchanged = all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if n in base_before)
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; base weights unchanged: {unchanged}; "
          f"{time.time() - t0:.1f}s in all")
    return {"first_loss": losses[0], "last_loss": losses[-1], "base_unchanged": unchanged}


if __name__ == "__main__":
    main()
