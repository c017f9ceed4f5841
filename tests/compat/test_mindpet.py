"""deltatune.compat.mindpet: every shell against a plain formula, MindPet's defaults, every argument check,
freeze_delta's modes (bitfit trains every bias), TrainableParamsCheckPoint with the Trainer.
(The numbers against the real MindPet: scripts/mindpet_parity.sh and test_mindpet_fixtures.py.)"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from deltatune.compat import mindpet as mp
from deltatune.errors import DeltaConfigError, DeltaConfigTypeError
from deltatune.train import TrainConfig, Trainer
from tests.train._train_utils import lm_examples, tiny_lm

F32 = torch.float32


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def test_lora_dense_formula_and_defaults():
    torch.manual_seed(0)
    layer = mp.LoRADense(8, 6, lora_rank=4, lora_alpha=8, compute_dtype=F32, activation="relu")
    assert torch.equal(layer.mindpet_delta_lora_b, torch.zeros(6, 4))  # lora_b_init 'zeros'
    assert layer.mindpet_delta_lora_a.abs().max() <= 1 / math.sqrt(8)  # HeUniform(negative_slope=sqrt(5))
    assert 0.005 < layer.weight.std() < 0.02 and torch.equal(layer.bias, torch.zeros(6))  # 'normal', 'zeros'
    with torch.no_grad():
        layer.mindpet_delta_lora_b.normal_()
    x = torch.randn(2, 3, 8)
    want = F.relu(x @ layer.weight.t() + layer.bias + 2.0 * x @ layer.mindpet_delta_lora_a.t() @ layer.mindpet_delta_lora_b.t())
    torch.testing.assert_close(layer(x), want)
    # MindPet's default compute_dtype is float16: computed in fp16, returned in the input's dtype
    half = mp.LoRADense(8, 6, lora_rank=4, lora_alpha=8)
    half.load_state_dict(layer.state_dict())
    half.activation = nn.ReLU()
    out = half(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=1e-2, atol=1e-2)
    assert not torch.equal(out, want)


def test_adapter_shells_formula_gelu_tanh_and_mindpet_init():
    torch.manual_seed(0)
    layer = mp.AdapterLayer(8, 3, compute_dtype=F32)
    down, up = layer.adapter.adapter_down["default"], layer.adapter.adapter_up["default"]
    for w in (down.weight, up.weight):
        assert 0.004 < w.std() < 0.02  # MindSpore's 'normal': N(0, 0.01²)
    with torch.no_grad():
        for p in (down.weight, down.bias, up.weight, up.bias):
            p.normal_()
    x = torch.randn(5, 8)
    want = x + gelu_tanh(x @ down.weight.t() + down.bias) @ up.weight.t() + up.bias
    torch.testing.assert_close(layer(x), want)
    exact = x + F.gelu(x @ down.weight.t() + down.bias) @ up.weight.t() + up.bias
    assert (layer(x) - exact).abs().max() > 1e-4  # the tanh approximation, not the exact GELU
    dense = mp.AdapterDense(8, 6, bottleneck_size=4, activation="tanh", non_linearity="relu", compute_dtype=F32)
    d, u = dense.adapter.adapter_down["default"], dense.adapter.adapter_up["default"]
    h = torch.tanh(x @ dense.dense.weight.t() + dense.dense.bias)
    torch.testing.assert_close(dense(x), h + F.relu(h @ d.weight.t() + d.bias) @ u.weight.t() + u.bias)


def test_low_rank_adapter_shells_formula_and_mindpet_init():
    torch.manual_seed(0)
    layer = mp.LowRankAdapterLayer(8, 2, low_rank_size=2, compute_dtype=F32)
    down, up = layer.adapter.low_rank_adapter_down["default"], layer.adapter.low_rank_adapter_up["default"]
    # MindPet: every factor xavier_uniform (deltatune's own config zeroes up.w_right by default)
    for t in (down.w_left, down.w_right, up.w_left, up.w_right):
        bound = math.sqrt(6 / sum(t.shape))
        assert t.abs().max() <= bound and t.abs().max() > bound / 4
    x = torch.randn(3, 8)
    want = x + gelu_tanh(x @ down.w_left @ down.w_right + down.bias) @ up.w_left @ up.w_right + up.bias
    torch.testing.assert_close(layer(x), want)
    assert not torch.allclose(layer(x), x)
    dense = mp.LowRankAdapterDense(8, 6, reduction_factor=3, compute_dtype=F32, low_rank_w_init="normal")
    d = dense.adapter.low_rank_adapter_down["default"]
    assert d.w_left.std() < 0.05  # 'normal' is N(0, 0.01²)
    assert tuple(d.w_right.shape) == (1, 2)  # bottleneck 6 // 3


def test_prefix_layer_and_ptuning2_encoder():
    torch.manual_seed(0)
    layer = mp.PrefixLayer(4, 2, 2, 10, 6, mid_dim=5, dropout_rate=0.0)
    enc = layer.prefix_encoder
    want = enc.mlp(enc.embedding.weight)
    torch.testing.assert_close(layer.past_key_reparam, want)
    torch.testing.assert_close(layer.past_value_reparam, want)
    layer.past_key_reparam.sum().backward()
    assert enc.embedding.weight.grad is not None  # unlike MindPet's init-time constant, gradients flow
    pt = mp.PrefixEncoder(3, 2, 2, 4, True, 5, 0.0)
    out = pt(2, F32)
    assert len(out) == 2 and out[0].shape == (2, 2, 2, 3, 4)
    flat = pt.ptuning_encoder()  # (pre_seq_len, 2·L·H·kv)
    kv = flat.view(3, 4, 2, 4)  # (pre, 2L, H, kv)
    torch.testing.assert_close(out[1][0, 1], kv[:, 2].permute(1, 0, 2))  # layer 1 key, batch 1: (H, pre, kv)
    torch.testing.assert_close(out[1][1, 0], kv[:, 3].permute(1, 0, 2))  # layer 1 value
    assert pt(2)[0].dtype == torch.float16  # MindPet's default dtype


def test_rdrop_shell_and_repeat():
    logits = torch.randn(8, 5, requires_grad=True)
    labels = torch.tensor([0, 0, 3, 3, 1, 1, 4, 4])
    z1, z2 = logits[0::2], logits[1::2]
    lp1, lp2 = F.log_softmax(z1, -1), F.log_softmax(z2, -1)
    kl = (lp2.exp() * (lp2 - lp1)).sum() + (lp1.exp() * (lp1 - lp2)).sum()
    want = F.cross_entropy(logits, labels) + kl / 4 * 3.0
    loss = mp.RDropLoss()(logits, labels, alpha=3)
    torch.testing.assert_close(loss, want)
    # gradient as MindSpore's KLDivLoss gives it: none through the target distributions
    (g,) = torch.autograd.grad(loss, logits)
    t1, t2 = lp1.detach(), lp2.detach()
    ref = F.cross_entropy(logits, labels) + 0.75 * ((t2.exp() * (t2 - lp1)).sum() + (t1.exp() * (t1 - lp2)).sum())
    (g_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g, g_ref)
    a, b = mp.rdrop_repeat(torch.tensor([[1, 2], [3, 4]]), torch.tensor([7, 8]))
    assert torch.equal(a, torch.tensor([[1, 2], [1, 2], [3, 4], [3, 4]])) and torch.equal(b, torch.tensor([7, 7, 8, 8]))


class Net(nn.Module):
    def __init__(self, delta: nn.Module) -> None:
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.delta = delta
        self.head = nn.Linear(8, 3)


@pytest.mark.parametrize(
    ("mode", "delta", "trained"),
    [
        ("lora", lambda: mp.LoRADense(8, 8, lora_rank=2, lora_alpha=4), {"delta.dense.lora_A.default.weight",
                                                                         "delta.dense.lora_B.default.weight"}),
        ("adapter", lambda: mp.AdapterLayer(8, 3), {f"delta.block.adapter_{p}.default.{w}" for p in ("down", "up")
                                                    for w in ("weight", "bias")}),
        ("low_rank_adapter", lambda: mp.LowRankAdapterLayer(8, 4),
         {f"delta.block.low_rank_adapter_{p}.default.{w}" for p in ("down", "up") for w in ("w_left", "w_right", "bias")}),
        ("prefixtuning", lambda: mp.PrefixLayer(2, 1, 1, 4, 3, mid_dim=2),
         {"delta.prefix_encoder.embedding.weight"} | {f"delta.prefix_encoder.mlp.{i}.{w}" for i in (0, 2)
                                                      for w in ("weight", "bias")}),
        ("ptuning2", lambda: mp.PrefixEncoder(2, 1, 1, 2, False, 4, 0.0), {"delta.ptuning_encoder.embedding.weight"}),
        ("bitfit", lambda: nn.Linear(8, 8), {"body.bias", "delta.bias"}),
    ],
)
def test_freeze_delta_modes(mode, delta, trained):
    net = Net(delta())
    mp.freeze_delta(net, mode, exclude=["*head*"])
    assert {n for n, p in net.named_parameters() if p.requires_grad} == trained | {"head.weight", "head.bias"}
    mp.freeze_delta(net, mode.upper(), include=["*head.weight"])  # case-insensitive, as MindPet
    assert {n for n, p in net.named_parameters() if p.requires_grad} == trained | (
        {"head.bias"} if mode == "bitfit" else set())


def test_freeze_delta_bitfit_uses_an_applied_bitfit():
    import deltatune as dt

    net = Net(nn.Linear(8, 8))
    dt.apply(net, dt.BitFitConfig(bias_patterns="body.*"))
    mp.freeze_delta(net, "bitfit")
    assert {n for n, p in net.named_parameters() if p.requires_grad} == {"body.bias"}


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        ({"mode": "prompt"}, DeltaConfigError,
         "mode must be a str from ['lora', 'prefixtuning', 'adapter', 'low_rank_adapter', 'bitfit', 'ptuning2'], "
         "got 'prompt'"),
        ({"mode": 3}, DeltaConfigError, "mode must be a str from"),
        ({"mode": "lora", "exclude": "*head*"}, DeltaConfigTypeError, "exclude must be a list of str, got '*head*'"),
        ({"mode": "bitfit", "exclude": ["*nothing*"]}, DeltaConfigError,
         "exclude pattern '*nothing*' matches no parameter of Net"),
        ({"mode": "bitfit", "include": ["*head*"], "exclude": ["*head.bias"]}, DeltaConfigError,
         "parameters ['head.bias'] match both include and exclude"),
        ({"mode": "lora"}, DeltaConfigError, "the model has no ['lora'] parameters"),
    ],
)
def test_freeze_delta_bad_input_changes_nothing(kwargs, exc, message):
    net = Net(nn.Linear(8, 8))
    before = {n: p.requires_grad for n, p in net.named_parameters()}
    with pytest.raises(exc) as info:
        mp.freeze_delta(net, **kwargs)
    assert str(info.value).startswith(message)
    assert {n: p.requires_grad for n, p in net.named_parameters()} == before


def test_freeze_delta_bitfit_without_biases():
    net = nn.Sequential(nn.Linear(2, 2, bias=False))
    with pytest.raises(DeltaConfigError, match=r"mode 'bitfit' trains every bias, but Sequential has no parameter "
                                               r"named '\*bias'"):
        mp.freeze_delta(net, "bitfit")


def test_trainable_params_checkpoint_with_the_trainer(tmp_path):
    model = tiny_lm()
    cb = mp.TrainableParamsCheckPoint(str(tmp_path / "ckpt"), prefix="RUN",
                                      config=mp.CheckpointConfig(save_checkpoint_steps=2, keep_checkpoint_max=2))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "RUN-0_0.safetensors").write_bytes(b"not ours")  # a file the callback did not write
    tr = Trainer(model, TrainConfig(batch_size=2, max_steps=6, progress_bar=False, tensorboard=False),
                 lm_examples(12), callbacks=[cb])
    tr.train()
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["RUN-0_0.safetensors", "RUN-1_4.safetensors", "RUN-1_6.safetensors"]
    state = load_file(tmp_path / "ckpt" / "RUN-1_6.safetensors")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(state) == set(trainable) and "embed.weight" not in state
    for n, p in trainable.items():
        torch.testing.assert_close(state[n], p.detach())


@pytest.mark.parametrize(
    ("args", "exc", "message"),
    [
        (("",), DeltaConfigError, "TrainableParamsCheckPoint.directory is required, got ''"),
        (("relative/dir",), DeltaConfigError,
         "TrainableParamsCheckPoint.directory must be an absolute path, got 'relative/dir'"),
        (("/tmp/x", ""), DeltaConfigError, "TrainableParamsCheckPoint.prefix must be a non-empty str without '/', got ''"),
        (("/tmp/x", "P", {"save_checkpoint_steps": 1}), DeltaConfigTypeError,
         "TrainableParamsCheckPoint.config must be a CheckpointConfig"),
    ],
)
def test_trainable_params_checkpoint_bad_arguments(args, exc, message):
    with pytest.raises(exc) as info:
        mp.TrainableParamsCheckPoint(*args)
    assert str(info.value).startswith(message)


def test_trainable_params_checkpoint_refuses_a_link(tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    with pytest.raises(DeltaConfigError, match="TrainableParamsCheckPoint.directory must not be a link path"):
        mp.TrainableParamsCheckPoint(str(tmp_path / "link"))
    with pytest.raises(DeltaConfigError, match=r"CheckpointConfig.keep_checkpoint_max must be a positive int, got 0"):
        mp.CheckpointConfig(keep_checkpoint_max=0)


@pytest.mark.parametrize(
    ("build", "exc", "message"),
    [
        (lambda: mp.LoRADense(8, 6, lora_rank=0, lora_alpha=8), DeltaConfigError,
         "LoRADense.lora_rank must be a positive int, got 0"),
        (lambda: mp.LoRADense(8.0, 6, lora_rank=2, lora_alpha=8), DeltaConfigTypeError,
         "LoRADense.in_channels must be a positive int, got 8.0 (float)"),
        (lambda: mp.LoRADense(8, -6, lora_rank=2, lora_alpha=8), DeltaConfigError,
         "LoRADense.out_channels must be a positive int, got -6"),
        (lambda: mp.LoRADense(8, 6, lora_rank=2, lora_alpha="8"), DeltaConfigTypeError,
         "LoRADense.lora_alpha must be an int or a float, got '8' (str)"),
        (lambda: mp.LoRADense(8, 6, lora_rank=2, lora_alpha=0), DeltaConfigError, "LoRADense.lora_alpha must not be 0"),
        (lambda: mp.LoRADense(8, 6, lora_rank=2, lora_alpha=-2), DeltaConfigError,
         "LoRADense.lora_alpha must be > 0 (deltatune is stricter than MindPet, which takes any non-zero value), got -2"),
        (lambda: mp.LoRADense(8, 6, lora_rank=2, lora_alpha=8, lora_dropout=0), DeltaConfigTypeError,
         "LoRADense.lora_dropout must be a float in [0, 1), got 0 (int)"),
        (lambda: mp.LoRADense(8, 6, lora_rank=2, lora_alpha=8, lora_dropout=1.0), DeltaConfigError,
         "LoRADense.lora_dropout must be a number in [0, 1), got 1.0"),
        (lambda: mp.LoRADense(8, 6, lora_rank=2, lora_alpha=8, has_bias=1), DeltaConfigTypeError,
         "LoRADense.has_bias must be a bool, got 1 (int)"),
        (lambda: mp.LoRADense(8, 6, lora_rank=2, lora_alpha=8, lora_a_init=torch.zeros(3, 8)), DeltaConfigError,
         "LoRADense.lora_a_init must have shape (2, 8), got (3, 8)"),
        (lambda: mp.LoRADense(8, 6, lora_rank=2, lora_alpha=8, lora_b_init=torch.zeros(6, 3)), DeltaConfigError,
         "LoRADense.lora_b_init must have shape (6, 2), got (6, 3)"),
        (lambda: mp.LoRADense(8, 6, lora_rank=2, lora_alpha=8, weight_init=torch.zeros(8, 6)), DeltaConfigError,
         "LoRADense.weight_init must have shape (6, 8), got (8, 6)"),
        (lambda: mp.LoRADense(8, 6, lora_rank=2, lora_alpha=8, weight_init="orthogonal"), DeltaConfigError,
         "LoRADense.weight_init must be one of"),
        (lambda: mp.LoRADense(8, 6, lora_rank=2, lora_alpha=8, compute_dtype=torch.bfloat16), DeltaConfigTypeError,
         "LoRADense.compute_dtype must be torch.float32 or torch.float16 (MindSpore's mstype.float32 / "
         "mstype.float16), got torch.bfloat16"),
        (lambda: mp.LoRADense(8, 6, lora_rank=2, lora_alpha=8, activation="mish"), DeltaConfigError,
         "LoRADense.activation must be one of ['gelu', 'leakyrelu', 'relu', 'sigmoid', 'silu', 'softmax', 'tanh'], "
         "got 'mish'"),
        (lambda: mp.LoRADense(8, 6, lora_rank=2, lora_alpha=8, activation=3), DeltaConfigTypeError,
         "LoRADense.activation must be a str, an nn.Module or None, got 3 (int)"),
        (lambda: mp.AdapterLayer(0), DeltaConfigError, "AdapterLayer.hidden_size must be a positive int, got 0"),
        (lambda: mp.AdapterLayer(8, bottleneck_size=2.5), DeltaConfigTypeError,
         "AdapterLayer.bottleneck_size must be a positive int, got 2.5 (float)"),
        (lambda: mp.AdapterLayer(8, non_linearity=None), DeltaConfigTypeError,
         "AdapterLayer.non_linearity must be a str, got None"),
        (lambda: mp.AdapterLayer(8, non_linearity="elu"), DeltaConfigError,
         "AdapterLayer.non_linearity must be one of ['gelu', 'relu', 'silu', 'tanh'] (deltatune's adapter "
         "non-linearities; MindPet also takes MindSpore's other activations), got 'elu'"),
        (lambda: mp.AdapterDense(8, 6, bias_init=torch.zeros(5)), DeltaConfigError,
         "AdapterDense.bias_init must have shape (6,), got (5,)"),
        (lambda: mp.AdapterDense(8, 6, param_init_type="float64"), DeltaConfigTypeError,
         "AdapterDense.param_init_type must be torch.float32 or torch.float16"),
        (lambda: mp.LowRankAdapterLayer(8, 9), DeltaConfigError,
         "LowRankAdapterLayer.reduction_factor must be <= the hidden size 8, got 9"),
        (lambda: mp.LowRankAdapterLayer(8, 4, low_rank_size=3), DeltaConfigError,
         "LowRankAdapterLayer.low_rank_size must be <= the bottleneck size 2 (hidden size 8 // reduction_factor 4; "
         "deltatune is stricter than MindPet here), got 3"),
        (lambda: mp.LowRankAdapterLayer(8, 0), DeltaConfigError,
         "LowRankAdapterLayer.reduction_factor must be a positive int, got 0"),
        (lambda: mp.LowRankAdapterLayer(8, 2, low_rank_w_init=1.0), DeltaConfigTypeError,
         "LowRankAdapterLayer.low_rank_w_init must be a str (an initializer name), got 1.0 (float)"),
        (lambda: mp.LowRankAdapterLayer(8, 2, low_rank_w_init="glorot"), DeltaConfigError,
         "LowRankAdapterLayer.low_rank_w_init must be one of"),
        (lambda: mp.LowRankAdapterDense(8, 6, reduction_factor=7), DeltaConfigError,
         "LowRankAdapterDense.reduction_factor must be <= the hidden size 6, got 7"),
        (lambda: mp.LowRankAdapterDense(8, 6, activation=[1]), DeltaConfigTypeError,
         "LowRankAdapterDense.activation must be a str, an nn.Module or None, got [1] (list)"),
        (lambda: mp.PrefixLayer(3, 2, 2, 10, 6), DeltaConfigError,
         "PrefixLayer.prefix_token_num must be a multiple of batch_size 2, got 3"),
        (lambda: mp.PrefixLayer(4, 2, 0, 10, 6), DeltaConfigError, "PrefixLayer.num_heads must be a positive int, got 0"),
        (lambda: mp.PrefixLayer(4, 2, 2, 10, 6, dropout_rate=1.0), DeltaConfigError,
         "PrefixLayer.dropout_rate must be a number in [0, 1), got 1.0"),
        (lambda: mp.PrefixLayer(4, 2, 2, 10, 6, mid_dim="512"), DeltaConfigTypeError,
         "PrefixLayer.mid_dim must be a positive int, got '512' (str)"),
        (lambda: mp.PrefixEncoder(0, 2, 2, 4, True, 5, 0.0), DeltaConfigError,
         "PrefixEncoder.pre_seq_len must be a positive int, got 0"),
        (lambda: mp.PrefixEncoder(3, 2, 2, 4, 1, 5, 0.0), DeltaConfigTypeError,
         "PrefixEncoder.prefix_projection must be a bool (deltatune is stricter than MindPet here), got 1 (int)"),
        (lambda: mp.PrefixEncoder(3, 2, 2, 4, True, 0, 0.0), DeltaConfigError,
         "PrefixEncoder.projection_dim must be a positive int, got 0"),
        (lambda: mp.PrefixEncoder(3, 2, 2, 4, True, 5, -0.1), DeltaConfigError,
         "PrefixEncoder.dropout_prob must be a number in [0, 1), got -0.1"),
        (lambda: mp.PrefixEncoder(3, 2, 2, 4, True, 5, 0.0, out_perm=(0, 1, 2)), DeltaConfigError,
         "PrefixEncoder.out_perm must be a permutation of (0, 1, 2, 3, 4), got (0, 1, 2)"),
        (lambda: mp.RDropLoss()(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), alpha="4"), DeltaConfigTypeError,
         "RDropLoss alpha must be an int or a float, got '4' (str)"),
        (lambda: mp.RDropLoss()(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), alpha=-1), DeltaConfigError,
         "RDropLoss alpha must be >= 0 (deltatune is stricter than MindPet here), got -1"),
        (lambda: mp.rdrop_repeat(torch.tensor(1.0)), DeltaConfigError,
         "rdrop_repeat item 0 must have a batch dimension, got a 0-d tensor"),
        (lambda: mp.rdrop_repeat([1, 2]), DeltaConfigTypeError, "rdrop_repeat item 0 must be a tensor, got [1, 2]"),
    ],
)
def test_shell_argument_checks(build, exc, message):
    with pytest.raises(exc) as info:
        build()
    assert str(info.value).startswith(message)
