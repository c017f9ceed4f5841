"""Prefix-Tuning: numerics against PEFT, training, freezing, folding, checkpoints, generation, errors.

Tiny random-init GPT-2, Llama (GQA: 2 key/value heads for 4 query heads) and BERT (sequence
classification) models are built here. The helpers at the top are also used by
``test_ptuning_v2.py``.
"""

from __future__ import annotations

import copy
import inspect
import re
import types
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import deltatune.api as api  # noqa: E402
from deltatune.checkpoint import load_delta, save_delta  # noqa: E402
from deltatune.errors import (  # noqa: E402
    AdapterNotFoundError,
    DeltaConfigError,
    DeltaConfigTypeError,
    UnsupportedModuleError,
)
from deltatune.freeze import trainable_summary  # noqa: E402
from deltatune.hf_cache import cache_arg, output_cache  # noqa: E402
from deltatune.methods import make_config  # noqa: E402
from deltatune.methods.prefix import PrefixConfig, PrefixEncoder, fold, fold_prefix  # noqa: E402

ARCHS = ("gpt2", "llama", "bert")
CAUSAL = ("gpt2", "llama")
VOCAB = 96
HIDDEN = 32
LAYERS = 2
PAD = 2
# key/value width per layer: heads * head_dim (Llama has 2 kv heads of size 8)
KV = {"gpt2": 32, "llama": 16, "bert": 32}


# ---------------------------------------------------------------------------------------------
# helpers (shared with test_ptuning_v2.py)
# ---------------------------------------------------------------------------------------------
def build(arch: str, seed: int = 0) -> nn.Module:
    """A seeded tiny model in eval mode without dropout."""
    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(
            n_embd=HIDDEN, n_layer=LAYERS, n_head=4, vocab_size=VOCAB, n_positions=64, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=1, pad_token_id=PAD, initializer_range=0.2,
        )
        model = transformers.GPT2LMHeadModel(cfg)
    elif arch == "llama":
        cfg = transformers.LlamaConfig(
            hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
            pad_token_id=PAD, initializer_range=0.2,
        )
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.BertConfig(
            hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64,
            vocab_size=VOCAB, max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, pad_token_id=0,
        )
        model = transformers.BertForSequenceClassification(cfg)
    return model.eval()


