"""Tests for the data-to-text task (deltatune.tasks: spec, loader, overrides, rundir, data_to_text, evaluate):
schema validation, overrides, data preparation and the pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from deltatune.errors import CheckpointError, DeltaConfigError, DeltaConfigTypeError
from deltatune.metrics import e2e_scores, read_predictions_file, read_references_file
from deltatune.tasks.data_to_text import (
    CUDA_GRAPH_PAD_MULTIPLE,
    generate_predictions,
    prepare_data,
    run_recipe,
    train_collator,
)
from deltatune.tasks.evaluate import evaluate_run
from deltatune.tasks.loader import load_recipe
from deltatune.tasks.overrides import apply_overrides, parse_override
from deltatune.tasks.rundir import write_references
from deltatune.tasks.spec import DATA_DIR_ENV_VAR
from tests.recipe_fixtures import (
    DEV,
    TEST,
    TRAIN,
    recipe_dict,
    tiny_assets,
    write_e2e_data,
    write_recipe,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SHARED = REPO.parent / "shared" / "data"
MY_CONFIGS = [f"e2e_{m}.yaml" for m in ("lora", "full", "adapter", "low_rank_adapter", "bitfit", "ia3", "prefix",
                                         "ptuning_v2", "cpu")] + ["webnlg_lora.yaml"]


@pytest.fixture(scope="module")
def tiny():
    return tiny_assets()


def _recipe(tiny, tmp_path, **sections):
    model_dir, data_dir = tiny
    return recipe_dict(model_dir, data_dir, tmp_path / "run", **sections)


# ------------------------------------------------------------------------------------------------
# overrides


def test_parse_override_yaml_values():
    assert parse_override("train.lr=1e-3") == (["train", "lr"], 1e-3)
    assert parse_override("data.add_bos=true") == (["data", "add_bos"], True)
    assert parse_override("delta.target_modules=[q_proj, v_proj]") == (["delta", "target_modules"], ["q_proj", "v_proj"])
    assert parse_override("eval.max_examples=null") == (["eval", "max_examples"], None)
    assert parse_override("data.separator= ||") == (["data", "separator"], " ||")  # not YAML: verbatim
    assert parse_override("data.prompt_template='a: {source}'") == (["data", "prompt_template"], "a: {source}")
    assert parse_override("name=a=b") == (["name"], "a=b")
    with pytest.raises(DeltaConfigError, match="--set expects KEY=VALUE"):
        parse_override("train.lr")
    with pytest.raises(DeltaConfigError, match="empty component"):
        parse_override("train..lr=1")


def test_apply_overrides():
    raw = {"delta": {"method": "lora", "r": 4}, "train": {"lr": 1.0}}
    out = apply_overrides(raw, ["train.lr=0.5", "delta.r=8", "delta.rank_pattern.q_proj=2", "eval.split=dev",
                                "output_dir=/x", "model={name_or_path: m}"])
    assert out == {"delta": {"method": "lora", "r": 8, "rank_pattern": {"q_proj": 2}}, "train": {"lr": 0.5},
                   "eval": {"split": "dev"}, "output_dir": "/x", "model": {"name_or_path": "m"}}
    assert raw["train"]["lr"] == 1.0  # the input is not changed
    # the keys inside a section are checked once, by the loader (test_unknown_train_key_is_checked_once)
    assert apply_overrides(raw, ["train.lrr=1"])["train"] == {"lr": 1.0, "lrr": 1}
    with pytest.raises(DeltaConfigError, match=r"unknown recipe key 'trian'; known keys: name, output_dir"):
        apply_overrides(raw, ["trian.lr=1"])
    with pytest.raises(DeltaConfigError, match="'train' is a section"):
        apply_overrides(raw, ["train=3"])
    with pytest.raises(DeltaConfigError, match="takes a value, not sub-keys"):
        apply_overrides(raw, ["data.seed.x=1"])


# ------------------------------------------------------------------------------------------------
# validation


def test_load_recipe_builds_sections(tiny, tmp_path):
    r = load_recipe(_recipe(tiny, tmp_path), ["train.lr=0.5", "generate.num_beams=3"])
    assert r.method == "lora" and not r.is_full
    assert r.train.lr == 0.5 and r.train.output_dir == str(tmp_path / "run")
    assert r.generate.num_beams == 3 and r.generate.length_penalty == 0.8
    assert r.delta_config().r == 2
    d = r.to_dict()
    assert "output_dir" not in d["train"] and d["delta"]["method"] == "lora"
    # the resolved dict loads back to the same recipe
    again = load_recipe(d)
    assert again.to_dict() == d


@pytest.mark.parametrize(
    ("section", "key", "known"),
    [("model", "nme", "name_or_path"), ("data", "datset", "dataset"), ("eval", "splt", "split"),
     ("generate", "beams", "num_beams"), ("train", "learning_rate", "lr")],
)
def test_unknown_keys_name_the_key_and_list_known(tiny, tmp_path, section, key, known):
    raw = _recipe(tiny, tmp_path)
    raw[section] = {**raw[section], key: 1}
    with pytest.raises(DeltaConfigError, match=rf"'{section}\.{key}'.*known keys: .*{known}"):
        load_recipe(raw)


def test_other_validation_errors(tiny, tmp_path):
    raw = _recipe(tiny, tmp_path)
    with pytest.raises(DeltaConfigError, match=r"unknown recipe key\(s\) 'extra'; known keys"):
        load_recipe({**raw, "extra": 1})
    with pytest.raises(DeltaConfigError, match=r"delta.method must be one of \[.*'lora'.*'full'\], got 'lorax'"):
        load_recipe({**raw, "delta": {"method": "lorax"}})
    with pytest.raises(DeltaConfigError, match="delta.method is required"):
        load_recipe({**raw, "delta": {"r": 4}})
    with pytest.raises(DeltaConfigError, match="recipe needs a 'delta' section"):
        load_recipe({k: v for k, v in raw.items() if k != "delta"})
    with pytest.raises(DeltaConfigError, match=r"'full' \(full fine-tuning\) takes no other keys, got \['r'\]"):
        load_recipe({**raw, "delta": {"method": "full", "r": 4}})
    with pytest.raises(DeltaConfigError, match="r must be a positive int, got 0"):
        load_recipe({**raw, "delta": {"method": "lora", "r": 0}})
    with pytest.raises(DeltaConfigError, match="recipe section 'train': lr must be a number > 0, got -1"):
        load_recipe(raw, ["train.lr=-1"])
    with pytest.raises(DeltaConfigError, match="set the top-level output_dir instead"):
        load_recipe({**raw, "train": {**raw["train"], "output_dir": "/tmp/x"}})
    with pytest.raises(DeltaConfigError, match="eval.split and data.train_split are both 'test'"):
        load_recipe(raw, ["data.train_split=test", "data.allow_dev_training=true"])
    with pytest.raises(DeltaConfigError, match="data.allow_dev_training: true"):
        load_recipe(raw, ["data.train_split=dev"])
    with pytest.raises(DeltaConfigError, match=r"eval.metrics\[0\] must be one of 'BLEU'"):
        load_recipe(raw, ["eval.metrics=[BLU]"])
    with pytest.raises(DeltaConfigError, match="data.sample_fraction must be a number in"):
        load_recipe(raw, ["data.sample_fraction=0"])
    with pytest.raises(DeltaConfigTypeError, match="recipe section 'model' must be a mapping"):
        load_recipe({**raw, "model": ["x"]})
    with pytest.raises(DeltaConfigError, match="model.name_or_path must be a registered model"):
        load_recipe(raw, [f"model.name_or_path={tmp_path / 'no_model'}"])


def test_data_dir_resolution(tiny, tmp_path, monkeypatch):
    model_dir, data_dir = tiny
    raw = _recipe(tiny, tmp_path)
    with pytest.raises(DeltaConfigError, match=r"data.data_dir must be an existing directory, got '.*nowhere'"):
        load_recipe(raw, [f"data.data_dir={tmp_path / 'nowhere'}"])
    # relative to the recipe file's parent directory (configs/*.yaml -> <repo>/../shared/data style)
    repo = tmp_path / "repo"
    (repo / "configs").mkdir(parents=True)
    (tmp_path / "shared").symlink_to(data_dir, target_is_directory=True)
    raw["data"] = {**raw["data"], "data_dir": "../shared"}
    path = write_recipe(repo / "configs" / "r.yaml", raw)
    elsewhere = tmp_path / "elsewhere" / "deep"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)  # ../shared is not found from the CWD nor beside the recipe
    assert load_recipe(path).data.data_dir == str((tmp_path / "shared").resolve())
    # the environment variable is used when the recipe does not set data_dir
    raw["data"].pop("data_dir")
    raw.pop("name")
    write_recipe(path, raw)
    monkeypatch.setenv(DATA_DIR_ENV_VAR, str(data_dir))
    r = load_recipe(path)
    assert r.data.data_dir == str(data_dir.resolve())
    assert r.name == "r"  # ... and without a name the recipe is named after its file


def test_missing_split_file(tiny, tmp_path):
    raw = _recipe(tiny, tmp_path)
    empty = tmp_path / "data_no_test"
    (empty / "e2e").mkdir(parents=True)
    for name in ("trainset.csv", "devset.csv"):
        (empty / "e2e" / name).write_bytes((tiny[1] / "e2e" / name).read_bytes())
    with pytest.raises(DeltaConfigError, match=r"eval.split='test': e2e split 'test' not found"):
        load_recipe(raw, [f"data.data_dir={empty}"])


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs the shared data folder")
def test_shipped_configs_validate():
    for name in MY_CONFIGS:
        r = load_recipe(CONFIGS / name)
        assert r.data.data_dir == str(SHARED.resolve())
    lora = load_recipe(CONFIGS / "e2e_lora.yaml")
    c = lora.delta_config()
    assert (c.r, c.alpha, c.dropout, c.target_modules) == (4, 32.0, 0.1, ["q_proj", "v_proj"])
    t = lora.train
    assert (t.lr, t.warmup_steps, t.epochs, t.batch_size, t.label_smoothing) == (2e-4, 500, 5, 8, 0.1)
    g = lora.generate
    assert (g.num_beams, g.length_penalty, g.no_repeat_ngram_size) == (10, 0.8, 4)
    assert load_recipe(CONFIGS / "e2e_full.yaml").is_full
    # DART: training on dev is refused unless asked for, and then the holdout is used
    with pytest.raises(DeltaConfigError, match="allow_dev_training: true.*DART v1.1.1 train is not shipped"):
        load_recipe(CONFIGS / "dart_lora.yaml")
    dart = load_recipe(CONFIGS / "dart_lora.yaml", ["data.allow_dev_training=true"])
    assert (dart.data.train_split, dart.data.dev_split, dart.eval.split) == ("dev", "dev", "test")
    with pytest.raises(DeltaConfigError, match="DART v1.1.1 train is not shipped there.*allow_dev_training: true"):
        load_recipe(CONFIGS / "dart_lora.yaml", ["data.train_split=train"])


# ------------------------------------------------------------------------------------------------
# data


def test_prepare_data_sampling(tiny, tmp_path):
    r = load_recipe(_recipe(tiny, tmp_path), ["eval.max_examples=3"])
    d = prepare_data(r)
    assert len(d.train) == len(TRAIN) and len(d.dev) == len(DEV)
    assert len(d.eval) == 3
    test_sources = [e.source for e in prepare_data(load_recipe(_recipe(tiny, tmp_path))).eval]
    assert len(test_sources) == len(TEST)
    # the kept inputs keep file order and are a subset
    kept = [e.source for e in d.eval]
    assert kept == [s for s in test_sources if s in kept]
    # a stratified half keeps every category (eatType) at least once
    half = prepare_data(load_recipe(_recipe(tiny, tmp_path), ["data.sample_fraction=0.5"])).train
    cats = {e.category for e in prepare_data(load_recipe(_recipe(tiny, tmp_path))).train}
    assert {e.category for e in half} == cats and len(half) < len(TRAIN)


def test_training_on_dev_holds_out_disjoint_part(tiny, tmp_path):
    r = load_recipe(_recipe(tiny, tmp_path), ["data.train_split=dev", "data.allow_dev_training=true",
                                              "data.dev_holdout_fraction=0.5"])
    d = prepare_data(r)
    train, dev = {e.source for e in d.train}, {e.source for e in d.dev}
    assert train and dev and not (train & dev)
    assert len(train) + len(dev) == len(DEV)


def test_eval_split_without_references_is_refused(tiny, tmp_path):
    data = tmp_path / "d"
    write_e2e_data(data)
    (data / "e2e" / "testset_w_refs.csv").write_text('MR\n"name[X], eatType[pub]"\n', encoding="utf-8")
    r = load_recipe(_recipe(tiny, tmp_path, data={"data_dir": str(data)}))
    with pytest.raises(DeltaConfigError, match="has 1 input\\(s\\) without references"):
        prepare_data(r)


def test_write_references_round_trip(tmp_path):
    groups = [["A b .", "A  c\n."], ["D ."], ["E .", "F .", "G ."]]
    write_references(tmp_path / "refs.txt", groups)
    assert (tmp_path / "refs.txt").read_text() == "A b .\nA c .\n\nD .\n\nE .\nF .\nG .\n"
    assert read_references_file(tmp_path / "refs.txt") == [["A b .", "A c ."], ["D ."], ["E .", "F .", "G ."]]
    write_references(tmp_path / "single.txt", [["x"], ["y"]])
    assert read_references_file(tmp_path / "single.txt") == [["x"], ["y"]]
    with pytest.raises(DeltaConfigError, match=r"references\[1\] must be a non-empty list"):
        write_references(tmp_path / "bad.txt", [["x"], []])


# ------------------------------------------------------------------------------------------------
# the pipeline on a tiny model


def test_run_recipe_then_steps_alone(tiny, tmp_path):
    raw = _recipe(tiny, tmp_path)
    r = load_recipe(raw)
    metrics = run_recipe(r, progress=False)
    run = tmp_path / "run"
    for name in ("config.yaml", "train_log.jsonl", "train_summary.json", "predictions.txt", "references.txt",
                 "sources.txt", "metrics.json", "report.md", "plot_loss.png", "plot_val_ppl.png", "plot_lr.png",
                 "delta/delta.safetensors", "delta/delta_config.json", "checkpoint-6/COMPLETE"):
        assert (run / name).is_file(), name
    preds = read_predictions_file(run / "predictions.txt")
    refs = read_references_file(run / "references.txt")
    assert len(preds) == len(refs) == len(TEST)
    assert refs == [[" ".join(x.split()) for x in rs] for _, rs in TEST]
    # metrics.json holds exactly what the scorer gives on the written files, plus the run's costs
    assert json.loads((run / "metrics.json").read_text()) == metrics
    expected = e2e_scores(preds, refs, ["BLEU", "NIST"])
    assert metrics["BLEU"] == pytest.approx(expected["BLEU"]) and metrics["NIST"] == pytest.approx(expected["NIST"])
    from deltatune.models import load

    base, _ = load(tiny[0])
    total = sum(p.numel() for p in base.parameters())
    lora = 2 * 2 * (2 * 32 + (32 + 16))  # 2 layers x (q: r*(32+32), v: r*(32+16)) with r=2
    assert metrics["trainable_params"] == lora
    assert metrics["total_params"] == total + lora
    assert metrics["trainable_percent"] == pytest.approx(100 * lora / (total + lora))
    assert metrics["steps"] == 6 and metrics["wall_time_s"] >= metrics["train_time_s"] > 0
    assert metrics["peak_memory_mb"] > 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg == r.to_dict() and cfg["train"]["lr"] == 1e-2
    report = (run / "report.md").read_text()
    assert f"| BLEU | {metrics['BLEU']:.4f} |" in report and "](plot_loss.png)" in report
    # the versions that produced the numbers are recorded in both
    import importlib.metadata

    import deltatune

    want = {"deltatune": deltatune.__version__, "torch": importlib.metadata.version("torch"),
            "transformers": importlib.metadata.version("transformers"), "peft": importlib.metadata.version("peft")}
    assert metrics["versions"] == want
    assert "| software | " + ", ".join(f"{k} {v}" for k, v in want.items()) + " |" in report

    # generate alone reloads the saved delta: greedy decoding gives the same predictions again
    before = (run / "predictions.txt").read_text()
    info = generate_predictions(r, progress=False)
    assert info["num_inputs"] == len(TEST)
    assert (run / "predictions.txt").read_text() == before
    # evaluate alone rescoring the same files gives the same scores
    again = evaluate_run(r)
    assert again["BLEU"] == pytest.approx(metrics["BLEU"])
    # a second run into the same directory is refused, unless overwrite
    with pytest.raises(DeltaConfigError, match="already holds a run"):
        run_recipe(r, progress=False)


def test_generate_without_training_and_evaluate_missing_files(tiny, tmp_path):
    r = load_recipe(_recipe(tiny, tmp_path))
    with pytest.raises(CheckpointError, match="no delta checkpoint at .*run `deltatune finetune` first"):
        generate_predictions(r, progress=False)
    with pytest.raises(DeltaConfigError, match="predictions file must exist"):
        evaluate_run(r)


def test_train_collator_pads_to_few_shapes_only_when_steps_are_captured():
    from deltatune.train import TrainConfig

    feats = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    eager = train_collator(2, TrainConfig(progress_bar=False, cuda_graph=False))(feats)
    assert eager["input_ids"].shape == (2, 3)
    assert train_collator(2, TrainConfig(progress_bar=False, device="cpu"))(feats)["input_ids"].shape == (2, 3)
    graphed = train_collator(2, TrainConfig(progress_bar=False, cuda_graph=True))(feats)
    assert graphed["input_ids"].shape == (2, CUDA_GRAPH_PAD_MULTIPLE)
    assert graphed["labels"][0].tolist() == [5, 6, 7] + [-100] * (CUDA_GRAPH_PAD_MULTIPLE - 3)
    assert graphed["attention_mask"].sum().item() == 4


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU error")
def test_cuda_graph_on_cpu_is_refused_before_any_work(tiny, tmp_path):
    recipe = load_recipe(_recipe(tiny, tmp_path), ["train.cuda_graph=true"])
    assert recipe.train.cuda_graph is True
    with pytest.raises(DeltaConfigError, match=r"cuda_graph=True needs a CUDA device, got device 'cpu'; set cuda_graph to false"):
        run_recipe(recipe)
    assert not (tmp_path / "run").exists()  # nothing written



def test_unknown_train_key_is_checked_once_by_the_loader(tiny, tmp_path):
    raw = _recipe(tiny, tmp_path)
    msg = r"^unknown key\(s\) 'train.lrr' in recipe section 'train'; known keys: lr, weight_decay, "
    with pytest.raises(DeltaConfigError, match=msg):
        load_recipe(raw, ["train.lrr=1"])  # from --set
    with pytest.raises(DeltaConfigError, match=msg):
        load_recipe({**raw, "train": {**raw["train"], "lrr": 1}})  # from the YAML: the same check, the same message
