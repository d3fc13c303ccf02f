"""Loading the real GGUF models: SmolLM2-135M-Instruct Q4_1 (llama) and Gemma 3 270M Q4_K_M (gemma3).

Reference facts (llama.cpp via llama-cpp-python 0.3.36, measured once, not available in CI):
  * On F32 copies of both files (same metadata, tensors dequantized with ``gguf``), llama.cpp's
    logits equal ours (compute='float32') to max |diff| 0.021 (SmolLM2) / 0.022 (Gemma) over five
    prompts, correlation 1.000000, and its greedy continuations are token-for-token ours.
  * On the quantized files themselves llama.cpp quantizes activations to 8 bits inside its
    quantized matmuls, so it differs from exact dequantization by max |diff| ~1.4 (SmolLM2) /
    ~1.8 (Gemma) at correlation >= 0.9986; the next token after each prompt still agrees (checked
    below when llama_cpp is importable).
"""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx
from gguf.quants import dequantize as gguf_dequantize

from mlxllm.errors import UserError
from mlxllm.formats.loader import describe_model, load, load_model
from mlxllm.formats import gguf as gguf_loader

# Token ids from llama.cpp's tokenizer (also what mlxllm.tokenize produces: checked below).
SMOL_PROMPTS = {
    "The capital of France is": [504, 3575, 282, 4649, 314],
    "Water boils at a temperature of": [12615, 36411, 418, 253, 2779, 282],
}
GEMMA_PROMPTS = {
    "The Eiffel Tower is located in the city of": [2, 818, 94648, 25822, 563, 5628, 528, 506, 3207, 529],
    "The capital of France is": [2, 818, 5279, 529, 7001, 563],
}
# Greedy continuations llama.cpp generates from F32 copies of the files (llm.generate, top_k=1).
SMOL_PARIS = [7042, 30, 198, 198, 504, 2988, 314, 42, 216, 34]  # " Paris.\n\nThe answer is: 2"
# " Paris, France. It is the tallest building in"
GEMMA_PARIS = [9079, 236764, 7001, 236761, 1030, 563, 506, 92900, 3788, 528]
SMOL_WATER = [1130, 216, 33, 28, 32, 32, 32, 4742, 51, 28]  # " around 1,000°C,"