def make_batch(arch: str) -> dict[str, torch.Tensor]:
    """Two sequences of 7 with padding: left padding for causal LMs, right padding for BERT."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, VOCAB, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    if arch in CAUSAL:
        ids[0, :2], mask[0, :2] = PAD, 0
        labels = ids.masked_fill(mask == 0, -100)
    else:
        ids[0, -2:], mask[0, -2:] = 0, 0
        labels = torch.tensor([0, 2])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs(batch)).logits


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Real-token positions of a left-padded batch (what ``generate`` computes)."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def train(model: nn.Module, batch: dict[str, torch.Tensor], steps: int = 6, lr: float = 1e-2) -> list[float]:
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def base_state(model: nn.Module, holder_attr: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith(holder_attr + ".")}


def amplify(model: nn.Module, holder_attr: str, factor: float = 3.0) -> None:
    """Make the prefix matter more (random tiny models barely react to a small one)."""
    with torch.no_grad():
        for p in getattr(model, holder_attr).parameters():
            p.mul_(factor)


def greedy(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, steps: int, *, use_cache: bool,
    explicit_positions: bool = True,
) -> torch.Tensor:
    """A plain greedy loop: with the cache it feeds one token per step (explicit mask, positions and
    its cache); without it recomputes the whole sequence every step."""
    past = None
    cur_ids, cur_mask = ids, mask
    with torch.no_grad():
        for _ in range(steps):
            pos = positions(cur_mask)
            if use_cache:
                step_ids = cur_ids if past is None else cur_ids[:, -1:]
                kw = {"position_ids": pos[:, -step_ids.shape[1]:]} if explicit_positions else {}
                kw[cache_arg(model)] = past
                out = model(input_ids=step_ids, attention_mask=cur_mask, use_cache=True, **kw)
                past = output_cache(out)
            else:
                kw = {"position_ids": pos} if explicit_positions else {}
                out = model(input_ids=cur_ids, attention_mask=cur_mask, use_cache=False, **kw)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            cur_ids = torch.cat([cur_ids, nxt], dim=1)
            cur_mask = torch.cat([cur_mask, torch.ones_like(nxt)], dim=1)
    return cur_ids[:, ids.shape[1]:]


def gen_kwargs(steps: int = 6) -> dict:
    return {"max_new_tokens": steps, "do_sample": False, "pad_token_id": PAD, "eos_token_id": None}


def prefix_count(n: int, d: int, mid: int, out: int) -> int:
    """Parameters of a reparameterised prefix: embedding, Linear(d, mid), Linear(mid, out)."""
    return n * d + d * mid + mid + mid * out + out


def expose_past_key_values(module: nn.Module) -> None:
    """Let PEFT find ``past_key_values`` in ``module.forward``'s signature when transformers calls it ``cache``.

    peft 0.21.2 decides whether a backbone takes a prefix cache by looking for ``past_key_values`` in
    its signature, which transformers >= 5.24 renamed to ``cache``. An instance-level forward that
    declares the old name and passes the value on as ``cache`` (what transformers' own
    ``deprecate_kwarg(..., expose_in_signature=True)`` does) lets the unmodified PEFT run.
    """
    forward = module.forward
    sig = inspect.signature(forward)
    if "past_key_values" in sig.parameters or "cache" not in sig.parameters:
        return

    def shim(*args, past_key_values=None, **kwargs):
        return forward(*args, cache=past_key_values, **kwargs)

    params = list(sig.parameters.values())
    old = inspect.Parameter("past_key_values", inspect.Parameter.KEYWORD_ONLY, default=None)
    at = len(params) - 1 if params and params[-1].kind is inspect.Parameter.VAR_KEYWORD else len(params)
    shim.__signature__ = sig.replace(parameters=[*params[:at], old, *params[at:]])
    module.forward = shim


def peft_prefix_model(base: nn.Module, arch: str, n: int, projection: bool, mid: int, encoder: PrefixEncoder):
    """PEFT's prefix tuning on ``base`` with the weights of our ``encoder`` copied in."""
    peft = pytest.importorskip("peft")
    if arch == "bert":  # PEFT calls the backbone of a sequence classifier itself
        expose_past_key_values(base.bert)
    task = peft.TaskType.SEQ_CLS if arch == "bert" else peft.TaskType.CAUSAL_LM
    cfg = peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=n, prefix_projection=projection,
                                  encoder_hidden_size=mid)
    pm = peft.get_peft_model(base, cfg)
    theirs = dict(pm.prompt_encoder["default"].named_parameters())
    ours = dict(encoder.named_parameters())
    assert sorted(k.replace("transform.", "mlp.") for k in theirs) == sorted(ours)
    with torch.no_grad():
        for k, p in theirs.items():
            p.copy_(ours[k.replace("transform.", "mlp.")])
    return pm.eval()


# ---------------------------------------------------------------------------------------------
# numerics
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "arch,reparameterize",
    [("gpt2", True), ("gpt2", False), ("llama", False), ("bert", True), ("bert", False)],
)
def test_outputs_match_peft_prefix_tuning(arch: str, reparameterize: bool) -> None:
    """Same prefix weights -> same logits as PEFT. PEFT shifts token positions by the prefix length;
    we do not, so PEFT gets ``position_ids - n`` (it adds n back). (PEFT's Llama MLP input is the
    kv width, ours the hidden size as in the paper, hence no reparameterised Llama case.)"""
    n, mid = 3, 16
    model = build(arch)
    ref_base = copy.deepcopy(model)
    api.apply(model, PrefixConfig(prefix_token_num=n, mid_dim=mid, reparameterize=reparameterize))
    ref = peft_prefix_model(ref_base, arch, n, reparameterize, mid, model.prefix_encoder.default)
    batch = make_batch(arch)
    mask = batch["attention_mask"]
    pos = positions(mask) if arch in CAUSAL else torch.arange(7).expand(2, -1)
    ours = logits(model, batch)
    with torch.no_grad():
        theirs = ref(input_ids=batch["input_ids"], attention_mask=mask, position_ids=pos - n).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_changes_output_and_disable_gives_base(arch: str) -> None:
    model = build(arch)
    batch = make_batch(arch)
    base = logits(model, batch)
    api.apply(model, PrefixConfig(prefix_token_num=4, mid_dim=16))
    out = logits(model, batch)
    assert out.shape == base.shape
    assert (out - base).abs().max() > 1e-4
    with api.disable_adapters(model):
        assert torch.equal(logits(model, batch), base)
    assert torch.equal(logits(model, batch), out)
    with torch.no_grad():
        # positional arguments and inputs_embeds take the same route
        positional = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        embeds = model.get_input_embeddings()(batch["input_ids"])
        from_embeds = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    assert torch.equal(positional, out)
    torch.testing.assert_close(from_embeds, out, rtol=0, atol=1e-6)


