"""Issue 19's run configs: they load with the paper's / seeds' settings, and a tiny version of each runs on CPU.

The tiny versions swap in a 2-layer random model, small data files in the real formats, a few steps and
short decoding; the data sampling, splits, metrics and scoring of the configs are kept.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from deltatune.data import WEBNLG_SEEN_CATEGORIES
from deltatune.errors import DeltaConfigError
from deltatune.metrics import (
    e2e_scores,
    read_predictions_file,
    read_references_file,
    seen_unseen_labels,
    split_scores,
)
from deltatune.recipes import evaluate_run, load_recipe, run_recipe
from deltatune.sweep import load_sweep, run_sweep
from tests.recipe_fixtures import tiny_assets
from tests.tasks._tasks_helpers import tiny_bert_dir, write_glue

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
E2E = ["e2e_lora.yaml", "e2e_full.yaml", "e2e_lora_18pct.yaml", "e2e_full_18pct.yaml"]
GLUE_TASKS = ["sst2", "mrpc", "cola", "stsb", "rte"]

# WebNLG test entries: two seen categories, two unseen ones (in the LoRA JSON layout)
WEBNLG = {
    "train": [("Airport", [("Aarhus_Airport", "cityServed", "Aarhus")], ["Aarhus Airport serves Aarhus ."]),
              ("Food", [("Ajoblanco", "country", "Spain")], ["Ajoblanco is from Spain .", "Ajoblanco comes from Spain ."]),
              ("Astronaut", [("Alan_Bean", "occupation", "Test_pilot")], ["Alan Bean was a test pilot ."])],
    "dev": [("City", [("Akron", "country", "United_States")], ["Akron is in the United States ."])],
    "test": [("Airport", [("Abilene_Airport", "cityServed", "Abilene")], ["Abilene Airport serves Abilene ."]),
             ("Athlete", [("Aaron_Boogaard", "club", "Wichita_Thunder")], ["Aaron Boogaard plays for Wichita Thunder ."]),
             ("Food", [("Bakso", "country", "Indonesia")], ["Bakso is from Indonesia .", "Bakso is Indonesian ."]),
             ("Politician", [("Abdul_Taib", "party", "Barisan")], ["Abdul Taib is in the Barisan party ."])],
}


def _write_webnlg(data_dir: Path) -> None:
    folder = data_dir / "webnlg2017"
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in WEBNLG.items():
        entries = []
        for n, (cat, triples, refs) in enumerate(rows, start=1):
            entries.append({str(n): {
                "category": cat,
                "modifiedtripleset": [{"subject": s, "property": p, "object": o} for s, p, o in triples],
                "lexicalisations": [{"lex": r, "comment": "good"} for r in refs],
            }})
        text = json.dumps({"entries": entries})
        if split == "train":
            with gzip.open(folder / "lora_train.json.gz", "wt", encoding="utf-8") as fh:
                fh.write(text)
        else:
            (folder / f"lora_{split}.json").write_text(text, encoding="utf-8")


def _write_dart(data_dir: Path) -> None:
    folder = data_dir / "dart"
    folder.mkdir(parents=True, exist_ok=True)
    dev = [{"tripleset": [[f"Place{i}", "country", "France"]],
            "annotations": [{"source": "WikiTableQuestions_lily", "text": f"Place{i} is in France ."}]} for i in range(12)]
    test = [{"tripleset": [["Loch Fyne", "food", "French"]],
             "annotations": [{"source": "e2e", "text": "Loch Fyne serves French food ."}]},
            {"tripleset": [["Browns", "area", "riverside"]],
             "annotations": [{"source": "e2e", "text": "Browns is by the riverside ."}]}]
    (folder / "dart-v1.1.1-full-dev.json").write_text(json.dumps(dev), encoding="utf-8")
    (folder / "dart-v1.1.1-full-test.json").write_text(json.dumps(test), encoding="utf-8")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    model_dir, e2e_dir = tiny_assets()
    data = tmp_path_factory.mktemp("data")
    (data / "e2e").symlink_to(e2e_dir / "e2e")
    _write_webnlg(data)
    _write_dart(data)
    return model_dir, data


def _tiny(model_dir: Path, data_dir: Path, metrics: str) -> list[str]:
    return [
        f"model.name_or_path={model_dir}", f"data.data_dir={data_dir}", "data.max_length=48",
        "train.max_steps=2", "train.device=cpu", "train.mixed_precision=no", "train.tensorboard=false",
        "train.progress_bar=false", "train.log_every=1", "train.eval_every=1", "train.warmup_steps=1",
        "generate.num_beams=2", "generate.max_new_tokens=4", "eval.batch_size=4", f"eval.metrics={metrics}",
    ]


# ------------------------------------------------------------------------------------------------
# the settings as written


def test_e2e_configs_have_the_paper_schedule():
    for name in E2E:
        r = load_recipe(CONFIGS / name, check_data=False)
        t, g = r.train, r.generate
        assert (t.epochs, t.batch_size, t.warmup_steps, t.scheduler, t.weight_decay) == (5, 8, 500, "linear", 0.01)
        assert t.label_smoothing == 0.1 and t.cuda_graph == "auto"  # captured on a GPU by default (issue 18)
        assert (g.num_beams, g.length_penalty, g.no_repeat_ngram_size, g.max_new_tokens) == (10, 0.8, 4, 64)
        assert r.eval.split == "test" and r.eval.max_examples is None
        frac = 0.18 if "18pct" in name else 1.0
        assert (r.data.sample_fraction, r.eval.sample_fraction) == (frac, frac)
        if "18pct" in name:
            assert r.data.dev_fraction == 0.18
        if r.is_full:
            assert (t.lr, t.max_grad_norm) == (5e-5, 1.0)
        else:
            c = r.delta_config()
            assert (c.r, c.alpha, c.dropout, c.target_modules) == (4, 32.0, 0.1, ["q_proj", "v_proj"])
            assert (t.lr, t.max_grad_norm) == (2e-4, None)  # the paper's --clip 0.0


def test_webnlg_and_dart_configs_report_bleu_meteor_ter():
    web = load_recipe(CONFIGS / "webnlg_lora.yaml", check_data=False)
    dart = load_recipe(CONFIGS / "dart_lora.yaml", ["data.allow_dev_training=true"], check_data=False)
    for r in (web, dart):
        assert r.eval.metrics == ["BLEU", "METEOR", "TER"]
        assert (r.train.lr, r.train.epochs, r.train.batch_size, r.train.max_grad_norm) == (2e-4, 5, 8, None)
    assert (dart.data.train_split, dart.data.dev_split) == ("dev", "dev")
    with pytest.raises(DeltaConfigError, match="allow_dev_training: true.*DART v1.1.1 train is not shipped"):
        load_recipe(CONFIGS / "dart_lora.yaml", check_data=False)


def test_glue_lora_vs_full_configs(tmp_path):
    for task in GLUE_TASKS:
        over = {"data.data_dir": str(write_glue(tmp_path / task, task))}  # the configs' own is ../shared/data
        spec = load_sweep(CONFIGS / "glue" / "lora_vs_full" / f"{task}.yaml", overrides=over)
        assert (spec.methods, spec.seeds) == (["full", "lora"], [1, 2, 3])
        assert spec.base["data"]["dataset"] == task and spec.base["model"]["name_or_path"] == "minilm-l6"
        assert spec.base["data"].get("max_train_examples") is None  # full data
        sweep8 = load_sweep(CONFIGS / "glue" / f"{task}.yaml", overrides=over)  # same budget as the 8-method sweep
        assert spec.base["train"] == sweep8.base["train"]
        assert spec.run_config("lora", 1)["train"]["lr"] == 1e-3
        assert spec.run_config("full", 1)["train"]["lr"] == 5e-5


# ------------------------------------------------------------------------------------------------
# tiny versions on CPU


# the 18% configs run in the main suite; the whole-data ones (same pipeline, no sampling) in the slow lane
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if "18pct" not in n else n for n in E2E])
def test_tiny_e2e_runs(assets, tmp_path, name):
    model_dir, data = assets
    r = load_recipe(CONFIGS / name, _tiny(model_dir, data, "[BLEU, NIST]"), output_dir=tmp_path / "run")
    metrics = run_recipe(r, progress=False)
    run = tmp_path / "run"
    preds, refs = read_predictions_file(run / "predictions.txt"), read_references_file(run / "references.txt")
    assert metrics["BLEU"] == pytest.approx(e2e_scores(preds, refs, ["BLEU"])["BLEU"])
    info = json.loads((run / "run_info.json").read_text())
    # 18%: each eatType category (pub 3, coffee shop 2, restaurant 2, none 1 tiny train inputs) keeps one
    assert info["train_examples"] == (4 if "18pct" in name else 8)
    assert len(preds) == 4 and (run / "categories.txt").read_text().split("\n")[:4] == [
        "pub", "restaurant", "coffee shop", "unknown"]
    assert (run / ("model" if "full" in name else "delta")).is_dir()


def test_tiny_webnlg_run_scores_seen_unseen_all(assets, tmp_path):
    model_dir, data = assets
    r = load_recipe(CONFIGS / "webnlg_lora.yaml", _tiny(model_dir, data, "[BLEU, TER]"), output_dir=tmp_path / "run")
    metrics = run_recipe(r, progress=False)
    run = tmp_path / "run"
    cats = (run / "categories.txt").read_text().splitlines()
    assert cats == ["Airport", "Athlete", "Food", "Politician"]
    preds, refs = read_predictions_file(run / "predictions.txt"), read_references_file(run / "references.txt")
    want = split_scores(preds, refs, seen_unseen_labels(cats, WEBNLG_SEEN_CATEGORIES), ["BLEU", "TER"],
                        order=("seen", "unseen"))
    assert list(metrics["splits"]) == ["seen", "unseen", "all"]
    for k in want:
        assert metrics["splits"][k] == pytest.approx(want[k])
    assert [metrics["splits"][k]["num_inputs"] for k in ("seen", "unseen", "all")] == [2, 2, 4]
    assert (metrics["BLEU"], metrics["TER"]) == pytest.approx((want["all"]["BLEU"], want["all"]["TER"]))
    on_disk = json.loads((run / "metrics.json").read_text())
    assert all(on_disk["splits"][k] == pytest.approx(want[k]) for k in want)
    report = (run / "report.md").read_text()
    assert "## Scores by split" in report and "| metric | seen | unseen | all |" in report
    assert f"| TER (lower is better) | {want['seen']['TER']:.4f} | {want['unseen']['TER']:.4f} |" in report
    # scoring again from the files alone (no recipe: the dataset comes from run_info.json)
    again = evaluate_run(run_dir=run, metrics=["TER"])
    assert again["splits"]["unseen"]["TER"] == pytest.approx(want["unseen"]["TER"])
    # a categories file that does not match is refused before scoring, naming both files
    (run / "categories.txt").write_text("Airport\n")
    with pytest.raises(DeltaConfigError, match=r"categories.txt holds 1 categories but .*predictions.txt holds 4"):
        evaluate_run(run_dir=run, metrics=["TER"])
    (run / "categories.txt").unlink()
    with pytest.raises(DeltaConfigError, match=r"seen/unseen category split, which needs .*categories.txt"):
        evaluate_run(run_dir=run, metrics=["TER"])


def test_tiny_dart_run_trains_on_dev(assets, tmp_path):
    model_dir, data = assets
    over = [*_tiny(model_dir, data, "[BLEU, TER]"), "data.allow_dev_training=true"]
    r = load_recipe(CONFIGS / "dart_lora.yaml", over, output_dir=tmp_path / "run")
    metrics = run_recipe(r, progress=False)
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert (info["train_examples"], info["dev_examples"]) == (11, 1)  # 10% of the 12 dev inputs held out
    preds = read_predictions_file(tmp_path / "run" / "predictions.txt")
    refs = read_references_file(tmp_path / "run" / "references.txt")
    assert metrics["TER"] == pytest.approx(e2e_scores(preds, refs, ["TER"])["TER"])
    assert "splits" not in metrics


@pytest.mark.parametrize(
    "task", [t if t in ("sst2", "stsb") else pytest.param(t, marks=pytest.mark.slow) for t in GLUE_TASKS]
)
def test_tiny_glue_lora_vs_full_runs(tmp_path, task):
    over = {"model.name_or_path": str(tiny_bert_dir(tmp_path)), "data.data_dir": str(write_glue(tmp_path / "data", task)),
            "data.max_length": 32, "progress": False, "train.": {"max_steps": 2, "progress_bar": False}}
    spec = load_sweep(CONFIGS / "glue" / "lora_vs_full" / f"{task}.yaml", seeds=[1], output_dir=tmp_path / "out",
                      overrides=over)
    res = run_sweep(spec, isolate=False, progress=False)
    assert [row.method for row in res.rows] == ["full", "lora"]
    assert all("result" in run for run in res.runs), [run.get("error") for run in res.runs]
    assert (tmp_path / "out" / "results.md").is_file()
