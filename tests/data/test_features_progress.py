"""``progress=False`` hides the tokenising bar of the data-to-text feature builders; ``True`` shows it."""

from __future__ import annotations

import pytest

from deltatune.data import DataToTextExample, build_causal_lm_features, build_generation_prompts
from deltatune.data import features as features_mod


@pytest.mark.parametrize("progress", [True, False])
@pytest.mark.parametrize("build", ["features", "prompts"])
def test_tokenising_bar_follows_progress(progress, build, word_tok, capfd, monkeypatch):
    monkeypatch.setattr(features_mod, "_CHUNK", 2)  # 6 texts in chunks of 2: large enough for a bar
    examples = [DataToTextExample(source="name [Alimentum]" + " pub" * i, references=["Alimentum is a pub"]) for i in range(6)]
    if build == "features":
        out = build_causal_lm_features(examples, word_tok, max_length=32, progress=progress)
    else:
        out = build_generation_prompts(examples, word_tok, progress=progress)
    assert len(out) == 6
    err = capfd.readouterr().err
    assert ("tokenising" in err) is progress
