"""run_perplexity: the pipeline's perplexities equal exp(mean NLL) computed directly, before and after LoRA."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from deltatune.checkpoint import load_delta
from deltatune.data import read_wikitext
from deltatune.errors import DeltaConfigError
from deltatune.models import load
from deltatune.tasks.lm import PerplexityConfig, pack_token_blocks, run_perplexity
from tests.tasks._tasks_helpers import tiny_llama_dir, write_wikitext


def _direct_ppl(model, ids, window):
    """Non-overlapping windows: every token but each window's first is scored once."""
    nll, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids), window):
            chunk = torch.tensor([ids[s : s + window]])
            if chunk.shape[1] < 2:
                continue
            logits = model(input_ids=chunk).logits[0, :-1]
            nll += float(F.cross_entropy(logits.double(), chunk[0, 1:], reduction="sum"))
            n += chunk.shape[1] - 1
    return math.exp(nll / n), n


def test_perplexity_pipeline_equals_direct_nll(tmp_path):
    model_dir = tiny_llama_dir(tmp_path)
    data = write_wikitext(tmp_path / "data")
    out = tmp_path / "run"
    res = run_perplexity(dict(model=str(model_dir), data_dir=str(data), eval_max_tokens=150, max_length=32,
                              stride=32, train_max_tokens=256, block_size=32,
                              delta={"method": "lora", "r": 4, "alpha": 8, "init": "random",
                                     "target_modules": ["q_proj", "v_proj"]},
                              train={"max_steps": 3, "batch_size": 4, "lr": 1e-2, "progress_bar": False},
                              output_dir=str(out), progress=False, device="cpu"))
    model, tok = load(str(model_dir))
    ids = tok(read_wikitext(str(data / "wikitext-2" / "wiki.valid.tokens")), add_special_tokens=False)["input_ids"]
    ids = ids[:150]
    base_ppl, n = _direct_ppl(model, ids, 32)
    assert res["base"]["tokens"] == n == res["eval_tokens"] - math.ceil(150 / 32)
    assert res["base"]["perplexity"] == pytest.approx(base_ppl, rel=1e-6)
    load_delta(model, out / "delta")
    tuned_ppl, _ = _direct_ppl(model, ids, 32)
    assert res["tuned"]["perplexity"] == pytest.approx(tuned_ppl, rel=1e-6)
    assert res["tuned"]["perplexity"] != pytest.approx(res["base"]["perplexity"], rel=1e-9)
    assert res["steps"] == 3 and res["train_blocks"] == 8 and res["method"] == "lora"
    assert 0 < res["trainable_params"] < res["total_params"]


def test_pack_token_blocks_and_config_errors(tmp_path):
    blocks = pack_token_blocks(list(range(10)), 4)
    assert blocks == [{"input_ids": [0, 1, 2, 3], "labels": [0, 1, 2, 3]},
                      {"input_ids": [4, 5, 6, 7], "labels": [4, 5, 6, 7]}]
    with pytest.raises(DeltaConfigError, match=r"^the training text has 3 tokens, fewer than one block of 4$"):
        pack_token_blocks([1, 2, 3], 4)
    data = write_wikitext(tmp_path)
    with pytest.raises(DeltaConfigError, match=r"^PerplexityConfig.stride must be an int <= max_length \(16\), got 32$"):
        PerplexityConfig(data_dir=str(data), max_length=16, stride=32)
    with pytest.raises(DeltaConfigError, match=r"^PerplexityConfig.data_dir must hold wikitext-2/wiki.train.tokens"):
        PerplexityConfig(data_dir=str(tmp_path / "nowhere"))


def test_cuda_graph_on_cpu_is_refused_before_the_model_loads(tmp_path):
    data = write_wikitext(tmp_path / "data")
    # the model path does not exist: loading it would raise another error
    with pytest.raises(DeltaConfigError, match=r"cuda_graph=True needs a CUDA device, got device 'cpu'"):
        run_perplexity(dict(model=str(tmp_path / "no-model"), data_dir=str(data),
                            delta={"method": "lora", "r": 4, "target_modules": ["q_proj"]},
                            train={"max_steps": 1, "cuda_graph": True}, progress=False, device="cpu"))
