"""deltatune.compat.loralib: the loralib README's code with one changed import, numbers against a plain
formula and (when installed) the real loralib 0.1.2, merge on eval / unmerge on train, bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import deltatune.compat.loralib as lora
from deltatune.errors import DeltaConfigError, DeltaConfigTypeError


def test_readme_example_runs_with_only_the_import_changed(tmp_path):
    """The loralib README's code: lora.Linear / lora.MergedLinear in a model, mark_only_lora_as_trainable,
    lora_state_dict, then load the pretrained and the LoRA checkpoints with strict=False."""
    d_model = 16

    class BigModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            # ===== Before =====  self.q_proj = nn.Linear(d_model, d_model)
            self.q_proj = lora.Linear(d_model, d_model, r=8)
            self.k_proj = nn.Linear(d_model, d_model)
            self.v_proj = lora.Linear(d_model, d_model, r=8)
            self.qkv_proj = lora.MergedLinear(d_model, 3 * d_model, r=8, enable_lora=[True, False, True])
            self.head = nn.Linear(3 * d_model, 2)

        def forward(self, x):
            h = self.q_proj(x) + self.k_proj(x) + self.v_proj(x)
            return self.head(self.qkv_proj(h))

    torch.manual_seed(0)
    model = BigModel()
    torch.save(model.state_dict(), tmp_path / "ckpt_pretrained.pt")
    # This sets requires_grad to False for all parameters without the string "lora_" in their names
    lora.mark_only_lora_as_trainable(model, bias="lora_only")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "q_proj.lora_A", "q_proj.lora_B", "q_proj.bias", "v_proj.lora_A", "v_proj.lora_B", "v_proj.bias",
        "qkv_proj.lora_A", "qkv_proj.lora_B", "qkv_proj.bias",
    }
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(4, d_model)
    y = torch.tensor([0, 1, 1, 0])
    for _ in range(3):  # training loop
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    torch.save(lora.lora_state_dict(model, bias="lora_only"), tmp_path / "ckpt_lora.pt")
    model.eval()
    with torch.no_grad():
        want = model(x)

    torch.manual_seed(1)  # a fresh model: different random weights until both checkpoints are loaded
    fresh = BigModel()
    fresh.load_state_dict(torch.load(tmp_path / "ckpt_pretrained.pt"), strict=False)
    result = fresh.load_state_dict(torch.load(tmp_path / "ckpt_lora.pt"), strict=False)
    assert result.unexpected_keys == []
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), want)
    saved = torch.load(tmp_path / "ckpt_lora.pt")
    assert set(saved) == trainable


def _ab(layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g))
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_linear_matches_formula_and_merges_on_eval(fan_in_fan_out):
    torch.manual_seed(0)
    layer = lora.Linear(6, 5, r=3, lora_alpha=6, fan_in_fan_out=fan_in_fan_out)
    assert not layer.weight.requires_grad and layer.scaling == 2.0
    assert torch.equal(layer.lora_B, torch.zeros(5, 3))
    _ab(layer)
    w = (layer.weight.t() if fan_in_fan_out else layer.weight).detach().clone()
    x = torch.randn(2, 4, 6, requires_grad=True)
    want = x @ w.t() + layer.bias + 2.0 * (x @ layer.lora_A.t() @ layer.lora_B.t())
    out = layer(x)
    torch.testing.assert_close(out, want)
    g = torch.randn_like(out)
    gx, ga, gb = torch.autograd.grad(out, (x, layer.lora_A, layer.lora_B), g)
    gx_ref, ga_ref, gb_ref = torch.autograd.grad(want, (x, layer.lora_A, layer.lora_B), g)
    for a, b in ((gx, gx_ref), (ga, ga_ref), (gb, gb_ref)):
        torch.testing.assert_close(a, b)
    layer.eval()
    assert layer.merged
    merged_w = w + 2.0 * layer.lora_B @ layer.lora_A
    torch.testing.assert_close(layer.weight.t() if fan_in_fan_out else layer.weight, merged_w)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want.detach())
    layer.train()
    assert not layer.merged
    torch.testing.assert_close(layer.weight.t() if fan_in_fan_out else layer.weight, w)
    no_merge = lora.Linear(6, 5, r=3, merge_weights=False).eval()
    assert not no_merge.merged


def test_merged_linear_matches_formula():
    torch.manual_seed(0)
    layer = lora.MergedLinear(4, 6, r=2, lora_alpha=4, enable_lora=[True, False, True])
    assert layer.lora_A.shape == (4, 4) and layer.lora_B.shape == (4, 2)
    _ab(layer, 3)
    x = torch.randn(3, 4)
    A, B = layer.lora_A, layer.lora_B
    delta = torch.zeros(6, 4)
    delta[0:2] = B[0:2] @ A[0:2]
    delta[4:6] = B[2:4] @ A[2:4]
    want = x @ (layer.weight + 2.0 * delta).t() + layer.bias
    torch.testing.assert_close(layer(x), want)
    layer.eval()
    torch.testing.assert_close(layer.weight, (layer.weight - 2.0 * delta) + 2.0 * delta)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want.detach())


def test_embedding_and_conv2d_formulas():
    torch.manual_seed(0)
    emb = lora.Embedding(10, 4, r=2, lora_alpha=2)
    assert torch.equal(emb.lora_A, torch.zeros(2, 10))
    _ab(emb)
    ids = torch.tensor([[1, 3], [9, 0]])
    want = emb.weight[ids] + (emb.lora_A.t()[ids] @ emb.lora_B.t()) * 1.0
    torch.testing.assert_close(emb(ids), want)
    emb.eval()
    with torch.no_grad():
        torch.testing.assert_close(emb(ids), want.detach())
    conv = lora.Conv2d(3, 4, 3, r=2, lora_alpha=4, padding=1)
    assert conv.lora_A.shape == (6, 9) and conv.lora_B.shape == (12, 6)
    _ab(conv, 5)
    x = torch.randn(2, 3, 5, 5)
    kernel = conv.weight + (conv.lora_B @ conv.lora_A).view(conv.weight.shape) * 2.0
    want = F.conv2d(x, kernel, conv.bias, padding=1)
    torch.testing.assert_close(conv(x), want)
    conv.eval()
    with torch.no_grad():
        torch.testing.assert_close(conv(x), want.detach(), rtol=1e-5, atol=1e-5)


def test_against_real_loralib():
    loralib = pytest.importorskip("loralib")
    torch.manual_seed(0)
    pairs = [
        (loralib.Linear(6, 4, r=2, lora_alpha=3), lora.Linear(6, 4, r=2, lora_alpha=3), torch.randn(3, 6)),
        (loralib.Linear(6, 4, r=2, lora_alpha=3, fan_in_fan_out=True),
         lora.Linear(6, 4, r=2, lora_alpha=3, fan_in_fan_out=True), torch.randn(3, 6)),
        (loralib.MergedLinear(6, 9, r=2, lora_alpha=5, enable_lora=[True, False, True]),
         lora.MergedLinear(6, 9, r=2, lora_alpha=5, enable_lora=[True, False, True]), torch.randn(2, 5, 6)),
        (loralib.Embedding(7, 4, r=2, lora_alpha=4), lora.Embedding(7, 4, r=2, lora_alpha=4),
         torch.tensor([[0, 6, 2]])),
        (loralib.Conv2d(2, 4, 3, r=1, lora_alpha=2, padding=1), lora.Conv2d(2, 4, 3, r=1, lora_alpha=2, padding=1),
         torch.randn(1, 2, 4, 4)),
    ]
    for ref, ours, x in pairs:
        _ab(ref, 7)
        assert list(ref.state_dict()) == list(ours.state_dict())
        ours.load_state_dict(ref.state_dict())
        assert [n for n, p in ref.named_parameters() if p.requires_grad] == [
            n for n, p in ours.named_parameters() if p.requires_grad]
        out_ref, out = ref(x), ours(x)
        torch.testing.assert_close(out, out_ref)
        g = torch.randn_like(out)
        gr = torch.autograd.grad(out_ref, (ref.lora_A, ref.lora_B), g)
        go = torch.autograd.grad(out, (ours.lora_A, ours.lora_B), g)
        for a, b in zip(go, gr):
            torch.testing.assert_close(a, b)
        ref.eval()
        ours.eval()
        for (kr, vr), (ko, vo) in zip(ref.state_dict().items(), ours.state_dict().items()):
            assert kr == ko
            torch.testing.assert_close(vo, vr, rtol=1e-6, atol=1e-6)  # the merged weights
        with torch.no_grad():
            torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    model_ref = nn.Sequential(loralib.Linear(4, 4, r=2), nn.Linear(4, 2))
    model = nn.Sequential(lora.Linear(4, 4, r=2), nn.Linear(4, 2))
    for bias in ("none", "all", "lora_only"):
        loralib.mark_only_lora_as_trainable(model_ref, bias=bias)
        lora.mark_only_lora_as_trainable(model, bias=bias)
        assert [n for n, p in model.named_parameters() if p.requires_grad] == [
            n for n, p in model_ref.named_parameters() if p.requires_grad]
        assert list(lora.lora_state_dict(model, bias=bias)) == list(loralib.lora_state_dict(model_ref, bias=bias))


def test_mark_only_and_state_dict_cover_deltatune_lora_layers():
    import deltatune as dt

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    dt.apply(model, dt.LoraConfig(r=2, target_modules=["0"]), freeze_base=False)
    lora.mark_only_lora_as_trainable(model, bias="lora_only")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "0.lora_A.default.weight", "0.lora_B.default.weight", "0.base_layer.bias"}
    assert set(lora.lora_state_dict(model)) == {"0.lora_A.default.weight", "0.lora_B.default.weight"}


def test_init_is_loralibs():
    torch.manual_seed(0)
    layer = lora.Linear(64, 8, r=4)
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) over fan_in 64
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > bound / 4
    assert torch.equal(layer.lora_B, torch.zeros(8, 4))
    plain = lora.Linear(6, 3)  # r=0: an ordinary, trainable nn.Linear
    assert plain.weight.requires_grad and not hasattr(plain, "lora_A")
    x = torch.randn(2, 6)
    torch.testing.assert_close(plain(x), F.linear(x, plain.weight, plain.bias))


@pytest.mark.parametrize(
    ("build", "exc", "message"),
    [
        (lambda: lora.Linear(4, 4, r=-1), DeltaConfigError, "Linear.r must be an int >= 0, got -1"),
        (lambda: lora.Linear(4, 4, r=1.5), DeltaConfigTypeError, "Linear.r must be an int >= 0, got 1.5 (float)"),
        (lambda: lora.Linear(4, 4, r=2, lora_dropout=1.0), DeltaConfigError,
         "Linear.lora_dropout must be a number in [0, 1), got 1.0"),
        (lambda: lora.Linear(4, 4, r=2, lora_alpha="8"), DeltaConfigTypeError,
         "Linear.lora_alpha must be a number, got '8' (str)"),
        (lambda: lora.Linear(4, 4, r=2, merge_weights=1), DeltaConfigTypeError,
         "Linear.merge_weights must be a bool, got 1 (int)"),
        (lambda: lora.MergedLinear(4, 10, r=2, enable_lora=[True, False, True]), DeltaConfigError,
         "MergedLinear.out_features 10 must be divisible by len(enable_lora) = 3"),
        (lambda: lora.MergedLinear(4, 6, r=2, enable_lora=[1, 0]), DeltaConfigTypeError,
         "MergedLinear.enable_lora must be a non-empty list of bool, got [1, 0]"),
        (lambda: lora.Conv2d(3, 4, (3, 3), r=2), DeltaConfigTypeError,
         "Conv2d.kernel_size must be an int (loralib's square kernels), got (3, 3)"),
        (lambda: lora.mark_only_lora_as_trainable(nn.Linear(2, 2), bias="some"), DeltaConfigError,
         "bias must be one of 'none', 'all', 'lora_only', got 'some'"),
        (lambda: lora.lora_state_dict(nn.Linear(2, 2), bias=None), DeltaConfigError,
         "bias must be one of 'none', 'all', 'lora_only', got None"),
    ],
)
def test_bad_arguments(build, exc, message):
    with pytest.raises(exc) as info:
        build()
    assert str(info.value) == message