def greedy(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens through the KV cache, one mx.eval per step."""
    cache = model.make_cache()
    logits = model(mx.array([ids]), cache=cache)
    out = []
    for _ in range(n):
        token = mx.argmax(logits[0, -1])
        mx.eval(token)
        out.append(token.item())
        logits = model(token.reshape(1, 1), cache=cache)
    return out


def logits_of(model, ids: list[int]) -> np.ndarray:
    return np.array(model(mx.array([ids])).astype(mx.float32))[0]


def test_smollm2_says_paris(smollm2):
    assert greedy(smollm2, SMOL_PROMPTS["The capital of France is"], 10) == SMOL_PARIS


def test_gemma3_says_paris(gemma3):
    assert greedy(gemma3, GEMMA_PROMPTS["The Eiffel Tower is located in the city of"], 10) == GEMMA_PARIS


def test_load_returns_the_tokenizer(smollm2_path):
    model, tokenizer = load(smollm2_path, compute="native")
    for text, ids in SMOL_PROMPTS.items():
        assert tokenizer.encode(text) == ids
    assert tokenizer.decode(SMOL_PARIS).startswith(" Paris.")
    assert model.load_report.target == "native" and model.compute_path == str(model.load_report)


def test_gemma3_tokenizer_ids(gemma3_path):
    from mlxllm.tokenize import Tokenizer, read_gguf_tokenizer_metadata

    tokenizer = Tokenizer.from_gguf_metadata(read_gguf_tokenizer_metadata(gemma3_path))
    for text, ids in GEMMA_PROMPTS.items():
        assert tokenizer.encode(text) == ids
    assert tokenizer.decode(GEMMA_PARIS).startswith(" Paris, France.")


def test_gemma3_config_from_gguf(gemma3):
    cfg = gemma3.config
    assert (cfg.head_dim, cfg.query_pre_attn_scalar) == (256, 256)
    assert (cfg.sliding_window, cfg.rope_local_base_freq) == (512, 10000.0)
    assert [i for i in range(18) if not cfg.is_sliding(i)] == [5, 11, 17]
    assert cfg.tie_word_embeddings and "lm_head" not in gemma3


def test_rope_unpermute_is_needed(smollm2, smollm2_path, monkeypatch):
    """Skipping the Q/K un-permutation leaves position 0 intact (RoPE is the identity there) but
    breaks every later position: the completion goes wrong while the real path matches llama.cpp."""
    ids = SMOL_PROMPTS["Water boils at a temperature of"]
    monkeypatch.setattr(gguf_loader, "_unpermute_qk", lambda rows, n_heads: rows)
    broken = load_model(smollm2_path, compute="float32")
    good, bad = logits_of(smollm2, ids), logits_of(broken, ids)
    np.testing.assert_allclose(good[0], bad[0], atol=1e-4)
    assert np.abs(good[1:] - bad[1:]).max() > 3
    assert min(np.corrcoef(good[i], bad[i])[0, 1] for i in range(1, len(ids))) < 0.97

    assert greedy(smollm2, ids, 10) == SMOL_WATER
    assert greedy(broken, ids, 10) != SMOL_WATER


@pytest.mark.parametrize(
    "which, names",
    [
        ("smollm2", ["token_embd.weight", "blk.0.ffn_down.weight", "blk.3.attn_v.weight"]),  # Q8_0, Q4_1
        # Q4_K, Q6_K, Q5_0, Q8_0
        ("gemma3", ["blk.0.attn_output.weight", "blk.0.ffn_down.weight", "blk.0.ffn_gate.weight",
                    "blk.0.attn_v.weight"]),
    ],
)
def test_decoding_equals_gguf_dequantize(which, names, request):
    """Our float32 values equal the gguf package's own dequantization, bit for bit, per block type."""
    source = gguf_loader.GGUFSource(request.getfixturevalue(f"{which}_path"))
    by_name = {t.name: t for t in source.file.tensors}
    for name in names:
        t = by_name[name]
        raw = source.raw(t)
        value = source._decode(t, raw)
        ours = np.array(value.dequantize() if isinstance(value, gguf_loader.Quantized) else value)
        reference = gguf_dequantize(raw, t.qtype).reshape(t.shape)
        np.testing.assert_array_equal(ours, reference, err_msg=f"{name} {t.qtype.name}")


def test_native_triples_equal_mx_load(smollm2_path):
    """Q4_1/Q8_0 repacked by us are exactly the triples mx.load makes (where mx.load can read the file)."""
    reference = mx.load(str(smollm2_path))
    source = gguf_loader.GGUFSource(smollm2_path)
    for t in source.file.tensors:
        if t.name not in ("token_embd.weight", "blk.0.ffn_up.weight", "blk.7.attn_output.weight"):
            continue
        value = source._decode(t, source.raw(t))
        stem = t.name[: -len(".weight")]
        for ours, key in ((value.weight, t.name), (value.scales, f"{stem}.scales"), (value.biases, f"{stem}.biases")):
            assert ours.dtype == reference[key].dtype and mx.array_equal(ours, reference[key]).item(), key


def test_native_path_keeps_quantized_weights(smollm2_path, smollm2):
    """'native' keeps the file's 4/8-bit triples; they hold exactly the float32 path's weights.
    (No forward pass: float16 quantized matmuls take ~20 s for 5 tokens on the CPU backend.)"""
    native = load_model(smollm2_path, compute="native")
    for module, bits in ((native.model.layers[2].mlp.down_proj, 4), (native.model.embed_tokens, 8)):
        assert module.bits == bits and module.group_size == 32 and module.scales.dtype == mx.float16
    for name in ("mlp.down_proj", "self_attn.q_proj"):
        q = native.model.layers[2][name.split(".")[0]][name.split(".")[1]]
        dense = smollm2.model.layers[2][name.split(".")[0]][name.split(".")[1]].weight
        restored = gguf_loader.Quantized(q.weight, q.scales, q.biases, q.group_size, q.bits).dequantize()
        assert mx.array_equal(restored, dense).item(), name


def test_low_memory_keeps_weights_quantized(smollm2_path, smollm2, monkeypatch):
    """'auto' on the CPU dequantizes to float32 only when that fits; else quantized + float32 scales."""
    facts = describe_model(smollm2_path)
    need = facts["memory_needed_bytes"]
    assert need["quantized"] < need["float32"]
    monkeypatch.setattr("mlxllm.backend.device_memory", lambda: (need["quantized"] + need["float32"]) // 2)
    model = load_model(smollm2_path)
    assert model.load_report.target == "quantized" and "would not fit" in model.compute_path
    assert model.model.layers[0].mlp.down_proj.scales.dtype == mx.float32
    ids = SMOL_PROMPTS["The capital of France is"]
    np.testing.assert_allclose(logits_of(model, ids), logits_of(smollm2, ids), atol=2e-3)
    monkeypatch.setattr("mlxllm.backend.device_memory", lambda: need["quantized"] // 2)
    with pytest.raises(UserError, match=r"needs about .* GiB .* only .* GiB"):
        load_model(smollm2_path)


def test_describe_model(smollm2_path, gemma3_path):
    smol = describe_model(smollm2_path)
    assert smol["architecture"] == "llama" and smol["parameters"] == 134_515_008
    assert smol["context_length"] == 8192 and smol["compute_auto"] == "float32"
    assert {k: v["tensors"] for k, v in smol["tensor_types"].items()} == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    gemma = describe_model(gemma3_path)
    assert gemma["family"] == "gemma3_text" and gemma["parameters"] == 268_098_176
    assert set(gemma["tensor_types"]) == {"F32", "Q5_0", "Q4_K", "Q6_K", "Q8_0"}
    assert gemma["memory_needed_bytes"]["float32"] > 4 * gemma["parameters"]


@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_agrees_with_llama_cpp(which, request):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    path = request.getfixturevalue(f"{which}_path")
    model = request.getfixturevalue(which)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=1)
    prompts = ["The capital of France is", "Water boils at a temperature of", "def fibonacci(n):\n    if n <",
               "In 1492, Christopher Columbus", "The Eiffel Tower is located in the city of"]  # fmt: skip
    for prompt in prompts:
        ids = llm.tokenize(prompt.encode(), add_bos=True, special=False)
        llm.reset()
        llm.eval(ids)
        ref = np.array(llm.scores[: len(ids)], dtype=np.float32)
        ours = logits_of(model, ids)
        assert ours[-1].argmax() == ref[-1].argmax(), prompt
        assert min(np.corrcoef(ours[i], ref[i])[0, 1] for i in range(len(ids))) > 0.995, prompt
        assert np.abs(ours - ref).max() < 2.5, prompt
