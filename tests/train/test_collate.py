"""PadCollator: sequence fields are padded, one-number-per-example fields (classification labels) stacked."""

from __future__ import annotations

import torch

from deltatune.train import PadCollator


def test_scalar_labels_are_stacked_not_padded():
    features = [{"input_ids": [5, 6, 7], "labels": 2}, {"input_ids": [8], "labels": 0}]
    batch = PadCollator(pad_token_id=1)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [2, 0]


def test_zero_dim_tensor_labels_without_input_ids():
    features = [{"x": torch.ones(4) * i, "labels": torch.tensor(i % 3)} for i in range(5)]
    batch = PadCollator()(features)
    assert batch["labels"].tolist() == [0, 1, 2, 0, 1]
    assert batch["x"].shape == (5, 4)


def test_sequence_labels_are_still_padded_with_the_ignore_index():
    features = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8], "labels": torch.tensor([8])}]
    batch = PadCollator(pad_token_id=1)(features)
    assert batch["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]