def test_deep_copy_is_independent() -> None:
    model = build("gpt2")
    batch = make_batch("gpt2")
    base = logits(model, batch)
    api.apply(model, PrefixConfig(prefix_token_num=3, mid_dim=16))
    out = logits(model, batch)
    twin = copy.deepcopy(model)
    assert torch.equal(logits(twin, batch), out)
    api.delete_adapter(twin, "default")
    assert torch.equal(logits(twin, batch), base)
    assert torch.equal(logits(model, batch), out)


@pytest.mark.parametrize("arch", CAUSAL)
def test_loss_uses_real_tokens_only(arch: str) -> None:
    """HF's loss with labels equals cross-entropy over the shifted logits of the real tokens."""
    model = build(arch)
    api.apply(model, PrefixConfig(prefix_token_num=3, mid_dim=16))
    batch = make_batch(arch)
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (2, 7, VOCAB)
    manual = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1),
                             ignore_index=-100)
    torch.testing.assert_close(out.loss, manual)


@pytest.mark.parametrize("arch", CAUSAL)
def test_use_cache_flag(arch: str) -> None:
    model = build(arch)
    api.apply(model, PrefixConfig(prefix_token_num=3, mid_dim=16))
    batch = inputs(make_batch(arch))
    with torch.no_grad():
        out = model(**batch, use_cache=False)
        cache = output_cache(model(**batch, use_cache=True))
    assert output_cache(out) is None and not {"cache", "past_key_values"} & set(out.keys())
    assert cache.get_seq_length() == 3 + 7


def test_prefix_layout_in_cache_follows_activation_dtype() -> None:
    """The cache holds, per layer, keys then values of the prefix in the activation dtype (bf16 here)."""
    n = 3
    model = build("llama").to(torch.bfloat16)
    api.apply(model, PrefixConfig(prefix_token_num=n, mid_dim=16))
    enc = model.prefix_encoder.default
    assert enc.embedding.weight.dtype == torch.float32  # fp32 master weights
    batch = inputs(make_batch("llama"))
    with torch.no_grad():
        out = model(**batch, use_cache=True)
        want = enc().to(torch.bfloat16).view(n, LAYERS, 2, 2, 8)  # (n, layer, k/v, kv_head, head_dim)
    assert out.logits.dtype == torch.bfloat16
    for layer in range(LAYERS):
        keys = output_cache(out).layers[layer].keys
        values = output_cache(out).layers[layer].values
        assert keys.dtype == torch.bfloat16 and keys.shape == (2, 2, n + 7, 8)
        for b in range(2):
            assert torch.equal(keys[b, :, :n], want[:, layer, 0].transpose(0, 1))
            assert torch.equal(values[b, :, :n], want[:, layer, 1].transpose(0, 1))


@pytest.mark.parametrize("arch", ARCHS)
def test_autocast_bf16(arch: str) -> None:
    """Under CPU autocast the prefix follows the autocast dtype; gradients reach the fp32 weights."""
    model = build(arch)
    api.apply(model, PrefixConfig(prefix_token_num=3, mid_dim=16))
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**make_batch(arch))
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    grad = model.prefix_encoder.default.embedding.weight.grad
    assert grad is not None and grad.dtype == torch.float32 and grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# training, freezing, counting
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_training_lowers_loss_and_changes_only_delta(arch: str) -> None:
    model = build(arch)
    api.apply(model, PrefixConfig(prefix_token_num=4, mid_dim=16))
    before_base = base_state(model, "prefix_encoder")
    before_delta = {n: p.detach().clone() for n, p in model.prefix_encoder.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"prefix_encoder.{n}" for n in before_delta}
    losses = train(model, make_batch(arch))
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        if n in before_base:
            assert torch.equal(p, before_base[n]), n
    for n, p in model.prefix_encoder.named_parameters():
        assert not torch.equal(p, before_delta[n]), n


