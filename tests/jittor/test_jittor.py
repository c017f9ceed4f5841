"""The Jittor side against the PyTorch side on tiny Llama and GPT-2 models (skipped without jittor)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import deltatune as dt
from deltatune.errors import DeltaConfigError, MissingPackageError
from tests import tiny_models as tm
from tests.recipe_fixtures import recipe_dict, tiny_assets, write_recipe

if importlib.util.find_spec("jittor") is None:
    pytest.skip("jittor is not installed (pip install jittor==1.3.11.0)", allow_module_level=True)

from deltatune.jittor import require_jittor  # noqa: E402

require_jittor()

from deltatune.jittor.generate import generate as jt_generate  # noqa: E402
from deltatune.jittor.lora import delta_arrays, load_delta, save_delta, trainable  # noqa: E402
from deltatune.jittor.models import load_pretrained, to_jt, to_np  # noqa: E402

# one worker runs every Jittor test (``--dist loadgroup``): Jittor compiles operators into one cache
pytestmark = pytest.mark.xdist_group("jittor")

LORA = {
    "llama": lambda: dt.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"], init="random"),
    "gpt2": lambda: dt.LoraConfig(r=2, alpha=4, target_modules=["c_attn"], enable_lora={"c_attn": [True, False, True]},
                                  init="random"),
}


def _pair(kind: str, tmp_path: Path) -> tuple[torch.nn.Module, object]:
    """A tiny PyTorch model with random LoRA and the Jittor model built from its saved files and delta."""
    model = getattr(tm, kind)()
    model.save_pretrained(tmp_path / "base")
    dt.apply(model, LORA[kind]())
    dt.save_delta(model, tmp_path / "delta")
    jmodel = load_pretrained(tmp_path / "base")
    load_delta(jmodel, tmp_path / "delta")
    return model, jmodel


def _batch(kind: str) -> dict[str, torch.Tensor]:
    x = tm.example_input(kind)
    mask = x["attention_mask"].clone()
    mask[0, :3] = 0  # left padding on row 0
    return {"input_ids": x["input_ids"], "attention_mask": mask}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_forward_logits_match_pytorch(kind: str, tmp_path: Path) -> None:
    model, jmodel = _pair(kind, tmp_path)
    b = _batch(kind)
    with torch.no_grad():
        want = model(**b).logits.numpy()
    got = to_np(jmodel(b["input_ids"].numpy(), attention_mask=b["attention_mask"].numpy())[0])
    real = b["attention_mask"].numpy().astype(bool)
    assert got.shape == want.shape
    assert np.abs(got - want)[real].max() <= 1e-5


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_beam_search_returns_pytorch_token_ids(kind: str, tmp_path: Path) -> None:
    model, jmodel = _pair(kind, tmp_path)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, tm.VOCAB, (n,), generator=g).tolist() for n in (5, 9, 3, 7)]
    cfg = dt.GenerationConfig(num_beams=3, length_penalty=0.8, no_repeat_ngram_size=2, max_new_tokens=8,
                              eos_token_id=[1, 5], pad_token_id=0)
    want = dt.generate(model, None, prompts, cfg, batch_size=3, progress=False)
    got = jt_generate(jmodel, prompts, cfg, eos_token_id=[1, 5], pad_token_id=0, batch_size=3)
    assert got == want
    assert any(len(r) > 0 for r in got)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_delta_round_trips_both_ways(kind: str, tmp_path: Path) -> None:
    model, jmodel = _pair(kind, tmp_path)
    # PyTorch -> Jittor: the loaded matrices are the PyTorch ones, bit for bit
    torch_state = {k: v.detach().numpy() for k, v in dt.delta_state_dict(model).items()}
    got = delta_arrays(jmodel)
    assert sorted(got) == sorted(torch_state)
    for k, v in torch_state.items():
        np.testing.assert_array_equal(got[k], v)
    # Jittor -> PyTorch: change the Jittor matrices, save, load into a fresh PyTorch model
    rng = np.random.default_rng(0)
    for var in trainable(jmodel).values():
        var.update(to_jt(rng.normal(size=tuple(var.shape)).astype(np.float32) * 0.1))
    save_delta(jmodel, tmp_path / "from_jittor")
    fresh = getattr(tm, kind)()
    dt.load_delta(fresh, tmp_path / "from_jittor")
    for k, v in dt.delta_state_dict(fresh).items():
        np.testing.assert_array_equal(v.detach().numpy(), delta_arrays(jmodel)[k])
    b = _batch(kind)
    with torch.no_grad():
        want = fresh(**b).logits.numpy()
    jl = to_np(jmodel(b["input_ids"].numpy(), attention_mask=b["attention_mask"].numpy())[0])
    real = b["attention_mask"].numpy().astype(bool)
    assert np.abs(jl - want)[real].max() <= 1e-5
    meta = json.loads((tmp_path / "from_jittor" / "delta_config.json").read_text())
    assert meta["config"] == json.loads((tmp_path / "delta" / "delta_config.json").read_text())["config"]


def test_rotary_tables_equal_transformers_at_smollm2_theta_and_long_positions(tmp_path: Path) -> None:
    # SmolLM2's head_dim 64 and rope_theta 1e5: numpy's float32 power differs from transformers' in the last
    # bit of some inverse frequencies, which positions multiply (cos/sin 1.9e-6 apart at position 63)
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = tm.llama_config(head_dim=64, rope_theta=100000.0, vocab_size=tm.VOCAB, max_position_embeddings=4096)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path)
    jmodel = load_pretrained(tmp_path)
    rot = model.model.rotary_emb
    np.testing.assert_array_equal(jmodel.inv_freq, rot.inv_freq.numpy())
    pos = np.stack([np.arange(4096), np.arange(4096)[::-1]])
    with torch.no_grad():
        cos, sin = rot(torch.zeros(1), torch.from_numpy(pos))
    jc, js = jmodel._rope(pos)
    # cos/sin of the same float32 angles: one unit in the last place at most
    assert np.abs(to_np(jc)[:, 0] - cos.numpy()).max() <= 1.2e-7
    assert np.abs(to_np(js)[:, 0] - sin.numpy()).max() <= 1.2e-7


def test_label_smoothed_loss_and_its_gradient_match_float64_on_a_50k_vocabulary() -> None:
    # Jittor's float32 CPU sums over the classes are sequential: 1.7e-6 relative on the loss and 1e-3 (of the
    # largest entry) on the logits' gradient before the loss summed in float64; PyTorch's float32: 6e-8, 8e-6
    from deltatune.jittor.train import logits_loss_sum

    jt = require_jittor()
    rng = np.random.default_rng(0)
    v = 49152
    logits = rng.normal(-2.0, 2.5, (2, 64, v)).astype(np.float32)
    labels = rng.integers(0, v, (2, 64))
    labels[:, :10] = -100
    labels[1, 50:] = -100
    x = torch.from_numpy(logits).double().requires_grad_()
    y = torch.from_numpy(labels)[:, 1:].reshape(-1)
    want = torch.nn.functional.cross_entropy(x[:, :-1].reshape(-1, v), y, ignore_index=-100, label_smoothing=0.1,
                                             reduction="sum")
    n = int((y != -100).sum())
    (want / n).backward()
    jl = to_jt(logits)
    total, got_n = logits_loss_sum(jl, labels, 0.1)
    grad = to_np(jt.grad(total / float(got_n), jl))
    assert got_n == n
    assert abs(float(total.item()) - want.item()) / want.item() <= 2e-7
    ref = x.grad.numpy()
    assert np.abs(grad - ref).max() <= 1e-6 * np.abs(ref).max()


def _gpt2_dir(path: Path, vocab_from: Path) -> Path:
    """A tiny GPT-2 (dropout 0.1 as GPT-2 ships) with the word-level tokenizer of the tiny Llama directory."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(vocab_from)
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=len(tok), n_positions=128, bos_token_id=2,
                     eos_token_id=3, pad_token_id=0)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


