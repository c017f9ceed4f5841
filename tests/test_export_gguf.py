"""GGUF export (deltatune.export_gguf): file structure, metadata, tensor names and values read back
with gguf.GGUFReader; the round trip through transformers' GGUF loader; errors before any write; the
recipe option and the CLI. The tests marked slow run the exported files in the real llama.cpp
(llama-cpp-python, built by scripts/build_llama_cpp.sh) and skip when it is not installed."""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import deltatune as dt
from deltatune.errors import DeltaConfigError
from deltatune.export_gguf import ExportSpec, export_gguf, find_source_gguf
from deltatune.gguf_check import (
    f16_matmuls,
    llama_cpp_greedy,
    llama_cpp_logits,
    llama_cpp_model,
    perplexity,
    torch_greedy,
    torch_logits,
)
from deltatune.models import load
from tests.gguf_fixtures import tiny_llama, tokens, write_tokenizer_gguf


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """``(dir, tokenizer.gguf, base.gguf)``: the tiny Llama written as an F32 GGUF base model."""
    root = tmp_path_factory.mktemp("gguf")
    tok = write_tokenizer_gguf(root / "tokenizer.gguf")
    base = export_gguf(tiny_llama(), root / "base.gguf", quant="f32", source_gguf=tok, progress=False)
    return root, tok, base


@pytest.fixture(scope="module")
def loaded(assets):
    """The base GGUF loaded the way users load it (deltatune.models.load, through the cache)."""
    root, _, base = assets
    return load(base, cache_dir=root / "cache")