def test_bert_classifier_trains_with_modules_to_save() -> None:
    model = build("bert")
    head = copy.deepcopy(model.classifier.state_dict())
    api.apply(model, PrefixConfig(prefix_token_num=4, mid_dim=16, modules_to_save=["classifier"]))
    losses = train(model, make_batch("bert"))
    assert losses[-1] < losses[0]
    assert torch.equal(model.classifier.base_layer.weight, head["weight"])
    assert not torch.equal(model.classifier.modules_to_save["default"].weight, head["weight"])


@pytest.mark.parametrize("arch", ARCHS)
def test_trainable_count_formula(arch: str) -> None:
    n, mid = 5, 24
    out = LAYERS * 2 * KV[arch]
    model = build(arch)
    total = sum(p.numel() for p in model.parameters())
    api.apply(model, PrefixConfig(prefix_token_num=n, mid_dim=mid))
    summary = trainable_summary(model)
    assert summary.trainable == prefix_count(n, HIDDEN, mid, out)
    assert summary.total == total + summary.trainable
    fold(model)
    assert trainable_summary(model).trainable == n * out
    direct = build(arch)
    api.apply(direct, PrefixConfig(prefix_token_num=n, mid_dim=mid, reparameterize=False))
    assert trainable_summary(direct).trainable == n * out


# ---------------------------------------------------------------------------------------------
# folding and checkpoints
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_fold_keeps_outputs(arch: str, tmp_path) -> None:
    model = build(arch)
    api.apply(model, PrefixConfig(prefix_token_num=4, mid_dim=16))
    train(model, make_batch(arch), steps=2)
    batch = make_batch(arch)
    before = logits(model, batch)
    fold_prefix(model, "default")
    enc = model.prefix_encoder.default
    assert enc.mlp is None and enc.embedding.weight.shape == (4, LAYERS * 2 * KV[arch])
    assert enc.embedding.weight.requires_grad
    assert api.get_config(model).reparameterize is False
    assert torch.equal(logits(model, batch), before)
    fold_prefix(model, "default")  # folding twice is a no-op
    assert torch.equal(logits(model, batch), before)
    # a folded adapter round-trips through a checkpoint into a fresh model
    save_delta(model, tmp_path / "folded")
    fresh = load_delta(build(arch), tmp_path / "folded")
    assert torch.equal(logits(fresh, batch), before)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(arch: str, tmp_path) -> None:
    model = build(arch)
    api.apply(model, PrefixConfig(prefix_token_num=4, mid_dim=16))
    train(model, make_batch(arch), steps=2)
    batch = make_batch(arch)
    want = logits(model, batch)
    save_delta(model, tmp_path / "delta")
    fresh = build(arch)
    assert not torch.equal(logits(fresh, batch), want)
    load_delta(fresh, tmp_path / "delta")
    assert torch.equal(logits(fresh, batch), want)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }


# ---------------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", CAUSAL)
def test_generation_with_and_without_cache_agree(arch: str) -> None:
    model = build(arch)
    api.apply(model, PrefixConfig(prefix_token_num=3, mid_dim=16))
    amplify(model, "prefix_encoder")
    batch = make_batch(arch)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    cached = greedy(model, ids, mask, 6, use_cache=True)
    assert torch.equal(cached, greedy(model, ids, mask, 6, use_cache=False))
    # positions computed by the hook give the same tokens
    assert torch.equal(cached, greedy(model, ids, mask, 6, use_cache=True, explicit_positions=False))
    # HF generate (cache created by generate, filled by the hook) agrees with the loop
    with torch.no_grad():
        hf = model.generate(input_ids=ids, attention_mask=mask, **gen_kwargs())[:, ids.shape[1]:]
        hf_nocache = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **gen_kwargs())
    assert torch.equal(hf, cached)
    assert torch.equal(hf_nocache[:, ids.shape[1]:], cached)
    # the prefix matters for generation
    with api.disable_adapters(model):
        assert not torch.equal(greedy(model, ids, mask, 6, use_cache=True), cached)


@pytest.mark.parametrize("arch", CAUSAL)
def test_batched_left_padded_generation_equals_one_by_one(arch: str) -> None:
    model = build(arch)
    api.apply(model, PrefixConfig(prefix_token_num=3, mid_dim=16))
    amplify(model, "prefix_encoder")
    batch = make_batch(arch)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    together = greedy(model, ids, mask, 6, use_cache=True)
    with torch.no_grad():
        hf = model.generate(input_ids=ids, attention_mask=mask, **gen_kwargs())[:, ids.shape[1]:]
    assert torch.equal(hf, together)
    for i in range(2):
        real = ids[i : i + 1, mask[i].bool()]
        alone = greedy(model, real, torch.ones_like(real), 6, use_cache=True)
        assert torch.equal(alone[0], together[i])


