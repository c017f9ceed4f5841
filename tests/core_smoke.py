"""The core install's smoke run (CI's newest job runs it in a venv without extras or pytest):
import deltatune, apply LoRA, one training step, save and load the delta. Exits 1 when an optional
package was imported on the way; prints the sorted list of optional packages that were imported."""

from __future__ import annotations

import sys
import tempfile

import torch

import deltatune as dt

OPTIONAL = {"matplotlib", "sacrebleu", "pycocoevalcap", "scipy", "tensorboard", "gguf", "accelerate", "nltk", "peft", "jittor"}


def main() -> int:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    dt.apply(model, dt.LoraConfig(r=2, alpha=4, target_modules=["0", "2"], init="random"))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(3, 8)
    model(x).square().mean().backward()
    opt.step()
    with torch.no_grad():
        want = model(x)
    with tempfile.TemporaryDirectory() as d:
        dt.save_delta(model, d)
        torch.manual_seed(0)
        fresh = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        dt.load_delta(fresh, d)
        with torch.no_grad():
            got = fresh(x)
    if not torch.equal(got, want):
        print("delta round trip changed the outputs", file=sys.stderr)
        return 1
    imported = sorted(m for m in OPTIONAL if m in sys.modules)
    print(imported)
    return 1 if imported else 0


if __name__ == "__main__":
    raise SystemExit(main())