def _read(path: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(path)


def _kv(reader: gguf.GGUFReader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _tensors(reader: gguf.GGUFReader) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (type name, float32 values in numpy (row-major, HF) shape)."""
    out = {}
    for t in reader.tensors:
        shape = tuple(int(s) for s in reversed(t.shape))
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        out[t.name] = (t.tensor_type.name, values)
    return out


def _perm_ref(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order, written out row by row: in each head, row 2i is the HF row i of the
    first rotary half and row 2i+1 the HF row i of the second half."""
    d = w.shape[0] // n_head
    out = torch.empty_like(w)
    for h in range(n_head):
        for i in range(d // 2):
            out[h * d + 2 * i] = w[h * d + i]
            out[h * d + 2 * i + 1] = w[h * d + d // 2 + i]
    return out


def _hf_to_gguf(name: str) -> str:
    """The GGUF name of a tiny-Llama parameter (written out, independent of the gguf name map)."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if name in fixed:
        return fixed[name]
    parts = name.split(".")  # model.layers.N.<block>.<proj>.weight
    sub = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    key = ".".join(parts[3:-1])
    return f"blk.{parts[2]}.{sub[key]}.weight"


def _reference_gguf(state: dict[str, torch.Tensor], n_head: int = 4, n_kv: int = 2) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if "q_proj" in k:
            v = _perm_ref(v, n_head)
        elif "k_proj" in k:
            v = _perm_ref(v, n_kv)
        out[_hf_to_gguf(k)] = v.float()
    return out


def _lora(model, **kw):
    cfg = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"], "init": "random"}
    cfg.update(kw)
    torch.manual_seed(1)
    return dt.apply(model, dt.LoraConfig(**cfg))


def _merged_reference(model) -> dict[str, torch.Tensor]:
    """W + alpha/r * B @ A for every LoRA layer, by the plain formula (the model is not touched)."""
    from deltatune.methods.base import delta_layers, logical_param_name
    from deltatune.methods.lora import LoraLayer

    state = {logical_param_name(k): v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}
    for path, layer in delta_layers(model):
        if isinstance(layer, LoraLayer):
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            state[f"{logical_param_name(path)}.weight"] += layer.alpha["default"] / layer.r["default"] * (B @ A).detach()
    return state


# --------------------------------------------------------------------------------------------------
# round trip and structure


def test_round_trip_through_transformers_gguf_loader_is_bit_identical(assets, loaded, tmp_path):
    _, _, base = assets
    model, tokenizer = loaded
    ref = tiny_llama()
    # transformers' loader undid the q/k permutation and the names: the model is the original, exactly
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert find_source_gguf(model) == base.resolve()
    again = export_gguf(model, tmp_path / "again.gguf", quant="f32", progress=False)  # source found by itself
    a, b = _read(base), _read(again)
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors):
        assert ta.tensor_type == tb.tensor_type == gguf.GGMLQuantizationType.F32
        assert np.array_equal(ta.data, tb.data), ta.name
    assert _kv(a) == _kv(b)
    # the tokenizer transformers built from the fixture's GGUF vocabulary is that vocabulary
    assert tokenizer.convert_ids_to_tokens(list(range(len(tokens())))) == tokens()


def test_merged_f32_tensors_names_and_metadata(assets, tmp_path):
    _, tok, _ = assets
    model = _lora(tiny_llama())
    out = export_gguf(model, tmp_path / "m.gguf", kind="merged", quant="f32", source_gguf=tok, progress=False)
    reader = _read(out)
    got = _tensors(reader)
    want = _reference_gguf(_merged_reference(model))
    assert set(got) == set(want)
    for name, ref in want.items():
        kind, values = got[name]
        assert kind == "F32", name
        np.testing.assert_allclose(values, ref.numpy(), rtol=0, atol=1e-6, err_msg=name)
    kv = _kv(reader)
    assert kv["general.architecture"] == "llama" and kv["general.type"] == "model"
    assert kv["general.file_type"] == 0 and kv["general.name"] == "tiny-test"
    expect = {"llama.block_count": 2, "llama.embedding_length": 64, "llama.feed_forward_length": 128,
              "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 16,
              "llama.context_length": 256, "llama.vocab_size": len(tokens()), "llama.rope.freq_base": 10000.0}
    for k, v in expect.items():
        assert kv[k] == v, k
    assert kv["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    src = _kv(_read(tok))
    for k, v in src.items():
        if k.startswith("tokenizer."):
            assert kv[k] == v, k
    # the model keeps its adapters and its outputs
    assert dt.adapter_names(model) == ["default"]


def test_merged_quantised_values(assets, tmp_path):
    _, tok, _ = assets
    model = _lora(tiny_llama())
    want = _reference_gguf(_merged_reference(model))
    for file_quant, tname in (("f16", "F16"), ("q8_0", "Q8_0"), ("q4_0", "Q4_0"), ("q4_1", "Q4_1")):
        reader = _read(export_gguf(model, tmp_path / f"{file_quant}.gguf", quant=file_quant, source_gguf=tok,
                                   progress=False))
        assert _kv(reader)["general.file_type"] == {"f16": 1, "q8_0": 7, "q4_0": 2, "q4_1": 3}[file_quant]
        for name, (kind, values) in _tensors(reader).items():
            ref = want[name].numpy()
            if ref.ndim == 1:  # norms stay F32, exactly
                assert kind == "F32" and np.array_equal(values, ref), name
                continue
            # the 4-bit files keep the output matrix at Q8_0 (DEFAULT_OUTPUT_QUANTS)
            want_kind = "Q8_0" if name == "output.weight" and file_quant in ("q4_0", "q4_1") else tname
            assert kind == want_kind, name
            quant = want_kind.lower()
            if quant == "f16":
                assert np.array_equal(values, ref.astype(np.float16).astype(np.float32)), name
                continue
            blocks = ref.reshape(-1, 32)
            err = np.abs(values.reshape(-1, 32) - blocks).max(axis=1)
            amax = np.abs(blocks).max(axis=1)
            spread = blocks.max(axis=1) - blocks.min(axis=1)
            # half a quantisation step per block (a whole one where Q4_0 clips at +7), plus the fp16
            # rounding of the block's scale (and minimum)
            step = {"q8_0": amax / 127, "q4_0": amax / 8, "q4_1": spread / 15}[quant]
            bound = step * {"q8_0": 0.5, "q4_0": 1.0, "q4_1": 0.5}[quant] + amax * 2.0**-10
            assert (err <= bound).all(), (name, float((err - bound).max()))


def test_adapter_file_layout_and_consistency_with_merged(assets, tmp_path):
    _, tok, _ = assets
    model = _lora(tiny_llama(), rank_pattern={"o_proj": 2}, alpha_pattern={"gate_proj": 3.0})
    out = export_gguf(model, tmp_path / "a.gguf", kind="adapter", progress=False)
    reader = _read(out)
    kv = _kv(reader)
    assert kv["general.type"] == "adapter" and kv["adapter.type"] == "lora" and kv["general.architecture"] == "llama"
    alpha = kv["adapter.lora.alpha"]
    assert alpha == pytest.approx(8.0)  # alpha / r of the first pair (q_proj: 8 / 4) times its rank
    got = _tensors(reader)
    names = {f"blk.{i}.{p}.weight.lora_{ab}" for i in range(2) for ab in "ab"
             for p in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate")}
    assert set(got) == names
    from deltatune.methods.lora import LoraLayer

    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraLayer)
    np.testing.assert_array_equal(got["blk.0.attn_q.weight.lora_a"][1], layer.lora_A["default"].weight.detach().numpy())
    np.testing.assert_array_equal(
        got["blk.0.attn_q.weight.lora_b"][1], _perm_ref(layer.lora_B["default"].weight.detach(), 4).numpy()
    )
    # what llama.cpp computes: base + alpha / rank * lora_b @ lora_a, equals the merged export
    base = _reference_gguf({k: v for k, v in tiny_llama().state_dict().items()})
    merged = _tensors(_read(export_gguf(model, tmp_path / "m.gguf", quant="f32", source_gguf=tok, progress=False)))
    for name in names:
        if not name.endswith("lora_a"):
            continue
        w = name[: -len(".lora_a")]
        a, b = got[name][1], got[f"{w}.lora_b"][1]
        rank = b.shape[1]
        np.testing.assert_allclose(base[w].numpy() + alpha / rank * (b @ a), merged[w][1], atol=1e-5, err_msg=w)
    assert got["blk.1.attn_output.weight.lora_a"][1].shape == (2, 64)


def test_adapter_f16_and_rslora(tmp_path):
    model = _lora(tiny_llama(), use_rslora=True, r=4, alpha=2)
    reader = _read(export_gguf(model, tmp_path / "a.gguf", kind="adapter", quant="f16", progress=False))
    kv, got = _kv(reader), _tensors(reader)
    # rsLoRA scales by alpha / sqrt(r) = 1: llama.cpp's alpha / rank must give the same
    assert kv["adapter.lora.alpha"] / 4 == pytest.approx(2 / math.sqrt(4))
    assert kv["general.file_type"] == 1
    B = model.model.layers[1].self_attn.v_proj.lora_B["default"].weight.detach().numpy()
    assert got["blk.1.attn_v.weight.lora_b"][0] == "F16"
    np.testing.assert_array_equal(got["blk.1.attn_v.weight.lora_b"][1], B.astype(np.float16).astype(np.float32))


def test_tokenizer_built_from_a_hugging_face_tokenizer(assets, tmp_path):
    """Without a source GGUF, the vocabulary comes from the HF tokenizer: here the fixture's vocabulary
    built with ``tokenizers``, so the fields must come back as the fixture's GGUF file holds them."""
    from tests.gguf_fixtures import hf_tokenizer

    _, tok, _ = assets
    tokenizer = hf_tokenizer()
    assert tokenizer.convert_ids_to_tokens(tokenizer("the")["input_ids"]) == ["t", "he"]  # merges in use
    kv = _kv(_read(export_gguf(tiny_llama(), tmp_path / "m.gguf", quant="f32", tokenizer=tokenizer, progress=False)))
    src = _kv(_read(tok))
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id"):
        assert kv[key] == src[key], key
    assert kv["tokenizer.ggml.pre"] == "default"


def test_word_level_tokenizer_is_refused(tmp_path):
    from transformers import AutoTokenizer

    from tests.recipe_fixtures import make_tiny_model_dir

    d = make_tiny_model_dir(tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(d)
    model = tiny_llama()
    with pytest.raises(DeltaConfigError, match=r"\(model 'WordLevel', pre-tokenizer 'WhitespaceSplit'\) cannot be "
                                               r"written to GGUF by deltatune; supported: byte-level BPE"):
        export_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer)
    assert not (tmp_path / "m.gguf").exists()


def test_tied_embeddings_write_no_output_tensor(assets, tmp_path):
    _, tok, _ = assets
    model = tiny_llama(tie=True)
    names = {t.name for t in _read(export_gguf(model, tmp_path / "t.gguf", quant="f32", source_gguf=tok,
                                                 progress=False)).tensors}
    assert "output.weight" not in names and "token_embd.weight" in names


def test_output_quant_keeps_the_output_matrix_at_its_own_type(assets, tmp_path):
    """The output matrix (token_embd when tied, else output.weight) gets output_quant, every other matrix
    quant; the 4-bit files default to Q8_0 for it; general.file_type stays that of quant."""
    _, tok, _ = assets
    cases = [  # (tie, quant, output_quant, the output tensor, its type, the other matrices' type)
        (True, "q8_0", "f32", "token_embd.weight", "F32", "Q8_0"),
        (True, "f16", "f32", "token_embd.weight", "F32", "F16"),
        (True, "q8_0", "f16", "token_embd.weight", "F16", "Q8_0"),
        (True, "q4_1", None, "token_embd.weight", "Q8_0", "Q4_1"),
        (True, "q4_0", None, "token_embd.weight", "Q8_0", "Q4_0"),
        (True, "q4_1", "q4_1", "token_embd.weight", "Q4_1", "Q4_1"),
        (True, "q8_0", None, "token_embd.weight", "Q8_0", "Q8_0"),
        (False, "f16", "f32", "output.weight", "F32", "F16"),
        (False, "q4_0", None, "output.weight", "Q8_0", "Q4_0"),
    ]
    for i, (tie, quant, output_quant, out_name, out_type, rest_type) in enumerate(cases):
        model = _lora(tiny_llama(tie=tie))
        want = _reference_gguf(_merged_reference(model))
        reader = _read(export_gguf(model, tmp_path / f"{i}.gguf", quant=quant, output_quant=output_quant,
                                   source_gguf=tok, progress=False))
        assert _kv(reader)["general.file_type"] == {"f16": 1, "q8_0": 7, "q4_0": 2, "q4_1": 3}[quant]
        got = _tensors(reader)
        assert ("output.weight" in got) == (not tie)
        for name, (kind, values) in got.items():
            ref = want[name].numpy()
            expected = out_type if name == out_name else "F32" if ref.ndim == 1 else rest_type
            assert kind == expected, (i, name, kind)
            if kind == "F32":
                assert np.array_equal(values, ref), (i, name)
            elif kind == "F16":
                assert np.array_equal(values, ref.astype(np.float16).astype(np.float32)), (i, name)
            elif kind == "Q8_0" and name == out_name:  # within half a step of its block (plus the F16 rounding of the scale)
                blocks, err = ref.reshape(-1, 32), np.abs(values - ref).reshape(-1, 32).max(axis=1)
                amax = np.abs(blocks).max(axis=1)
                assert (err <= amax / 127 * 0.5 + amax * 2.0**-10).all(), (i, name)


# --------------------------------------------------------------------------------------------------
# errors: named, listing what is supported, and nothing written


def _empty(d: Path) -> bool:
    return not any(d.iterdir())


def test_errors_before_any_write(assets, tmp_path):
    from tests.tiny_models import gpt2

    _, tok, _ = assets
    out = tmp_path / "out"
    out.mkdir()
    target = out / "x.gguf"
    ia3 = dt.apply(tiny_llama(), dt.IA3Config())
    cases = [
        (lambda: export_gguf(ia3, target, kind="adapter"),
         r"kind='adapter' exports LoRA adapters only \(the adapter type llama.cpp loads\); adapter 'default' is 'ia3'"),
        (lambda: export_gguf(gpt2(), target, source_gguf=tok),
         r"model architecture 'gpt2' \(GPT2LMHeadModel\) cannot be exported to GGUF; supported: llama "
         r"\(Hugging Face model_type 'llama'\)"),
        (lambda: export_gguf(tiny_llama(), target, quant="q5_k", source_gguf=tok),
         r"quant must be one of 'f32', 'f16', 'q8_0', 'q4_0', 'q4_1' for kind='merged', got 'q5_k'"),
        (lambda: export_gguf(_lora(tiny_llama()), target, kind="adapter", quant="q8_0"),
         r"quant must be one of 'f32', 'f16' for kind='adapter', got 'q8_0'"),
        (lambda: export_gguf(tiny_llama(), target, kind="lora"),
         r"kind must be one of 'adapter', 'merged', got 'lora'"),
        (lambda: export_gguf(tiny_llama(), target),
         r"kind='merged' needs a tokenizer: pass source_gguf=PATH \(a GGUF file to copy it from\) or "
         r"tokenizer=TOKENIZER"),
        (lambda: export_gguf(tiny_llama(), target, kind="adapter"),
         r"kind='adapter' needs a model with a LoRA adapter; the model has no adapter"),
        (lambda: export_gguf(_lora(tiny_llama(), use_dora=True), target, kind="adapter"),
         r"adapter 'default' is DoRA \(use_dora=True\), which llama.cpp's LoRA adapters do not support"),
        (lambda: export_gguf(dt.apply(tiny_llama(), dt.PrefixConfig(prefix_token_num=2, mid_dim=8)), target, source_gguf=tok),
         r"adapter 'default' \('prefix'\) cannot be merged into the weights"),
        (lambda: export_gguf(tiny_llama(), out, source_gguf=tok),
         r"path must be a file path, got .* which is a directory"),
        (lambda: export_gguf(tiny_llama(), target, quant="q8_0", output_quant="q6_k", source_gguf=tok),
         r"output_quant must be one of 'f32', 'f16', 'q8_0', 'q4_0', 'q4_1' for kind='merged', got 'q6_k'"),
        (lambda: export_gguf(_lora(tiny_llama()), target, kind="adapter", output_quant="f32"),
         r"output_quant is used with kind='merged' only \(an adapter has no output matrix\), got 'f32'"),
    ]
    for call, match in cases:
        with pytest.raises(DeltaConfigError, match=match):
            call()
        assert _empty(out), match


def test_source_gguf_must_fit(assets, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok, _ = assets
    small = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, vocab_size=100)).eval()
    with pytest.raises(DeltaConfigError, match=rf"has {len(tokens())} tokens but the model's embedding has 100 rows"):
        export_gguf(small, tmp_path / "x.gguf", source_gguf=tok)
    w = gguf.GGUFWriter(tmp_path / "gpt2.gguf", "gpt2")
    w.add_token_list(tokens())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(DeltaConfigError, match=r"has general.architecture 'gpt2', but the model is 'llama'"):
        export_gguf(tiny_llama(), tmp_path / "x.gguf", source_gguf=tmp_path / "gpt2.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_a_crash_mid_write_leaves_the_old_file_and_no_temp(assets, tmp_path, monkeypatch):
    _, tok, _ = assets
    target = tmp_path / "m.gguf"
    target.write_bytes(b"old contents")

    def boom(data, qtype):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(gguf.quants, "quantize", boom)
    with pytest.raises(RuntimeError, match=r"disk full \(simulated\)"):
        export_gguf(tiny_llama(), target, quant="q8_0", source_gguf=tok, progress=False)
    assert target.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


# --------------------------------------------------------------------------------------------------
# recipe option and CLI


def test_export_spec_validation():
    assert ExportSpec("merged").quant == "f16" and ExportSpec("adapter").quant == "f32"
    with pytest.raises(DeltaConfigError, match=r"export.gguf must be one of 'adapter', 'merged', got 'full'"):
        ExportSpec("full")
    with pytest.raises(DeltaConfigError, match=r"export.quant must be one of 'f32', 'f16' for kind='adapter', got 'q4_0'"):
        ExportSpec("adapter", "q4_0")
    with pytest.raises(DeltaConfigError, match=r"export.quant needs export.gguf \(adapter or merged\), got quant 'q8_0' alone"):
        ExportSpec(None, "q8_0")
    assert ExportSpec("merged", "q8_0", "f16").output_quant == "f16" and ExportSpec("merged").output_quant is None
    with pytest.raises(DeltaConfigError, match=r"^export.output_quant needs export.gguf \(adapter or merged\), got "
                                               r"output_quant 'f16' alone$"):
        ExportSpec(None, None, "f16")
    with pytest.raises(DeltaConfigError, match=r"^export.output_quant is used with gguf 'merged' only \(an adapter has "
                                               r"no output matrix\), got output_quant 'f32' with gguf 'adapter'$"):
        ExportSpec("adapter", None, "f32")
    with pytest.raises(DeltaConfigError, match=r"^export.output_quant must be one of 'f32', 'f16', 'q8_0', 'q4_0', "
                                               r"'q4_1' for kind='merged', got 'q6_k'"):
        ExportSpec("merged", "q8_0", "q6_k")


def test_recipe_adapter_export_needs_lora(assets, tmp_path):
    from deltatune.recipes import load_recipe
    from tests.recipe_fixtures import recipe_dict

    _, _, base = assets
    raw = recipe_dict(base, tmp_path, tmp_path / "run", delta={"method": "ia3"}, export={"gguf": "adapter"})
    with pytest.raises(DeltaConfigError, match=r"export.gguf 'adapter' writes a llama.cpp LoRA adapter and needs "
                                               r"delta.method 'lora', got 'ia3'; use export.gguf: merged"):
        load_recipe(raw, check_data=False)
    raw = recipe_dict(base, tmp_path, tmp_path / "run", export={"gguf": "merged", "level": 3})
    with pytest.raises(DeltaConfigError, match=r"unknown key\(s\) 'export.level' in recipe section 'export'"):
        load_recipe(raw, check_data=False)


def test_run_leaves_a_gguf_file_and_cli_exports_the_adapter(assets, tmp_path, monkeypatch, capsys):
    """GGUF in, GGUF out: a recipe on the GGUF base writes model.q8_0.gguf; `deltatune export-gguf`
    then writes the run's LoRA adapter."""
    from deltatune.cli import main
    from deltatune.methods.lora import LoraLayer
    from tests.recipe_fixtures import recipe_dict, write_e2e_data, write_recipe

    root, _, base = assets
    monkeypatch.setenv("DELTATUNE_CACHE", str(root / "cache-env"))
    data = write_e2e_data(tmp_path / "data")
    run = tmp_path / "run"
    raw = recipe_dict(base, data, run, export={"gguf": "merged", "quant": "q8_0", "output_quant": "f16"},
                      train={"max_steps": 2, "eval_every": 2}, generate={"num_beams": 1})
    cfg = write_recipe(tmp_path / "r.yaml", raw)
    assert main(["run", str(cfg), "--no-progress"]) == 0, capsys.readouterr().err
    merged = _read(run / "model.q8_0.gguf")
    assert _kv(merged)["general.file_type"] == 7 and _kv(merged)["general.name"] == "tiny-test"
    assert {t.name for t in merged.tensors} == {t.name for t in _read(base).tensors}
    out_name = "output.weight" if "output.weight" in _tensors(merged) else "token_embd.weight"
    kinds = {name: kind for name, (kind, _) in _tensors(merged).items()}
    assert kinds[out_name] == "F16" and kinds["blk.0.attn_q.weight"] == "Q8_0"  # the recipe's output_quant

    # the CLI's --output-quant: the same run exported again, the output matrix at F32
    assert main(["export-gguf", str(run), "--kind", "merged", "--quant", "q8_0", "--output-quant", "f32",
                 "--out", str(tmp_path / "out32.gguf"), "--no-progress"]) == 0
    kinds = {name: kind for name, (kind, _) in _tensors(_read(tmp_path / "out32.gguf")).items()}
    assert kinds[out_name] == "F32" and kinds["blk.0.attn_q.weight"] == "Q8_0"

    capsys.readouterr()
    assert main(["export-gguf", str(run), "--kind", "adapter", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"written: {run / 'adapter.f32.gguf'}" in out
    got = _tensors(_read(run / "adapter.f32.gguf"))
    model, _ = load(base, cache_dir=root / "cache")
    model = dt.apply(model, dt.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    dt.load_delta(model, run / "delta")
    layer = model.model.layers[1].self_attn.v_proj
    assert isinstance(layer, LoraLayer)
    np.testing.assert_array_equal(got["blk.1.attn_v.weight.lora_b"][1], layer.lora_B["default"].weight.detach().numpy())
    assert set(got) == {f"blk.{i}.attn_{p}.weight.lora_{ab}" for i in range(2) for p in "qv" for ab in "ab"}

    code = main(["export-gguf", str(tmp_path), "--kind", "merged"])
    assert code == 2
    assert f"RUN_DIR must be a run directory holding config.yaml, got {str(tmp_path)!r}" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# the real llama.cpp (llama-cpp-python; scripts/build_llama_cpp.sh builds and caches it)

FIXTURE_TEXT = (
    "the history of the town began in the early years of the century . the river runs through the "
    "centre and the old bridge was built of stone . in the summer the market is open on saturday and "
    "people come from the villages around . the church on the hill is the oldest building in the town ."
)
PROMPTS = [" ".join(FIXTURE_TEXT.split()[:k]) for k in (3, 8, 15)]


@pytest.fixture(scope="module")
def llama_cpp_mod():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (scripts/build_llama_cpp.sh)")


@pytest.fixture(scope="module")
def cpp_files(assets, llama_cpp_mod, tmp_path_factory):
    """A tiny Llama that has learnt FIXTURE_TEXT (a random model's argmax over near-equal logits would
    make greedy decoding a coin toss; this one continues the prompts with clear margins), its output
    norm scaled by 1/3 so its logits stay within about +-5: the absolute tolerance of 1e-2 then asks
    for about 2e-3 relative agreement, what F16 weights and arithmetic allow. It goes through the GGUF
    round trip users take (F32 GGUF -> deltatune.models.load), gets a LoRA adapter with random B, and is
    exported as base F16, merged F16, merged Q8_0, adapter F32, merged F32 and merged F16 with an F32
    output matrix (base F32 is the file it was loaded from)."""
    from tests.gguf_fixtures import hf_tokenizer

    root, tok, _ = assets
    d = tmp_path_factory.mktemp("cpp")
    tokenizer = hf_tokenizer()
    model = tiny_llama(std=0.1, seed=3)
    ids = torch.tensor([tokenizer(FIXTURE_TEXT)["input_ids"]])
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(40):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        model.model.norm.weight.mul_(1 / 3)
    model.eval()
    base_gguf = export_gguf(model, d / "base-f32.gguf", quant="f32", source_gguf=tok, progress=False)
    model, _ = load(base_gguf, cache_dir=root / "cache")
    files = {"base": export_gguf(model, d / "base-f16.gguf", quant="f16", progress=False)}
    _lora(model, r=4, alpha=1)
    files["merged"] = export_gguf(model, d / "merged-f16.gguf", quant="f16", progress=False)
    files["q8_0"] = export_gguf(model, d / "merged-q8_0.gguf", quant="q8_0", progress=False)
    files["adapter"] = export_gguf(model, d / "adapter.gguf", kind="adapter", progress=False)
    files["f32"] = export_gguf(model, d / "merged-f32.gguf", quant="f32", progress=False)
    files["f16_out32"] = export_gguf(model, d / "merged-f16-out32.gguf", quant="f16", output_quant="f32", progress=False)
    files["base_f32"] = base_gguf
    merged = dt.merge_and_unload(model)
    return files, merged, tokenizer


def _cpp(path: Path, lora: Path | None = None, kv_cache: str = "f16"):
    return llama_cpp_model(path, lora=lora, n_ctx=256, n_threads=2, kv_cache=kv_cache)


def test_perplexity_helper_equals_cross_entropy():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, vocab_size=50)).eval()
    ids = torch.randint(0, 50, (23,)).tolist()
    with torch.no_grad():  # windows of 10, 10 and 3 tokens, each from a fresh context
        nll = [torch.nn.functional.cross_entropy(model(input_ids=torch.tensor([c])).logits[0, :-1],
                                                 torch.tensor(c[1:]), reduction="sum")
               for c in (ids[:10], ids[10:20], ids[20:])]
    want = math.exp(float(sum(nll)) / (9 + 9 + 2))
    assert perplexity(lambda c: torch_logits(model, c), ids, 10) == pytest.approx(want, rel=1e-6)
    with pytest.raises(DeltaConfigError, match=r"window must be at least 2 tokens, got 1"):
        perplexity(lambda c: torch_logits(model, c), ids, 1)


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


def test_f16_matmuls_rounds_weights_and_linear_inputs_and_restores():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 5)
    x = torch.randn(3, 8) * 3
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    assert not torch.equal(_f16(w), w) and not torch.equal(_f16(x), x)
    with torch.no_grad():
        with f16_matmuls(lin):  # the 1-D bias stays float32, as llama.cpp keeps it
            assert torch.equal(lin(x), torch.nn.functional.linear(_f16(x), _f16(w), b))
        with f16_matmuls(lin, activations=False):
            assert torch.equal(lin(x), torch.nn.functional.linear(x, _f16(w), b))
        with f16_matmuls(lin, weights=False):
            assert torch.equal(lin(x), torch.nn.functional.linear(_f16(x), w, b))
        assert torch.equal(lin.weight, w) and torch.equal(lin(x), torch.nn.functional.linear(x, w, b))
    # a whole model: weights rounded once (tied embeddings included) and restored bit for bit after
    model = tiny_llama(tie=True)
    ids = [5, 9, 3, 7]
    before = torch_logits(model, ids)
    rounded = tiny_llama(tie=True)
    with torch.no_grad():
        for p in rounded.parameters():
            if p.ndim == 2:
                p.copy_(_f16(p))
    with f16_matmuls(model, activations=False):
        assert np.array_equal(torch_logits(model, ids), torch_logits(rounded, ids))
    with f16_matmuls(model):
        assert not np.array_equal(torch_logits(model, ids), torch_logits(rounded, ids))
    assert np.array_equal(torch_logits(model, ids), before)


def test_llama_cpp_model_checks_kv_cache_first(tmp_path):
    with pytest.raises(DeltaConfigError, match=r"kv_cache must be one of 'f32', 'f16', got 'q8_0'"):
        llama_cpp_model(tmp_path / "none.gguf", kv_cache="q8_0")


@pytest.mark.slow
def test_llama_cpp_f32_export_equals_pytorch(cpp_files, llama_cpp_mod):
    """The exporter itself adds nothing: the F32 file with an F32 KV cache gives PyTorch's logits to
    float32 accumulation order, and base F32 + adapter gives the merged F32 file's; what the F16 checks
    below allow for is the F16 format and arithmetic."""
    files, merged, tokenizer = cpp_files
    f32 = _cpp(files["f32"], kv_cache="f32")
    with_lora = _cpp(files["base_f32"], lora=files["adapter"], kv_cache="f32")
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        ref = torch_logits(merged, ids)
        a, b = llama_cpp_logits(f32, ids), llama_cpp_logits(with_lora, ids)
        print(f"merged F32 vs PyTorch {np.abs(a - ref).max():.2e}; base F32 + adapter vs merged F32 {np.abs(a - b).max():.2e}")
        assert np.abs(a - ref).max() <= 1e-4, prompt
        assert np.abs(a - b).max() <= 1e-4, prompt


@pytest.mark.slow
def test_llama_cpp_runs_an_f16_file_with_an_f32_output_matrix(cpp_files, llama_cpp_mod):
    files, merged, tokenizer = cpp_files
    llm = _cpp(files["f16_out32"])
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        diff = np.abs(llama_cpp_logits(llm, ids) - torch_logits(merged, ids)).max()
        print(f"merged F16, output F32 vs PyTorch: max |logit diff| {diff:.2e}")
        assert diff <= 1e-2, (prompt, diff)
        assert llama_cpp_greedy(llm, ids, 32) == torch_greedy(merged, ids, 32), prompt


@pytest.mark.slow
def test_llama_cpp_merged_f16_matches_pytorch(cpp_files, llama_cpp_mod):
    files, merged, tokenizer = cpp_files
    llm = _cpp(files["merged"])
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        ref = torch_logits(merged, ids)
        diff = np.abs(llama_cpp_logits(llm, ids) - ref).max()
        print(f"merged F16 vs PyTorch: max |logit diff| {diff:.2e} (max |logit| {np.abs(ref).max():.2f})")
        assert diff <= 1e-2, (prompt, diff)
        assert llama_cpp_greedy(llm, ids, 32) == torch_greedy(merged, ids, 32), prompt


@pytest.mark.slow
def test_llama_cpp_base_plus_adapter_matches_merged(cpp_files, llama_cpp_mod):
    files, _, tokenizer = cpp_files
    with_lora = _cpp(files["base"], lora=files["adapter"])
    merged = _cpp(files["merged"])
    plain = _cpp(files["base"])
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        a, b = llama_cpp_logits(with_lora, ids), llama_cpp_logits(merged, ids)
        print(f"base F16 + adapter vs merged F16: max |logit diff| {np.abs(a - b).max():.2e}")
        assert np.abs(a - b).max() <= 1e-2, prompt
        # the adapter does change the outputs (a file llama.cpp ignored would pass the check above only
        # if the delta were below the tolerance)
        assert np.abs(llama_cpp_logits(plain, ids) - b).max() > 0.05, prompt


@pytest.mark.slow
def test_llama_cpp_q8_0_greedy_and_perplexity(cpp_files, llama_cpp_mod):
    files, _, tokenizer = cpp_files
    f16, q8 = _cpp(files["merged"]), _cpp(files["q8_0"])
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        assert llama_cpp_greedy(q8, ids, 32) == llama_cpp_greedy(f16, ids, 32), prompt
    ids = tokenizer(FIXTURE_TEXT)["input_ids"]
    ppl_f16 = perplexity(lambda c: llama_cpp_logits(f16, c), ids, 128)
    ppl_q8 = perplexity(lambda c: llama_cpp_logits(q8, c), ids, 128)
    print(f"perplexity F16 {ppl_f16:.4f}, Q8_0 {ppl_q8:.4f} (ratio {ppl_q8 / ppl_f16:.4f})")
    assert abs(ppl_q8 / ppl_f16 - 1) <= 0.01, (ppl_f16, ppl_q8)
