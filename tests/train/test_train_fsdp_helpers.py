"""FSDP2 helpers in one process (a 1-rank gloo group): block discovery, mixed precision policy,
gather/swap/write-back, optimizer-state conversion, refusal of shards and empty tensors, and the
Trainer's fsdp mode against the plain one. The 2-process runs are in test_trainer_fsdp.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _train_utils import lm_examples, tiny_llama, trainable_state
from _train_utils import single_thread as _single_thread  # noqa: F401
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from deltatune.errors import CheckpointError, DeltaConfigError
from deltatune.train import TrainConfig, Trainer, read_log
from deltatune.train.fsdp import (
    find_block_modules,
    full_optimizer_state_dict,
    full_parameters,
    is_dtensor,
    is_sharded,
    mixed_precision_policy,
    run_on_rank0,
    save_delta_sharded,
    shard_model,
    shard_optimizer_state_dict,
)
from deltatune.train.optim import AdamW
from deltatune.train.resume import save_trainable_params

CPU = torch.device("cpu")


@pytest.fixture
def group(tmp_path):
    """A one-process gloo process group (what torchrun --nproc_per_node 1 would give)."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


class SubLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x)


class MyBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.ModuleList([SubLayer(), SubLayer()])  # nested "Layer"s: not units of their own

    def forward(self, x):
        for m in self.inner:
            x = x + m(x)
        return x


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.blocks = nn.ModuleList([MyBlock(), MyBlock()])
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        h = self.embed(ids)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def test_find_block_modules_generic_and_transformers():
    from transformers import GPT2Config, GPT2LMHeadModel

    llama = tiny_llama()
    dt.apply(llama, dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert [n for n, _ in find_block_modules(llama)] == ["model.layers.0", "model.layers.1"]  # _no_split_modules
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, n_positions=16,
                                      bos_token_id=0, eos_token_id=0))
    assert [n for n, _ in find_block_modules(gpt2)] == ["transformer.h.0", "transformer.h.1"]
    # no _no_split_modules: ModuleList children whose class ends in Block/Layer, outermost only
    assert [n for n, _ in find_block_modules(Stack())] == ["blocks.0", "blocks.1"]
    assert find_block_modules(nn.Sequential(nn.Linear(2, 2), nn.ReLU())) == []


def test_mixed_precision_policy():
    gpu = mixed_precision_policy("bf16", torch.device("cuda", 0))
    assert gpu.param_dtype == torch.bfloat16 and gpu.reduce_dtype == torch.float32
    for mp, dev in (("bf16", CPU), ("no", CPU), ("no", torch.device("cuda", 0))):
        pol = mixed_precision_policy(mp, dev)
        assert pol.param_dtype is None and pol.reduce_dtype is None
    with pytest.raises(DeltaConfigError, match=r"mixed_precision='fp16' is not supported with distributed='fsdp'"):
        mixed_precision_policy("fp16", CPU)


def test_fsdp_needs_torchrun(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(DeltaConfigError, match=r"distributed='fsdp' needs a torchrun launch \(environment RANK"):
        Trainer(tiny_lm_with_grad(), TrainConfig(distributed="fsdp", progress_bar=False), lm_examples(4))


def tiny_lm_with_grad() -> nn.Module:
    model = tiny_llama(seed=1)
    dt.apply(model, dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init="random"))
    return model


def test_shard_model_errors(group):
    with pytest.raises(DeltaConfigError, match=r"several dtypes \['bfloat16', 'float32'\]"):
        m = Stack()
        m.blocks[0].inner[0].lin.to(torch.bfloat16)
        shard_model(m, device=CPU)
    assert not is_sharded(m)  # checked before anything was sharded
    m = Stack()
    assert shard_model(m, device=CPU) == ["blocks.0", "blocks.1", ""]
    assert is_sharded(m) and all(is_dtensor(p) for p in m.parameters())
    with pytest.raises(DeltaConfigError, match=r"already sharded"):
        shard_model(m, device=CPU)


def test_shard_model_needs_a_process_group():
    with pytest.raises(DeltaConfigError, match=r"needs an initialised default process group"):
        shard_model(Stack(), device=CPU)


def test_full_parameters_swap_restore_and_writeback(group):
    torch.manual_seed(0)
    m = Stack()
    m.head = nn.Linear(4, 4)
    m.blocks[1].inner[1].lin.weight = m.head.weight  # a tied parameter held by two modules
    before = {n: p.detach().clone() for n, p in m.named_parameters(remove_duplicate=False)}
    # blocks.1 shares a weight with the head: it is left to the root unit (FSDP2 would untie it)
    assert shard_model(m, device=CPU) == ["blocks.0", ""]
    assert m.blocks[1].inner[1].lin.weight is m.head.weight
    name = "head.weight"
    with full_parameters(m, [name], rank0_only=True) as inside:
        assert inside is m
        w = m.head.weight
        assert not is_dtensor(w) and isinstance(w, nn.Parameter) and w.shape == (4, 4)
        assert m.blocks[1].inner[1].lin.weight is w  # both holders see the gathered tensor
        assert is_dtensor(m.embed.weight)  # parameters not asked for stay sharded
        torch.testing.assert_close(w.detach(), before[name])
        w.data.fill_(7.0)  # without writeback this is thrown away
    assert is_dtensor(m.head.weight)
    torch.testing.assert_close(m.head.weight.full_tensor(), before[name])
    with full_parameters(m, [name], rank0_only=False, writeback=True):
        m.head.weight.data.fill_(1.5)
    assert is_dtensor(m.head.weight) and m.blocks[1].inner[1].lin.weight is m.head.weight
    assert torch.equal(m.head.weight.full_tensor(), torch.full((4, 4), 1.5))
    with pytest.raises(DeltaConfigError, match=r"writeback=True\) needs rank0_only=False"):
        with full_parameters(m, [name], writeback=True):
            pass
    with pytest.raises(CheckpointError, match=r"no parameter named \['nope\.weight'\]"):
        with full_parameters(m, ["nope.weight"]):
            pass


