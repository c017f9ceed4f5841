"""The one default loss (lm_loss_sum): the chunked head path equals the logits path in values and gradients,
and the Trainer takes it wherever the head allows."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from _train_utils import lm_examples, tiny_llama, tiny_lm, trainable_state
from _train_utils import single_thread as _single_thread  # noqa: F401
from torch import nn

from deltatune.train import PadCollator, TrainConfig, Trainer, chunked_head, lm_loss_sum, logits_loss_sum
from deltatune.train import step as step_mod


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=32, n_positions=64, bos_token_id=0, eos_token_id=1))


def _batch(seed=0, b=3, t=9, vocab=32):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, t), generator=g)
    labels = ids.clone()
    labels[0, 5:] = -100
    labels[2, :3] = -100
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _reference(model, batch, smoothing, shift):
    """The plain formula: F.cross_entropy over the model's full fp32 logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["labels"]
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    flat = labels.reshape(-1)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), flat, ignore_index=-100,
                            label_smoothing=smoothing, reduction="sum")
    return total, int((flat != -100).sum())


@pytest.mark.parametrize("make", [tiny_llama, _gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("smoothing,shift", [(0.0, True), (0.1, True), (0.2, False)])
def test_chunked_loss_equals_plain_loss_values_and_gradients(make, smoothing, shift):
    model = make().eval()  # GPT-2's dropout off: both passes see the same network
    model.requires_grad_(True)
    assert chunked_head(model)[0] is not None
    batch = _batch()
    ref, n_ref = _reference(model, batch, smoothing, shift)
    ref.backward()
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    total, n = lm_loss_sum(model, batch, label_smoothing=smoothing, shift=shift)
    total.backward()
    assert int(n) == n_ref
    torch.testing.assert_close(total, ref, rtol=1e-5, atol=1e-5)
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys()
    for k, g in ref_grads.items():
        torch.testing.assert_close(grads[k], g, rtol=1e-4, atol=1e-6, msg=k)


def test_cpu_default_chunk_is_cpu_chunk_elems_logits_and_equals_the_plain_loss(monkeypatch):
    from deltatune.train import losses

    seen = []
    real = losses.linear_cross_entropy

    def spy(*args, **kwargs):
        seen.append(kwargs["chunk_size"])
        return real(*args, **kwargs)

    monkeypatch.setattr(losses, "linear_cross_entropy", spy)
    model = tiny_llama().eval()
    model.requires_grad_(True)
    batch = _batch()
    assert losses.CPU_CHUNK_ELEMS // 32 >= 27  # the real default: one chunk for this tiny batch
    lm_loss_sum(model, batch)
    monkeypatch.setattr(losses, "CPU_CHUNK_ELEMS", 4 * 32 + 31)  # 4 rows of 32 logits: 7 chunks of 27 rows
    ref, n_ref = _reference(model, batch, 0.1, True)
    ref.backward()
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    total, n = lm_loss_sum(model, batch, label_smoothing=0.1)
    total.backward()
    lm_loss_sum(model, batch, chunk_size=5)  # an explicit chunk size is passed on as it is
    assert seen == [2**24 // 32, 4, 5]
    assert int(n) == n_ref
    torch.testing.assert_close(total, ref, rtol=1e-5, atol=1e-5)
    for k, p in model.named_parameters():  # (float32 sums in another order: within 1e-6 of the largest)
        scale = float(ref_grads[k].abs().max())
        assert scale > 0, k
        torch.testing.assert_close(p.grad, ref_grads[k], rtol=1e-4, atol=1e-6 * scale, msg=k)


def test_logits_path_when_chunked_is_off_or_not_possible():
    model = tiny_llama()
    batch = _batch()
    a, _ = lm_loss_sum(model, batch, chunked=False)
    b, _ = logits_loss_sum(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                           batch["labels"])
    assert torch.equal(a, b)
    # a pure-torch model without a config: no chunked head, the logits are used
    assert chunked_head(tiny_lm()) == (None, "model_type None is not one whose head is a plain linear layer")


def test_chunked_head_reasons():
    model = tiny_llama()
    backbone, head = chunked_head(model)[0]
    assert backbone is model.model and head is model.lm_head
    handle = model.register_forward_pre_hook(lambda m, a: None)
    assert chunked_head(model) == (
        None, "forward hooks sit on the model (e.g. prefix-tuning's), so its own forward must run")
    handle.remove()
    model.lm_head = nn.Sequential(model.lm_head)
    assert chunked_head(model) == (None, "the output embedding is a Sequential, not a plain nn.Linear")


def test_lora_on_the_head_falls_back_to_logits():
    import deltatune as dt

    model = tiny_llama()
    dt.apply(model, dt.LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    found, why = chunked_head(model)
    assert found is None and why.startswith("the output embedding is a ")


def _train(chunked: bool, smoothing: float = 0.1):
    data = lm_examples(12, seed=3, min_len=3, max_len=12)
    cfg = TrainConfig(progress_bar=False, tensorboard=False, lr=5e-3, batch_size=4, max_steps=3, log_every=1,
                      shuffle=False, label_smoothing=smoothing, device="cpu", cuda_graph="auto")
    model = tiny_llama()
    tr = Trainer(model, cfg, data, eval_dataset=data[:5], collate_fn=PadCollator(pad_token_id=2))
    if not chunked:  # the logits path: a no-op hook on the model forbids the chunked head
        model.register_forward_pre_hook(lambda m, a: None)
    assert tr.chunked_loss is chunked
    tr.train()
    losses = [r["loss"] for r in tr.log_history if r["split"] == "train"]
    return losses, tr.evaluate()["eval_loss"], trainable_state(model)


def test_trainer_default_loss_is_chunked_and_trains_as_the_logits_loss():
    losses, ev, state = _train(True)
    ref_losses, ref_ev, ref_state = _train(False)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert ev == pytest.approx(ref_ev, rel=1e-5)
    for k, v in ref_state.items():
        torch.testing.assert_close(state[k], v, rtol=1e-4, atol=1e-6, msg=k)


def test_auto_cuda_graph_says_once_why_it_runs_eagerly(caplog, monkeypatch):
    monkeypatch.setattr(step_mod, "_SAID", set())
    cfg = TrainConfig(progress_bar=False, tensorboard=False, device="cpu")
    assert cfg.cuda_graph == "auto"
    with caplog.at_level(logging.INFO, logger="deltatune.train"):
        tr = Trainer(tiny_lm(), cfg, lm_examples(2))
        Trainer(tiny_lm(), cfg, lm_examples(2))
    said = [r.getMessage() for r in caplog.records if "eagerly" in r.getMessage()]
    assert said == ["Trainer: steps run eagerly (not captured as CUDA graphs): the device is 'cpu', not CUDA"]
    assert tr.capture is False and tr.eager_reason == "the device is 'cpu', not CUDA"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="deltatune.train"):
        off = Trainer(tiny_lm(), TrainConfig(progress_bar=False, tensorboard=False, device="cpu", cuda_graph=False),
                      lm_examples(2))
    assert off.eager_reason == "cuda_graph is false" and not caplog.records  # asked for: nothing to say


def test_eager_reasons_in_order():
    class Loss:
        def __call__(self, model, batch):
            return torch.zeros(()), 1

    cfg = TrainConfig(progress_bar=False, tensorboard=False, device="cpu")
    tr = Trainer(tiny_lm(), cfg, lm_examples(2))
    tr.device = torch.device("cuda", 0)  # the checks after the device one, without a GPU
    assert tr._eager_reason(cfg, None) == ""
    assert tr._eager_reason(cfg, Loss()) == "a custom loss_fn without a unit_count(batch) method"
    Loss.unit_count = lambda self, batch: 1
    assert tr._eager_reason(cfg, Loss()) == ""
    for fields, why in [
        ({"mixed_precision": "fp16"}, "mixed_precision='fp16' (its GradScaler reads the gradients' finiteness on the host)"),
        ({"distributed": "ddp"}, "distributed='ddp' (capture runs in one process)"),
        ({"fused_kernels": "compile"}, "fused_kernels='compile' (capturing compiled blocks fails)"),
    ]:
        assert tr._eager_reason(TrainConfig(progress_bar=False, **fields), None) == why


def test_out_of_range_labels_are_refused_on_the_host_before_training():
    from deltatune.errors import DataFormatError, DeltaConfigError

    examples = [{"input_ids": [3, 4, 5], "labels": [3, 4, 40]}]
    cfg = TrainConfig(progress_bar=False, tensorboard=False, device="cpu", max_steps=1)
    # a list dataset is scanned when the Trainer is built (check_lm_examples)
    with pytest.raises(DataFormatError, match=r"^train_dataset\[0\]\['labels'\] holds 40, neither -100"):
        Trainer(tiny_llama(), cfg, examples)

    class Lazy(torch.utils.data.Dataset):  # not scanned up front: each batch is checked on the host
        def __len__(self):
            return len(examples)

        def __getitem__(self, i):
            return examples[i]

    data = Lazy()
    tr = Trainer(tiny_llama(), cfg, data, eval_dataset=data)
    with pytest.raises(DeltaConfigError, match=r"^labels must be in \[0, 32\) or equal ignore_index \(-100\), got 40$"):
        tr.evaluate()
    with pytest.raises(DeltaConfigError, match=r"^labels must be in \[0, 32\) or equal ignore_index \(-100\), got 40$"):
        tr.train()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_cpu_chunk_log_softmax_in_place_is_bitwise_the_out_of_place_one(dtype, with_bias):
    """On the CPU the chunk's log-softmax overwrites its logits (one (rows, V) buffer); the values must be
    bitwise those of the out-of-place kernel, which the chunked loss used before."""
    from deltatune.kernels.cross_entropy import _chunk_buffer, _chunk_log_softmax

    g = torch.Generator().manual_seed(3)
    for rows, v in [(170, 4099), (7, 50), (1, 3)]:
        h = torch.randn(rows, 24, generator=g, dtype=dtype) * 3
        w = torch.randn(v, 24, generator=g, dtype=dtype)
        b = torch.randn(v, generator=g, dtype=dtype) if with_bias else None
        z = torch.addmm(b, h, w.t()) if b is not None else h @ w.t()
        expected = torch.log_softmax(z, dim=1, dtype=dtype)
        assert torch.equal(_chunk_log_softmax(h, w, b, dtype), expected), (rows, v)  # without a buffer
        buf = _chunk_buffer(h, w, rows + 5, dtype)  # a buffer of at most the rows there are, reused
        assert buf is not None and buf.shape == (rows, v)
        for chunk_rows in (rows, max(1, rows // 2)):  # a full chunk, then a last, shorter one
            hc = h[:chunk_rows]
            zc = torch.addmm(b, hc, w.t()) if b is not None else hc @ w.t()
            got = _chunk_log_softmax(hc, w, b, dtype, buf)
            assert got.dtype == dtype and got.data_ptr() == buf.data_ptr()  # written into the buffer
            assert torch.equal(got, torch.log_softmax(zc, dim=1, dtype=dtype)), (rows, v, chunk_rows)
    # no buffer off the CPU or when the logits are not in the accumulation dtype (bf16 upcasts)
    hb = torch.randn(4, 24, dtype=torch.bfloat16)
    assert _chunk_buffer(hb, torch.randn(9, 24, dtype=torch.bfloat16), 4, torch.float32) is None


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("zero_rows", [[], [0, 3, 4]])
def test_unit_coefficients_zero_rows_bitwise_as_the_multiplication(eps, zero_rows):
    """The CPU "sum" path zeroes the ignored rows instead of multiplying every logit's gradient by its row's
    0/1 coefficient: the same bits."""
    from deltatune.kernels.cross_entropy import _dlogits

    g = torch.Generator().manual_seed(4)
    logp = torch.log_softmax(torch.randn(6, 40, generator=g) * 4, dim=1)
    y = torch.randint(0, 40, (6,), generator=g)
    coef = torch.ones(6)
    coef[zero_rows] = 0.0
    ref = _dlogits(logp.clone(), y, coef, eps, torch.float32, unit_coef=False)
    got = _dlogits(logp.clone(), y, coef, eps, torch.float32, unit_coef=True)
    assert torch.equal(got, ref)
    assert bool((got[zero_rows] == 0).all()) and bool((got[[i for i in range(6) if i not in zero_rows]] != 0).any())
