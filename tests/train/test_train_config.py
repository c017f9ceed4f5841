"""TrainConfig validation and dict round trips."""

from __future__ import annotations

import pytest

from deltatune.errors import DeltaConfigError, DeltaConfigTypeError
from deltatune.train import TrainConfig


def test_defaults_valid_and_round_trip():
    cfg = TrainConfig()
    assert cfg.clip_grad_norm == 1.0
    d = cfg.to_dict()
    assert TrainConfig.from_dict(d) == cfg
    assert set(d) == set(TrainConfig.known_keys())


def test_from_dict_yaml_style_values():
    cfg = TrainConfig.from_dict({"lr": 3e-4, "adam_betas": [0.8, 0.99], "max_steps": 10, "output_dir": "x"})
    assert cfg.adam_betas == (0.8, 0.99)
    assert cfg.max_steps == 10 and cfg.lr == 3e-4


def test_from_dict_unknown_keys_lists_known():
    with pytest.raises(DeltaConfigError, match=r"unknown TrainConfig key\(s\) 'learning_rate'; known keys: lr, weight_decay"):
        TrainConfig.from_dict({"learning_rate": 1e-3})


def test_from_dict_needs_mapping():
    with pytest.raises(DeltaConfigTypeError, match="needs a mapping"):
        TrainConfig.from_dict([("lr", 1.0)])


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"lr": 0}, DeltaConfigError, r"lr must be a number > 0, got 0\.0"),
        ({"lr": "1e-3"}, DeltaConfigTypeError, r"lr must be a number > 0, got '1e-3' \(str\)"),
        ({"weight_decay": -0.1}, DeltaConfigError, r"weight_decay must be a number >= 0, got -0\.1"),
        ({"adam_betas": (0.9,)}, DeltaConfigTypeError, r"adam_betas must be a pair"),
        ({"adam_betas": (0.9, 1.0)}, DeltaConfigError, r"adam_betas\[1\] must be a number in \[0, 1\), got 1\.0"),
        ({"adam_eps": 0.0}, DeltaConfigError, r"adam_eps must be a number > 0"),
        ({"bias_correction": 1}, DeltaConfigTypeError, r"bias_correction must be a bool, got 1"),
        ({"scheduler": "step"}, DeltaConfigError, r"scheduler must be one of 'linear', 'cosine', 'constant', got 'step'"),
        ({"warmup_steps": -1}, DeltaConfigError, r"warmup_steps must be an int >= 0, got -1"),
        ({"warmup_ratio": 1.0}, DeltaConfigError, r"warmup_ratio must be a number in \[0, 1\), got 1\.0"),
        ({"warmup_steps": 2, "warmup_ratio": 0.1}, DeltaConfigError, r"warmup_steps and warmup_ratio are exclusive"),
        ({"epochs": 0}, DeltaConfigError, r"epochs must be a positive int, got 0"),
        ({"max_steps": 0}, DeltaConfigError, r"max_steps must be a positive int, got 0"),
        ({"batch_size": 2.0}, DeltaConfigTypeError, r"batch_size must be a positive int, got 2\.0 \(float\)"),
        ({"grad_accum_steps": 0}, DeltaConfigError, r"grad_accum_steps must be a positive int, got 0"),
        ({"max_grad_norm": -1}, DeltaConfigError, r"max_grad_norm must be a number >= 0"),
        ({"label_smoothing": 1.0}, DeltaConfigError, r"label_smoothing must be a number in \[0, 1\), got 1\.0"),
        ({"mixed_precision": "fp8"}, DeltaConfigError, r"mixed_precision must be one of 'no', 'bf16', 'fp16', got 'fp8'"),
        ({"device": "tpu"}, DeltaConfigError, r"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
        ({"log_every": 0}, DeltaConfigError, r"log_every must be a positive int, got 0"),
        ({"num_workers": -1}, DeltaConfigError, r"num_workers must be an int >= 0, got -1"),
        ({"keep_last_checkpoints": 0}, DeltaConfigError, r"keep_last_checkpoints must be a positive int, got 0"),
        ({"distributed": "fsdp", "mixed_precision": "fp16"}, DeltaConfigError,
         r"mixed_precision='fp16' is not supported with distributed='fsdp'.*use 'bf16' or 'no'"),
        ({"distributed": "horovod"}, DeltaConfigError, r"distributed must be one of 'none', 'ddp', 'fsdp', got 'horovod'"),
        ({"save_every": 5}, DeltaConfigError, r"save_every=5 needs output_dir"),
        ({"resume_from": "latest"}, DeltaConfigError, r"resume_from='latest' needs output_dir"),
        ({"output_dir": ""}, DeltaConfigError, r"output_dir must be None or a non-empty directory path"),
        ({"seed": True}, DeltaConfigTypeError, r"seed must be an int >= 0, got True \(bool\)"),
        ({"cuda_graph": "yes"}, DeltaConfigTypeError, r"cuda_graph must be a bool or 'auto', got 'yes'"),
        ({"cuda_graph": True, "distributed": "ddp"}, DeltaConfigError,
         r"cuda_graph=True runs in one process; got distributed='ddp' \(use 'none'\)"),
        ({"cuda_graph": True, "mixed_precision": "fp16"}, DeltaConfigError,
         r"cuda_graph=True does not take mixed_precision='fp16' .*use 'bf16' or 'no'"),
    ],
)
def test_validation_errors(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        TrainConfig(**kwargs)


def test_max_grad_norm_zero_or_none_disables_clipping():
    assert TrainConfig(max_grad_norm=0).clip_grad_norm is None
    assert TrainConfig(max_grad_norm=None).clip_grad_norm is None
    assert TrainConfig(max_grad_norm=0.5).clip_grad_norm == 0.5


def test_mixed_precision_yaml_no_reads_as_false():
    """`--set train.mixed_precision=no` gives YAML false; it means "no", and `true` is still refused."""
    import yaml

    value = yaml.safe_load("no")
    assert value is False
    assert TrainConfig.from_dict({"mixed_precision": value}).mixed_precision == "no"
    with pytest.raises(DeltaConfigError, match=r"mixed_precision must be one of 'no', 'bf16', 'fp16', got True"):
        TrainConfig.from_dict({"mixed_precision": True})
