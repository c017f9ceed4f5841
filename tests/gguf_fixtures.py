"""Tiny GGUF fixtures for the GGUF export tests: a byte-level BPE vocabulary (the 256 GPT-2 byte
symbols, three special tokens and a few merges) written as a tokenizer-only GGUF file, a tiny random
Llama whose vocabulary is that one, and that Llama written as a GGUF base model."""

from __future__ import annotations

from pathlib import Path

import torch

SPECIALS = ["<unk>", "<s>", "</s>"]
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"), ("Ġ", "s")]


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out: dict[int, str] = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + n)
            n += 1
    return [out[b] for b in range(256)]


def tokens() -> list[str]:
    return SPECIALS + byte_symbols() + [a + b for a, b in MERGES]


def write_tokenizer_gguf(path: Path) -> Path:
    """A GGUF file holding only metadata: general.architecture 'llama' and a gpt2-style tokenizer."""
    import gguf

    toks = tokens()
    w = gguf.GGUFWriter(path, "llama")
    w.add_type("model")
    w.add_name("tiny-test")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(toks)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(toks) - len(SPECIALS)))
    w.add_token_merges([f"{a} {b}" for a, b in MERGES])
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_llama(*, seed: int = 0, tie: bool = False, std: float = 0.02, layers: int = 2) -> torch.nn.Module:
    """A tiny random Llama over :func:`tokens` (hidden 64, 4 heads of 16, 2 KV heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokens()), max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=tie, rms_norm_eps=1e-5, rope_theta=10000.0, initializer_range=std,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 so a swapped norm tensor shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def hf_tokenizer():
    """The fixture vocabulary as a Hugging Face byte-level BPE tokenizer, built offline with ``tokenizers``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(tokens())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=list(MERGES)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
