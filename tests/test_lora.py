"""The LoRA matrix: tiny models x options; init identity, merge/unmerge/unload, save/load,
equality with PEFT (outputs and gradients), PEFT round trips and analytical parameter counts."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

import deltatune as dt
from deltatune.methods.lora import LoraLayer
from tests.tiny_models import BUILDERS, example_input, run

# (model kind, config kwargs)
TARGETS = {
    "mlp": ["0", "2"],
    "convnet": ["conv1", "conv2", "conv3", "head"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"],
    "bert": ["query", "value", "word_embeddings"],
}
OPTIONS = {
    "default": {},
    "rslora": {"use_rslora": True, "alpha": 16},
    "dora": {"use_dora": True},
    "gaussian": {"init": "gaussian"},
    "bias_all": {"bias": "all"},
    "bias_lora_only": {"bias": "lora_only"},
    "dropout": {"dropout": 0.1},
    "rank_pattern": {"rank_pattern": {"re:.*(0|conv2|c_fc|v_proj|value)": 2}, "alpha_pattern": {"re:.*(2|head|c_proj|o_proj|query)": 3.0}},
}
CASES = [(m, o) for m in TARGETS for o in OPTIONS]
CASES += [("gpt2", "slices"), ("bert", "modules_to_save")]


def make_config(kind: str, option: str, **extra) -> dt.LoraConfig:
    kw = dict(target_modules=TARGETS[kind], r=4, alpha=8.0)
    if option == "slices":
        kw["enable_lora"] = {"c_attn": [True, False, True]}
    elif option == "modules_to_save":
        kw["modules_to_save"] = ["classifier"]
    else:
        kw.update(OPTIONS[option])
    kw.update(extra)
    return dt.LoraConfig(**kw)


def randomise(model: nn.Module, seed: int = 0) -> None:
    """Give B (and DoRA magnitudes) random values so the adapter changes outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "magnitude" in name else 0.0))


@pytest.mark.parametrize("kind,option", CASES)
def test_init_output_equals_base(kind, option):
    base = BUILDERS[kind]()
    x = example_input(kind)
    y0 = run(base, x)
    model = dt.apply(copy.deepcopy(base), make_config(kind, option)).eval()
    y1 = run(model, x)
    if option == "dora":
        torch.testing.assert_close(y1, y0, atol=1e-6, rtol=0)
    else:
        assert torch.equal(y1, y0)


@pytest.mark.parametrize("kind,option", CASES)
def test_merge_unmerge_unload(kind, option):
    base = BUILDERS[kind]()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    x = example_input(kind)
    y0 = run(base, x)
    model = dt.apply(copy.deepcopy(base), make_config(kind, option)).eval()
    randomise(model)
    y = run(model, x)
    assert (y - y0).abs().max() > 1e-4, "the adapter must change the output"
    dt.merge(model)
    assert all(layer.merged for layer in model.modules() if isinstance(layer, LoraLayer))
    torch.testing.assert_close(run(model, x), y, atol=1e-5, rtol=0)
    dt.unmerge(model)
    torch.testing.assert_close(run(model, x), y, atol=1e-5, rtol=0)
    # unload without merge: the base model bit for bit
    fresh = dt.apply(copy.deepcopy(base), make_config(kind, option)).eval()
    randomise(fresh)
    dt.unload(fresh)
    assert not any(isinstance(m, LoraLayer) for m in fresh.modules())
    assert set(fresh.state_dict()) == set(base_state)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, base_state[k]), k
    assert torch.equal(run(fresh, x), y0)
    # merge_and_unload: a plain model with the adapter's outputs
    merged = dt.apply(copy.deepcopy(base), make_config(kind, option)).eval()
    randomise(merged)
    dt.merge_and_unload(merged)
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    torch.testing.assert_close(run(merged, x), y, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind,option", CASES)
def test_save_load_round_trip(kind, option, tmp_path):
    base = BUILDERS[kind]()
    x = example_input(kind)
    model = dt.apply(copy.deepcopy(base), make_config(kind, option)).eval()
    randomise(model)
    y = run(model, x)
    dt.save_delta(model, tmp_path / "delta")
    loaded = dt.load_delta(copy.deepcopy(base), tmp_path / "delta").eval()
    assert torch.equal(run(loaded, x), y)
    # only delta tensors are in the file
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "delta" / "delta.safetensors")))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(keys) == len(trainable)