@pytest.mark.parametrize("arch", CAUSAL)
def test_beam_search_with_and_without_cache(arch: str) -> None:
    model = build(arch)
    api.apply(model, PrefixConfig(prefix_token_num=3, mid_dim=16))
    amplify(model, "prefix_encoder")
    batch = make_batch(arch)
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], num_beams=3, **gen_kwargs())
    with torch.no_grad():
        cached = model.generate(**kw)
        recomputed = model.generate(use_cache=False, **kw)
        with api.disable_adapters(model):
            base = model.generate(**kw)
    assert torch.equal(cached, recomputed)
    assert not torch.equal(cached, base)


# ---------------------------------------------------------------------------------------------
# named adapters
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_two_named_prefixes(arch: str) -> None:
    model = build(arch)
    batch = make_batch(arch)
    base = logits(model, batch)
    api.apply(model, PrefixConfig(prefix_token_num=3, mid_dim=16), name="a")
    out_a = logits(model, batch)
    api.apply(model, PrefixConfig(prefix_token_num=2, mid_dim=8), name="b")
    assert api.active_adapters(model) == ["b"]
    out_b = logits(model, batch)
    assert not torch.equal(out_a, out_b)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("prefix_encoder.b.") for n in trainable)
    api.set_active_adapter(model, "a")
    assert torch.equal(logits(model, batch), out_a)
    assert all(n.startswith("prefix_encoder.a.") for n, p in model.named_parameters() if p.requires_grad)

    # both active: the prefixes are concatenated (a then b); reference: one direct prefix holding both
    api.set_active_adapter(model, ["a", "b"])
    both = logits(model, batch)
    with torch.no_grad():
        joined = torch.cat([model.prefix_encoder.a(), model.prefix_encoder.b()])
    ref = build(arch)
    api.apply(ref, PrefixConfig(prefix_token_num=5, reparameterize=False))
    with torch.no_grad():
        ref.prefix_encoder.default.embedding.weight.copy_(joined)
    torch.testing.assert_close(both, logits(ref, batch), rtol=0, atol=1e-6)

    # where the hook sits: on the model, or (a 4.x task head whose forward takes no cache) its backbone
    declares = any(n in inspect.signature(model.forward).parameters for n in ("cache", "past_key_values"))
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(model.forward).parameters.values())
    hooked = model if declares or takes_kwargs else model.base_model
    assert arch == "bert" or hooked is model
    assert len(hooked._forward_pre_hooks) == 1 and len(hooked._forward_hooks) == 1
    assert hooked is model or not (model._forward_pre_hooks or model._forward_hooks)

    api.delete_adapter(model, "a")
    assert api.active_adapters(model) == ["b"]
    assert torch.equal(logits(model, batch), out_b)
    api.delete_adapter(model, "b")
    assert "prefix_encoder" not in model._modules
    for module in (model, model.base_model):
        assert not module._forward_pre_hooks and not module._forward_hooks
        assert not [k for k in module.__dict__ if k.startswith("_deltatune_prefix")]
    assert torch.equal(logits(model, batch), base)


def test_unload_restores_base_and_reapply_works() -> None:
    model = build("gpt2")
    batch = make_batch("gpt2")
    base = logits(model, batch)
    api.apply(model, PrefixConfig(prefix_token_num=3, mid_dim=16))
    api.unload(model)
    assert torch.equal(logits(model, batch), base)
    api.apply(model, PrefixConfig(prefix_token_num=3, mid_dim=16))
    assert not torch.equal(logits(model, batch), base)


def test_merge_is_refused() -> None:
    model = build("gpt2")
    api.apply(model, PrefixConfig(prefix_token_num=3, mid_dim=16))
    with pytest.raises(DeltaConfigError, match=re.escape("method 'prefix' (at 'prefix_encoder') cannot be merged")):
        api.merge(model)


