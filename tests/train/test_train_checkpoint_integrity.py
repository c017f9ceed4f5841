"""Training checkpoints carry a hash checked on resume; foreign ``checkpoint-N`` directories are refused,
never deleted; bad training data (ids outside the vocabulary, all labels -100) is refused up front."""

from __future__ import annotations

import json

import pytest
import torch
from _train_utils import TinyLM, lm_examples, tiny_lm
from _train_utils import single_thread as _single_thread  # noqa: F401

from deltatune.errors import CheckpointError, DataFormatError, ForeignFileError
from deltatune.train import TrainConfig, Trainer
from deltatune.train.resume import cleanup_stale_checkpoints, verify_checkpoint


def _cfg(out, **kw):
    base = {"lr": 1e-2, "batch_size": 2, "max_steps": 2, "save_every": 2, "log_every": 1, "output_dir": str(out),
            "progress_bar": False, "tensorboard": False, "save_final": False}
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture
def trained(tmp_path):
    Trainer(tiny_lm(), _cfg(tmp_path), lm_examples(6)).train()
    return tmp_path / "checkpoint-2"


def test_complete_marker_records_every_file(trained):
    marker = json.loads((trained / "COMPLETE").read_text())
    assert marker["step"] == 2 and marker["format"] == "deltatune.train_checkpoint"
    files = sorted(p.name for p in trained.iterdir() if p.name != "COMPLETE")
    assert sorted(marker["sha256"]) == files
    import hashlib

    for name, digest in marker["sha256"].items():
        assert hashlib.sha256((trained / name).read_bytes()).hexdigest() == digest
    verify_checkpoint(trained)  # passes


@pytest.mark.parametrize("name", ["delta.safetensors", "optimizer.pt", "trainer_state.pt", "rng_state_rank0.pt"])
def test_one_bit_flip_is_refused_on_resume(tmp_path, trained, name):
    f = trained / name
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))
    tr = Trainer(tiny_lm(), _cfg(tmp_path, max_steps=4), lm_examples(6))
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    with pytest.raises(CheckpointError, match=rf"{name}' has SHA-256 .*, but COMPLETE records .*changed or corrupted"):
        tr.train(resume_from="latest")
    assert all(torch.equal(p, before[n]) for n, p in tr.model.named_parameters())  # nothing was loaded


def test_truncated_or_missing_file_is_refused(tmp_path, trained):
    (trained / "optimizer.pt").write_bytes((trained / "optimizer.pt").read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"optimizer\.pt' has SHA-256"):
        Trainer(tiny_lm(), _cfg(tmp_path, max_steps=4), lm_examples(6)).train(resume_from=trained)
    (trained / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match=r"is missing 'optimizer\.pt' \(recorded in COMPLETE\)"):
        verify_checkpoint(trained)


def test_bad_markers(trained):
    (trained / "COMPLETE").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"COMPLETE' is not valid JSON"):
        verify_checkpoint(trained)
    (trained / "COMPLETE").write_text(json.dumps({"format": "other", "sha256": {}}))
    with pytest.raises(CheckpointError, match=r"is not a deltatune checkpoint marker"):
        verify_checkpoint(trained)
    (trained / "COMPLETE").write_text(json.dumps({"format": "deltatune.train_checkpoint", "step": 3, "sha256": {}}))
    with pytest.raises(CheckpointError, match=r"records step 3, but the directory is step 2"):
        verify_checkpoint(trained)


def test_checkpoint_of_an_older_version_still_resumes(tmp_path, trained):
    """Older deltatune wrote ``COMPLETE`` as just the step: read without hashes."""
    (trained / "COMPLETE").write_text("2\n")
    verify_checkpoint(trained)
    tr = Trainer(tiny_lm(), _cfg(tmp_path, max_steps=3, save_every=0), lm_examples(6))
    tr.train(resume_from="latest")
    assert [r["step"] for r in tr.log_history] == [3]


def test_truncated_safetensors_without_marker_check_is_a_checkpoint_error(trained):
    from deltatune.train.resume import load_trainable_params

    f = trained / "delta.safetensors"
    f.write_bytes(f.read_bytes()[:-9])
    with pytest.raises(CheckpointError, match=r"delta\.safetensors' is not a valid safetensors file"):
        load_trainable_params(tiny_lm(), trained)