ALIGN_FILES = ["config.yaml", "init_delta/delta.safetensors", "log_torch.jsonl", "log_jittor.jsonl", "align.png",
               "align_scores.md", "align_summary.json", "verdict.txt", "torch/delta/delta.safetensors",
               "jittor/delta/delta.safetensors", "torch/predictions.txt", "jittor/predictions.txt",
               "torch/metrics.json", "jittor/metrics.json", "jittor/train_log.jsonl"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_align_exact_ten_steps_within_tolerance_and_writes_every_file(kind: str, tmp_path: Path) -> None:
    from deltatune.cli import main

    model_dir, data_dir = tiny_assets()
    delta = {"method": "lora", "r": 2, "alpha": 4, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}
    if kind == "gpt2":
        model_dir = _gpt2_dir(tmp_path / "gpt2", model_dir)
        delta = {"method": "lora", "r": 2, "alpha": 4, "dropout": 0.1, "target_modules": ["c_attn"],
                 "enable_lora": {"c_attn": [True, False, True]}}
    out = tmp_path / "run"
    recipe = recipe_dict(model_dir, data_dir, out, delta=delta,
                         train={"max_steps": 10, "eval_every": 5, "log_every": 5, "warmup_steps": 2, "lr": 1e-2})
    path = write_recipe(tmp_path / "align.yaml", recipe)
    assert main(["align", str(path), "--mode", "exact", "--no-progress"]) == 0
    for name in ALIGN_FILES:
        assert (out / name).is_file(), name
    s = json.loads((out / "align_summary.json").read_text())
    m = s["measured"]
    assert m["loss_steps_compared"] == 10
    assert m["max_rel_loss_diff_first_steps"] <= 1e-4
    assert m["max_rel_lora_weight_diff"] <= 1e-3
    assert m["crossover_max_abs_logit_diff"] <= 1e-4
    assert [v.split()[0] for v in s["verdicts"][:3]] == ["PASS", "PASS", "PASS"]
    t_rows = [json.loads(x) for x in (out / "log_torch.jsonl").read_text().splitlines()]
    j_rows = [json.loads(x) for x in (out / "log_jittor.jsonl").read_text().splitlines()]
    t_train = [r for r in t_rows if r["split"] == "train"]
    j_train = [r for r in j_rows if r["split"] == "train"]
    assert [r["step"] for r in j_train] == list(range(1, 11))
    assert [r["lr"] for r in j_train] == pytest.approx([r["lr"] for r in t_train], rel=1e-12)
    # average loss: the mean over each log_every window (5 steps)
    assert j_train[4]["avg_loss"] == pytest.approx(np.mean([r["loss"] for r in j_train[:5]]), rel=1e-12)
    assert [r["step"] for r in j_rows if r["split"] == "eval"] == [5, 10]
    # the trained deltas moved away from the shared initial one
    from safetensors.numpy import load_file

    init = load_file(out / "init_delta" / "delta.safetensors")
    trained = load_file(out / "jittor" / "delta" / "delta.safetensors")
    ref = load_file(out / "torch" / "delta" / "delta.safetensors")
    assert m["max_rel_lora_weight_diff"] == pytest.approx(
        max(np.abs(trained[k] - ref[k]).max() / np.abs(ref[k]).max() for k in ref), rel=1e-6)
    assert m["max_frobenius_rel_lora_weight_diff"] == pytest.approx(
        max(np.linalg.norm(trained[k] - ref[k]) / np.linalg.norm(ref[k]) for k in ref), rel=1e-6)
    assert max(np.abs(trained[k] - init[k]).max() for k in init) > 1e-3


def test_unsupported_architecture_is_named_with_the_supported_list(tmp_path: Path) -> None:
    tm.bert().save_pretrained(tmp_path / "bert")
    with pytest.raises(
        DeltaConfigError,
        match=r"does not implement the architecture 'BertForSequenceClassification' \(model_type 'bert'.*"
        r"it implements: LlamaForCausalLM \(model_type 'llama'\), GPT2LMHeadModel \(model_type 'gpt2'\)",
    ):
        load_pretrained(tmp_path / "bert")


def test_align_refuses_a_method_other_than_lora_before_any_work(tmp_path: Path) -> None:
    from deltatune.jittor.align import align
    from deltatune.recipes import load_recipe

    model_dir, data_dir = tiny_assets()
    out = tmp_path / "run"
    recipe = load_recipe(recipe_dict(model_dir, data_dir, out, delta={"method": "ia3"}))
    with pytest.raises(DeltaConfigError, match=r"the Jittor side implements the delta method 'lora' only, got 'ia3'"):
        align(recipe, "exact")
    assert not out.exists()


def test_align_refuses_an_unsupported_architecture_before_any_work(tmp_path: Path) -> None:
    from deltatune.jittor.align import align
    from deltatune.recipes import load_recipe

    _, data_dir = tiny_assets()
    bert = tmp_path / "bert"
    tm.bert().save_pretrained(bert)
    out = tmp_path / "run"
    recipe = load_recipe(recipe_dict(bert, data_dir, out, delta={"method": "lora", "target_modules": ["query"]}))
    with pytest.raises(DeltaConfigError, match=r"does not implement the architecture 'BertForSequenceClassification'"):
        align(recipe, "exact")
    assert not out.exists()


def test_missing_jittor_names_the_pip_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import deltatune.jittor as pkg

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "jittor" else real(name, *a))
    monkeypatch.setitem(pkg._STATE, "module", None)
    with pytest.raises(MissingPackageError, match=r"not installed; install it with `pip install jittor==1\.3\.11\.0`"):
        pkg.require_jittor()


def test_cli_align_without_jittor_prints_the_pip_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import deltatune.jittor as pkg
    from deltatune.cli import main

    model_dir, data_dir = tiny_assets()
    path = write_recipe(tmp_path / "a.yaml", recipe_dict(model_dir, data_dir, tmp_path / "run"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "jittor" else real(name, *a))
    monkeypatch.setitem(pkg._STATE, "module", None)
    assert main(["align", str(path)]) == 2
    assert "pip install jittor==1.3.11.0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_child_killed_by_a_signal_does_not_end_the_process() -> None:
    # Jittor's core would "quick exit" the whole process here (how the METEOR scorer's Java child,
    # killed on close, ended an align run); require_jittor gives Python's SIGCHLD handler back
    import signal
    import subprocess

    assert signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL
    child = subprocess.Popen(["sleep", "30"])
    child.kill()
    assert child.wait() == -signal.SIGKILL
    assert to_np(to_jt(np.arange(3)) * 2).tolist() == [0, 2, 4]
