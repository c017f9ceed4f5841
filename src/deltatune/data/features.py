"""Tokenisation of data-to-text examples for causal-LM fine-tuning and for generation.

Training sequence (``use_chat_template=False``)::

    [BOS?] tok(prompt_template.format(source=...) + separator) tok(target_prefix + reference) [EOS?]
    labels: -100 ... -100 (prompt)                             target ids ...                 EOS

The prompt and the target are tokenised *separately* (``add_special_tokens=False``), so the label mask
falls exactly on the boundary. With ``use_chat_template=True`` the prompt is
``tokenizer.apply_chat_template([system?, {"role": "user", "content": prompt}], add_generation_prompt=True)``
(no separator) and the target is the reference followed by ``tokenizer.eos_token_id`` (for SmolLM2-Instruct
that is ``<|im_end|>``, the end of the assistant turn).

Truncation (never an error): when a sequence is longer than ``max_length``, the prompt is cut from the
*left* first (a BOS token stays in front; the separator / generation prompt at the end of the prompt is
kept). Only when the target plus EOS alone does not fit is the target cut from the right (then no prompt
tokens remain and the EOS is lost). Every feature carries ``num_prompt_tokens``, so such features can be
found (``num_prompt_tokens`` is then 0, or 1 with a BOS token).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from ..errors import DataFormatError, DeltaConfigError, DeltaConfigTypeError
from ..validation import check_bool, check_int, check_type
from .base import DataToTextExample

__all__ = ["IGNORE_INDEX", "build_causal_lm_features", "build_generation_prompts"]

#: Label value ignored by ``torch.nn.CrossEntropyLoss`` (and HF causal-LM losses).
IGNORE_INDEX = -100

_CHUNK = 2048


def _check_tokenizer(tokenizer: Any) -> None:
    if not callable(tokenizer) or not hasattr(tokenizer, "convert_tokens_to_ids"):
        raise DeltaConfigTypeError(
            f"tokenizer must be a Hugging Face tokenizer, got {type(tokenizer).__name__}"
        )


def _check_examples(examples: Any) -> Sequence[DataToTextExample]:
    if not isinstance(examples, Sequence) or isinstance(examples, (str, bytes)):
        raise DeltaConfigTypeError(f"examples must be a list of DataToTextExample, got {type(examples).__name__}")
    for i, ex in enumerate(examples):
        if not isinstance(ex, DataToTextExample):
            raise DeltaConfigTypeError(
                f"examples[{i}] must be a DataToTextExample, got {type(ex).__name__}"
            )
    return examples


def _encode_many(tokenizer: Any, texts: list[str], desc: str, progress: bool = True) -> list[list[int]]:
    out: list[list[int]] = []
    starts = range(0, len(texts), _CHUNK)
    for s in tqdm(starts, desc=desc, disable=not progress or len(texts) <= _CHUNK, leave=False):
        enc = tokenizer(texts[s : s + _CHUNK], add_special_tokens=False)
        out.extend(list(ids) for ids in enc["input_ids"])
    return out


def _prompt_texts(
    examples: Sequence[DataToTextExample],
    tokenizer: Any,
    prompt_template: str,
    separator: str,
    use_chat_template: bool,
    system_prompt: str | None,
) -> list[str]:
    check_type("prompt_template", prompt_template, str, "a str containing '{source}'")
    check_type("separator", separator, str, "a str")
    check_bool("use_chat_template", use_chat_template)
    if system_prompt is not None:
        check_type("system_prompt", system_prompt, str, "a str or None")
    if "{source}" not in prompt_template:
        raise DeltaConfigError(f"prompt_template must contain '{{source}}', got {prompt_template!r}")
    try:
        prompt_template.format(source="")
    except (KeyError, IndexError, ValueError) as exc:
        raise DeltaConfigError(
            f"prompt_template must only use the field '{{source}}' (write '{{{{'/'}}}}' for braces), "
            f"got {prompt_template!r} ({exc!r})"
        ) from None
    if use_chat_template and not getattr(tokenizer, "chat_template", None):
        raise DeltaConfigError("use_chat_template=True needs a tokenizer with a chat_template, got one without")
    texts = []
    for ex in examples:
        body = prompt_template.format(source=ex.source)
        if use_chat_template:
            messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
            messages.append({"role": "user", "content": body})
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        else:
            texts.append(body + separator)
    return texts


def _special_id(tokenizer: Any, attr: str, flag: str) -> int:
    tid = getattr(tokenizer, attr, None)
    if tid is None:
        raise DeltaConfigError(f"{flag}=True needs tokenizer.{attr}, but the tokenizer has none")
    return int(tid)


def build_causal_lm_features(
    examples: Sequence[DataToTextExample],
    tokenizer: Any,
    *,
    max_length: int,
    prompt_template: str = "{source}",
    separator: str = " ||",
    target_prefix: str | None = None,
    expand_references: bool = True,
    add_eos: bool = True,
    add_bos: bool = False,
    use_chat_template: bool = False,
    system_prompt: str | None = None,
    progress: bool = True,
) -> list[dict]:
    """Tokenise examples into causal-LM training features with the prompt masked out of the labels.

    Args:
        examples: data-to-text examples (e.g. from :func:`~deltatune.data.load_data_to_text`).
        tokenizer: a Hugging Face tokenizer (fast or slow).
        max_length: the longest feature, in tokens (see the module docstring for truncation).
        prompt_template: a ``str.format`` template with ``{source}``.
        separator: appended to the formatted prompt (not with a chat template); the LoRA setup uses ``" ||"``.
        target_prefix: prepended to the reference before tokenising; ``None`` means ``" "`` without a
            chat template (so the reference starts a new word after the separator) and ``""`` with one.
        expand_references: one feature per reference (training); ``False``: one feature per example,
            from its first reference.
        add_eos: append ``tokenizer.eos_token_id`` to the target (it is trained).
        add_bos: put ``tokenizer.bos_token_id`` in front (masked); leave ``False`` for chat templates
            that already write it.
        use_chat_template: format the prompt as a user turn with ``tokenizer.apply_chat_template``.
        system_prompt: optional system message for the chat template.
        progress: the tokenising bar for large inputs (``False``: none).

    Returns:
        One dict per feature: ``input_ids`` and ``labels`` (lists of int, same length),
        ``example_index``, ``reference_index`` and ``num_prompt_tokens``. Examples without references
        give no feature.

    Raises:
        DeltaConfigError: invalid arguments (e.g. ``max_length`` too small, no EOS token).
        DataFormatError: a reference that tokenises to nothing while ``add_eos`` is ``False``.
    """
    _check_tokenizer(tokenizer)
    examples = _check_examples(examples)
    check_bool("expand_references", expand_references)
    check_bool("add_eos", add_eos)
    check_bool("add_bos", add_bos)
    check_int("max_length", max_length, minimum=2 if add_bos else 1)
    if target_prefix is None:
        target_prefix = "" if use_chat_template else " "
    check_type("target_prefix", target_prefix, str, "a str or None")
    eos = _special_id(tokenizer, "eos_token_id", "add_eos") if add_eos else None
    bos = _special_id(tokenizer, "bos_token_id", "add_bos") if add_bos else None
    prompts = _prompt_texts(examples, tokenizer, prompt_template, separator, use_chat_template, system_prompt)

    pairs: list[tuple[int, int]] = []
    targets: list[str] = []
    for i, ex in enumerate(examples):
        refs = ex.references if expand_references else ex.references[:1]
        for j, ref in enumerate(refs):
            pairs.append((i, j))
            targets.append(target_prefix + ref)
    used = sorted({i for i, _ in pairs})
    prompt_ids = dict(zip(used, _encode_many(tokenizer, [prompts[i] for i in used], "tokenising prompts", progress)))
    target_ids = _encode_many(tokenizer, targets, "tokenising targets", progress)

    head = [bos] if bos is not None else []
    features = []
    for (i, j), tgt in zip(pairs, target_ids):
        if not tgt and eos is None:
            raise DataFormatError(
                f"examples[{i}].references[{j}] tokenises to no tokens and add_eos is False: nothing to train"
            )
        tgt = tgt + ([eos] if eos is not None else [])
        body = prompt_ids[i]
        room = max_length - len(head) - len(tgt)
        if room >= len(body):
            prompt = head + body
        elif room >= 0:
            prompt = head + body[len(body) - room :]
        else:
            prompt = head
            tgt = tgt[: max_length - len(head)]
        features.append(
            {
                "input_ids": prompt + tgt,
                "labels": [IGNORE_INDEX] * len(prompt) + tgt,
                "example_index": i,
                "reference_index": j,
                "num_prompt_tokens": len(prompt),
            }
        )
    return features


def build_generation_prompts(
    examples: Sequence[DataToTextExample],
    tokenizer: Any,
    *,
    prompt_template: str = "{source}",
    separator: str = " ||",
    max_length: int | None = None,
    add_bos: bool = False,
    use_chat_template: bool = False,
    system_prompt: str | None = None,
    progress: bool = True,
) -> list[dict]:
    """Tokenise the prompts for generation: one per unique ``source`` (first-seen order).

    The prompt is built exactly as in :func:`build_causal_lm_features` (same arguments), without any
    target. ``max_length`` (optional) cuts long prompts from the left, keeping a BOS token.
    ``progress=False`` hides the tokenising bar.

    Returns:
        One dict per unique source: ``input_ids``, ``example_index`` (of the first example with that
        source), ``source`` and ``references`` (the references of every example with that source, in order).
    """
    _check_tokenizer(tokenizer)
    examples = _check_examples(examples)
    check_bool("add_bos", add_bos)
    if max_length is not None:
        check_int("max_length", max_length, minimum=2 if add_bos else 1)
    bos = _special_id(tokenizer, "bos_token_id", "add_bos") if add_bos else None
    prompts = _prompt_texts(examples, tokenizer, prompt_template, separator, use_chat_template, system_prompt)
    first: dict[str, dict] = {}
    order: list[dict] = []
    for i, ex in enumerate(examples):
        item = first.get(ex.source)
        if item is None:
            item = {"example_index": i, "source": ex.source, "references": []}
            first[ex.source] = item
            order.append(item)
        item["references"].extend(ex.references)
    ids = _encode_many(tokenizer, [prompts[item["example_index"]] for item in order], "tokenising prompts", progress)
    head = [bos] if bos is not None else []
    for item, body in zip(order, ids):
        if max_length is not None and len(head) + len(body) > max_length:
            body = body[len(body) - (max_length - len(head)) :]
        item["input_ids"] = head + body
    return [{"input_ids": it["input_ids"], **{k: v for k, v in it.items() if k != "input_ids"}} for it in order]