def test_dropout_only_in_training() -> None:
    model = build("llama")
    api.apply(model, PrefixConfig(prefix_token_num=4, mid_dim=16, dropout=0.5))
    batch = inputs(make_batch("llama"))
    a, b = logits(model, batch), logits(model, batch)
    assert torch.equal(a, b)
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        c, d = model(**batch).logits, model(**batch).logits
    assert not torch.equal(c, d)


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"prefix_token_num": 0}, DeltaConfigError, "PrefixConfig.prefix_token_num must be a positive int, got 0"),
        ({"prefix_token_num": 2.0}, DeltaConfigTypeError,
         "PrefixConfig.prefix_token_num must be a positive int, got 2.0 (float)"),
        ({"prefix_token_num": True}, DeltaConfigTypeError,
         "PrefixConfig.prefix_token_num must be a positive int, got True (bool)"),
        ({"mid_dim": -1}, DeltaConfigError, "PrefixConfig.mid_dim must be a positive int, got -1"),
        ({"dropout": 1.0}, DeltaConfigError, "PrefixConfig.dropout must be a number in [0, 1), got 1.0"),
        ({"dropout": -0.1}, DeltaConfigError, "PrefixConfig.dropout must be a number in [0, 1), got -0.1"),
        ({"reparameterize": "yes"}, DeltaConfigTypeError, "PrefixConfig.reparameterize must be a bool, got 'yes' (str)"),
        ({"target_modules": ["q_proj"]}, DeltaConfigError,
         "PrefixConfig.target_modules must be None (prefix-tuning adds prefixes to every attention layer), "
         "got ['q_proj']"),
        ({"layers_to_transform": [0]}, DeltaConfigError,
         "PrefixConfig.layers_to_transform must be None (prefix-tuning adds prefixes to every attention layer), "
         "got [0]"),
    ],
)
def test_config_validation(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        PrefixConfig(**kwargs)


def test_config_dict_round_trip() -> None:
    cfg = PrefixConfig(prefix_token_num=7, mid_dim=32, dropout=0.1, reparameterize=False)
    again = make_config(cfg.to_dict())
    assert again == cfg and type(again) is PrefixConfig


def test_unsupported_models() -> None:
    with pytest.raises(UnsupportedModuleError, match=re.escape(
        "prefix-tuning needs a transformers model with a config (num_hidden_layers, num_attention_heads); "
        "Linear has no config"
    )):
        api.apply(nn.Linear(4, 4), PrefixConfig())

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = types.SimpleNamespace(model_type="oddformer", num_hidden_layers=2, hidden_size=8)
            self.proj = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    odd = Odd()
    with pytest.raises(UnsupportedModuleError, match=re.escape(
        "prefix-tuning does not support model type 'oddformer' (Odd): its config has no positive int "
        "num_attention_heads (got None); unsupported architecture"
    )):
        api.apply(odd, PrefixConfig())
    assert "prefix_encoder" not in odd._modules and not api.adapter_names(odd)

    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=32))
    with pytest.raises(UnsupportedModuleError, match=re.escape(
        "prefix-tuning does not support encoder-decoder model type 't5' (T5ForConditionalGeneration)"
    )):
        api.apply(t5, PrefixConfig())


def test_reserved_adapter_name() -> None:
    model = build("gpt2")
    with pytest.raises(DeltaConfigError, match=re.escape(
        "adapter name 'base_layer' is reserved by PrefixTuningHolder; choose another name"
    )):
        api.apply(model, PrefixConfig(), name="base_layer")
    assert not api.adapter_names(model) and "prefix_encoder" not in model._modules


