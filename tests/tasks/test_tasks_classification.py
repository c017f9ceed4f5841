"""run_classification: metric wiring against hand-computed values, saved head, CSV tasks, config checks."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import numpy as np
import pytest
import torch
import yaml

from deltatune.checkpoint import load_delta
from deltatune.data import ClassificationCollator, TextPairExample, load_glue
from deltatune.errors import DeltaConfigError
from deltatune.tasks import (
    ClassificationConfig,
    classification_loss,
    predict,
    run_classification,
    subset_examples,
)
from deltatune.tasks.heads import build_classifier
from tests.tasks._tasks_helpers import tiny_bert_dir, write_ag_news, write_glue

TRAIN = {"max_steps": 3, "batch_size": 8, "log_every": 1, "progress_bar": False}


def _ranks(x):
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x))
    r[order] = np.arange(len(x), dtype=float)
    for v in np.unique(x):  # average ranks of ties
        idx = np.where(x == v)[0]
        r[idx] = r[idx].mean()
    return r


def _by_hand(task, preds, labels):
    p, y = np.asarray(preds, dtype=float), np.asarray(labels, dtype=float)
    if task == "stsb":
        pear = float(np.corrcoef(p, y)[0, 1])
        spear = float(np.corrcoef(_ranks(p), _ranks(y))[0, 1])
        return {"pearson": pear, "spearman": spear}
    acc = float(np.mean(p == y))
    tp, fp = np.sum((p == 1) & (y == 1)), np.sum((p == 1) & (y == 0))
    fn, tn = np.sum((p == 0) & (y == 1)), np.sum((p == 0) & (y == 0))
    if task == "mrpc":
        return {"accuracy": acc, "f1": 0.0 if tp == 0 else float(2 * tp / (2 * tp + fp + fn))}
    if task == "cola":
        den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        return {"mcc": 0.0 if den == 0 else float((tp * tn - fp * fn) / den)}
    return {"accuracy": acc}


@pytest.mark.parametrize(
    "task,method,pooling",
    [("sst2", "lora", "mean"), ("mrpc", "bitfit", "cls"), ("stsb", "ia3", "mean"), ("cola", "prefix", "cls")],
)
def test_dev_metrics_equal_hand_computed_from_the_saved_delta(tmp_path, task, method, pooling):
    model_dir = tiny_bert_dir(tmp_path)
    data = write_glue(tmp_path / "data", task)
    out = tmp_path / "run"
    res = run_classification(dict(task=task, model=str(model_dir), method=method, pooling=pooling,
                                  data_dir=str(data), train=TRAIN, output_dir=str(out), progress=False, seed=3,
                                  max_length=32))
    assert res["steps"] == 3 and res["method"] == method and res["pooling"] == pooling
    assert (out / "result.json").is_file() and (out / "train_log.jsonl").is_file()
    # rebuild the classifier, load the saved delta (with the head), predict, score by hand
    dev = load_glue(task, "dev", str(data))
    regression = task == "stsb"
    torch.manual_seed(123)  # a different fresh head: only the saved one can reproduce the scores
    b = build_classifier(str(model_dir), 1 if regression else 2, pooling=pooling)
    load_delta(b.model, out / "delta")
    preds = predict(b.model, dev, ClassificationCollator(b.tokenizer, 32, is_regression=regression),
                    batch_size=5, is_regression=regression)
    want = _by_hand(task, preds, [e.label for e in dev])
    assert res["metrics"].keys() == want.keys()
    for k, v in want.items():
        assert res["metrics"][k] == pytest.approx(v, abs=1e-6), k
    assert res["trainable_percent"] == pytest.approx(100 * res["trainable_params"] / res["total_params"])
    assert 0 < res["trainable_params"] < res["total_params"]
    assert res["eval_examples"] == len(dev) and res["time_per_step_s"] > 0 and res["peak_memory_mb"] > 0


def test_full_fine_tuning_trains_everything_and_csv_task_with_four_labels(tmp_path):
    model_dir = tiny_bert_dir(tmp_path)
    train, dev = write_ag_news(tmp_path)
    res = run_classification(dict(task="csv", csv={"train_file": str(train), "dev_file": str(dev),
                                                   "text_columns": [1, 2], "label_column": 0},
                                  model=str(model_dir), method="full", pooling="mean", train=TRAIN, progress=False))
    assert res["trainable_params"] == res["total_params"] and res["trainable_percent"] == 100.0
    assert set(res["metrics"]) == {"accuracy"} and res["task"] == "csv"
    assert res["delta_dir"] is None
    # the head has 4 outputs: trainable count = encoder + 32*4 + 4
    enc = build_classifier(str(model_dir), 4, pooling="mean").model
    assert res["total_params"] == sum(p.numel() for p in enc.parameters())


def test_classification_loss_matches_torch_formulas():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)

    class M(torch.nn.Module):
        def __init__(self, head):
            super().__init__()
            self.head = head

        def forward(self, x):
            return type("O", (), {"logits": self.head(x)})()

    x, y = torch.randn(5, 4), torch.tensor([0, 2, 1, 1, 0])
    loss, n = classification_loss(False)(M(lin), {"x": x, "labels": y})
    logp = torch.log_softmax(lin(x), -1)
    assert n == 5 and torch.allclose(loss, -logp[torch.arange(5), y].mean())
    reg = torch.nn.Linear(4, 1)
    t = torch.tensor([0.1, 2.0, 3.5, -1.0, 0.0])
    loss, n = classification_loss(True)(M(reg), {"x": x, "labels": t})
    assert n == 5 and torch.allclose(loss, ((reg(x).squeeze(-1) - t) ** 2).mean())


def test_subset_examples_stratified_and_uniform():
    exs = [TextPairExample(f"t{i}", None, 0 if i < 60 else 1) for i in range(80)]
    sub = subset_examples(exs, 20, seed=0, regression=False)
    assert len(sub) == 20 and Counter(e.label for e in sub) == {0: 15, 1: 5}
    assert [int(e.text_a[1:]) for e in sub] == sorted(int(e.text_a[1:]) for e in sub)
    assert subset_examples(exs, 20, seed=0, regression=False) == sub
    reg = [TextPairExample(f"t{i}", None, float(i)) for i in range(30)]
    assert len(subset_examples(reg, 7, seed=1, regression=True)) == 7
    assert subset_examples(reg, None, seed=1, regression=True) == reg


@pytest.mark.parametrize("n", [1, 4, 5, 6, 7])
def test_subset_examples_exact_count_when_per_class_rounding_falls_short(n):
    # three classes of 3: round(n/9 * 3) per class undershoots for 4 and 7 (1+1+1, 2+2+2) and overshoots for 5
    exs = [TextPairExample(f"t{i}", None, i % 3) for i in range(9)]
    sub = subset_examples(exs, n, seed=2, regression=False)
    assert len(sub) == n and len({id(e) for e in sub}) == n
    assert [int(e.text_a[1:]) for e in sub] == sorted(int(e.text_a[1:]) for e in sub)
    assert set(Counter(e.label for e in sub).values()) <= {n // 3, n // 3 + 1} or n < 3


def test_config_errors(tmp_path):
    data = write_glue(tmp_path, "sst2")
    with pytest.raises(DeltaConfigError, match=r"^task must be one of 'cola', 'sst2', 'mrpc', 'stsb', 'rte', 'wnli'"):
        ClassificationConfig(task="sst3", data_dir=str(data))
    with pytest.raises(DeltaConfigError, match=r"^ClassificationConfig.method must be one of 'full', 'adapter', 'bitfit', .*, got 'lorra'$"):
        ClassificationConfig(task="sst2", method="lorra", data_dir=str(data))
    with pytest.raises(DeltaConfigError, match=r"^ClassificationConfig.data_dir must hold glue/MRPC/train.tsv"):
        ClassificationConfig(task="mrpc", data_dir=str(data))
    with pytest.raises(DeltaConfigError, match=r"^unknown ClassificationConfig key\(s\) 'epochs'; known keys: task, "):
        ClassificationConfig.from_dict({"task": "sst2", "epochs": 3})
    with pytest.raises(DeltaConfigError, match=r"^ClassificationConfig.method_config must be empty for method 'full'"):
        ClassificationConfig(task="sst2", method="full", method_config={"r": 4}, data_dir=str(data))
    with pytest.raises(DeltaConfigError, match=r"^LoraConfig.r must be a positive int, got 0$"):
        ClassificationConfig(task="sst2", method="lora", method_config={"r": 0}, data_dir=str(data))
    with pytest.raises(DeltaConfigError, match=r"^ClassificationConfig.train must not set 'seed'"):
        ClassificationConfig(task="sst2", train={"seed": 1}, data_dir=str(data))

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_cuda_graph_is_accepted_and_refused_on_cpu_before_loading(tmp_path):
    data = write_glue(tmp_path / "data", "sst2")
    cfg = ClassificationConfig(task="sst2", train={"cuda_graph": True}, data_dir=str(data), device="cpu",
                               model=str(tmp_path / "no-such-model"))
    with pytest.raises(DeltaConfigError, match=r"^cuda_graph=True needs a CUDA device, got device 'cpu'"):
        run_classification(cfg)  # the model path does not exist: nothing was loaded before the error


def test_classification_loss_can_be_captured():
    from deltatune.train import TrainConfig, Trainer

    loss = classification_loss(False)
    assert loss.unit_count({"x": torch.zeros(5, 4), "labels": torch.zeros(5)}) == 5
    lin = torch.nn.Linear(4, 3)
    tr = Trainer(lin, TrainConfig(progress_bar=False, device="cpu"), [{"x": torch.zeros(4), "labels": 0}],
                 loss_fn=loss)
    tr.device = torch.device("cuda", 0)  # the checks after the device one, without a GPU
    assert tr._eager_reason(tr.config, loss) == ""
    assert tr._eager_reason(tr.config, lambda m, b: (torch.zeros(()), 1)) == (
        "a custom loss_fn without a unit_count(batch) method")


def test_run_directory_is_prepared_like_a_recipe_run(tmp_path):
    """A classification run directory goes through tasks.rundir.prepare_run_dir: a second run there is refused
    before any work, --overwrite deletes only the files a run writes, and config.yaml (the sectioned layout)
    reads back as the run's config."""
    from deltatune.tasks import classification_config

    model_dir = tiny_bert_dir(tmp_path)
    data = write_glue(tmp_path / "data", "sst2")
    out = tmp_path / "run"
    cfg = dict(task="sst2", model=str(model_dir), method="lora", pooling="mean", data_dir=str(data),
               train={**TRAIN, "max_steps": 1}, output_dir=str(out), progress=False, max_length=32)
    first = run_classification(cfg)
    written = sorted(p.name for p in out.iterdir())
    assert written == ["config.yaml", "delta", "result.json", "train_log.jsonl", "train_summary.json"]
    saved = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    assert saved["model"]["name_or_path"] == str(model_dir) and saved["delta"]["method"] == "lora"
    again = classification_config({**saved, "progress": False})
    assert again.to_sections() == saved
    assert dataclasses.replace(again, method_config={}) == ClassificationConfig(**cfg)
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    before = (out / "result.json").read_text(encoding="utf-8")
    log_lines = len((out / "train_log.jsonl").read_text(encoding="utf-8").splitlines())
    with pytest.raises(DeltaConfigError, match=r"^output_dir '.*run' already holds a run \(train_log.jsonl\); pass "
                                               r"--overwrite"):
        run_classification(cfg)
    assert (out / "result.json").read_text(encoding="utf-8") == before  # nothing touched
    second = run_classification(cfg, overwrite=True)
    assert (out / "notes.txt").read_text(encoding="utf-8") == "mine"  # not a file a run writes: kept
    assert sorted(p.name for p in out.iterdir()) == sorted([*written, "notes.txt"])
    assert second["metrics"] == first["metrics"]  # the same seed: the same run
    # the old log was deleted, not appended to
    assert len((out / "train_log.jsonl").read_text(encoding="utf-8").splitlines()) == log_lines
