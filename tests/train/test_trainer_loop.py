"""The Trainer loop: learning, evaluation, logs, summary, callbacks, precision, argument errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from _train_utils import lm_examples, tiny_llama, tiny_lm, trainable_state
from _train_utils import single_thread as _single_thread  # noqa: F401

from deltatune.errors import DataFormatError, DeltaConfigError, DeltaConfigTypeError
from deltatune.train import PadCollator, TrainConfig, Trainer, TrainerCallback, lr_factor, read_log


def _cfg(**kw):
    base = {"progress_bar": False, "tensorboard": False}
    base.update(kw)
    return TrainConfig(**base)


def test_loss_goes_down_on_a_fixed_batch():
    data = lm_examples(4, seed=7)
    tr = Trainer(tiny_llama(), _cfg(lr=1e-2, batch_size=4, max_steps=12, scheduler="constant", log_every=1), data,
                 eval_dataset=data)
    before = tr.evaluate()["eval_loss"]
    summary = tr.train()
    losses = [r["loss"] for r in tr.log_history if r["split"] == "train"]
    assert len(losses) == 12
    assert losses[0] == pytest.approx(before)  # first step's loss is measured before its update
    assert summary["eval_loss"] < before / 3, (before, summary["eval_loss"])
    assert losses[-1] < losses[0] / 3


def test_evaluate_is_mean_token_cross_entropy_and_restores_mode():
    data = lm_examples(5, seed=11)
    model = tiny_llama()
    tr = Trainer(model, _cfg(eval_batch_size=2, label_smoothing=0.3), data, eval_dataset=data)
    model.train()
    metrics = tr.evaluate()
    assert model.training
    model.eval()
    batch = PadCollator()(data)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))
    n_tokens = sum(len(d["input_ids"]) - 1 for d in data)
    assert metrics["eval_tokens"] == n_tokens
    assert metrics["eval_loss"] == pytest.approx(float(ref), rel=1e-5)  # no label smoothing in eval
    assert metrics["eval_ppl"] == pytest.approx(math.exp(float(ref)), rel=1e-5)
    with pytest.raises(DeltaConfigError, match="evaluate\\(\\) needs an eval_dataset"):
        Trainer(tiny_lm(), _cfg(), data).evaluate()


def test_jsonl_log_summary_and_tensorboard(tmp_path):
    data = lm_examples(10, seed=2)
    cfg = _cfg(lr=1e-2, batch_size=4, epochs=2, warmup_steps=2, log_every=2, eval_every=3, output_dir=str(tmp_path),
               tensorboard=True, save_final=False)
    tr = Trainer(tiny_lm(), cfg, data, eval_dataset=data[:3])
    summary = tr.train()
    assert tr.total_steps == 6  # 10 examples / batch 4 -> 3 steps per epoch, 2 epochs
    log = read_log(tmp_path / "train_log.jsonl")
    assert log == tr.log_history
    train = [r for r in log if r["split"] == "train"]
    evals = [r for r in log if r["split"] == "eval"]
    assert [r["step"] for r in train] == [2, 4, 6]
    assert [r["step"] for r in evals] == [3, 6]
    keys = {"split", "step", "epoch", "loss", "lr", "grad_norm", "tokens", "loss_tokens", "tokens_per_s", "elapsed",
            "peak_mem_mb"}
    assert all(set(r) == keys for r in train)
    assert all(set(r) == {"split", "step", "epoch", "loss", "ppl", "tokens", "elapsed"} for r in evals)
    # lr logged is the lr used by that step (0-based step s = logged step - 1)
    for r in train:
        assert r["lr"] == pytest.approx(1e-2 * lr_factor("linear", r["step"] - 1, 2, 6))
    assert [r["epoch"] for r in train] == pytest.approx([2 / 3, 4 / 3, 2.0])
    # token counters: every token of both epochs, and every shifted label
    assert train[-1]["tokens"] == 2 * sum(len(d["input_ids"]) for d in data) == summary["tokens"]
    assert train[-1]["loss_tokens"] == 2 * sum(len(d["input_ids"]) - 1 for d in data) == summary["loss_tokens"]
    assert all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 and r["peak_mem_mb"] > 0 for r in train)
    assert [r["elapsed"] for r in train] == sorted(r["elapsed"] for r in train)
    for r in evals:
        assert r["ppl"] == pytest.approx(math.exp(r["loss"]))
    assert summary["eval_loss"] == evals[-1]["loss"]
    model = tr.model
    assert summary["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert summary["total_params"] == sum(p.numel() for p in model.parameters()) > summary["trainable_params"]
    assert summary["steps"] == 6 and summary["final_loss"] == train[-1]["loss"]
    assert json.loads((tmp_path / "train_summary.json").read_text()) == pytest.approx(summary)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert not list(tmp_path.glob("checkpoint-*"))  # save_final=False, save_every=0


def test_read_log_tolerates_torn_last_line_only(tmp_path):
    p = tmp_path / "train_log.jsonl"
    p.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert read_log(tmp_path) == [{"step": 1}, {"step": 2}]
    p.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(DataFormatError, match=r"train_log\.jsonl:2: not a JSON object"):
        read_log(p)


def test_callbacks_and_should_stop(tmp_path):
    events = []

    class Stopper(TrainerCallback):
        def on_train_begin(self, trainer):
            events.append("begin")

        def on_step_end(self, trainer):
            events.append(("step", trainer.state.step))
            if trainer.state.step == 3:
                trainer.should_stop = True

        def on_save(self, trainer, path):
            events.append(("save", path.name))

        def on_train_end(self, trainer, summary):
            events.append(("end", summary["steps"]))

    tr = Trainer(tiny_lm(), _cfg(batch_size=2, max_steps=10, output_dir=str(tmp_path)), lm_examples(8),
                 callbacks=[Stopper()])
    tr.train()
    assert events == ["begin", ("step", 1), ("step", 2), ("step", 3), ("save", "checkpoint-3"), ("end", 3)]
    # log_every=10 was never reached: the stopped window is still logged
    assert [r["step"] for r in tr.log_history] == [3]


def test_dataloader_workers_give_the_same_run():
    data = lm_examples(8, seed=6)
    weights = []
    for workers in (0, 1):
        tr = Trainer(tiny_lm(dropout=0.2), _cfg(batch_size=2, max_steps=3, num_workers=workers), data)
        tr.train()
        weights.append(trainable_state(tr.model))
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name


def test_max_steps_overrides_epochs_and_wraps_epochs():
    tr = Trainer(tiny_lm(), _cfg(batch_size=4, epochs=1, max_steps=5, log_every=1), lm_examples(6))
    assert tr.steps_per_epoch == 2 and tr.total_steps == 5
    tr.train()
    assert [r["epoch"] for r in tr.log_history] == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.5])


def test_gradient_checkpointing_same_gradients():
    data = lm_examples(4, seed=4)
    grads = {}
    for gc in (False, True):
        model = tiny_llama()
        tr = Trainer(model, _cfg(batch_size=4, max_steps=1, gradient_checkpointing=gc), data)
        assert model.is_activation_checkpointing is gc
        got = []
        tr.optimizer.register_step_pre_hook(
            lambda opt, a, k, got=got: got.extend(p.grad.clone() for g in opt.param_groups for p in g["params"])
        )
        tr.train()
        grads[gc] = got
    for a, b in zip(grads[False], grads[True], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_warns_without_support():
    with pytest.warns(UserWarning, match="has no gradient_checkpointing_enable"):
        Trainer(tiny_lm(), _cfg(gradient_checkpointing=True), lm_examples(2))


def test_bf16_autocast_on_cpu_trains():
    tr = Trainer(tiny_lm(), _cfg(batch_size=2, max_steps=2, mixed_precision="bf16", log_every=1), lm_examples(4))
    tr.train()
    assert all(math.isfinite(r["loss"]) for r in tr.log_history)
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_fp16_on_cpu_is_a_clear_error():
    with pytest.raises(DeltaConfigError, match="mixed_precision='fp16' needs a CUDA device .* use 'bf16' or 'no' on CPU"):
        Trainer(tiny_lm(), _cfg(mixed_precision="fp16"), lm_examples(2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_on_cuda_uses_grad_scaler():
    tr = Trainer(tiny_lm(), _cfg(batch_size=2, max_steps=3, mixed_precision="fp16", log_every=1), lm_examples(4))
    assert tr.scaler is not None and tr.device.type == "cuda"
    summary = tr.train()
    assert math.isfinite(summary["final_loss"]) and summary["peak_mem_mb"] > 0


def test_argument_errors():
    data = lm_examples(2)
    model = tiny_lm()
    with pytest.raises(DeltaConfigTypeError, match="config must be a TrainConfig or a dict"):
        Trainer(model, 3, data)
    with pytest.raises(DeltaConfigError, match="unknown TrainConfig key"):
        Trainer(model, {"nope": 1}, data)
    with pytest.raises(DeltaConfigTypeError, match="model must be a torch.nn.Module"):
        Trainer("model", _cfg(), data)
    with pytest.raises(DeltaConfigTypeError, match="train_dataset must be a map-style dataset"):
        Trainer(model, _cfg(), iter(data))
    with pytest.raises(DeltaConfigError, match="train_dataset must hold at least one example"):
        Trainer(model, _cfg(), [])
    with pytest.raises(DeltaConfigTypeError, match="loss_fn must be callable or None"):
        Trainer(model, _cfg(), data, loss_fn=1)
    frozen = tiny_lm().requires_grad_(False)
    with pytest.raises(DeltaConfigError, match="model has no trainable parameters"):
        Trainer(frozen, _cfg(), data)
    with pytest.raises(DeltaConfigError, match="distributed='ddp' needs a torchrun launch"):
        Trainer(model, _cfg(distributed="ddp"), data)
    assert Trainer(model, {"lr": 1e-3, "progress_bar": False}, data).config.lr == 1e-3


def test_logger_on_resume_keeps_each_step_once(tmp_path):
    """A resumed run drops what the interrupted run logged after its checkpoint (and a torn line)."""
    import json

    from deltatune.train import read_log
    from deltatune.train.logging import MetricsLogger

    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    logger = MetricsLogger(tmp_path, tensorboard=False, resume_step=3)
    logger.log({"step": 4, "loss": 0.5})
    logger.close()
    assert [r["step"] for r in read_log(log)] == [1, 2, 3, 4]