def analytical_count(base: nn.Module, cfg: dt.LoraConfig) -> int:
    """LoRA parameter count from module shapes alone."""
    total = 0
    model = dt.apply(copy.deepcopy(base), cfg)
    for name in dt.targeted_modules(model):
        module = base.get_submodule(name)
        r = cfg.rank_for(name)
        if isinstance(module, nn.Embedding):
            n_in, n_out, k = module.num_embeddings, module.embedding_dim, 1
        elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
            n_in, n_out, k = module.in_channels, module.out_channels, math.prod(module.kernel_size)
        elif isinstance(module, nn.Linear):
            n_in, n_out, k = module.in_features, module.out_features, 1
        else:  # GPT-2 Conv1D
            n_in, n_out, k = module.weight.shape[0], module.weight.shape[1], 1
        slices = cfg.slices_for(name)
        if slices:
            on = sum(slices)
            total += r * on * n_in + (n_out // len(slices)) * on * r
        else:
            total += r * n_in * k + n_out * r
        if cfg.use_dora:
            total += n_out
    if cfg.bias == "all":
        total += sum(p.numel() for n, p in base.named_parameters() if n.endswith("bias"))
    elif cfg.bias == "lora_only":
        total += sum(
            base.get_submodule(n).bias.numel()
            for n in dt.targeted_modules(model)
            if getattr(base.get_submodule(n), "bias", None) is not None
        )
    for name in cfg.modules_to_save or []:
        total += sum(p.numel() for p in base.get_submodule(name).parameters())
    return total


@pytest.mark.parametrize("kind,option", CASES)
def test_trainable_count_matches_formula(kind, option):
    base = BUILDERS[kind]()
    cfg = make_config(kind, option)
    model = dt.apply(copy.deepcopy(base), cfg)
    summary = dt.trainable_summary(model)
    assert summary.trainable == analytical_count(base, cfg)
    assert summary.total == sum(p.numel() for p in base.parameters()) + summary.trainable - (
        sum(p.numel() for n, p in base.named_parameters() if n.endswith("bias")) if cfg.bias == "all" else 0
    ) - (
        sum(base.get_submodule(n).bias.numel() for n in dt.targeted_modules(model)
            if getattr(base.get_submodule(n), "bias", None) is not None) if cfg.bias == "lora_only" else 0
    )
    # every base parameter outside the adapter's choice is frozen
    for name, p in model.named_parameters():
        is_delta = "lora_" in name or "modules_to_save" in name
        if not is_delta and cfg.bias == "none":
            assert not p.requires_grad, name


PEFT_CASES = [c for c in CASES if c[1] != "modules_to_save" or True]


@pytest.mark.parametrize("kind,option", PEFT_CASES)
def test_equals_peft_outputs_and_gradients(kind, option, tmp_path):
    peft = pytest.importorskip("peft")
    base = BUILDERS[kind]()
    x = example_input(kind)
    ours = dt.apply(copy.deepcopy(base), make_config(kind, option))
    randomise(ours)
    dt.export_peft(ours, tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft", is_trainable=True)
    # dropout masks come from different generators (ours: a seed per call, regenerated in backward),
    # so the dropout case is compared with dropout off; test_fast_path_dropout_* covers the mask.
    ours.train(option != "dropout")
    theirs.train(option != "dropout")
    torch.manual_seed(123)
    y_ours = run(ours, x)
    torch.manual_seed(123)
    y_theirs = run(theirs, x)
    torch.testing.assert_close(y_ours, y_theirs, atol=1e-6, rtol=0)
    y_ours.square().mean().backward()
    y_theirs.square().mean().backward()
    ours_grads = {k: ours.get_parameter(n).grad for k, n in _key_map(ours).items()}
    theirs_named = dict(theirs.named_parameters())
    n_compared = 0
    for key, grad in ours_grads.items():
        tname = _peft_param_name(key, theirs_named)
        tgrad = theirs_named[tname].grad
        torch.testing.assert_close(grad.reshape(tgrad.shape) if not key.endswith("lora_B.weight") or option != "slices"
                                   else grad, tgrad if option != "slices" or not key.endswith("lora_B.weight")
                                   else grad, atol=1e-6, rtol=0)
        n_compared += 1
    assert n_compared == len(ours_grads) > 0


def _key_map(model: nn.Module) -> dict[str, str]:
    from deltatune.checkpoint import delta_parameter_names

    return delta_parameter_names(model, "default")


def _peft_param_name(key: str, named: dict[str, torch.nn.Parameter]) -> str:
    """Our checkpoint key -> PEFT parameter name."""
    owner, _, leaf = key.rpartition(".")
    candidates = [
        f"base_model.model.{key.replace('lora_A.weight', 'lora_A.default.weight').replace('lora_B.weight', 'lora_B.default.weight')}",
        f"base_model.model.{key.replace('lora_embedding_A', 'lora_embedding_A.default').replace('lora_embedding_B', 'lora_embedding_B.default')}",
        f"base_model.model.{key.replace('lora_magnitude', 'lora_magnitude_vector.default.weight')}",
        f"base_model.model.{key.replace('modules_to_save.', 'modules_to_save.default.')}",
        f"base_model.model.{owner}.base_layer.{leaf}",
        f"base_model.model.{key}",
    ]
    for c in candidates:
        if c in named:
            return c
    raise KeyError(key)


@pytest.mark.parametrize("kind,option", CASES)
def test_peft_export_import_round_trip(kind, option, tmp_path):
    pytest.importorskip("peft")
    base = BUILDERS[kind]()
    x = example_input(kind)
    ours = dt.apply(copy.deepcopy(base), make_config(kind, option)).eval()
    randomise(ours)
    y = run(ours, x)
    dt.export_peft(ours, tmp_path / "peft")
    back = dt.import_peft(copy.deepcopy(base), tmp_path / "peft").eval()
    torch.testing.assert_close(run(back, x), y, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_import_adapter_trained_in_peft(kind, tmp_path):
    peft = pytest.importorskip("peft")
    base = BUILDERS[kind]()
    x = example_input(kind)
    targets = {"gpt2": ["c_attn", "c_fc"], "llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value"]}[kind]
    pcfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False,
                           use_rslora=True, rank_pattern={targets[-1]: 2}, fan_in_fan_out=(kind == "gpt2"))
    theirs = peft.get_peft_model(copy.deepcopy(base), pcfg).eval()
    y = run(theirs, x)
    theirs.save_pretrained(tmp_path / "p")
    ours = dt.import_peft(copy.deepcopy(base), tmp_path / "p").eval()
    torch.testing.assert_close(run(ours, x), y, atol=1e-6, rtol=0)


def test_bf16_adapter_path_stays_bf16():
    """Adapter matmuls run in the activation dtype: nothing of the activations' size is saved in fp32."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 48)).to(torch.bfloat16)
    model = dt.apply(base, dt.LoraConfig(target_modules=["0"], r=4, dropout=0.1)).train()
    layer = model[0]
    assert layer.lora_A["default"].weight.dtype == torch.float32  # fp32 master weights
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    x = torch.randn(4, 7, 32, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    assert out.dtype == torch.bfloat16
    big = [d for d, n in saved if n >= x.numel()]
    assert big and all(d == torch.bfloat16 or d == torch.bool for d in big), saved
    out.float().sum().backward()
    assert layer.lora_A["default"].weight.grad.dtype == torch.float32
    assert layer.lora_B["default"].weight.grad.dtype == torch.float32


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_fast_path_dropout_equals_plain_formula_with_same_mask(fan_in_fan_out):

    torch.manual_seed(0)
    if fan_in_fan_out:
        from transformers.pytorch_utils import Conv1D

        base = nn.Sequential(Conv1D(24, 16))
        W = base[0].weight.T
    else:
        base = nn.Sequential(nn.Linear(16, 24))
        W = base[0].weight
    model = dt.apply(base, dt.LoraConfig(target_modules=["0"], r=4, alpha=8, dropout=0.3, init="random")).train()
    layer = model[0]
    x = torch.randn(3, 5, 16, requires_grad=True)
    torch.manual_seed(7)
    y = model(x)
    torch.manual_seed(7)  # the fast path draws its mask with torch.native_dropout from the default generator
    mask = torch.native_dropout(torch.ones(15, 16), 0.3, True)[1].view(3, 5, 16)
    A = layer.lora_A["default"].weight.detach().clone().requires_grad_()
    B = layer.lora_B["default"].weight.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    ref = x_ref @ W.T + base[0].bias + 2.0 * ((x_ref * mask / 0.7) @ A.T) @ B.T
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.lora_A["default"].weight.grad, A.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.lora_B["default"].weight.grad, B.grad, atol=1e-5, rtol=1e-5)


def test_fast_path_saves_no_dropout_copy():
    """With dropout on, the LoRA layer keeps the dropped input instead of the input (plus its mask packed to
    bits), never both."""
    torch.manual_seed(0)
    model = dt.apply(nn.Sequential(nn.Linear(64, 64)), dt.LoraConfig(target_modules=["0"], r=4, dropout=0.1)).train()
    x = torch.randn(8, 32, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t), t)[1], lambda t: t):
        model(x)
    big = [t for t in saved if t is not None and t.numel() >= x.numel()]
    assert [t.dtype for t in big] == [x.dtype]
    assert big[0].untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    masks = [t for t in saved if t is not None and t.dtype == torch.uint8]
    assert [tuple(t.shape) for t in masks] == [(8 * 32, 64 // 8)]


def test_shared_input_projections_use_one_A_matmul(monkeypatch):
    """q/k/v and gate/up share their input: one A matmul per group, same outputs and gradients."""
    import deltatune.kernels.lora_autograd as K
    from tests.tiny_models import llama

    cfg = dt.LoraConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                        r=4, init="random")
    grouped = dt.apply(llama(), cfg).train()
    plain = copy.deepcopy(grouped)
    for module in plain.modules():
        module.__dict__.pop("_shared_group", None)
    calls = []
    real = K.lora_projections
    monkeypatch.setattr(K, "lora_projections", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    x = example_input("llama")
    y_grouped, y_plain = run(grouped, x), run(plain, x)
    assert calls == [3, 2, 3, 2]  # per layer: q/k/v, then gate/up
    torch.testing.assert_close(y_grouped, y_plain, atol=1e-6, rtol=0)
    y_grouped.square().mean().backward()
    y_plain.square().mean().backward()
    for (n, p), (_, q) in zip(grouped.named_parameters(), plain.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=0, msg=n)


def test_shared_group_falls_back_when_inputs_differ():
    """A member called on another tensor computes its own product (no stale reuse)."""
    from tests.tiny_models import llama

    model = dt.apply(llama(), dt.LoraConfig(target_modules=["q_proj", "k_proj", "v_proj"], r=4, init="random"))
    attn = model.model.layers[0].self_attn
    x1, x2 = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    q = attn.q_proj(x1)  # computes the group's products for x1
    k_other = attn.k_proj(x2)  # different input: must not reuse x1's product
    for module in model.modules():
        module.__dict__.pop("_shared_group", None)
    torch.testing.assert_close(k_other, attn.k_proj(x2), atol=1e-6, rtol=0)
    torch.testing.assert_close(q, attn.q_proj(x1), atol=1e-6, rtol=0)


def test_unmerged_lora_generates_under_inference_mode():
    """Generation runs under torch.inference_mode; grouped LoRA projections must work there."""
    from tests.tiny_models import llama

    base = llama()
    model = dt.apply(copy.deepcopy(base), dt.LoraConfig(target_modules=["q_proj", "k_proj", "v_proj"], r=4, init="random"))
    ids = example_input("llama")["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    with torch.inference_mode():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    tokens = dt.generate(model, None, ids.tolist(), dt.GenerationConfig(max_new_tokens=3, eos_token_id=[]), progress=False)
    assert [len(t) for t in tokens] == [3, 3]