def test_checkpoint_writers_refuse_shards_and_empty_tensors(group, tmp_path):
    m = Stack()
    shard_model(m, device=CPU)
    with pytest.raises(CheckpointError, match=r"parameter 'embed\.weight' is a sharded DTensor; gather it first"):
        save_trainable_params(m, tmp_path)
    assert not (tmp_path / "delta.safetensors").exists()
    with full_parameters(m):
        save_trainable_params(m, tmp_path)
    saved = load_file(tmp_path / "delta.safetensors")
    assert saved.keys() == {n for n, _ in m.named_parameters()}
    assert saved["embed.weight"].shape == (10, 4)

    empty = nn.Linear(3, 3)
    empty.extra = nn.Parameter(torch.empty(0, 3))
    with pytest.raises(CheckpointError, match=r"parameter 'extra' is empty \(shape \(0, 3\)\); refusing to write it"):
        save_trainable_params(empty, tmp_path / "e")
    with pytest.raises(CheckpointError, match=r"parameter 'extra' is empty"):
        shard_model(empty, device=CPU, blocks=[])
        with full_parameters(empty, ["extra"]):
            pass


@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module")  # the toy model's output is a view; nothing edits it
def test_optimizer_state_full_and_sharded_round_trip(group):
    torch.manual_seed(0)
    m = Stack()
    shard_model(m, device=CPU)
    opt = AdamW(m.parameters(), lr=1e-2)
    m(torch.tensor([[1, 2, 3]])).sum().backward()
    opt.step()
    full = full_optimizer_state_dict(opt)
    params = list(m.parameters())
    for i, st in full["state"].items():
        assert not is_dtensor(st["exp_avg"]) and st["exp_avg"].shape == params[i].shape
        assert torch.equal(st["exp_avg"], opt.state[params[i]]["exp_avg"].full_tensor())
    fresh = AdamW(m.parameters(), lr=1e-2)
    fresh.load_state_dict(shard_optimizer_state_dict(fresh, full))
    for p in params:
        a, b = fresh.state[p]["exp_avg_sq"], opt.state[p]["exp_avg_sq"]
        assert is_dtensor(a) and a.placements == p.placements and torch.equal(a.full_tensor(), b.full_tensor())
        assert fresh.state[p]["step"] == 1


def test_run_on_rank0_raises_everywhere(group):
    calls = []
    run_on_rank0(lambda: calls.append(1))
    assert calls == [1]
    with pytest.raises(ValueError, match="boom"):
        run_on_rank0(lambda: (_ for _ in ()).throw(ValueError("boom")))
    run_on_rank0(lambda: calls.append(2), distributed=False)
    assert calls == [1, 2]


def _cfg(out, distributed):
    return TrainConfig(lr=1e-2, batch_size=2, grad_accum_steps=2, max_steps=3, max_grad_norm=0.05, log_every=1,
                       save_every=3, eval_every=3, seed=4, distributed=distributed, output_dir=str(out),
                       progress_bar=False, tensorboard=False)


def test_one_process_fsdp_trainer_equals_plain_trainer(group, tmp_path):
    data, evals = lm_examples(12, seed=2), lm_examples(3, seed=3)
    plain = Trainer(tiny_lm_with_grad(), _cfg(tmp_path / "plain", "none"), data, eval_dataset=evals)
    plain.train()
    fsdp = Trainer(tiny_lm_with_grad(), _cfg(tmp_path / "fsdp", "fsdp"), data, eval_dataset=evals)
    assert fsdp.is_fsdp and fsdp.dist.enabled and not fsdp.dist.created_group
    assert all(is_dtensor(p) for p in fsdp.model.parameters())
    assert fsdp.trainable_params == plain.trainable_params and fsdp.total_params == plain.total_params
    fsdp.train()
    for a, b in zip(read_log(tmp_path / "fsdp"), read_log(tmp_path / "plain"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-6)
        if a["split"] == "train":
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    got = load_file(tmp_path / "fsdp" / "checkpoint-3" / "delta.safetensors")
    want = trainable_state(plain.model)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
    # Trainer.save_delta / save_delta_sharded: the deltatune format, loadable on a plain model
    assert fsdp.save_delta(tmp_path / "delta") == tmp_path / "delta"
    fresh = tiny_llama(seed=1)
    dt.load_delta(fresh, tmp_path / "delta")
    for k, v in trainable_state(fresh).items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=1e-6)
    assert save_delta_sharded(plain.model, tmp_path / "plain_delta") == tmp_path / "plain_delta"