# -- foreign directories ----------------------------------------------------------------------
def test_foreign_checkpoint_is_refused_and_kept(tmp_path):
    foreign = tmp_path / "checkpoint-500"
    foreign.mkdir()
    (foreign / "pytorch_model.bin").write_bytes(b"someone else's weights")
    tr = Trainer(tiny_lm(), _cfg(tmp_path), lm_examples(6))
    with pytest.raises(ForeignFileError, match=r"holds \['checkpoint-500'\], checkpoint directories deltatune did not write"):
        tr.train()
    assert (foreign / "pytorch_model.bin").read_bytes() == b"someone else's weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-500"]  # nothing written, nothing deleted
    with pytest.raises(ForeignFileError, match="move them away or choose another output_dir"):
        cleanup_stale_checkpoints(tmp_path)


def test_own_leftovers_are_cleaned_and_rotation_never_leaves_unmarked_dirs(tmp_path):
    (tmp_path / ".tmp-checkpoint-9-0123abcd").mkdir()
    (tmp_path / "notes").mkdir()  # not a checkpoint name: left alone
    tr = Trainer(tiny_lm(), _cfg(tmp_path, max_steps=6, keep_last_checkpoints=1), lm_examples(6))
    tr.train()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["checkpoint-6", "notes"]
    cleanup_stale_checkpoints(tmp_path)  # nothing foreign: no error


# -- training data ---------------------------------------------------------------------------
class VocabLM(TinyLM):
    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head


def _vocab_lm():
    torch.manual_seed(0)
    m = VocabLM()
    m.embed.weight.requires_grad_(False)
    return m


def test_token_id_outside_vocabulary_is_refused(tmp_path):
    data = lm_examples(4)
    data[2] = {"input_ids": [3, 4, 32, 5]}
    with pytest.raises(DataFormatError, match=r"train_dataset\[2\]\['input_ids'\] holds token id 32, outside the model's vocabulary \[0, 32\)"):
        Trainer(_vocab_lm(), _cfg(tmp_path), data)
    data[2] = {"input_ids": [3, -1, 5]}
    with pytest.raises(DataFormatError, match=r"train_dataset\[2\]\['input_ids'\] holds token id -1"):
        Trainer(_vocab_lm(), _cfg(tmp_path), data)
    data[2] = {"input_ids": [3, 4, 5], "labels": [3, 40, -100]}
    data = [{**d, "labels": d.get("labels", d["input_ids"])} for d in data]
    with pytest.raises(DataFormatError, match=r"train_dataset\[2\]\['labels'\] holds 40, neither -100 \(ignored\) nor a class in \[0, 32\)"):
        Trainer(_vocab_lm(), _cfg(tmp_path), data)
    data[2] = {"input_ids": [3, 4, 5], "labels": [-100, 31, -100]}
    Trainer(_vocab_lm(), _cfg(tmp_path), data)  # the edge of the vocabulary is fine


def test_all_labels_ignored_is_refused(tmp_path):
    data = [{"input_ids": [3, 4, 5], "labels": [-100, -100, -100]} for _ in range(4)]
    with pytest.raises(DataFormatError, match=r"every label of train_dataset is -100 .*nothing to train on"):
        Trainer(tiny_lm(), _cfg(tmp_path), data)
    data[1] = {"input_ids": [3, 4, 5], "labels": [7, -100, -100]}  # only position 0: never used after the shift
    with pytest.raises(DataFormatError, match="nothing to train on"):
        Trainer(tiny_lm(), _cfg(tmp_path), data)
    data[1] = {"input_ids": [3, 4, 5], "labels": [-100, -100, 5]}
    Trainer(tiny_lm(), _cfg(tmp_path), data)  # one usable label is enough


def test_read_log_with_cut_or_bad_utf8(tmp_path):
    from deltatune.train import read_log

    log = tmp_path / "train_log.jsonl"
    log.write_bytes(b'{"step": 1, "note": "caf\xc3\xa9"}\n{"step": 2, "note": "caf\xc3')  # killed mid-character
    assert read_log(log) == [{"step": 1, "note": "caf\u00e9"}]
    log.write_bytes(b'{"step": 1, "note": "\xff"}\n{"step": 2}\n')
    with pytest.raises(DataFormatError, match=r"train_log\.jsonl:1: not a JSON object \(not valid UTF-8: invalid start byte\)"):
        read_log(log)