@pytest.mark.parametrize("arch", CAUSAL)
def test_cache_accepted_under_either_name(arch: str) -> None:
    """The hook takes the cache as ``cache`` or ``past_key_values`` and hands it to the model under the
    model's own name (no FutureWarning on transformers >= 5.24, which renamed it); both at once is refused."""
    model = build(arch)
    api.apply(model, PrefixConfig(prefix_token_num=3, mid_dim=16))
    batch = inputs(make_batch(arch))
    nxt = {"input_ids": batch["input_ids"][:, :1], "attention_mask": torch.ones(2, 8, dtype=torch.long),
           "position_ids": positions(torch.cat([batch["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1))[:, -1:]}
    steps = {}
    for name in ("cache", "past_key_values"):
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            cache = output_cache(model(**batch, use_cache=True))
            out = model(**nxt, **{name: cache})
        steps[name] = out.logits
        assert output_cache(out) is cache and cache.get_seq_length() == 3 + 7 + 1
    torch.testing.assert_close(steps["cache"], steps["past_key_values"], rtol=0, atol=0)
    with torch.no_grad():
        cache = output_cache(model(**batch, use_cache=True))
    with pytest.raises(DeltaConfigError, match=re.escape("got a cache under both 'cache' and 'past_key_values'")):
        model(**nxt, cache=cache, past_key_values=cache)


def test_runtime_errors() -> None:
    model = build("llama")
    api.apply(model, PrefixConfig(prefix_token_num=3, mid_dim=16))
    batch = inputs(make_batch("llama"))
    # a cache computed without the prefix cannot be continued with it
    with api.disable_adapters(model), torch.no_grad():
        plain = output_cache(model(**batch, use_cache=True))
    arg = cache_arg(model)  # "cache" from transformers 5.24, "past_key_values" before
    nxt = {"input_ids": batch["input_ids"][:, :1], "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    with pytest.raises(DeltaConfigError, match=re.escape(f"{arg} holds 7 tokens but no prefix")):
        model(**nxt, **{arg: plain})
    # attention_mask must cover the cached and the new tokens, not the prefix
    with pytest.raises(DeltaConfigError, match=re.escape(
        "attention_mask has 5 columns, expected 7 (0 cached tokens + 7 new ones; the prefix is added by deltatune)"
    )):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"][:, :5])
    # switching adapters in the middle of a generation is refused
    with torch.no_grad():
        cache = output_cache(model(**batch, use_cache=True))
    api.apply(model, PrefixConfig(prefix_token_num=2, mid_dim=8), name="other")
    with pytest.raises(DeltaConfigError, match=re.escape(
        f"{arg} holds the prefix of [('prefix', 'default')], but the active prefix adapters are "
        "[('prefix', 'other')]"
    )):
        model(**nxt, **{arg: cache})
    # gradient checkpointing would drop the cache (and the prefix) in training
    renamed = hasattr(model, "activation_checkpointing_enable")  # transformers 5 renamed the methods
    (model.activation_checkpointing_enable if renamed else model.gradient_checkpointing_enable)()
    model.train()
    disable = "activation_checkpointing_disable" if renamed else "gradient_checkpointing_disable"
    with pytest.raises(DeltaConfigError, match=re.escape(
        "prefix methods cannot train with gradient checkpointing: transformers drops the cache in checkpointed "
        f"layers, which would silently drop the prefix; call model.{disable}()"
    )):
        model(**batch)
    with pytest.raises(AdapterNotFoundError, match=re.escape("adapter 'nope' not found on the model")):
        fold_prefix(model, "nope")
    assert model.__dict__["_deltatune_prefix_calls"] == []  # the post hook ran after every failed call


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_generation() -> None:
    model = build("llama").cuda()
    api.apply(model, PrefixConfig(prefix_token_num=3, mid_dim=16))
    assert model.prefix_encoder.default.embedding.weight.is_cuda
    batch = {k: v.cuda() for k, v in make_batch("llama").items()}
    ids, mask = batch["input_ids"], batch["attention_mask"]
    cached = greedy(model, ids, mask, 5, use_cache=True)
    assert torch.equal(cached, greedy(model, ids, mask, 5, use_cache=False))
    losses = train(model, batch, steps=3)
    assert losses[-1] < losses[0]


@pytest.mark.real_model
def test_minilm_real_model() -> None:
    """The bundled MiniLM-L6 (BERT encoder, used as a bare BertModel): the prefix reaches every layer,
    disabling restores the base exactly, and training moves the embedding."""
    import deltatune.models as dm

    if not dm.REGISTERED_MODELS["minilm-l6"].is_installed():
        pytest.skip("minilm-l6 not installed")
    model, tok = dm.load("minilm-l6", task="base")
    model.eval()
    enc = tok(["A man is playing a guitar.", "The stock market fell."], padding=True, return_tensors="pt")
    with torch.no_grad():
        base = model(**enc).last_hidden_state
    api.apply(model, PrefixConfig(prefix_token_num=4, mid_dim=32))
    with torch.no_grad():
        out = model(**enc).last_hidden_state
        with api.disable_adapters(model):
            assert torch.equal(model(**enc).last_hidden_state, base)
    assert out.shape == base.shape and (out - base).abs().max() > 1e-3
    target = torch.zeros_like(base[:, 0])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = (model(**enc).last_hidden_state[:, 0] - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
